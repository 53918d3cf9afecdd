"""The output directory of ``spinestream shard`` and how to read it.

```
OUT/manifest.json          written last: the run is complete when it exists
OUT/studies.parquet        one row per study
OUT/slices.parquet         one row per slice (slice_id is the key everywhere)
OUT/labels/truth.parquet   slice_id -> C1..C7, any (boxed and negative studies)
OUT/wds/<cohort>-f<fold>-<k:04d>.tar + .idx + .sums (each sample's CRC-32: shards.wds.read_sums)
OUT/volumes.zarr/<StudyInstanceUID>
OUT/_work/                 resumable job state; removed when the job completes
```

The constants below are the one definition of the cohorts, the targets and the studies
every job leaves out; the files' contents are defined in :mod:`spinestream.shards.manifest`,
:mod:`spinestream.shards.tables` and :mod:`spinestream.shards.volumes`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FORMAT = "spinestream-shards"
VERSION = 2
"""Manifest format version: 2 added ``warnings``, ``source.selection`` and the volumes' affine."""
COHORTS: tuple[str, ...] = ("boxed", "negative", "positive-unboxed")
"""Shard groups by label source: has bounding boxes / patient_overall 0 / fractured without boxes."""
VERTEBRAE: tuple[str, ...] = tuple(f"C{i}" for i in range(1, 8))
TARGETS: tuple[str, ...] = VERTEBRAE + ("any",)
"""The 8 slice targets, in label-table and model-output order; "any" is the OR of C1..C7."""
ROW_TYPES: tuple[str, ...] = VERTEBRAE + ("patient_overall",)
"""The 8 study labels of train.csv (study-table columns), in the competition's submission row order."""
DROPPED_STUDIES: tuple[str, ...] = ("1.2.826.0.1.3680043.20574", "1.2.826.0.1.3680043.29952")
"""Broken scans left out by default: ...20574 (dropped by almost every public solution) and
...29952 (the 3rd place team drops it in every config; both are the competition discussion's
"bad scans"; FACTS.md)."""


def group_name(cohort: str, fold: int) -> str:
    return f"{cohort}-f{fold}"


def shard_name(cohort: str, fold: int, k: int) -> str:
    return f"{group_name(cohort, fold)}-{k:04d}"


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def studies(self) -> Path:
        return self.root / "studies.parquet"

    @property
    def slices(self) -> Path:
        return self.root / "slices.parquet"

    @property
    def truth(self) -> Path:
        return self.root / "labels" / "truth.parquet"

    @property
    def wds(self) -> Path:
        return self.root / "wds"

    @property
    def volumes(self) -> Path:
        return self.root / "volumes.zarr"

    @property
    def work(self) -> Path:
        return self.root / "_work"
