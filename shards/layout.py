"""The output directory of ``spinestream shard`` and how to read it.

```
OUT/manifest.json          written last: the run is complete when it exists
OUT/studies.parquet        one row per study
OUT/slices.parquet         one row per slice (slice_id is the key everywhere)
OUT/labels/truth.parquet   slice_id -> C1..C7, any (boxed and negative studies)
OUT/wds/<cohort>-f<fold>-<k:04d>.tar + .idx
OUT/volumes.zarr/<StudyInstanceUID>
OUT/_work/                 resumable job state; removed when the job completes
```
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FORMAT = "spinestream-shards"
VERSION = 1
COHORTS = ("boxed", "negative", "positive-unboxed")
TARGETS = ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "any")


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


def load_manifest(root: str | Path) -> dict:
    """Read and sanity-check ``OUT/manifest.json``."""
    path = Layout(Path(root)).manifest
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {root} is not a finished shard directory "
            f"(run `spinestream shard --data DATA --out {root}`; a rerun resumes an interrupted job)"
        )
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if m.get("format") != FORMAT:
        raise ValueError(f"{path}: not a spinestream manifest (format={m.get('format')!r})")
    if m.get("version") != VERSION:
        raise ValueError(f"{path}: manifest version {m.get('version')} is not supported (expected {VERSION})")
    return m


def select_shards(manifest: dict, cohorts=None, folds=None) -> list[dict]:
    """Shard entries of the manifest for the given cohorts/folds (None = all); never empty."""
    out = [
        s for s in manifest["shards"]
        if (cohorts is None or s["cohort"] in cohorts) and (folds is None or s["fold"] in folds)
    ]
    if not out:
        raise ValueError(f"no shards for cohorts={cohorts} folds={folds} in this manifest")
    return out
