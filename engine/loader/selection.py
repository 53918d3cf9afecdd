"""What a loader reads: a selection of shard files, chosen through the manifest.

Choosing a training set is choosing shard groups (cohort × fold) through the manifest —
never filtering samples at read time. The targets are not in the shards: a loader looks them
up by slice_id in :class:`spinestream.engine.loader.labels.DeviceLabels`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spinestream import InputError
from spinestream.shards.layout import COHORTS
from spinestream.shards.manifest import ShardEntry, read_manifest
from spinestream.shards.wds import ShardError, index_records, write_subset_index

from .labels import DeviceLabels


@dataclass
class Selection:
    """A set of shards chosen by cohort and fold, with the slice ids they hold."""

    root: Path
    cohorts: tuple[str, ...]
    folds: tuple[int, ...] | None
    shards: list[ShardEntry]  # manifest entries (copies), then any oversampled copies
    n_total: int  # slices in the whole shard set (the label table's length)
    image_size: int  # side of the shard images

    @property
    def tars(self) -> list[str]:
        return [str(self.root / s.path) for s in self.shards]

    @property
    def indexes(self) -> list[str]:
        return [str(self.root / s.index) for s in self.shards]

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def oversampled(self) -> int:
        """Extra reads per epoch added by :func:`oversample_positives` (0 without it)."""
        return sum(s.samples for s in self.shards if s.oversample_of is not None)

    def records(self) -> dict[str, np.ndarray]:
        """Every sample's (shard number, jpg offset, jpg size, slice_id), from the ``.idx`` files
        (:func:`spinestream.shards.wds.index_records`)."""
        return index_records(self.indexes, [s.samples for s in self.shards])

    def slice_ids(self) -> np.ndarray:
        return self.records()["slice_id"]


def select(root: str | Path, cohorts: Sequence[str] | None = None, folds: Sequence[int] | None = None,
           exclude_folds: Sequence[int] | None = None) -> Selection:
    """Choose shard groups; every chosen tar and index must exist. Never returns an empty selection."""
    root = Path(root)
    m = read_manifest(root)
    cohorts = tuple(cohorts) if cohorts else COHORTS
    unknown = [c for c in cohorts if c not in COHORTS]
    if unknown:
        raise InputError(f"unknown cohort(s) {unknown}; known: {list(COHORTS)}")
    chosen = [
        dataclasses.replace(s) for s in m.shards
        if s.cohort in cohorts
        and (folds is None or s.fold in folds)
        and (exclude_folds is None or s.fold not in exclude_folds)
    ]
    what = f"cohorts {list(cohorts)}" + (f", folds {list(folds)}" if folds is not None else "") + (
        f", excluding folds {list(exclude_folds)}" if exclude_folds else "")
    if not chosen:
        raise InputError(f"{root}: no shards for {what} (the manifest has groups "
                         f"{sorted({(s.cohort, s.fold) for s in m.shards})})")
    for s in chosen:
        for rel in (s.path, s.index):
            p = root / rel
            if not p.is_file():
                raise ShardError(f"{p}: listed in the manifest but missing (run `spinestream verify {root}`)")
        size = (root / s.path).stat().st_size
        if size != s.bytes:
            raise ShardError(f"{root / s.path}: {size} bytes, the manifest says {s.bytes} "
                             f"(truncated or replaced; run `spinestream verify {root}`)")
    return Selection(root, cohorts, tuple(folds) if folds is not None else None, chosen,
                     m.counts.slices, m.image.size)


def oversample_positives(sel: Selection, labels: DeviceLabels, factor: int, out_dir: str | Path,
                         threshold: float = 0.5) -> Selection:
    """Positive oversampling: a selection in which every slice whose ``any`` target is >= ``threshold``
    is read ``factor`` times per epoch, the others once.

    Nothing is copied: for each shard holding positives a subset ``.idx`` listing only them is written
    to ``out_dir`` (atomically, deterministic), and the selection lists that (tar, subset index) pair
    ``factor - 1`` more times, right after the shard; the epoch's global permutation spreads the
    extra reads over the whole epoch wherever they are listed. Both backends read the pair like any shard (DALI through ``index_paths``, the torch
    backend through :meth:`Selection.records`), so the epoch, rank split and resume rules are the
    usual ones over the longer list. ``factor == 1`` returns ``sel`` unchanged.
    """
    if factor < 1:
        raise ValueError(f"oversampling factor must be >= 1, got {factor}")
    if factor == 1:
        return sel
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rec = sel.records()  # samples shard by shard, each in index order
    positive = (labels[torch.from_numpy(rec["slice_id"])][:, -1] >= threshold).numpy()
    per_shard = np.split(positive, np.cumsum([s.samples for s in sel.shards])[:-1])
    shards: list[ShardEntry] = []
    for s, idx, pos in zip(sel.shards, sel.indexes, per_shard):
        shards.append(s)
        if not pos.any():
            continue
        dst = out_dir / f"{s.name}.pos.idx"
        n = write_subset_index(idx, dst, pos)
        # the subset index is not the manifest's: no index_sha256 for it
        shards += [dataclasses.replace(s, name=f"{s.name}+pos{r}", index=str(dst.resolve()), samples=n,
                                       index_sha256="", oversample_of=s.name) for r in range(1, factor)]
    return dataclasses.replace(sel, shards=shards)
