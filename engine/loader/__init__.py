"""Loaders: shards -> augmented, normalised GPU batches with targets looked up by slice_id.

    from spinestream.engine.loader import DeviceLabels, LoaderConfig, build_loader, select
    sel = select("shards-512", cohorts=["boxed", "negative"], exclude_folds=[0])
    loader = build_loader(sel, DeviceLabels.load("shards-512"), LoaderConfig(), device="cuda")
    for batch in loader: ...   # one epoch of Batch(images, targets, slice_ids, valid)

Backends, one per file behind the same interface (:class:`spinestream.engine.loader.base.Loader`):
``dali`` (GPU decode + GPU augmentation; DALI's CPU-only mode without a GPU) and ``torch``
(DataLoader workers + torch augmentation on the batch). ``backend: auto`` picks DALI when
it is installed. Both read samples by ``.idx`` offset in one global permutation per epoch
(the guarantees are in :mod:`spinestream.engine.loader.base`), through
:class:`spinestream.shards.wds.RecordReader`. What they read: :mod:`.selection` (shard groups
chosen through the manifest) and :mod:`.labels` (the targets, on the device). The legacy DALI
reader (``loader.dali_reader: webdataset``) is not here: only the loader benchmark builds it
(benchmarks/dali_webdataset.py).
"""
from __future__ import annotations

import importlib.util
import sys

from spinestream import SpinestreamError

from .base import Batch, Loader
from .config import AugmentConfig, LoaderConfig
from .labels import DeviceLabels
from .selection import Selection, oversample_positives, select

__all__ = ["AugmentConfig", "Batch", "DeviceLabels", "Loader", "LoaderConfig", "Selection", "build_loader",
           "dali_available", "oversample_positives", "select"]


class BackendUnavailable(SpinestreamError, RuntimeError):
    """``loader.backend`` names a backend this installation lacks (the message names the extra to install)."""


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def build_loader(sel: Selection, labels: DeviceLabels, cfg: LoaderConfig, *, device="cpu", rank: int = 0,
                 world: int = 1, train: bool = True) -> Loader:
    """The configured backend (``auto``: DALI if installed, else torch with a one-line notice). The legacy
    DALI reader is refused: it does not mix across shards and only ``bench loader`` builds it."""
    backend = cfg.backend
    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
        if backend == "torch":
            print("spinestream: nvidia-dali is not installed; using the torch loader "
                  "(pip install -e '.[dali-cu12]' or '.[dali-cu13]' for the DALI one)", file=sys.stderr)
    if backend == "dali":
        if cfg.dali_reader == "webdataset":
            raise ValueError("loader.dali_reader=webdataset: the legacy DALI reader does not mix across shards "
                             "and is kept only for `spinestream bench loader`; use loader.dali_reader=index")
        if not dali_available():
            raise BackendUnavailable("loader.backend=dali but nvidia-dali is not installed "
                                     "(pip install -e '.[dali-cu13]', or '.[dali-cu12]' for Pascal/CUDA 12)")
        from .dali_backend import DaliLoader

        return DaliLoader(sel, labels, cfg, device=device, rank=rank, world=world, train=train)
    from .torch_backend import TorchLoader

    return TorchLoader(sel, labels, cfg, device=device, rank=rank, world=world, train=train)
