"""A reference reader for the tests: whole studies in slice order (head to feet) from the Zarr
volumes, built sample by sample on the CPU. Production reads studies with
:mod:`spinestream.engine.infer` (batched, on the device); tests/test_infer.py checks it against
this reader, and tests/test_loader.py checks this reader against the training loader.

Each sample is built with ``spinestream.shards.sample.sample_image`` — the function the shard writer
used — then resized and normalised like the training loader with augmentation off, so
it equals (up to JPEG error) what the model saw in training.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from spinestream import InputError
from spinestream.engine.loader.augment import normalize
from spinestream.engine.loader.config import LoaderConfig, torch_dtype
from spinestream.shards.layout import Layout
from spinestream.shards.manifest import read_manifest
from spinestream.shards.sample import neighbour_index, sample_image
from spinestream.shards.tables import read_study_table
from spinestream.shards.volumes import open_volume, read_attrs


@dataclass
class StudyBatch:
    study: str
    slice_ids: torch.Tensor  # (b,) int64, consecutive, head to feet
    images: torch.Tensor  # (b, 3, S, S) normalised
    first: bool  # the study's first batch
    last: bool  # the study's last batch


class StudyReader:
    """Iterate ``StudyBatch`` over the chosen studies (by folds/cohorts or explicit UIDs)."""

    def __init__(self, root: str | Path, cfg: LoaderConfig, *, folds: Sequence[int] | None = None,
                 cohorts: Sequence[str] | None = None, studies: Sequence[str] | None = None, device="cpu"):
        self.root, self.cfg, self.device = Path(root), cfg, torch.device(device)
        self.manifest = read_manifest(self.root)
        table = read_study_table(Layout(self.root).studies)
        if studies is not None:
            unknown = sorted(set(studies) - set(table.StudyInstanceUID))
            if unknown:
                raise InputError(f"studies not in {self.root}: {unknown[:5]}")
            table = table[table.StudyInstanceUID.isin(studies)]
        if folds is not None:
            table = table[table.fold.isin(folds)]
        if cohorts is not None:
            table = table[table.cohort.isin(cohorts)]
        if table.empty:
            raise InputError(f"{self.root}: no studies for folds={folds} cohorts={cohorts} studies={studies}")
        self.table = table.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.table)

    def volume(self, study: str) -> tuple[np.ndarray, np.ndarray, int]:
        """(uint8 volume, (Z, 3) neighbour index or None, slice_id offset) of one study."""
        volumes = Layout(self.root).volumes
        arr = open_volume(volumes, study)[...]
        attrs, img = read_attrs(volumes / study), self.manifest.image
        nbr = neighbour_index(np.asarray(attrs.z), img.offset_mm) if img.channels == "neighbours" else None
        if attrs.slice_id_offset is None:
            raise InputError(f"{volumes / study}: the volume has no slice_id_offset (its shard job did not finish)")
        return arr, nbr, attrs.slice_id_offset

    def __iter__(self) -> Iterator[StudyBatch]:
        cfg, dev = self.cfg, self.device
        channels = self.manifest.image.channels
        for uid in self.table.StudyInstanceUID:
            arr, nbr, offset = self.volume(uid)
            n = arr.shape[0]
            for s in range(0, n, cfg.batch_size):
                idx = range(s, min(n, s + cfg.batch_size))
                imgs = np.stack([sample_image(arr, i, nbr, channels) for i in idx])  # (b, H, W, 3)
                x = torch.from_numpy(imgs).to(dev).permute(0, 3, 1, 2).float()
                if x.shape[-1] != cfg.image_size:
                    x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear",
                                      align_corners=False)  # as the training loaders resize
                x = normalize(x, cfg.mean, cfg.std, torch_dtype(cfg.dtype), cfg.channels_last)
                ids = torch.arange(offset + idx.start, offset + idx.stop, dtype=torch.int64, device=dev)
                yield StudyBatch(uid, ids, x, first=s == 0, last=idx.stop == n)
