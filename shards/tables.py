"""The parquet tables of a shard directory: their columns and dtypes, writers and readers together.

* **study table** (``studies.parquet``): one row per converted study, in UID order.
* **slice table** (``slices.parquet``): one row per slice; ``slice_id`` is ``0..N-1`` in order
  (studies in UID order, slices head to feet) and is the key of every shard sample.
* **label tables** (``labels/truth.parquet``, ``labels/pseudo-<run>.parquet``): ``slice_id``
  -> the 8 :data:`~spinestream.shards.layout.TARGETS`, uint8 (hard labels) or float32 (probabilities),
  plus optional extra columns (e.g. a pseudo-label table's probabilities beside its binarized
  labels) and free-form metadata (which run made it, thresholds, ...) kept in the parquet
  schema metadata under ``spinestream.label_table``.

Writers cast to the declared dtypes, write the declared columns first (extras after, label
tables only) and are atomic and byte-reproducible; readers check that every declared column
is there and name the file and the column when one is not.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spinestream import InputError, MissingInput

from .fsutil import atomic_write_parquet
from .layout import TARGETS, VERTEBRAE

LABEL_METADATA_KEY = b"spinestream.label_table"
TARGET_DTYPES = ("uint8", "float32")


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str
    """numpy dtype name, or "str" for text columns (stored as parquet strings)."""
    doc: str = ""


STUDY_COLUMNS: tuple[Column, ...] = (
    Column("StudyInstanceUID", "str"),
    Column("patient_overall", "int8", "train.csv: any fracture"),
    *(Column(v, "int8", f"train.csv: {v} fractured") for v in VERTEBRAE),
    Column("cohort", "str", "one of shards.layout.COHORTS"),
    Column("fold", "int16"),
    Column("n_boxes", "int32", "box rows in train_bounding_boxes.csv"),
    Column("n_boxed_slices", "int32", "distinct slice numbers with a box"),
    Column("n_slices", "int64", "slices in the volume and the shards"),
    Column("slice_id_offset", "int64", "slice_id of volume index 0"),
    Column("spacing_z", "float64", "mm between slices along the slice normal"),
    Column("spacing_y", "float64", "source row spacing, mm"),
    Column("spacing_x", "float64", "source column spacing, mm"),
    Column("rows", "int64", "source Rows"),
    Column("cols", "int64", "source Columns"),
    Column("z_reversed", "bool", "file numbers run feet -> head"),
    Column("n_bad_files", "int64"),
    Column("transfer_syntax", "str", "';'-joined TransferSyntaxUIDs of the study's files"),
    Column("has_segmentation", "bool", "a segmentation was used for its labels"),
    Column("n_warnings", "int64", "DataWarnings raised while converting it (manifest.json lists them)"),
)

SLICE_COLUMNS: tuple[Column, ...] = (
    Column("slice_id", "int64", "global key: 0..N-1"),
    Column("StudyInstanceUID", "str"),
    Column("slice_number", "int64", "the file-name number (<n>.dcm)"),
    Column("index", "int32", "volume index, head to feet"),
    Column("z", "float64", "position along the slice normal, mm (ImagePositionPatient z for axial series)"),
    Column("cohort", "str"),
    Column("fold", "int8"),
    Column("shard", "str", "name of the shard holding it"),
)


def _cast(df: pd.DataFrame, columns: tuple[Column, ...], where: str) -> pd.DataFrame:
    missing = [c.name for c in columns if c.name not in df.columns]
    if missing:
        raise InputError(f"{where}: missing column(s) {missing}; the table needs {[c.name for c in columns]}")
    out = {}
    for c in columns:
        col = df[c.name]
        out[c.name] = col.astype(str) if c.dtype == "str" else col.to_numpy(dtype=c.dtype)
    return pd.DataFrame(out)


def _read(path: str | Path, columns: tuple[Column, ...], only: Sequence[str] | None = None) -> pd.DataFrame:
    """The table at ``path``, checked for the declared ``columns``; with ``only``, just those
    (each one of the declared columns), in that order."""
    path = Path(path)
    if only is not None:
        names = [c.name for c in columns]
        unknown = [c for c in only if c not in names]
        if unknown:
            raise InputError(f"{path}: {unknown} are not columns of this table; it has {names}")
        columns = tuple(c for c in columns if c.name in only)
    if not path.is_file():
        raise MissingInput(f"{path}: no such table (is this a finished shard directory?)")
    if only is not None:
        import pyarrow.parquet as pq

        have = set(pq.read_schema(path).names)
        missing = [c for c in only if c not in have]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing} (written by another spinestream version?)")
        return pd.read_parquet(path, columns=list(only))
    df = pd.read_parquet(path)
    missing = [c.name for c in columns if c.name not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing} (written by another spinestream version?)")
    return df


def write_study_table(path: str | Path, df: pd.DataFrame) -> None:
    """Write the study table: :data:`STUDY_COLUMNS`, in that order and dtype (other columns dropped)."""
    atomic_write_parquet(path, _cast(df, STUDY_COLUMNS, str(path)))


def read_study_table(path: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The study table; ``columns``: read only these (of :data:`STUDY_COLUMNS`)."""
    return _read(path, STUDY_COLUMNS, columns)


def write_slice_table(path: str | Path, df: pd.DataFrame) -> None:
    """Write the slice table: :data:`SLICE_COLUMNS`; slice_id must be 0..N-1 in order."""
    out = _cast(df, SLICE_COLUMNS, str(path))
    if not np.array_equal(out.slice_id.to_numpy(), np.arange(len(out))):
        raise InputError(f"{path}: slice_id must run 0..{len(out) - 1} in order")
    atomic_write_parquet(path, out)


def read_slice_table(path: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The slice table; ``columns``: read only these (of :data:`SLICE_COLUMNS`)."""
    return _read(path, SLICE_COLUMNS, columns)


# --------------------------------------------------------------------------- label tables


@dataclass
class LabelTable:
    """slice_id -> TARGETS (+ extra columns) and the table's metadata."""

    frame: pd.DataFrame
    """Columns: slice_id (int64), C1..C7, any (uint8 or float32), then any extra columns."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """JSON-serialisable facts about the table (source run, thresholds, ...)."""

    @property
    def extra_columns(self) -> list[str]:
        return [c for c in self.frame.columns if c not in ("slice_id", *TARGETS)]


def label_frame(slice_ids: np.ndarray, targets: np.ndarray, extra: Mapping[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Build a label-table frame from ``(n,)`` slice ids and ``(n, 8)`` targets."""
    targets = np.asarray(targets)
    if targets.ndim != 2 or targets.shape[1] != len(TARGETS):
        raise ValueError(f"targets must be (n, {len(TARGETS)}) ({', '.join(TARGETS)}), got {targets.shape}")
    df = pd.DataFrame(targets, columns=list(TARGETS))
    df.insert(0, "slice_id", np.asarray(slice_ids, dtype=np.int64))
    for k, v in (extra or {}).items():
        df[k] = v
    return df


def write_label_table(path: str | Path, table: LabelTable) -> None:
    """Write a label table: slice_id int64 unique, the 8 targets as uint8 or float32, extras
    after them, metadata as JSON in the parquet schema metadata."""
    df, where = table.frame, str(path)
    missing = [c for c in ("slice_id", *TARGETS) if c not in df.columns]
    if missing:
        raise InputError(f"{where}: missing column(s) {missing}; a label table needs slice_id and {list(TARGETS)}")
    kinds = {str(df[t].dtype) for t in TARGETS}
    dtype = "float32" if kinds - {"uint8", "bool", "int8", "int16", "int32", "int64"} else "uint8"
    ids = df.slice_id.to_numpy(dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise InputError(f"{where}: slice_id values are not unique")
    out = pd.DataFrame({"slice_id": ids, **{t: df[t].to_numpy(dtype=dtype) for t in TARGETS}})
    for c in table.extra_columns:
        out[c] = df[c].to_numpy()
    meta = json.dumps(table.metadata, sort_keys=True).encode()
    atomic_write_parquet(path, out, {LABEL_METADATA_KEY: meta})


def read_label_table(path: str | Path) -> LabelTable:
    """Read a label table (metadata {} when it has none).

    :func:`write_label_table` writes the targets as uint8 or float32; a table made elsewhere
    (pandas' ``to_parquet`` writes float64) reads too as long as its targets are numeric."""
    import pyarrow.parquet as pq

    path = Path(path)
    df = _read(path, (Column("slice_id", "int64"), *(Column(t, "uint8") for t in TARGETS)))
    bad = [t for t in TARGETS if not (pd.api.types.is_numeric_dtype(df[t]) or pd.api.types.is_bool_dtype(df[t]))]
    if bad:
        raise InputError(f"{path}: target column(s) {bad} are not numeric")
    check_label_rows(df, str(path))
    raw = (pq.read_schema(path).metadata or {}).get(LABEL_METADATA_KEY)
    return LabelTable(df, json.loads(raw) if raw else {})


def check_label_rows(df: pd.DataFrame, where: str) -> None:
    """A label table's rows: slice_id whole, >= 0 and unique; every target finite and in [0, 1].

    Each failure is one line naming the table, how many rows and the first slice_id, and what to do
    (a table that breaks these was not written by spinestream, or was edited: a NaN target would
    train as NaN loss, a duplicated slice_id would give one slice two answers)."""
    fix = "rebuild it (spinestream shard writes truth.parquet, spinestream pseudo-label the pseudo tables)"
    sid = df["slice_id"]
    if not pd.api.types.is_integer_dtype(sid):
        num = pd.to_numeric(sid, errors="coerce")
        odd = num.isna() | (num != np.floor(num))
        if odd.any():
            raise InputError(f"{where}: {int(odd.sum())} row(s) have a slice_id that is not a whole number (first: "
                             f"{sid[odd].iloc[0]}); {fix}")
    ids = pd.to_numeric(sid).to_numpy(np.float64)
    if (ids < 0).any():
        raise InputError(f"{where}: {int((ids < 0).sum())} row(s) have a negative slice_id (first: "
                         f"{int(ids[ids < 0][0])}); {fix}")
    dup = pd.Series(ids).duplicated(keep=False).to_numpy()
    if dup.any():
        raise InputError(f"{where}: {int(dup.sum())} rows share {len(np.unique(ids[dup]))} slice_id(s) (first: "
                         f"{int(ids[dup][0])}): a slice would have two sets of targets; {fix}")
    vals = df[list(TARGETS)].to_numpy(np.float64)
    nan = np.isnan(vals).any(axis=1)
    if nan.any():
        raise InputError(f"{where}: {int(nan.sum())} row(s) have NaN targets (first slice_id: {int(ids[nan][0])}); "
                         f"{fix}")
    out = ((vals < 0) | (vals > 1)).any(axis=1)
    if out.any():
        first = int(np.flatnonzero(out)[0])
        raise InputError(f"{where}: {int(out.sum())} row(s) have targets outside [0, 1] (first slice_id "
                         f"{int(ids[first])}: {vals[first].tolist()}); {fix}")


__all__ = ["Column", "LabelTable", "SLICE_COLUMNS", "STUDY_COLUMNS", "label_frame", "read_label_table",
           "read_slice_table", "read_study_table", "write_label_table", "write_slice_table", "write_study_table"]
