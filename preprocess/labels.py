"""Round-1 labels: the study table (cohorts, folds) and per-slice vertebra targets.

Targets are 8 columns per slice: C1..C7 and "any" (the OR of C1..C7). Volumes run head
to feet, so a lower volume index is more cranial; vertebra 1 (C1) is the most cranial.

Study table (:func:`build_study_table`)
    One row per study from ``train.csv`` and ``train_bounding_boxes.csv``. Cohorts:
    ``boxed`` (the study has >=1 box), ``negative`` (patient_overall == 0) and
    ``positive-unboxed`` (fractured, but no boxes: no slice-level labels in round 1).
    Folds: within each cohort, studies are ordered by ``sha1(f"{seed}:{uid}")`` and dealt
    round-robin, one counter running on across the cohorts in :data:`COHORTS` order.
    Guaranteed: the same (set of studies, seed, folds) gives the same folds whatever the
    input row order; fold sizes differ by at most 1 within each cohort and overall.
    Not guaranteed: stability when studies are added or removed -- every study dealt
    after the change (in its cohort and in the cohorts after it) moves by one fold. The
    table is meant to be written once and saved with the shards, not recomputed.

Which fractured vertebra a boxed slice shows (:func:`assign_vertebrae`)
    The boxes do not name the vertebra; ``train.csv`` says which vertebrae are fractured.

    1. One fractured vertebra: every boxed slice belongs to it (a segmentation is ignored).
    2. Several, with a segmentation (``seg`` and ``boxes``): each box goes to the fractured
       vertebra with the most mask voxels inside the box rectangle on that slice (x =
       column, y = row; the rectangle covers every pixel it touches, ``floor(x)`` to
       ``ceil(x + width)``, clipped to the image). Ties go to the more cranial vertebra.
       A slice is positive for the union of its boxes' vertebrae: two boxes on one slice
       can sit on two vertebrae (e.g. C1 ring and C2 dens at the same level). Boxes
       touching no fractured vertebra's mask are ignored; a slice with no box touching
       one is *unresolved* and takes the vertebra(e) of the nearest resolved slice in the
       same run (runs as in rule 3; equal distance -> the cranial neighbour), because
       vertebrae occupy contiguous z ranges and a fracture box that overhangs its mask
       at the ends of a run is the common case. A run with no resolved slice at all
       (seg misaligned, or box wholly outside the mask) takes the rule-3 answer computed
       over the whole study -- the segmentation says nothing about it, and rule 3 is
       what the study would have got without one.
    3. Several, no segmentation: sorted boxed indices are cut into runs wherever two
       consecutive indices differ by more than ``max_gap + 1`` (default ``max_gap=1``:
       one missing slice does not break a run). Runs are matched to the fractured
       vertebrae in cranio-caudal order (lowest-index run -> smallest vertebra number).
       - More runs than vertebrae: repeatedly merge the adjacent pair with the smallest
         gap (missing slices between them); ties -> the most cranial pair. Only boxed
         slices are labelled; the gap slices stay negative.
       - Fewer runs than vertebrae: repeatedly give one more part to the run whose
         parts are longest (boxed slices / parts; ties -> the most cranial run), then
         cut each run into that many contiguous parts of equal length (cranial parts
         take the extra slice when the length does not divide).
       - More vertebrae than boxed slices in a run (e.g. one boxed slice, C1 and C2
         fractured): the run's vertebrae are shared out as contiguous groups, one group
         per slice (cranial slices take the extra), so a single slice is positive for
         every vertebra it would be split between -- the box shows a fracture and we
         cannot tell which; dropping a vertebra would label a true fracture negative.

Every slice of a boxed study without a box is negative (the reference solution's
assumption, :func:`slice_labels`). Warnings use :mod:`warnings` so callers decide once
whether they are errors; the one that changes a study's labels (a box on a slice the
series lacks) is a :class:`~spinestream.preprocess.errors.DataWarning`. Bad input (the CSV files, a
study's boxes) raises :class:`~spinestream.preprocess.errors.LabelError` (a ValueError); other
ValueErrors are wrong arguments, i.e. bugs.
"""
from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction

import numpy as np
import pandas as pd

from .errors import DataWarning, LabelError

# One definition, in the storage contract (shards.layout); re-exported here for the label code.
from spinestream.shards.layout import COHORTS, DROPPED_STUDIES, TARGETS, VERTEBRAE

TRAIN_FILE = "train.csv"
BOXES_FILE = "train_bounding_boxes.csv"
TRAIN_COLUMNS: tuple[str, ...] = ("StudyInstanceUID", "patient_overall", *VERTEBRAE)
BOX_COLUMNS: tuple[str, ...] = ("StudyInstanceUID", "x", "y", "width", "height", "slice_number")
STUDY_TABLE_COLUMNS: tuple[str, ...] = (
    "StudyInstanceUID", "patient_overall", *VERTEBRAE, "cohort", "fold", "n_boxes", "n_boxed_slices",
)


def _preview(items: Iterable[object], limit: int = 5) -> str:
    items = [str(i) for i in items]
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _require_columns(df: pd.DataFrame, columns: Sequence[str], file: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise LabelError(f"{file}: missing column(s) {missing}; expected {list(columns)}")


# A StudyInstanceUID names a directory (train_images/<uid>/, the output's volumes.zarr/<uid>, the job's
# _work/studies/<uid>): only characters that keep it one plain path component. DICOM UIDs are digits and dots.
_UID_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


def _uids(series: pd.Series, file: str, *, paths: bool = False) -> pd.Series:
    """The column as stripped strings; with ``paths``, each must be a plain UID (:data:`_UID_RE`)."""
    if series.isna().any():
        raise LabelError(f"{file}: {int(series.isna().sum())} row(s) have no StudyInstanceUID")
    out = series.astype(str).str.strip()
    if paths:
        bad = ~out.str.match(_UID_RE) | out.str.contains("..", regex=False)
        if bad.any():
            first = int(np.flatnonzero(bad.to_numpy())[0])
            raise LabelError(f"{file}: StudyInstanceUID {out.iloc[first]!r} (row {first + 2}; {int(bad.sum())} such "
                             f"row(s)) is not a UID: it names a directory, so only letters, digits, '.', '-' and '_' "
                             f"are allowed, no '..' or '/'; fix the file")
    return out


# ---------------------------------------------------------------------------------------
# Study table
# ---------------------------------------------------------------------------------------


def build_study_table(
    train: pd.DataFrame,
    boxes: pd.DataFrame,
    *,
    folds: int = 10,
    seed: int = 0,
    exclude: Sequence[str] = DROPPED_STUDIES,
) -> pd.DataFrame:
    """``train.csv`` + ``train_bounding_boxes.csv`` -> one row per study, sorted by UID.

    Columns: StudyInstanceUID, patient_overall, C1..C7 (int8), cohort (one of
    :data:`COHORTS`), fold (0..folds-1), n_boxes (box rows), n_boxed_slices (distinct
    slice numbers with a box). Fold guarantees are in the module docstring.

    Raises ValueError for: a missing column (naming it and the file); a duplicated study
    row; a target that is not 0/1; patient_overall != max(C1..C7) (either direction: a
    fractured study with no fractured vertebra would have no slice labels); a boxed study
    that ``train.csv`` calls negative. Warns and ignores boxes of studies not in
    ``train.csv``; warns when excluded studies are present, and removes them (with
    their boxes) before any other check, since they are excluded for being broken.
    """
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 1:
        raise ValueError(f"folds must be an integer >= 1, got {folds!r}")
    _require_columns(train, TRAIN_COLUMNS, TRAIN_FILE)
    _require_columns(boxes, BOX_COLUMNS, BOXES_FILE)

    table = train.loc[:, list(TRAIN_COLUMNS)].copy()
    table["StudyInstanceUID"] = _uids(table["StudyInstanceUID"], TRAIN_FILE, paths=True)
    box_rows = boxes.loc[:, ["StudyInstanceUID", "slice_number"]].copy()
    box_rows["StudyInstanceUID"] = _uids(box_rows["StudyInstanceUID"], BOXES_FILE)

    excluded = {str(u) for u in exclude}
    present = sorted(excluded & set(table["StudyInstanceUID"]))
    if present:
        warnings.warn(f"{TRAIN_FILE}: removing {len(present)} excluded study/studies: {_preview(present)}",
                      stacklevel=2)
    table = table[~table["StudyInstanceUID"].isin(excluded)]
    box_rows = box_rows[~box_rows["StudyInstanceUID"].isin(excluded)]

    uid = table["StudyInstanceUID"]
    dup = uid[uid.duplicated()].unique()
    if len(dup):
        raise LabelError(f"{TRAIN_FILE}: {len(dup)} study/studies appear on more than one row: {_preview(dup)}")
    for col in ("patient_overall", *VERTEBRAE):
        values = pd.to_numeric(table[col], errors="coerce")
        bad = ~values.isin([0, 1])
        if bad.any():
            raise LabelError(f"{TRAIN_FILE}: column {col} must be 0 or 1; bad value(s) for {_preview(uid[bad])}")
        table[col] = values.astype(np.int8)
    any_vertebra = table[list(VERTEBRAE)].max(axis=1)
    inconsistent = any_vertebra != table["patient_overall"]
    if inconsistent.any():
        raise LabelError(
            f"{TRAIN_FILE}: patient_overall disagrees with C1..C7 (must equal their max) for "
            f"{int(inconsistent.sum())} study/studies: {_preview(uid[inconsistent])}"
        )

    unknown = sorted(set(box_rows["StudyInstanceUID"]) - set(uid))
    if unknown:
        warnings.warn(f"{BOXES_FILE}: ignoring boxes of {len(unknown)} study/studies not in {TRAIN_FILE}: "
                      f"{_preview(unknown)}", DataWarning, stacklevel=2)
        box_rows = box_rows[box_rows["StudyInstanceUID"].isin(set(uid))]
    grouped = box_rows.groupby("StudyInstanceUID")
    table["n_boxes"] = uid.map(grouped.size()).fillna(0).astype(np.int32)
    table["n_boxed_slices"] = uid.map(grouped["slice_number"].nunique()).fillna(0).astype(np.int32)

    boxed_negative = uid[(table["n_boxes"] > 0) & (table["patient_overall"] == 0)]
    if len(boxed_negative):
        raise LabelError(
            f"{BOXES_FILE}: study/studies with boxes are negative in {TRAIN_FILE}: {_preview(boxed_negative)}"
        )

    table["cohort"] = np.where(
        table["n_boxes"] > 0, COHORTS[0], np.where(table["patient_overall"] == 0, COHORTS[1], COHORTS[2])
    )
    table = table.sort_values("StudyInstanceUID", kind="stable").reset_index(drop=True)
    table["fold"] = _deal_folds(table["StudyInstanceUID"], table["cohort"], folds, seed)
    return table.loc[:, list(STUDY_TABLE_COLUMNS)]


def _deal_folds(uids: pd.Series, cohorts: pd.Series, folds: int, seed: int) -> np.ndarray:
    """Round-robin over sha1-ordered studies; one counter across cohorts balances totals too."""

    def key(uid: str) -> tuple[str, str]:
        return hashlib.sha1(f"{seed}:{uid}".encode()).hexdigest(), uid  # uid breaks (impossible) ties

    fold_of: dict[str, int] = {}
    dealt = 0
    for cohort in COHORTS:
        for uid in sorted(uids[cohorts == cohort], key=key):
            fold_of[uid] = dealt % folds
            dealt += 1
    return uids.map(fold_of).to_numpy(dtype=np.int16)


# ---------------------------------------------------------------------------------------
# Boxes -> volume indices
# ---------------------------------------------------------------------------------------


def boxes_to_index(
    boxes: pd.DataFrame, slice_number_to_index: Mapping[int, int], uid: str
) -> tuple[np.ndarray, np.ndarray]:
    """One study's box rows -> (sorted unique boxed volume indices, ``(n, 5)`` boxes).

    ``boxes`` may hold other studies' rows too; only ``uid``'s are used. The box array
    rows are ``(volume_index, x, y, width, height)`` (float64), sorted by volume index.
    Boxes whose slice_number is not in ``slice_number_to_index`` are dropped with a
    warning naming the study and the slice numbers.
    """
    _require_columns(boxes, BOX_COLUMNS, BOXES_FILE)
    rows = boxes[boxes["StudyInstanceUID"].astype(str).str.strip() == str(uid)]
    slice_numbers = pd.to_numeric(rows["slice_number"], errors="coerce").to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(slice_numbers) & (slice_numbers == np.round(slice_numbers))):
        raise LabelError(f"{BOXES_FILE}: study {uid} has a slice_number that is not an integer")
    slice_numbers = slice_numbers.astype(np.int64)
    coords = rows[["x", "y", "width", "height"]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    if not np.all(np.isfinite(coords)):
        raise LabelError(f"{BOXES_FILE}: study {uid} has a box with a missing or non-numeric coordinate")
    if np.any(coords[:, 2:] < 0):
        raise LabelError(f"{BOXES_FILE}: study {uid} has a box with negative width or height")

    known = np.array([int(s) in slice_number_to_index for s in slice_numbers], dtype=bool)
    if not known.all():
        unknown = sorted({int(s) for s in slice_numbers[~known]})
        warnings.warn(
            f"{BOXES_FILE}: study {uid}: dropping {int((~known).sum())} box(es) on slice number(s) "
            f"{unknown} that the study's DICOM series does not have",
            DataWarning,
            stacklevel=2,
        )
    index = np.array([slice_number_to_index[int(s)] for s in slice_numbers[known]], dtype=np.int64)
    table = np.column_stack([index.astype(np.float64), coords[known]]).reshape(-1, 5)
    table = table[np.argsort(index, kind="stable")]
    return np.unique(index), table


# ---------------------------------------------------------------------------------------
# Vertebra assignment
# ---------------------------------------------------------------------------------------


def _as_index(boxed_index: object) -> np.ndarray:
    """Validated sorted unique int64 volume indices."""
    idx = np.asarray(boxed_index)
    if idx.ndim != 1:
        raise ValueError(f"boxed_index must be 1-D, got shape {idx.shape}")
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not (np.issubdtype(idx.dtype, np.integer) or np.all(np.asarray(idx, dtype=np.float64) % 1 == 0)):
        raise ValueError("boxed_index must hold integer volume indices")
    idx = np.unique(idx.astype(np.int64))
    if idx[0] < 0:
        raise ValueError(f"boxed_index must be >= 0, got {int(idx[0])}")
    return idx


def _as_vertebrae(fractured: Sequence[int]) -> list[int]:
    verts = sorted({int(v) for v in fractured})
    bad = [v for v in verts if not 1 <= v <= len(VERTEBRAE)]
    if bad:
        raise ValueError(f"fractured vertebrae must be 1..{len(VERTEBRAE)} (C1..C7), got {bad}")
    return verts


def _as_boxes(boxes: object, idx: np.ndarray) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 5:
        raise ValueError(f"boxes must be (n, 5) rows of (volume_index, x, y, width, height), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr[:, 0] % 1 != 0):
        raise ValueError("boxes must be finite with an integer volume_index column")
    box_slices = set(arr[:, 0].astype(np.int64).tolist())
    boxed = set(idx.tolist())
    if box_slices != boxed:
        raise ValueError(
            "boxes and boxed_index disagree: slices with boxes but not in boxed_index "
            f"{sorted(box_slices - boxed)}, boxed slices without boxes {sorted(boxed - box_slices)}"
        )
    return arr


def _runs(idx: np.ndarray, max_gap: int) -> list[np.ndarray]:
    """Cut sorted indices where consecutive ones differ by more than ``max_gap + 1``."""
    cuts = np.flatnonzero(np.diff(idx) > max_gap + 1) + 1
    return np.split(idx, cuts)


def _assign_by_runs(idx: np.ndarray, verts: list[int], max_gap: int) -> dict[int, set[int]]:
    """Rule 3 (module docstring): runs matched cranio-caudally, merged or split to fit."""
    runs = _runs(idx, max_gap)
    while len(runs) > len(verts):
        gaps = [int(runs[i + 1][0] - runs[i][-1] - 1) for i in range(len(runs) - 1)]
        i = int(np.argmin(gaps))  # argmin returns the first minimum: the most cranial pair
        runs[i : i + 2] = [np.concatenate(runs[i : i + 2])]

    parts = [1] * len(runs)
    for _ in range(len(verts) - len(runs)):
        # Fraction: exact comparison, so equal part lengths tie and the cranial run wins.
        j = max(range(len(runs)), key=lambda r: (Fraction(len(runs[r]), parts[r]), -r))
        parts[j] += 1

    out: dict[int, set[int]] = {}
    first = 0
    for run, n_parts in zip(runs, parts):
        run_verts = verts[first : first + n_parts]
        first += n_parts
        if n_parts <= len(run):
            # array_split gives the extra slices to the first (cranial) parts.
            for chunk, v in zip(np.array_split(run, n_parts), run_verts):
                out.update({int(z): {v} for z in chunk})
        else:
            # More vertebrae than slices: each slice takes a contiguous group of vertebrae.
            for z, group in zip(run, np.array_split(np.asarray(run_verts), len(run))):
                out[int(z)] = {int(v) for v in group}
    assert len(out) == len(idx) and first == len(verts)
    return out


def _assign_by_seg(verts: list[int], seg: np.ndarray, boxes: np.ndarray) -> dict[int, set[int]]:
    """Rule 2 for the slices it resolves: each box -> fractured vertebra covering it most."""
    _, rows, cols = seg.shape
    out: dict[int, set[int]] = {}
    for z, x, y, w, h in boxes:
        r0, r1 = max(int(np.floor(y)), 0), min(int(np.ceil(y + h)), rows)
        c0, c1 = max(int(np.floor(x)), 0), min(int(np.ceil(x + w)), cols)
        if r1 <= r0 or c1 <= c0:
            continue  # box wholly outside the image
        patch = seg[int(z), r0:r1, c0:c1]  # (box rows, box cols)
        counts = np.array([np.count_nonzero(patch == v) for v in verts])
        if counts.max() > 0:
            # argmax returns the first maximum: ties go to the more cranial vertebra.
            out.setdefault(int(z), set()).add(verts[int(np.argmax(counts))])
    return out


def assign_vertebrae(
    boxed_index: np.ndarray,
    fractured: Sequence[int],
    *,
    seg: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    max_gap: int = 1,
) -> dict[int, set[int]]:
    """Map each boxed volume index to the fractured vertebra(e) it shows.

    boxed_index: volume indices with >=1 box (any order; duplicates are collapsed).
    fractured: vertebra numbers 1..7 positive in ``train.csv`` for this study.
    seg: optional ``(Z, rows, cols)`` label volume (1..7 = C1..C7) aligned with the volume.
    boxes: ``(n, 5)`` rows of ``(volume_index, x, y, width, height)``; required with ``seg``,
    and its slices must be exactly ``boxed_index``.
    max_gap: missing slices a run of boxed slices may bridge (rule 3).

    Returns ``{volume_index: {vertebra, ...}}`` for every boxed index. The rules and their
    tie-breaks are in the module docstring. Raises ValueError for boxed slices with no
    fractured vertebra, ``seg`` without ``boxes``, or inconsistent inputs.
    """
    if isinstance(max_gap, bool) or not isinstance(max_gap, (int, np.integer)) or max_gap < 0:
        raise ValueError(f"max_gap must be an integer >= 0, got {max_gap!r}")
    idx = _as_index(boxed_index)
    verts = _as_vertebrae(fractured)
    if boxes is not None:
        boxes = _as_boxes(boxes, idx)
    if seg is not None:
        seg = np.asarray(seg)
        if seg.ndim != 3:
            raise ValueError(f"seg must be (Z, rows, cols), got shape {seg.shape}")
        if idx.size and idx[-1] >= seg.shape[0]:
            raise ValueError(f"boxed slice {int(idx[-1])} is outside seg with {seg.shape[0]} slices")
        if boxes is None:
            raise ValueError("seg needs boxes: rule 2 measures mask voxels inside each box")

    if idx.size == 0:
        return {}
    if not verts:
        raise LabelError(f"{idx.size} boxed slice(s) but no fractured vertebra; the study's train.csv row is negative")
    if len(verts) == 1:  # rule 1
        return {int(z): {verts[0]} for z in idx}
    by_runs = _assign_by_runs(idx, verts, max_gap)  # rule 3
    if seg is None:
        return by_runs

    assert boxes is not None
    by_seg = _assign_by_seg(verts, seg, boxes)  # rule 2, resolved slices only
    out: dict[int, set[int]] = {}
    for run in _runs(idx, max_gap):
        resolved = [int(z) for z in run if int(z) in by_seg]
        for z in map(int, run):
            if z in by_seg:
                out[z] = by_seg[z]
            elif resolved:
                nearest = min(resolved, key=lambda r: (abs(r - z), r))  # equal distance: cranial
                out[z] = set(by_seg[nearest])
            else:
                out[z] = by_runs[z]
    return out


def slice_labels(
    n_slices: int,
    boxed_index: np.ndarray,
    fractured: Sequence[int],
    *,
    seg: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    max_gap: int = 1,
) -> np.ndarray:
    """``(n_slices, 8)`` uint8 targets (:data:`TARGETS`) for a boxed study.

    Boxed slices are positive for the vertebra(e) :func:`assign_vertebrae` gives them;
    every other slice is negative (the reference solution's assumption). The last
    column, "any", is the OR of C1..C7.
    """
    if isinstance(n_slices, bool) or not isinstance(n_slices, (int, np.integer)) or n_slices < 0:
        raise ValueError(f"n_slices must be an integer >= 0, got {n_slices!r}")
    idx = _as_index(boxed_index)
    if idx.size and idx[-1] >= n_slices:
        raise ValueError(f"boxed slice {int(idx[-1])} is outside a volume of {n_slices} slices")
    if seg is not None and np.shape(seg)[0] != n_slices:
        raise ValueError(f"seg has {np.shape(seg)[0]} slices, the volume {n_slices}")

    labels = np.zeros((n_slices, len(TARGETS)), dtype=np.uint8)  # (Z, C1..C7 + any)
    for z, verts in assign_vertebrae(idx, fractured, seg=seg, boxes=boxes, max_gap=max_gap).items():
        labels[z, [v - 1 for v in verts]] = 1
    labels[:, -1] = labels[:, :-1].max(axis=1, initial=0)
    return labels
