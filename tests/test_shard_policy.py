"""The shard job's error policy (preprocess/errors.py) end to end: data warnings raised inside a
worker reach manifest.json naming the study; the two keep-and-warn cases (a ragged slice, an
unreadable segmentation); verify's warning summary; the volumes' affine against the DICOM files."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pydicom
import pytest

from conftest import CFG
from spinestream.preprocess.convert import shard_dataset
from spinestream.preprocess.errors import DataWarning
from spinestream.shards.manifest import read_manifest
from spinestream.shards.shard_config import ShardConfig
from spinestream.shards.verify import main as verify_main
from spinestream.shards.verify import verify
from spinestream.shards.volumes import read_attrs
from test_convert import subset


def _boxed_with_seg(raw) -> str:
    boxes = pd.read_csv(raw / "train_bounding_boxes.csv")
    segs = {p.stem for p in (raw / "segmentations").glob("*.nii")}
    return sorted(set(boxes.StudyInstanceUID) & segs)[0]


def _negative(raw) -> str:
    train = pd.read_csv(raw / "train.csv")
    return sorted(train.StudyInstanceUID[train.patient_overall == 0])[0]


def test_a_warning_in_a_worker_reaches_the_manifest(raw, tmp_path):
    """A box on a slice the study lacks: the worker drops it with a DataWarning; two workers."""
    boxed, neg = _boxed_with_seg(raw), _negative(raw)
    data = subset(raw, tmp_path / "raw", [boxed, neg])
    b = pd.read_csv(data / "train_bounding_boxes.csv")
    extra = b.iloc[[0]].assign(slice_number=999)
    pd.concat([b, extra]).to_csv(data / "train_bounding_boxes.csv", index=False)
    m = shard_dataset(data, tmp_path / "out", ShardConfig(**CFG), workers=2)
    assert [(w.study, "[999]" in w.message) for w in m.warnings] == [(boxed, True)]
    assert m.counts.warnings == 1
    assert read_manifest(tmp_path / "out").warnings == m.warnings
    studies = pd.read_parquet(tmp_path / "out" / "studies.parquet").set_index("StudyInstanceUID")
    assert studies.n_warnings.to_dict() == {boxed: 1, neg: 0}


def test_a_monkeypatched_worker_warning_names_the_study(raw, tmp_path, monkeypatch):
    import spinestream.preprocess.convert as convert

    neg = _negative(raw)
    data = subset(raw, tmp_path / "raw", [neg])
    real = convert.study_labels

    def warns(task, *a, **k):
        warnings.warn("something was changed for a test", DataWarning)
        warnings.warn("an ordinary warning is not the manifest's business", UserWarning)
        return real(task, *a, **k)

    monkeypatch.setattr(convert, "study_labels", warns)
    with pytest.warns(UserWarning, match="ordinary"):  # re-emitted, not swallowed
        m = shard_dataset(data, tmp_path / "out", ShardConfig(**CFG), workers=1)
    assert [(w.study, w.message) for w in m.warnings] == [(neg, "something was changed for a test")]


def test_ragged_slice_is_resized_and_warned_not_dropped(raw, tmp_path):
    neg = _negative(raw)
    data = subset(raw, tmp_path / "raw", [neg])
    victim = sorted((data / "train_images" / neg).glob("*.dcm"), key=lambda p: int(p.stem))[5]
    ds = pydicom.dcmread(victim)
    small = ds.pixel_array[::2, ::2].copy()
    ds.PixelData, ds.Rows, ds.Columns = small.tobytes(), small.shape[0], small.shape[1]
    ds.save_as(victim, enforce_file_format=True)
    n_files = len(list((data / "train_images" / neg).glob("*.dcm")))
    m = shard_dataset(data, tmp_path / "out", ShardConfig(**CFG), workers=1)
    assert m.bad_files == [] and m.counts.slices == n_files
    assert len(m.warnings) == 1 and m.warnings[0].study == neg
    assert "resized 1 slice" in m.warnings[0].message and victim.name in m.warnings[0].message
    assert str(raw) not in m.warnings[0].message and str(data) not in m.warnings[0].message  # no absolute paths


def test_unreadable_segmentation_leaves_the_study_labelled_without_it(raw, tmp_path, capsys):
    boxed = _boxed_with_seg(raw)
    data = subset(raw, tmp_path / "raw", [boxed])
    (data / "segmentations" / f"{boxed}.nii").write_bytes(b"not a nifti file at all")
    out = tmp_path / "out"
    m = shard_dataset(data, out, ShardConfig(**CFG), workers=1)
    assert m.failed_studies == [] and m.counts.studies == 1
    assert [w.study for w in m.warnings] == [boxed] and "segmentation" in m.warnings[0].message
    truth = pd.read_parquet(out / "labels" / "truth.parquet")
    assert len(truth) == m.counts.slices and truth["any"].sum() > 0  # labelled by the box rules
    assert not pd.read_parquet(out / "studies.parquet").has_segmentation.any()
    # verify prints the warning summary
    assert verify(out, progress=False)["warnings"][0].startswith("1 data warning(s) in 1 studies")
    capsys.readouterr()
    assert verify_main([str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 data warning(s)" in printed and "segmentation left out" in printed and boxed in printed


def test_volume_affine_maps_indices_to_the_dicom_positions(raw, shards):
    studies = pd.read_parquet(shards / "studies.parquet")
    uid = studies.StudyInstanceUID.iloc[0]
    attrs = read_attrs(shards / "volumes.zarr" / uid)
    a = attrs.affine((len(attrs.z), 48, 48))
    rows, cols = attrs.source_shape
    for k in (0, len(attrs.z) - 1):
        ds = pydicom.dcmread(raw / "train_images" / uid / f"{attrs.slice_numbers[k]}.dcm")
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        dy, dx = (float(v) for v in ds.PixelSpacing)
        sy, sx = rows / 48, cols / 48
        # centre of output pixel (0, 0) in the source grid: (0.5 * s - 0.5) source pixels
        want = ipp + (0.5 * sy - 0.5) * dy * iop[3:] + (0.5 * sx - 0.5) * dx * iop[:3]
        np.testing.assert_allclose((a @ [k, 0, 0, 1])[:3], want, atol=0.01 * max(1, k))
    assert attrs.origin == pytest.approx([float(v) for v in pydicom.dcmread(
        raw / "train_images" / uid / f"{attrs.slice_numbers[0]}.dcm").ImagePositionPatient])


def test_a_base_exception_outside_the_decoder_stops_the_job(raw, tmp_path, monkeypatch):
    """Not swallowed as bad input, and re-raised as an Exception (a pool worker dying of a
    BaseException would never return its task)."""
    import spinestream.preprocess.convert as convert

    class Panic(BaseException):
        pass

    def panics(*a, **k):
        raise Panic("a codec panicked outside the decoder")

    monkeypatch.setattr(convert, "study_labels", panics)
    data = subset(raw, tmp_path / "raw", [_negative(raw)])
    with pytest.raises(convert.StudyCrash, match="Panic: a codec panicked") as err:
        shard_dataset(data, tmp_path / "out", ShardConfig(**CFG), workers=1)
    assert isinstance(err.value.__cause__, Panic)
    assert not (tmp_path / "out" / "manifest.json").exists()
