"""Round-1 labels: study table, vertebra assignment rules 1-3, slice targets, box mapping."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from spinestream.preprocess.labels import (
    COHORTS,
    DROPPED_STUDIES,
    TARGETS,
    VERTEBRAE,
    assign_vertebrae,
    boxes_to_index,
    build_study_table,
    slice_labels,
)

# ---------------------------------------------------------------------------------------
# Study table
# ---------------------------------------------------------------------------------------


def _train(rows: list[tuple[str, list[int]]]) -> pd.DataFrame:
    """rows: (uid, fractured vertebra numbers)."""
    records = []
    for uid, fractured in rows:
        rec = {"StudyInstanceUID": uid, "patient_overall": int(bool(fractured))}
        rec.update({f"C{v}": int(v in fractured) for v in range(1, 8)})
        records.append(rec)
    return pd.DataFrame(records)


def _boxes(rows: list[tuple[str, int]]) -> pd.DataFrame:
    """rows: (uid, slice_number); every box is 10x10 at (5, 5)."""
    return pd.DataFrame(
        [{"StudyInstanceUID": u, "x": 5.0, "y": 5.0, "width": 10.0, "height": 10.0, "slice_number": s}
         for u, s in rows],
        columns=["StudyInstanceUID", "x", "y", "width", "height", "slice_number"],
    )


def _cohort_data(n_boxed: int = 23, n_neg: int = 41, n_pos: int = 17) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, box_rows = [], []
    for i in range(n_boxed):
        uid = f"1.2.3.{i}"
        rows.append((uid, [1 + i % 7]))
        box_rows += [(uid, 100 + i), (uid, 101 + i), (uid, 101 + i)]  # 3 boxes on 2 slices
    rows += [(f"1.2.4.{i}", []) for i in range(n_neg)]
    rows += [(f"1.2.5.{i}", [2, 5]) for i in range(n_pos)]
    return _train(rows), _boxes(box_rows)


def test_study_table_cohorts_columns_and_counts() -> None:
    train, boxes = _cohort_data()
    table = build_study_table(train, boxes)
    assert list(table.columns) == [
        "StudyInstanceUID", "patient_overall", *VERTEBRAE, "cohort", "fold", "n_boxes", "n_boxed_slices",
    ]
    assert table["StudyInstanceUID"].is_monotonic_increasing and len(table) == len(train)
    for col in ("patient_overall", *VERTEBRAE):
        assert table[col].dtype == np.int8
    by = table.set_index("StudyInstanceUID")
    assert by.loc["1.2.3.0", "cohort"] == "boxed"
    assert by.loc["1.2.3.0", "n_boxes"] == 3 and by.loc["1.2.3.0", "n_boxed_slices"] == 2
    assert by.loc["1.2.3.4", "C5"] == 1 and by.loc["1.2.3.4", "C1"] == 0
    assert by.loc["1.2.4.0", "cohort"] == "negative" and by.loc["1.2.4.0", "n_boxes"] == 0
    assert by.loc["1.2.5.0", "cohort"] == "positive-unboxed" and by.loc["1.2.5.0", "n_boxed_slices"] == 0
    assert table["cohort"].value_counts().to_dict() == {"negative": 41, "boxed": 23, "positive-unboxed": 17}
    assert set(table["cohort"]) <= set(COHORTS)


@pytest.mark.parametrize("folds", [3, 5, 10])
def test_folds_balanced_within_each_cohort_and_overall(folds: int) -> None:
    train, boxes = _cohort_data()
    table = build_study_table(train, boxes, folds=folds)
    assert set(table["fold"]) == set(range(folds))
    for cohort in COHORTS:
        sizes = table.loc[table["cohort"] == cohort, "fold"].value_counts().reindex(range(folds), fill_value=0)
        assert sizes.max() - sizes.min() <= 1, (cohort, sizes.to_dict())
    sizes = table["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1


def test_folds_deterministic_order_independent_and_seeded() -> None:
    train, boxes = _cohort_data()
    a = build_study_table(train, boxes, seed=0)
    shuffled = train.sample(frac=1.0, random_state=1).reset_index(drop=True)
    b = build_study_table(shuffled, boxes.iloc[::-1], seed=0)
    pd.testing.assert_frame_equal(a, b)
    c = build_study_table(train, boxes, seed=1)
    assert (a["fold"] != c["fold"]).sum() > len(a) // 2  # a new seed reshuffles most studies
    assert c["fold"].value_counts().max() - c["fold"].value_counts().min() <= 1


@pytest.mark.parametrize(
    "frame, column, file",
    [("train", "C4", "train.csv"), ("train", "patient_overall", "train.csv"),
     ("boxes", "slice_number", "train_bounding_boxes.csv"), ("boxes", "width", "train_bounding_boxes.csv")],
)
def test_missing_column_names_column_and_file(frame: str, column: str, file: str) -> None:
    train, boxes = _cohort_data(3, 3, 3)
    if frame == "train":
        train = train.drop(columns=column)
    else:
        boxes = boxes.drop(columns=column)
    with pytest.raises(ValueError, match=rf"{file}.*{column}"):
        build_study_table(train, boxes)


def test_duplicated_study_row_raises() -> None:
    train = _train([("1.1", []), ("1.2", [3]), ("1.1", [])])
    with pytest.raises(ValueError, match=r"train\.csv.*more than one row.*1\.1"):
        build_study_table(train, _boxes([]))


@pytest.mark.parametrize("overall, fractured", [(0, [2]), (1, [])])
def test_inconsistent_patient_overall_raises(overall: int, fractured: list[int]) -> None:
    train = _train([("1.1", fractured), ("1.2", [])])
    train.loc[0, "patient_overall"] = overall
    with pytest.raises(ValueError, match=r"patient_overall disagrees.*1\.1"):
        build_study_table(train, _boxes([]))


def test_non_binary_target_raises() -> None:
    train = _train([("1.1", [2])])
    train.loc[0, "C3"] = 2
    with pytest.raises(ValueError, match=r"C3 must be 0 or 1.*1\.1"):
        build_study_table(train, _boxes([]))


def test_boxed_negative_study_raises_naming_it() -> None:
    train = _train([("1.1", []), ("1.2", [3])])
    with pytest.raises(ValueError, match=r"negative in train\.csv: 1\.1"):
        build_study_table(train, _boxes([("1.1", 10), ("1.2", 4)]))


def test_boxes_of_unknown_studies_warn_and_are_ignored() -> None:
    train = _train([("1.1", [3]), ("1.2", [])])
    with pytest.warns(UserWarning, match=r"not in train\.csv: 9\.9"):
        table = build_study_table(train, _boxes([("1.1", 10), ("9.9", 4), ("9.9", 5)]))
    assert list(table["StudyInstanceUID"]) == ["1.1", "1.2"]
    assert table["n_boxes"].tolist() == [1, 0]


def test_excluded_studies_removed_with_warning() -> None:
    dropped = DROPPED_STUDIES[0]
    # The excluded study is broken on purpose (boxed but negative): exclusion comes first.
    train = _train([("1.1", [3]), (dropped, [])])
    boxes = _boxes([("1.1", 10), (dropped, 4)])
    with pytest.warns(UserWarning, match=rf"excluded.*{dropped}"):
        table = build_study_table(train, boxes)
    assert list(table["StudyInstanceUID"]) == ["1.1"]
    with pytest.warns(UserWarning, match=r"excluded.*1\.1"):
        table = build_study_table(train, boxes, exclude=["1.1", dropped])
    assert table.empty
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # excluded-but-absent studies are silent
        build_study_table(_train([("1.1", [3])]), _boxes([("1.1", 10)]))


def test_bad_folds_raises() -> None:
    with pytest.raises(ValueError, match="folds"):
        build_study_table(_train([("1.1", [])]), _boxes([]), folds=0)


# ---------------------------------------------------------------------------------------
# assign_vertebrae: rules 1 and 3
# ---------------------------------------------------------------------------------------


def _by_vertebra(assigned: dict[int, set[int]]) -> dict[int, list[int]]:
    """{vertebra: sorted slices} -- easier to read in asserts."""
    out: dict[int, list[int]] = {}
    for z, verts in assigned.items():
        for v in verts:
            out.setdefault(v, []).append(z)
    return {v: sorted(zs) for v, zs in sorted(out.items())}


def test_rule1_single_vertebra_takes_every_boxed_slice() -> None:
    idx = np.array([40, 3, 20, 21])
    assert assign_vertebrae(idx, [5]) == {3: {5}, 20: {5}, 21: {5}, 40: {5}}
    # A segmentation is irrelevant with one fractured vertebra (even an empty one).
    boxes = np.array([[z, 0, 0, 4, 4] for z in idx], dtype=float)
    assert assign_vertebrae(idx, [5], seg=np.zeros((50, 8, 8), np.uint8), boxes=boxes) == {
        3: {5}, 20: {5}, 21: {5}, 40: {5}}


def test_rule3_two_runs_cranio_caudal() -> None:
    idx = np.array([60, 61, 62, 10, 11, 12, 13])  # any order
    assert _by_vertebra(assign_vertebrae(idx, [6, 2])) == {2: [10, 11, 12, 13], 6: [60, 61, 62]}


def test_rule3_three_runs() -> None:
    idx = np.r_[5:8, 30:34, 80:82]
    assert _by_vertebra(assign_vertebrae(idx, [1, 3, 7])) == {1: [5, 6, 7], 3: [30, 31, 32, 33], 7: [80, 81]}


def test_rule3_gap_tolerance() -> None:
    idx = np.array([10, 11, 13, 14, 17, 18])  # gap of 1 (12) and gap of 2 (15, 16)
    # max_gap=1: 12 is bridged, 15-16 is not -> two runs.
    assert _by_vertebra(assign_vertebrae(idx, [2, 3])) == {2: [10, 11, 13, 14], 3: [17, 18]}
    # max_gap=0: three runs for two vertebrae -> the two separated by the smallest gap merge.
    assert _by_vertebra(assign_vertebrae(idx, [2, 3], max_gap=0)) == {2: [10, 11, 13, 14], 3: [17, 18]}
    # max_gap=2 bridges both gaps -> one run split in half.
    assert _by_vertebra(assign_vertebrae(idx, [2, 3], max_gap=2)) == {2: [10, 11, 13], 3: [14, 17, 18]}
    # Three vertebrae, max_gap=0: three runs, one each.
    assert _by_vertebra(assign_vertebrae(idx, [2, 3, 4], max_gap=0)) == {2: [10, 11], 3: [13, 14], 4: [17, 18]}
    with pytest.raises(ValueError, match="max_gap"):
        assign_vertebrae(idx, [2, 3], max_gap=-1)


def test_rule3_merges_runs_separated_by_smallest_gap() -> None:
    idx = np.array([0, 1, 10, 11, 14, 15])  # gaps: 8 then 2 -> merge the last two runs
    assert _by_vertebra(assign_vertebrae(idx, [4, 5])) == {4: [0, 1], 5: [10, 11, 14, 15]}
    idx = np.array([0, 1, 5, 6, 30, 40])  # gaps 3, 23, 9 -> merge first pair, then the last pair
    assert _by_vertebra(assign_vertebrae(idx, [4, 5])) == {4: [0, 1, 5, 6], 5: [30, 40]}
    # Equal gaps: the most cranial pair merges first.
    idx = np.array([0, 10, 20])
    assert _by_vertebra(assign_vertebrae(idx, [1, 2])) == {1: [0, 10], 2: [20]}


def test_rule3_splits_when_fewer_runs() -> None:
    # One run, two vertebrae: equal halves; odd length -> the cranial part takes the extra.
    assert _by_vertebra(assign_vertebrae(np.arange(10, 16), [1, 2])) == {1: [10, 11, 12], 2: [13, 14, 15]}
    assert _by_vertebra(assign_vertebrae(np.arange(10, 15), [1, 2])) == {1: [10, 11, 12], 2: [13, 14]}
    # One run of 9, three vertebrae: thirds (not halves of halves).
    assert _by_vertebra(assign_vertebrae(np.arange(9), [2, 3, 4])) == {2: [0, 1, 2], 3: [3, 4, 5], 4: [6, 7, 8]}
    # Two runs, three vertebrae: the longest run is split, order is kept.
    idx = np.r_[0:3, 20:30]
    assert _by_vertebra(assign_vertebrae(idx, [1, 2, 3])) == {
        1: [0, 1, 2], 2: list(range(20, 25)), 3: list(range(25, 30))}
    # Equal-length runs: the cranial one is split.
    idx = np.r_[0:4, 20:24]
    assert _by_vertebra(assign_vertebrae(idx, [1, 2, 3])) == {1: [0, 1], 2: [2, 3], 3: [20, 21, 22, 23]}


def test_single_boxed_slice_with_several_vertebrae_is_positive_for_all() -> None:
    assert assign_vertebrae(np.array([42]), [2, 3]) == {42: {2, 3}}
    assert assign_vertebrae(np.array([42]), [1, 4, 7]) == {42: {1, 4, 7}}
    # Two boxed slices, three vertebrae: contiguous groups, the cranial slice takes the extra.
    assert assign_vertebrae(np.array([5, 6]), [1, 2, 3]) == {5: {1, 2}, 6: {3}}
    assert assign_vertebrae(np.array([5, 50]), [1, 2, 3]) == {5: {1, 2}, 50: {3}}


def test_assign_input_validation() -> None:
    with pytest.raises(ValueError, match="no fractured vertebra"):
        assign_vertebrae(np.array([1, 2]), [])
    assert assign_vertebrae(np.array([], dtype=int), []) == {}
    with pytest.raises(ValueError, match="1..7"):
        assign_vertebrae(np.array([1]), [8])
    with pytest.raises(ValueError, match="boxed_index must be >= 0"):
        assign_vertebrae(np.array([-1, 2]), [1])
    # Duplicates and unsorted fractured lists are harmless.
    assert assign_vertebrae(np.array([3, 3, 2]), [2, 2]) == {2: {2}, 3: {2}}
    assert all(type(z) is int for z in assign_vertebrae(np.array([3, 9]), [1, 2]))


# ---------------------------------------------------------------------------------------
# assign_vertebrae: rule 2 (segmentation)
# ---------------------------------------------------------------------------------------

Z, ROWS, COLS = 12, 32, 32


def _seg(c2_slices: range, c3_slices: range) -> np.ndarray:
    """C2 and C3 masks over rows 8..15, cols 8..15 on the given slices; C4 at cols 24..31."""
    seg = np.zeros((Z, ROWS, COLS), dtype=np.uint8)  # (Z, rows, cols)
    seg[c2_slices, 8:16, 8:16] = 2
    seg[c3_slices, 8:16, 8:16] = 3
    seg[:, 8:16, 24:32] = 4
    return seg


def _boxes_on(slices, x: float = 9, y: float = 9, w: float = 4, h: float = 4) -> np.ndarray:
    return np.array([[z, x, y, w, h] for z in slices], dtype=float)


def test_rule2_seg_decides_where_rule3_would_differ() -> None:
    seg = _seg(range(0, 4), range(4, 12))
    idx = np.arange(2, 10)  # one run of 8 boxed slices
    by_runs = assign_vertebrae(idx, [2, 3])
    assert _by_vertebra(by_runs) == {2: [2, 3, 4, 5], 3: [6, 7, 8, 9]}  # rule 3: halves
    by_seg = assign_vertebrae(idx, [2, 3], seg=seg, boxes=_boxes_on(idx))
    assert _by_vertebra(by_seg) == {2: [2, 3], 3: [4, 5, 6, 7, 8, 9]}  # the mask boundary


def test_rule2_majority_coverage_per_box_and_union_per_slice() -> None:
    seg = np.zeros((Z, ROWS, COLS), dtype=np.uint8)
    seg[5, 0:10, 0:16] = 2  # C2 above row 10
    seg[5, 10:32, 0:16] = 3  # C3 below
    seg[5, 0:32, 20:32] = 1  # C1 to the right
    # Box over rows 4..11: 6 rows of C2, 2 rows of C3 -> C2.
    assert assign_vertebrae(np.array([5]), [2, 3], seg=seg, boxes=_boxes_on([5], x=2, y=4, w=8, h=8)) == {5: {2}}
    # Box over rows 8..15: 2 rows of C2, 6 of C3 -> C3.
    assert assign_vertebrae(np.array([5]), [2, 3], seg=seg, boxes=_boxes_on([5], x=2, y=8, w=8, h=8)) == {5: {3}}
    # Exactly half and half (rows 6..13): the more cranial vertebra.
    assert assign_vertebrae(np.array([5]), [2, 3], seg=seg, boxes=_boxes_on([5], x=2, y=6, w=8, h=8)) == {5: {2}}
    # Two boxes on one slice over two vertebrae: positive for both.
    two = np.array([[5, 2, 20, 8, 8], [5, 24, 2, 4, 4]], dtype=float)
    assert assign_vertebrae(np.array([5]), [1, 3], seg=seg, boxes=two) == {5: {1, 3}}
    # Fractional box edges cover every touched pixel (cols 16..19 are background): a box over
    # cols 15.5..15.7 touches col 15 (C2), one over cols 19.2..20.2 touches col 20 (C1). A miss
    # would fall back to rule 3, which gives the single slice both vertebrae.
    start = np.array([[5, 15.5, 0.5, 0.2, 2.0]])
    assert assign_vertebrae(np.array([5]), [1, 2], seg=seg, boxes=start) == {5: {2}}
    end = np.array([[5, 19.2, 0.5, 1.0, 2.0]])
    assert assign_vertebrae(np.array([5]), [1, 2], seg=seg, boxes=end) == {5: {1}}
    rows_end = np.array([[5, 2, 9.2, 4, 1.0]])  # rows 9..10.2 touch row 10 (C3); row 9 is C2
    assert assign_vertebrae(np.array([5]), [1, 3], seg=seg, boxes=rows_end) == {5: {3}}


def test_rule2_box_clipped_to_image() -> None:
    seg = _seg(range(0, 6), range(6, 12))
    boxes = np.array([[1, -50, -50, 70, 70], [8, 10, 10, 500, 500]], dtype=float)
    assert assign_vertebrae(np.array([1, 8]), [2, 3], seg=seg, boxes=boxes, max_gap=0) == {1: {2}, 8: {3}}


def test_rule2_unresolved_edge_slice_takes_nearest_resolved_in_run() -> None:
    seg = _seg(range(0, 4), range(4, 12))
    idx = np.arange(2, 10)
    boxes = _boxes_on(idx)
    boxes[-1, 1:3] = [0, 24]  # slice 9's box sits on background (rows 24..27, cols 0..3)
    boxes[0, 1:3] = [25, 9]  # slice 2's box sits on C4, which is not fractured
    got = assign_vertebrae(idx, [2, 3], seg=seg, boxes=boxes)
    # Slice 2 -> nearest resolved slice 3 (C2); slice 9 -> slice 8 (C3). Rule 3 would give 9 -> C3
    # too, but 2..5 -> C2; the seg boundary (4) must survive.
    assert _by_vertebra(got) == {2: [2, 3], 3: [4, 5, 6, 7, 8, 9]}


def test_rule2_nearest_resolved_tie_goes_cranial() -> None:
    seg = _seg(range(0, 5), range(5, 12))
    idx = np.arange(3, 8)
    boxes = _boxes_on(idx)
    boxes[2, 1:3] = [0, 24]  # slice 5 (first C3 slice) misses; neighbours 4 (C2) and 6 (C3)
    got = assign_vertebrae(idx, [2, 3], seg=seg, boxes=boxes)
    assert got[5] == {2}


def test_rule2_falls_back_to_rule3_when_box_misses_mask() -> None:
    seg = _seg(range(0, 4), range(4, 12))
    idx = np.arange(2, 10)
    missing = _boxes_on(idx, x=0, y=24)  # every box on background
    assert assign_vertebrae(idx, [2, 3], seg=seg, boxes=missing) == assign_vertebrae(idx, [2, 3])
    empty_seg = np.zeros_like(seg)  # no segmentation content at all (e.g. misaligned)
    assert assign_vertebrae(idx, [2, 3], seg=empty_seg, boxes=_boxes_on(idx)) == assign_vertebrae(idx, [2, 3])


def test_rule2_run_without_resolved_slice_uses_rule3_for_that_run() -> None:
    seg = np.zeros((Z, ROWS, COLS), dtype=np.uint8)
    seg[0:4, 8:16, 8:16] = 2  # only the first run has mask under its boxes
    idx = np.r_[1:3, 8:11]
    got = assign_vertebrae(idx, [2, 3], seg=seg, boxes=_boxes_on(idx))
    # Run 1 (1, 2) resolved by seg -> C2; run 2 (8..10) has no mask -> rule 3's answer (C3),
    # not the nearest resolved slice across the gap (which would say C2).
    assert got == {1: {2}, 2: {2}, 8: {3}, 9: {3}, 10: {3}}


def test_rule2_input_validation() -> None:
    seg = _seg(range(0, 4), range(4, 12))
    idx = np.arange(2, 5)
    with pytest.raises(ValueError, match="seg needs boxes"):
        assign_vertebrae(idx, [2, 3], seg=seg)
    with pytest.raises(ValueError, match="disagree"):
        assign_vertebrae(idx, [2, 3], seg=seg, boxes=_boxes_on([2, 3]))
    with pytest.raises(ValueError, match=r"\(n, 5\)"):
        assign_vertebrae(idx, [2, 3], seg=seg, boxes=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="outside seg"):
        assign_vertebrae(np.array([20]), [2, 3], seg=seg, boxes=_boxes_on([20]))


# ---------------------------------------------------------------------------------------
# slice_labels
# ---------------------------------------------------------------------------------------


def test_slice_labels_shape_dtype_any_and_negatives() -> None:
    idx = np.array([2, 3, 4, 10, 11, 12])
    labels = slice_labels(16, idx, [1, 3])
    assert labels.shape == (16, len(TARGETS)) and labels.dtype == np.uint8 and len(TARGETS) == 8
    assert labels[[2, 3, 4], 0].tolist() == [1, 1, 1] and labels[[10, 11, 12], 2].tolist() == [1, 1, 1]
    assert labels[:, [1, 3, 4, 5, 6]].sum() == 0
    np.testing.assert_array_equal(labels[:, -1], labels[:, :7].max(axis=1))
    unboxed = np.setdiff1d(np.arange(16), idx)
    assert labels[unboxed].sum() == 0
    # A slice positive for two vertebrae has both set and any = 1.
    two = slice_labels(5, np.array([1]), [2, 3])
    assert two[1].tolist() == [0, 1, 1, 0, 0, 0, 0, 1] and two.sum() == 3


def test_slice_labels_with_seg_and_validation() -> None:
    seg = _seg(range(0, 4), range(4, 12))
    idx = np.arange(2, 10)
    labels = slice_labels(Z, idx, [2, 3], seg=seg, boxes=_boxes_on(idx))
    assert np.flatnonzero(labels[:, 1]).tolist() == [2, 3]
    assert np.flatnonzero(labels[:, 2]).tolist() == [4, 5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="outside a volume"):
        slice_labels(5, np.array([5]), [1])
    with pytest.raises(ValueError, match="seg has"):
        slice_labels(Z + 1, idx, [2, 3], seg=seg, boxes=_boxes_on(idx))
    assert slice_labels(4, np.array([], dtype=int), []).sum() == 0


# ---------------------------------------------------------------------------------------
# boxes_to_index
# ---------------------------------------------------------------------------------------


def test_boxes_to_index_maps_and_drops_unknown_slice_numbers() -> None:
    boxes = pd.DataFrame({
        "StudyInstanceUID": ["1.1", "1.1", "1.1", "1.1", "2.2"],
        "x": [1.0, 2.0, 3.0, 4.0, 5.0],
        "y": [10.0, 20.0, 30.0, 40.0, 50.0],
        "width": [5.0, 5.0, 5.0, 5.0, 5.0],
        "height": [6.0, 6.0, 6.0, 6.0, 6.0],
        "slice_number": [101, 100, 999, 101, 100],
    })
    mapping = {100: 7, 101: 6, 102: 5}  # file numbers run feet to head in this study
    with pytest.warns(UserWarning, match=r"1\.1.*\[999\]"):
        index, table = boxes_to_index(boxes, mapping, "1.1")
    assert index.tolist() == [6, 7] and index.dtype == np.int64
    assert table.shape == (3, 5) and table.dtype == np.float64
    assert table.tolist() == [[6, 1, 10, 5, 6], [6, 4, 40, 5, 6], [7, 2, 20, 5, 6]]
    # The outputs feed assign_vertebrae directly.
    assert assign_vertebrae(index, [2], seg=np.zeros((8, 64, 64), np.uint8), boxes=table) == {6: {2}, 7: {2}}


def test_boxes_to_index_no_boxes_and_no_warning_when_all_known() -> None:
    boxes = _boxes([("1.1", 3)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index, table = boxes_to_index(boxes, {3: 0}, "1.1")
        assert index.tolist() == [0] and table.shape == (1, 5)
        index, table = boxes_to_index(boxes, {3: 0}, "other")
    assert index.shape == (0,) and table.shape == (0, 5)
    bad = boxes.assign(x=np.nan)
    with pytest.raises(ValueError, match=r"1\.1.*coordinate"):
        boxes_to_index(bad, {3: 0}, "1.1")


def test_dropped_studies_have_one_definition() -> None:
    """shards.layout holds the list; the label code and the shard config use it (issue 10)."""
    import inspect

    import spinestream.preprocess.labels as labels_mod
    from spinestream.shards import layout
    from spinestream.shards.shard_config import ShardConfig

    assert "1.2.826.0.1.3680043.29952" in layout.DROPPED_STUDIES and "1.2.826.0.1.3680043.20574" in layout.DROPPED_STUDIES
    assert labels_mod.DROPPED_STUDIES is layout.DROPPED_STUDIES and labels_mod.TARGETS is layout.TARGETS
    assert labels_mod.COHORTS is layout.COHORTS
    assert inspect.signature(build_study_table).parameters["exclude"].default is layout.DROPPED_STUDIES
    assert ShardConfig().exclude_studies == list(layout.DROPPED_STUDIES)


def test_bad_boxes_raise_label_error_and_a_dropped_box_is_a_data_warning() -> None:
    """Bad input is a LabelError (the shard job fails that study, not the job); a box on a slice the
    series lacks is a DataWarning (the shard job lists it in the manifest)."""
    from spinestream.preprocess.errors import DataWarning, LabelError

    boxes = pd.DataFrame({"StudyInstanceUID": ["1.1"], "x": [1.0], "y": [2.0], "width": [3.0], "height": [4.0],
                          "slice_number": [1.5]})
    with pytest.raises(LabelError, match="not an integer"):
        boxes_to_index(boxes, {1: 0}, "1.1")
    with pytest.raises(LabelError, match="negative width"):
        boxes_to_index(boxes.assign(slice_number=1, width=-1.0), {1: 0}, "1.1")
    with pytest.warns(DataWarning, match=r"\[7\]"):
        boxes_to_index(boxes.assign(slice_number=7), {1: 0}, "1.1")
    with pytest.raises(LabelError, match="missing column"):
        build_study_table(pd.DataFrame({"StudyInstanceUID": ["1.1"]}), boxes)
