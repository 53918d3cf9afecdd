"""The Python API, for notebooks: load runs, predict a directory of studies into a DataFrame, read a shard set.

    from spinestream import api

    runs = api.load_runs("/kaggle/input/my-bundle/runs/round2", device="cuda")   # or a list: an ensemble
    sub = api.predict("/kaggle/input/rsna-2022-cervical-spine-fracture-detection/test_images", runs,
                      sample_submission=".../sample_submission.csv")            # row_id, fractured
    api.write_submission(sub, "submission.csv")                                 # clipped, atomic
    shards = api.open_shards("shards-512")          # .manifest, .studies, .slices, .labels (read when asked)

Strings are accepted wherever a path or a device is expected (``device``: ``auto``, ``cpu``, ``cuda``,
``cuda:1`` or a ``torch.device``). The functions are those of ``spinestream predict`` (spinestream/predict.py,
whose module doc has the rules for bad input) and of the shard format (spinestream/shards/), with notebook
defaults: decoding inline (no worker processes to fork from a kernel) unless ``workers`` says otherwise.

Importing this module imports nothing heavy (torch, timm and pandas load on the first call). It is not
re-exported from the package root: ``spinestream.predict`` is the predict verb's module, and a function of
the same name there would shadow it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from spinestream.predict import Run
    from spinestream.shards.manifest import Manifest
    from spinestream.shards.tables import LabelTable

__all__ = ["ShardSet", "load_runs", "open_shards", "predict", "write_submission"]

PathLike = str | Path


def load_runs(paths: PathLike | Sequence[PathLike], device: Any = "auto", *, checkpoint: str = "best",
              batch_size: int | None = None, tta: bool = False) -> list[Run]:
    """The models of one run or an ensemble, each a training run directory or a Kaggle bundle's
    ``runs/<name>/``, on ``device``; an ensemble's runs must share one image spec (ValueError otherwise)."""
    from spinestream.predict import load_runs as _load_runs

    one = isinstance(paths, (str, Path))
    return _load_runs([Path(p) for p in ([paths] if one else paths)], device, checkpoint=checkpoint,
                      batch_size=batch_size, tta=tta)


def predict(images_dir: PathLike, runs: Sequence[Run], *, sample_submission: PathLike | None = None,
            rule: str | None = None, workers: int = 0, prefetch: int = 2, progress: bool = True) -> pd.DataFrame:
    """``row_id, fractured`` for every study directory in ``images_dir`` (8 rows each, sorted), or exactly the
    rows of ``sample_submission`` in its order; unclipped probabilities. ``frame.attrs["summary"]`` holds the
    counts (studies, slices, bad files, unreadable and missing studies, seconds, rule)."""
    from spinestream.predict import predict as _predict

    frame, stats = _predict(runs, Path(images_dir), sample=None if sample_submission is None else Path(sample_submission),
                            rule=rule, workers=workers, prefetch=prefetch, progress=progress)
    frame.attrs["summary"] = stats
    return frame


def write_submission(frame: pd.DataFrame, path: PathLike) -> None:
    """Kaggle's ``submission.csv``, clipped as ``spinestream predict`` writes it (see
    :func:`spinestream.predict.write_submission` for why)."""
    from spinestream.predict import write_submission as _write

    _write(frame, Path(path))


@dataclass
class ShardSet:
    """A shard set written by ``spinestream shard``: its manifest, and its tables read on first use."""

    root: Path
    manifest: Manifest = field(repr=False)

    @cached_property
    def studies(self) -> pd.DataFrame:
        """One row per study: StudyInstanceUID, cohort, fold, the 8 targets, ..."""
        from spinestream.shards.tables import read_study_table

        return read_study_table(self.root / self.manifest.tables.studies)

    @cached_property
    def slices(self) -> pd.DataFrame:
        """One row per slice: slice_id, StudyInstanceUID, shard, z index, ..."""
        from spinestream.shards.tables import read_slice_table

        return read_slice_table(self.root / self.manifest.tables.slices)

    @cached_property
    def labels(self) -> LabelTable:
        """The slice-level truth (``labels/truth.parquet``)."""
        from spinestream.shards.tables import read_label_table

        return read_label_table(self.root / self.manifest.tables.truth)


def open_shards(path: PathLike) -> ShardSet:
    """The shard set at ``path``; FileNotFoundError when it is not a finished one (the message says how to make
    it), ManifestError when its manifest cannot be read."""
    from spinestream.shards.manifest import read_manifest

    root = Path(path)
    return ShardSet(root, read_manifest(root))
