"""The synthetic dataset: Kaggle's layout, determinism, cohorts, and pixels that match the truth.

One small dataset (64 px, 10 + 2 studies, 32-40 slices) is written once per module; every
check compares what a DICOM reader gets back with :func:`study_specs` / :func:`render_study`.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from spinestream.cli import main as cli_main
from spinestream.preprocess import synth
from spinestream.preprocess.segmentation import read_segmentation

ARGS = dict(studies=10, seed=3, size=64, test_studies=2, slices=(32, 40))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[synth.StudySpec]]:
    out = tmp_path_factory.mktemp("synth") / "data"
    summary = synth.make_dataset(out, **ARGS)
    specs = synth.study_specs(ARGS["studies"], ARGS["seed"], size=ARGS["size"],
                              test_studies=ARGS["test_studies"], slices=ARGS["slices"])
    return out, summary, specs


def _study_dir(out: Path, spec: synth.StudySpec) -> Path:
    return out / ("train_images" if spec.split == "train" else "test_images") / spec.uid


def _read_study(out: Path, spec: synth.StudySpec) -> dict[int, pydicom.Dataset]:
    return {n: pydicom.dcmread(_study_dir(out, spec) / f"{n}.dcm") for n in range(1, spec.n_slices + 1)}


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- layout


def test_layout_and_csvs_match_kaggle(dataset):
    out, summary, specs = dataset
    assert sorted(p.name for p in out.iterdir()) == sorted(synth.LAYOUT)
    train = [s for s in specs if s.split == "train"]
    test = [s for s in specs if s.split == "test"]

    df = pd.read_csv(out / "train.csv")
    assert list(df.columns) == ["StudyInstanceUID", "patient_overall", *synth.VERTEBRAE]
    assert list(df.StudyInstanceUID) == [s.uid for s in train]
    for col in df.columns[1:]:
        assert df[col].dtype.kind == "i" and set(df[col]) <= {0, 1}
    assert (df.patient_overall == df[list(synth.VERTEBRAE)].max(axis=1)).all()
    for s, row in zip(train, df.itertuples(index=False)):
        assert row._asdict() == {"StudyInstanceUID": s.uid, **s.labels}

    boxes = pd.read_csv(out / "train_bounding_boxes.csv")
    assert list(boxes.columns) == ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
    assert all(boxes[c].dtype.kind == "f" for c in ("x", "y", "width", "height"))
    assert boxes.slice_number.dtype.kind == "i"
    assert set(boxes.StudyInstanceUID) == {s.uid for s in train if s.boxed}

    for s in specs:
        assert s.uid.startswith("1.2.826.0.1.3680043.") and s.uid.count(".") == 6
        names = sorted(p.name for p in _study_dir(out, s).iterdir())
        assert names == sorted(f"{n}.dcm" for n in range(1, s.n_slices + 1))
    assert not {s.uid for s in train} & {s.uid for s in test}

    tdf = pd.read_csv(out / "test.csv")
    assert list(tdf.columns) == ["row_id", "StudyInstanceUID", "prediction_type"]
    assert len(tdf) == 8 * len(test)
    assert (tdf.row_id == tdf.StudyInstanceUID + "_" + tdf.prediction_type).all()
    assert set(tdf.prediction_type) == {*synth.VERTEBRAE, "patient_overall"}
    sub = pd.read_csv(out / "sample_submission.csv")
    assert list(sub.columns) == ["row_id", "fractured"]
    assert list(sub.row_id) == list(tdf.row_id) and (sub.fractured == 0.5).all()

    segs = sorted(p.name for p in (out / "segmentations").iterdir())
    assert segs == sorted(f"{s.uid}.nii" for s in specs if s.has_segmentation)
    assert summary["files"] == sum(s.n_slices for s in specs)
    assert (out / synth.COMPLETE_MARKER).exists()


def test_same_seed_same_bytes_other_seed_other_data(dataset, tmp_path):
    out, _, _ = dataset
    again = tmp_path / "again"
    synth.make_dataset(again, **ARGS, workers=2)  # worker count must not matter either
    assert _all_files(again) == _all_files(out)

    other = tmp_path / "other"
    synth.make_dataset(other, **{**ARGS, "studies": 3, "test_studies": 0, "seed": 4})
    uids = set(pd.read_csv(out / "train.csv").StudyInstanceUID)
    assert not set(pd.read_csv(other / "train.csv").StudyInstanceUID) & uids
    a = synth.study_specs(3, 3, size=64, test_studies=0, slices=(32, 40))
    b = synth.study_specs(3, 4, size=64, test_studies=0, slices=(32, 40))
    assert [s.n_slices for s in a] != [s.n_slices for s in b] or [s.uid for s in a] != [s.uid for s in b]


def test_refuses_non_empty_dir_and_force_keeps_foreign_files(tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["--out", str(out), "--studies", "3", "--size", "32", "--slices", "32:32",
            "--test-studies", "0", "--quiet", "--workers", "1"]
    assert cli_main(["synth", *args]) == 2
    assert "not empty" in capsys.readouterr().err
    assert not (out / "train.csv").exists()
    assert synth.main(args + ["--force"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("synth: 3 train studies") and "\n" not in line
    assert (out / "notes.txt").read_text() == "mine"  # --force removes only the dataset's own entries
    assert (out / synth.COMPLETE_MARKER).exists()
    with pytest.raises(FileExistsError):
        synth.make_dataset(out, studies=3, size=32, slices=(32, 32), test_studies=0)


def test_interrupted_run_has_no_marker(tmp_path, monkeypatch):
    out = tmp_path / "d"
    real = synth.write_study
    calls = []

    def dies_on_second_study(spec, where):
        calls.append(spec.uid)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(spec, where)

    monkeypatch.setattr(synth.dataset, "write_study", dies_on_second_study)
    with pytest.raises(KeyboardInterrupt):
        synth.make_dataset(out, studies=3, size=32, slices=(32, 32), test_studies=0)
    assert any(out.iterdir()) and not (out / synth.COMPLETE_MARKER).exists()
    monkeypatch.setattr(synth.dataset, "write_study", real)
    with pytest.raises(FileExistsError, match="--force"):
        synth.make_dataset(out, studies=3, size=32, slices=(32, 32), test_studies=0)
    synth.make_dataset(out, studies=3, size=32, slices=(32, 32), test_studies=0, force=True)
    assert (out / synth.COMPLETE_MARKER).exists()


def test_cli_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        synth.main(["--help"])
    assert e.value.code == 0
    assert "spinestream synth" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        synth.main(["--out", "x", "--syntax", "jpeg-ls"])
    with pytest.raises(ValueError, match="slices"):
        synth.study_specs(3, 0, slices=(8, 20))


# --------------------------------------------------------------------------- specs


def test_cohort_shares_and_fracture_counts():
    for seed in range(3):
        specs = synth.study_specs(50, seed, test_studies=0)
        counts = Counter(s.cohort for s in specs)
        assert counts == {"boxed": 6, "positive-unboxed": 18, "negative": 26}
        for s in specs:
            assert (s.cohort == "negative") == (not s.fractured)
            assert len(s.fractured) <= 3 and all(1 <= k <= 7 for k in s.fractured)
            assert sorted(c.vertebra for c in s.cracks) == list(s.fractured)
        multi = [s for s in specs if s.boxed and len(s.fractured) >= 2 and s.has_segmentation]
        assert multi, "a boxed study with several fractures needs a segmentation"
        assert 8 <= sum(s.reversed for s in specs) <= 12
        assert Counter(s.syntax for s in specs)["explicit"] > 20
    for n in range(3, 12):
        assert set(Counter(s.cohort for s in synth.study_specs(n, 0, test_studies=0))) == {
            "boxed", "negative", "positive-unboxed"}
    assert [s.cohort for s in synth.study_specs(1, 0, test_studies=0)] == ["boxed"]


def test_enriched_mix_and_wider_cracks_change_only_what_they_say():
    real = synth.study_specs(100, 0, test_studies=0)
    rich = synth.study_specs(100, 0, test_studies=0, boxed_share=0.5, crack_width=(3.0, 4.0))
    assert Counter(s.cohort for s in rich) == {"boxed": 50, "positive-unboxed": 20, "negative": 30}
    assert all(3.0 <= c.width <= 4.0 for s in rich for c in s.cracks)
    assert all(1.2 <= c.width <= 2.0 for s in real for c in s.cracks)
    # the same draws otherwise: geometry and syntax of each study do not move
    assert [(s.uid, s.n_slices, s.syntax) for s in rich] == [(s.uid, s.n_slices, s.syntax) for s in real]
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="boxed_share"):
            synth.study_specs(10, 0, boxed_share=bad)
    with pytest.raises(ValueError, match="crack_width"):
        synth.study_specs(10, 0, crack_width=(4.0, 3.0))
    with pytest.raises(SystemExit):
        synth.main(["--out", "x", "--crack-width", "wide"])


def test_geometry_is_consistent():
    for s in synth.study_specs(20, 1, size=64, slices=(12, 96)):
        assert synth.MIN_SLICES <= s.n_slices <= 96
        assert 0.5 <= s.slice_spacing <= 1.0
        ranges = s.vertebra_z
        assert all(b - a >= (2 if s.n_slices >= 32 else 1) for a, b in ranges)
        # C1 on top, then downwards, never overlapping
        assert all(ranges[i][1] <= ranges[i + 1][0] for i in range(len(ranges) - 1))
        for c in s.cracks:
            a, b = ranges[c.vertebra - 1]
            assert a <= c.z_indices[0] and c.z_indices[-1] < b
            assert list(c.z_indices) == list(range(c.z_indices[0], c.z_indices[-1] + 1))
            lo, hi = s.vertebra_files[c.vertebra]
            assert all(lo <= n <= hi for n in s.cracked_files[c.vertebra])


def test_pixels_do_not_depend_on_the_syntax():
    a = synth.study_specs(30, 0, size=32, test_studies=0, slices=(32, 32))
    b = synth.study_specs(30, 0, size=32, test_studies=0, slices=(32, 32), syntax="rle")
    assert {s.syntax for s in a} == set(synth.SYNTAXES) and {s.syntax for s in b} == {"rle"}
    for x, y in zip(a, b):
        assert dataclasses.replace(x, syntax="rle") == y
        assert all(np.array_equal(p.hu, q.hu) for p, q in zip(synth.render_study(x), synth.render_study(y)))


# --------------------------------------------------------------------------- pixels


def test_every_syntax_decodes_to_the_rendered_hu(dataset):
    out, summary, specs = dataset
    assert set(summary["files_per_syntax"]) == set(synth.SYNTAXES)
    assert {s.signed for s in specs} == {True, False}
    for name, uid in synth.SYNTAXES.items():
        spec = next(s for s in specs if s.syntax == name)
        files = _read_study(out, spec)
        rendered = {spec.file_number(r.z): r for r in synth.render_study(spec)}
        for n, ds in files.items():
            assert ds.file_meta.TransferSyntaxUID == uid
            assert ds.file_meta.MediaStorageSOPClassUID == synth.CT_IMAGE_STORAGE
            assert ds.StudyInstanceUID == spec.uid and ds.Modality == "CT" and ds.InstanceNumber == n
            assert ds.PixelRepresentation == int(spec.signed) and float(ds.RescaleIntercept) == spec.intercept
            assert (ds.Rows, ds.Columns, ds.BitsAllocated) == (64, 64, 16)
            hu = _hu(ds)
            assert np.array_equal(hu, rendered[n].hu), (name, n)
            assert max(hu[0, 0], hu[0, -1], hu[-1, 0], hu[-1, -1]) < -900
        for k, (a, b) in enumerate(spec.vertebra_z[:7], start=1):
            mid = rendered[spec.file_number((a + b) // 2)]
            bone = mid.labels == k
            assert bone.any() and np.median(mid.hu[bone]) > 300, (name, k)
            assert np.median(mid.hu[~bone & (mid.hu > -500)]) < 150  # soft tissue around it


def test_z_runs_head_to_feet_unless_reversed(dataset):
    out, _, specs = dataset
    assert {s.reversed for s in specs} == {True, False}
    for spec in specs:
        z = [float(pydicom.dcmread(_study_dir(out, spec) / f"{n}.dcm", stop_before_pixels=True)
                   .ImagePositionPatient[2]) for n in range(1, spec.n_slices + 1)]
        steps = np.diff(z)
        assert np.allclose(np.abs(steps), spec.slice_spacing)
        assert (steps > 0).all() if spec.reversed else (steps < 0).all()


def test_boxes_frame_visible_cracks_on_the_fractured_vertebra(dataset):
    out, _, specs = dataset
    boxes = pd.read_csv(out / "train_bounding_boxes.csv")
    boxed = [s for s in specs if s.boxed]
    assert boxed and any(len(s.fractured) >= 2 for s in boxed)
    for spec in boxed:
        rows = boxes[boxes.StudyInstanceUID == spec.uid]
        expected = sorted(n for ns in spec.cracked_files.values() for n in ns)
        assert sorted(rows.slice_number) == expected
        intact = {spec.file_number(r.z): r.hu for r in synth.render_study(spec, cracks=False)}
        for row in rows.itertuples():
            assert any(lo <= row.slice_number <= hi for k, (lo, hi) in spec.vertebra_files.items()
                       if k in spec.fractured)
            hu = _hu(pydicom.dcmread(_study_dir(out, spec) / f"{row.slice_number}.dcm"))
            changed = hu != intact[row.slice_number]
            assert changed.any()
            r, c = np.nonzero(changed)
            assert (c >= row.x).all() and (c < row.x + row.width).all()
            assert (r >= row.y).all() and (r < row.y + row.height).all()
            # bone window WL 400 / WW 1800: the crack is much darker than the bone it replaced
            def win(v):
                return np.clip((v + 500) / 1800, 0, 1) * 255
            assert win(hu[changed]).mean() < win(intact[row.slice_number][changed]).mean() - 30
            assert hu[changed].mean() < 150


def test_unboxed_and_negative_studies(dataset):
    out, _, specs = dataset
    for spec in specs:
        if spec.cohort == "negative":
            assert not spec.cracks
        if spec.cohort == "positive-unboxed":
            assert spec.cracks and all(r.crack is not None for r in synth.render_study(spec)
                                       if any(r.z in c.z_indices for c in spec.cracks))


def test_segmentation_marks_the_bone(dataset):
    out, _, specs = dataset
    segmented = [s for s in specs if s.has_segmentation]
    assert any(s.boxed and len(s.fractured) >= 2 for s in segmented)
    for spec in segmented:
        seg = read_segmentation(out / "segmentations" / f"{spec.uid}.nii")
        assert seg.shape == (spec.n_slices, 64, 64)
        # volume order: by ImagePositionPatient z, descending, whatever the file order
        files = _read_study(out, spec)
        order = sorted(files, key=lambda n: -float(files[n].ImagePositionPatient[2]))
        vol = np.stack([_hu(files[n]) for n in order])
        for k, (a, b) in enumerate(spec.vertebra_z, start=1):
            assert set(np.unique(seg[a:b])) == {0, k}
            bone = vol[a:b] > 600  # cortical bone of this vertebra
            assert (seg[a:b][bone] == k).mean() > 0.99
            assert np.median(vol[a:b][seg[a:b] == k]) > 300
        assert (seg[vol < -200] == 0).all()


# --------------------------------------------------------------------------- SynthConfig


def test_synth_config_is_the_one_parameter_set(tmp_path):
    import json

    cfg = synth.SynthConfig(studies=3, seed=4, size=32, slices=(12, 12), test_studies=0, crack_width=(3, 4))
    fields = dict(studies=3, seed=4, size=32, slices=(12, 12), test_studies=0, crack_width=(3, 4))
    assert [repr(s) for s in synth.study_specs(cfg)] == [repr(s) for s in synth.study_specs(**fields)]
    assert [repr(s) for s in synth.study_specs(3, 4, **{k: v for k, v in fields.items()
                                                       if k not in ("studies", "seed")})] == \
        [repr(s) for s in synth.study_specs(cfg)]
    synth.make_dataset(tmp_path / "d", cfg)
    params = json.loads((tmp_path / "d" / synth.COMPLETE_MARKER).read_text())["params"]
    assert params == cfg.params() and set(params) == {f.name for f in dataclasses.fields(synth.SynthConfig)}
    assert synth.SynthConfig(**params) == cfg  # the marker's params rebuild the config
    with pytest.raises(TypeError, match="not both"):
        synth.make_dataset(tmp_path / "e", cfg, studies=4)
    with pytest.raises(TypeError, match="unknown synth parameter.*'studis'"):
        synth.make_dataset(tmp_path / "e", studis=4)
    with pytest.raises(ValueError, match="size must be"):
        synth.make_dataset(tmp_path / "e", size=8)
    assert not (tmp_path / "e").exists()  # validated before anything is written
