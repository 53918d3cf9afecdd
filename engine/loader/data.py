"""What a loader reads: a selection of shard files, and the label table it looks targets up in.

Choosing a training set is choosing shard groups (cohort × fold) through the manifest —
never filtering samples at read time. Labels are not in the shards: a label table maps
``slice_id`` → the 8 targets (C1..C7, any), is loaded onto the device once (700k × 8
floats) and indexed by the slice ids a batch carries, so round 2 swaps the table
(truth ∪ pseudo-labels) without touching the shards.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spinestream import InputError, MissingInput
from spinestream.shards.layout import COHORTS, TARGETS, Layout
from spinestream.shards.manifest import ShardEntry, read_manifest
from spinestream.shards.tables import read_label_table, read_slice_table
from spinestream.shards.wds import ShardError, read_index, write_subset_index


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
        """Every sample's (shard number, jpg offset, jpg size, slice_id), from the ``.idx`` files."""
        shard, off, size, sid = [], [], [], []
        for k, (s, idx) in enumerate(zip(self.shards, self.indexes)):
            entries = read_index(idx)
            if len(entries) != s.samples:
                raise ShardError(f"{idx}: {len(entries)} samples, manifest says {s.samples}")
            for comps in entries:
                jpg = next((c for c in comps if c[0] == "jpg"), None)
                if jpg is None:
                    raise ShardError(f"{idx}: a sample has no .jpg component")
                shard.append(k)
                off.append(jpg[1])
                size.append(jpg[2])
                sid.append(int(jpg[3].split(".")[0]))
        return {"shard": np.asarray(shard, np.int32), "offset": np.asarray(off, np.int64),
                "size": np.asarray(size, np.int64), "slice_id": np.asarray(sid, np.int64)}

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


def oversample_positives(sel: Selection, labels: LabelTable, factor: int, out_dir: str | Path,
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


class LabelTable:
    """slice_id → 8 targets as one ``(n_total, 8)`` float tensor; NaN where a slice has no label."""

    def __init__(self, targets: torch.Tensor, sources: list[str]):
        self.targets = targets
        self.sources = sources

    @classmethod
    def load(cls, root: str | Path, tables: Sequence[str | Path] = ("labels/truth.parquet",),
             n_total: int | None = None) -> LabelTable:
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

    def to(self, device) -> LabelTable:
        return LabelTable(self.targets.to(device), self.sources)

    def __getitem__(self, slice_ids: torch.Tensor) -> torch.Tensor:
        return self.targets[slice_ids]
