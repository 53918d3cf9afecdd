"""The study, slice and label tables (columns, dtypes, metadata) and the volume attributes with
their affine: what is written is what is read."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spinestream.shards.layout import TARGETS
from spinestream.shards.tables import (SLICE_COLUMNS, STUDY_COLUMNS, LabelTable, label_frame, read_label_table,
                           read_slice_table, read_study_table, write_label_table, write_slice_table,
                           write_study_table)
from spinestream.shards.volumes import VolumeAttrs, read_attrs, write_volume


def _study_rows(n: int = 2) -> pd.DataFrame:
    data = {}
    for c in STUDY_COLUMNS:
        data[c.name] = [f"1.2.{i}" for i in range(n)] if c.dtype == "str" else np.arange(n).astype(c.dtype)
    return pd.DataFrame(data)


def test_study_and_slice_tables_round_trip_with_their_dtypes(tmp_path):
    rows = _study_rows()
    rows["extra"] = 1  # not part of the contract: dropped
    write_study_table(tmp_path / "studies.parquet", rows)
    back = read_study_table(tmp_path / "studies.parquet")
    assert list(back.columns) == [c.name for c in STUDY_COLUMNS]
    for c in STUDY_COLUMNS:
        if c.dtype == "str":
            assert pd.api.types.is_string_dtype(back[c.name]), c.name
        else:
            assert str(back[c.name].dtype) == c.dtype, c.name

    slices = pd.DataFrame({"slice_id": [0, 1, 2], "StudyInstanceUID": ["a", "a", "b"], "slice_number": [1, 2, 1],
                           "index": [0, 1, 0], "z": [2.0, 1.0, 5.0], "cohort": "boxed", "fold": 0, "shard": "s"})
    write_slice_table(tmp_path / "slices.parquet", slices)
    back = read_slice_table(tmp_path / "slices.parquet")
    assert [str(back[c.name].dtype) for c in SLICE_COLUMNS if c.dtype != "str"] == [
        "int64", "int64", "int32", "float64", "int8"]
    assert all(pd.api.types.is_string_dtype(back[c.name]) for c in SLICE_COLUMNS if c.dtype == "str")
    with pytest.raises(ValueError, match="slice_id must run"):
        write_slice_table(tmp_path / "bad.parquet", slices.iloc[::-1])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['shard'\]"):
        write_slice_table(tmp_path / "bad.parquet", slices.drop(columns="shard"))
    slices.drop(columns="z").to_parquet(tmp_path / "old.parquet")
    with pytest.raises(ValueError, match=r"old\.parquet: missing column\(s\) \['z'\]"):
        read_slice_table(tmp_path / "old.parquet")
    # reading some columns only: they are checked like the whole table
    part = read_slice_table(tmp_path / "slices.parquet", columns=["slice_id", "cohort"])
    assert list(part.columns) == ["slice_id", "cohort"] and part.slice_id.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"old\.parquet: missing column\(s\) \['z'\]"):
        read_slice_table(tmp_path / "old.parquet", columns=["slice_id", "z"])
    with pytest.raises(ValueError, match=r"\['slices'\] are not columns of this table"):
        read_study_table(tmp_path / "studies.parquet", columns=["StudyInstanceUID", "slices"])


def test_label_table_round_trip_with_extras_and_metadata(tmp_path):
    probs = np.random.default_rng(0).random((4, 8)).astype(np.float32)
    frame = label_frame(np.array([3, 1, 7, 2]), probs, extra={"weight": np.array([1.0, 0.5, 1.0, 0.25])})
    meta = {"source": "pseudo", "run": "runs/round1", "threshold": 0.5}
    write_label_table(tmp_path / "pseudo-r2.parquet", LabelTable(frame, meta))
    back = read_label_table(tmp_path / "pseudo-r2.parquet")
    assert back.metadata == meta and back.extra_columns == ["weight"]
    assert list(back.frame.columns) == ["slice_id", *TARGETS, "weight"]
    np.testing.assert_array_equal(back.frame[list(TARGETS)].to_numpy(), probs)
    assert back.frame[list(TARGETS)].dtypes.unique().tolist() == [np.float32]

    hard = label_frame(np.arange(3), np.eye(3, 8, dtype=np.uint8))
    write_label_table(tmp_path / "truth.parquet", LabelTable(hard))
    back = read_label_table(tmp_path / "truth.parquet")
    assert back.metadata == {} and back.frame["C1"].dtype == np.uint8
    with pytest.raises(ValueError, match="not unique"):
        write_label_table(tmp_path / "dup.parquet", LabelTable(label_frame([1, 1], np.zeros((2, 8), np.uint8))))
    with pytest.raises(ValueError, match=r"targets must be \(n, 8\)"):
        label_frame([1], np.zeros((1, 7)))
    # a plain parquet without the metadata still reads (metadata {})
    hard.to_parquet(tmp_path / "plain.parquet", index=False)
    assert read_label_table(tmp_path / "plain.parquet").metadata == {}
    # a table pandas made (float64 targets) reads; text targets do not
    floats = pd.DataFrame({"slice_id": [0, 1], **{t: [0.0, 0.5] for t in TARGETS}})
    floats.to_parquet(tmp_path / "float64.parquet", index=False)
    assert read_label_table(tmp_path / "float64.parquet").frame["any"].tolist() == [0.0, 0.5]
    floats.astype({"C3": str}).to_parquet(tmp_path / "text.parquet", index=False)
    with pytest.raises(ValueError, match=r"\['C3'\] are not numeric"):
        read_label_table(tmp_path / "text.parquet")


def test_volume_attrs_and_affine_round_trip(tmp_path):
    t = np.deg2rad(20.0)
    attrs = VolumeAttrs(study="1.2.3", z=[10.0, 8.0, 6.0], slice_numbers=[1, 2, 3], spacing=[2.0, 0.5, 0.4],
                        z_reversed=False, channels="neighbours", windows=[[400.0, 1800.0]], offset_mm=1.0,
                        direction=[1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(-np.sin(t))],
                        normal=[0.0, float(np.sin(t)), float(np.cos(t))], origin=[-50.0, -60.0, 10.0],
                        source_shape=[16, 20])
    vol = np.zeros((3, 8, 10), np.uint8)  # resized by 2 from (16, 20)
    write_volume(tmp_path / "tmp", tmp_path / "v" / "1.2.3", vol, attrs)
    back = read_attrs(tmp_path / "v" / "1.2.3")
    assert back == attrs
    a = back.affine(vol.shape)
    # output pixel (i, j) centre = source pixel (2i + 0.5, 2j + 0.5)
    row, col, n = np.array(attrs.direction[:3]), np.array(attrs.direction[3:]), np.array(attrs.normal)
    for k, i, j in [(0, 0, 0), (2, 3, 4), (1, 7, 9)]:
        want = np.array(attrs.origin) - k * 2.0 * n + (2 * i + 0.5) * 0.5 * col + (2 * j + 0.5) * 0.4 * row
        np.testing.assert_allclose(a @ [k, i, j, 1], [*want, 1.0], atol=1e-9)
    with pytest.raises(ValueError, match="lack"):
        VolumeAttrs.from_json({"study": "x"})
