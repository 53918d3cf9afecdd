"""Loaders: shards -> augmented, normalised GPU batches with targets looked up by slice_id.

    from spinestream.engine.loader import LoaderConfig, build_loader, select, LabelTable
    sel = select("shards-512", cohorts=["boxed", "negative"], exclude_folds=[0])
    loader = build_loader(sel, LabelTable.load("shards-512"), LoaderConfig(), device="cuda")
    for batch in loader: ...   # one epoch of Batch(images, targets, slice_ids, valid)

Backends, one per file behind the same interface (:class:`spinestream.engine.loader.base.Loader`):
``dali`` (GPU decode + GPU augmentation; DALI's CPU-only mode without a GPU) and ``torch``
(DataLoader workers + torch augmentation on the batch). ``backend: auto`` picks DALI when
it is installed. Both read samples by ``.idx`` offset in one global permutation per epoch
(the guarantees are in :mod:`spinestream.engine.loader.base`); ``loader.dali_reader: webdataset`` is the
legacy DALI reader, kept for the loader benchmark's before/after line only.
"""
from __future__ import annotations

import importlib.util
import sys

from spinestream import SpinestreamError

from .base import Batch, Loader
from .config import AugmentConfig, LoaderConfig
from .data import LabelTable, Selection, select

__all__ = ["AugmentConfig", "Batch", "LabelTable", "Loader", "LoaderConfig", "Selection", "build_loader",
           "dali_available", "select"]


class BackendUnavailable(SpinestreamError, RuntimeError):
    """``loader.backend`` names a backend this installation lacks (the message names the extra to install)."""


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def build_loader(sel: Selection, labels: LabelTable, cfg: LoaderConfig, *, device="cpu", rank: int = 0,
                 world: int = 1, train: bool = True) -> Loader:
    """The configured backend (``auto``: DALI if installed, else torch with a one-line notice)."""
    backend = cfg.backend
    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
        if backend == "torch":
            print("spinestream: nvidia-dali is not installed; using the torch loader "
                  "(pip install -e '.[dali-cu12]' or '.[dali-cu13]' for the DALI one)", file=sys.stderr)
    if backend == "dali":
        if not dali_available():
            raise BackendUnavailable("loader.backend=dali but nvidia-dali is not installed "
                                     "(pip install -e '.[dali-cu13]', or '.[dali-cu12]' for Pascal/CUDA 12)")
        if cfg.dali_reader == "webdataset":  # legacy, no cross-shard mix: for the benchmark's before line
            from .dali_webdataset import DaliWebdatasetLoader as DaliLoader
        else:
            from .dali_backend import DaliLoader

        return DaliLoader(sel, labels, cfg, device=device, rank=rank, world=world, train=train)
    from .torch_backend import TorchLoader

    return TorchLoader(sel, labels, cfg, device=device, rank=rank, world=world, train=train)
