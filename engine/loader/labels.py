"""The targets a loader looks up: slice_id -> the 8 targets (C1..C7, any) as one tensor on the device.

Labels are not in the shards: the label tables (parquet, :mod:`spinestream.shards.tables`) are
unioned into one ``(n_total, 8)`` tensor, loaded onto the device once (700k × 8 floats) and indexed
by the slice ids a batch carries, so round 2 swaps the tables (truth ∪ pseudo-labels) without
touching the shards.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from spinestream import InputError, MissingInput
from spinestream.shards.layout import TARGETS, Layout
from spinestream.shards.manifest import read_manifest
from spinestream.shards.tables import read_label_table, read_slice_table

if TYPE_CHECKING:
    from .selection import Selection


class DeviceLabels:
    """slice_id → 8 targets as one ``(n_total, 8)`` float tensor; NaN where a slice has no label."""

    def __init__(self, targets: torch.Tensor, sources: list[str]):
        self.targets = targets
        self.sources = sources

    @classmethod
    def load(cls, root: str | Path, tables: Sequence[str | Path] = ("labels/truth.parquet",),
             n_total: int | None = None) -> DeviceLabels:
        """Union of label tables (paths relative to ``root`` or absolute); earlier tables win.

        Each table has ``slice_id`` and the columns C1..C7, any with values in [0, 1] (soft
        pseudo-labels are allowed).
        """
        root = Path(root)
        if n_total is None:
            n_total = read_manifest(root).counts.slices
        out = torch.full((n_total, len(TARGETS)), float("nan"), dtype=torch.float32)
        for t in tables:
            path = Path(t) if Path(t).is_absolute() else root / t
            if not path.is_file():
                raise MissingInput(f"label table {path} does not exist")
            df = read_label_table(path).frame  # names a missing column
            ids = df.slice_id.to_numpy(np.int64)
            if len(ids) and (ids.min() < 0 or ids.max() >= n_total):
                raise InputError(f"{path}: slice_ids outside 0..{n_total - 1}; this table belongs to another shard set")
            if len(np.unique(ids)) != len(ids):
                raise InputError(f"{path}: duplicated slice_ids")
            vals = torch.from_numpy(df[list(TARGETS)].to_numpy(np.float32, copy=True))
            if torch.isnan(vals).any() or (vals < 0).any() or (vals > 1).any():
                raise InputError(f"{path}: targets must be in [0, 1] without NaN")
            idx = torch.from_numpy(ids.copy())
            free = torch.isnan(out[idx, 0])
            out[idx[free]] = vals[free]
        return cls(out, [str(t) for t in tables])

    def check_covers(self, sel: Selection) -> None:
        """Every selected slice must have targets; otherwise name the cohorts lacking them."""
        ids = torch.from_numpy(sel.slice_ids())
        missing = torch.isnan(self.targets[ids, 0])
        if missing.any():
            slices = read_slice_table(Layout(sel.root).slices, columns=["slice_id", "cohort"]).set_index("slice_id")
            bad_ids = ids[missing].numpy()
            by = slices.loc[bad_ids, "cohort"].value_counts().to_dict()
            raise InputError(
                f"the label table(s) {self.sources} do not cover {int(missing.sum())} selected slices "
                f"(by cohort: {by}); positive-unboxed slices need pseudo-labels (round 2) or leave that cohort out")

    def to(self, device) -> DeviceLabels:
        return DeviceLabels(self.targets.to(device), self.sources)

    def __getitem__(self, slice_ids: torch.Tensor) -> torch.Tensor:
        return self.targets[slice_ids]
