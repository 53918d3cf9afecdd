"""``spinestream predict`` (spinestream/predict.py) on synthetic test studies.

The test images hold a JPEG 2000 study, a study with one truncated slice and a study whose every
slice is truncated; the sample submission adds a study that is not in the images and lists its
rows in an order of its own. The submission has exactly the sample's rows, in order, finite in
[0, 1]; the warnings name the bad file, the unreadable study and the missing one (once); the
damaged study equals the same study without the bad file; two runs ensemble as the mean of their
slice probabilities before the study rule; and predict's model inputs equal those engine.infer
builds from the shard job's Zarr volume for the same (training) study: the same ingest and window.
An ``--images`` with no study directory (empty, or a dataset root, where the message names its
test_images/) is refused with exit status 2.

The runs are run directories as ``spinestream train`` leaves them with untrained weights (as
tests/test_pseudo.py writes them): predict's properties do not depend on what a model learnt, and
this keeps the file independent of the trainer and fast.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from spinestream.engine import checkpoint as ck
from spinestream.engine.infer import build_inputs, inputs, predict_volumes, read_study
from spinestream.engine.metrics import ROW_TYPES, study_probabilities
from spinestream.preprocess.errors import DataWarning
from spinestream.shards.spec import SPEC_FILE, ShardSpec, run_shard_spec
from spinestream.predict import PredictError, decode_study, load_runs, main, predict, study_volume

J2K = "1.2.840.10008.1.2.4.90"
MISSING = "1.2.826.0.1.3680043.999999"


def write_run(run_dir: Path, shards: Path, seed: int, **sets) -> Path:
    """A run directory as `spinestream train` leaves it (run.json, config.yaml, best.pt), untrained weights."""
    from spinestream.engine.config import RunConfig
    from spinestream.engine.model import build_model, model_fingerprint
    from spinestream.shards.config import load_config, to_dict

    overrides = [f"data.root={shards}", "model.name=test_resnet", "model.pretrained=false", "loader.image_size=40",
                 "loader.batch_size=16", "log.wandb=disabled", *[f"{k}={v}" for k, v in sets.items()]]
    cfg = load_config(RunConfig, None, overrides)
    ck.mark_run(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    ck.save(run_dir / "best.pt", {"model_fingerprint": model_fingerprint(model), "model": model.state_dict(),
                                  "ema": None, "step": 0})
    return run_dir


@pytest.fixture(scope="module")
def run_dirs(shards, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    return [write_run(root / f"r{k}", shards, seed=k) for k in range(2)]


@pytest.fixture(scope="module")
def runs(run_dirs):
    return load_runs(run_dirs, torch.device("cpu"))


@pytest.fixture(scope="module")
def test_set(tmp_path_factory) -> dict:
    """test_images/ with [j2k study, one truncated slice, every slice truncated, plain] and a sample
    submission that also lists MISSING, rows in reverse order."""
    from spinestream.preprocess.synth import make_dataset
    from spinestream.preprocess.synth.dicom_io import write_study
    from spinestream.preprocess.synth.spec import study_specs

    d = tmp_path_factory.mktemp("test-set")
    params = dict(studies=1, seed=11, size=64, slices=(16, 20), test_studies=4, syntax="explicit")
    make_dataset(d, **params)
    tests = [s for s in study_specs(**params) if s.split == "test"]
    images = d / "test_images"
    shutil.rmtree(images / tests[0].uid)  # the same study (same pixels) stored as JPEG 2000
    write_study(dataclasses.replace(tests[0], syntax="j2k"), d)
    files = sorted((images / tests[1].uid).glob("*.dcm"), key=lambda p: int(p.stem))
    bad = files[len(files) // 2]
    bad.write_bytes(bad.read_bytes()[:300])  # header cut mid-way: no pixel data
    for f in (images / tests[2].uid).glob("*.dcm"):
        f.write_bytes(f.read_bytes()[:300])
    sample = pd.read_csv(d / "sample_submission.csv")
    extra = pd.DataFrame({"row_id": [f"{MISSING}_{t}" for t in ROW_TYPES], "fractured": 0.5})
    sample = pd.concat([sample.iloc[:8], extra, sample.iloc[8:]]).iloc[::-1]  # an order of its own
    sample.to_csv(d / "sample.csv", index=False)
    return {"images": images, "sample": d / "sample.csv", "uids": [s.uid for s in tests], "bad_file": bad}


@pytest.fixture(scope="module")
def predicted(runs, test_set):
    with pytest.warns(DataWarning) as rec:
        frame, stats = predict(runs[:1], test_set["images"], sample=test_set["sample"], workers=2)
    return frame, stats, [str(w.message) for w in rec]


def _prevalence(shards: Path) -> np.ndarray:
    studies = pd.read_parquet(shards / "studies.parquet")
    return studies[list(ROW_TYPES)].mean().to_numpy()


def _by_study(frame: pd.DataFrame, uid: str) -> np.ndarray:
    return frame.set_index("row_id").loc[[f"{uid}_{t}" for t in ROW_TYPES], "fractured"].to_numpy()


def test_exactly_the_sample_rows_in_order_and_valid(predicted, test_set, shards):
    import pydicom

    frame, stats, _ = predicted
    sample = pd.read_csv(test_set["sample"])
    assert frame.row_id.tolist() == sample.row_id.tolist()
    v = frame.fractured.to_numpy()
    assert np.isfinite(v).all() and ((v >= 0) & (v <= 1)).all()
    j2k, damaged, unreadable, _plain = test_set["uids"]
    assert pydicom.dcmread(next((test_set["images"] / j2k).glob("*.dcm"))).file_meta.TransferSyntaxUID == J2K
    prev = _prevalence(shards)
    np.testing.assert_allclose(_by_study(frame, MISSING), prev)
    np.testing.assert_allclose(_by_study(frame, unreadable), prev)
    for uid in (j2k, damaged):  # predicted by the model, not filled
        assert not np.allclose(_by_study(frame, uid), prev)
    assert stats["bad_files"] == 1 and stats["unreadable_studies"] == [unreadable]
    assert stats["missing_studies"] == [MISSING]


def test_warnings_name_the_file_and_the_studies(predicted, test_set):
    _, _, messages = predicted
    j2k, damaged, unreadable, _ = test_set["uids"]
    bad_name = test_set["bad_file"].name
    assert any(bad_name in m and damaged in m for m in messages), messages
    assert any(unreadable in m and "prevalence" in m for m in messages), messages
    missing = [m for m in messages if "sample submission" in m]
    assert len(missing) == 1 and MISSING in missing[0] and missing[0].startswith("1 study"), missing
    assert not any(j2k in m for m in messages), messages  # JPEG 2000 decodes cleanly


def test_a_damaged_study_is_predicted_from_its_other_slices(predicted, runs, test_set, tmp_path):
    frame, _, _ = predicted
    damaged = test_set["uids"][1]
    clean = tmp_path / "images" / damaged
    shutil.copytree(test_set["images"] / damaged, clean)
    (clean / test_set["bad_file"].name).unlink()
    alone, _ = predict(runs[:1], tmp_path / "images", workers=0)
    np.testing.assert_allclose(_by_study(frame, damaged), _by_study(alone, damaged), rtol=0, atol=1e-6)


def test_two_runs_ensemble_slice_probabilities_before_the_rule(runs, test_set):
    uid = test_set["uids"][3]
    spec = runs[0].spec
    sv = study_volume(decode_study(uid, test_set["images"] / uid, spec.config), spec)
    per_run = [next(predict_volumes(r.model, [sv], **r.kwargs))[1] for r in runs]
    assert not np.allclose(per_run[0], per_run[1])  # two different models
    rule = runs[0].rule
    want = study_probabilities((per_run[0] + per_run[1]) / 2, rule)
    frame, _ = predict(runs, test_set["images"], workers=0)
    np.testing.assert_allclose(_by_study(frame, uid), want, rtol=0, atol=1e-6)
    after_rule = np.mean([study_probabilities(p, rule) for p in per_run], axis=0)
    assert not np.allclose(want, after_rule)  # so the test tells "before" from "after" the rule


def test_inputs_equal_the_shard_jobs_for_a_sharded_study(runs, raw, shards):
    spec = runs[0].spec
    uid = pd.read_parquet(shards / "studies.parquet").StudyInstanceUID.iloc[0]
    sv = study_volume(decode_study(uid, raw / "train_images" / uid, spec.config), spec)
    ref = read_study(shards, uid)
    np.testing.assert_array_equal(sv.volume, ref.volume)  # the same ingest and window (Zarr is lossless)
    np.testing.assert_array_equal(sv.nbr, ref.nbr)  # the same 2.5D neighbours
    k = runs[0].kwargs
    idx = torch.arange(sv.n_slices)
    got = build_inputs(torch.from_numpy(sv.volume), torch.from_numpy(sv.nbr), idx, sv.channels,
                       image_size=k["image_size"], mean=k["mean"], std=k["std"])
    torch.testing.assert_close(got, inputs(shards, uid, image_size=k["image_size"], mean=k["mean"], std=k["std"]),
                               rtol=0, atol=0)


def test_cli_without_sample_writes_every_study_sorted(run_dirs, test_set, tmp_path):
    from spinestream.cli import main as cli

    out = tmp_path / "sub" / "submission.csv"
    assert cli(["predict", "--run", str(run_dirs[0]), "--images", str(test_set["images"]), "--out", str(out),
                "--workers", "1", "--device", "cpu", "--no-progress"]) == 0
    df = pd.read_csv(out)
    want = [f"{u}_{t}" for u in sorted(test_set["uids"]) for t in ROW_TYPES]
    assert list(df.columns) == ["row_id", "fractured"] and df.row_id.tolist() == want
    assert df.fractured.between(0, 1).all() and np.isfinite(df.fractured).all()
    assert [p.name for p in out.parent.iterdir()] == ["submission.csv"]  # no temporary left behind


def test_a_row_id_it_cannot_parse_is_an_error_naming_it(runs, test_set, tmp_path, capsys):
    sample = pd.read_csv(test_set["sample"])
    sample.loc[3, "row_id"] = "not-a-row-id"
    bad = tmp_path / "bad.csv"
    sample.to_csv(bad, index=False)
    with pytest.raises(ValueError, match="not-a-row-id"):
        predict(runs[:1], test_set["images"], sample=bad, workers=0)


def test_the_run_dirs_spec_is_preferred_and_an_ensemble_needs_one_spec(run_dirs, shards, test_set, tmp_path):
    own = tmp_path / "own"
    shutil.copytree(run_dirs[0], own)
    spec = ShardSpec.from_shards(shards)
    spec.save(own)
    cfg = yaml.safe_load((own / "config.yaml").read_text())
    cfg["data"]["root"] = str(tmp_path / "no-shards-here")  # as on Kaggle: no shard set
    (own / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    got = run_shard_spec(own, cfg["data"]["root"])
    assert got.source == str(own / SPEC_FILE) and got.key() == spec.key() and got.prevalence == spec.prevalence
    other = tmp_path / "other"
    shutil.copytree(own, other)
    ShardSpec(dataclasses.replace(spec.config, offset_mm=2.0), dataclasses.replace(spec.image, offset_mm=2.0), spec.prevalence).save(other)
    with pytest.raises(ValueError, match="one image spec"):
        load_runs([own, other], torch.device("cpu"))
    with pytest.raises(PredictError, match="one image spec"):
        main(["--run", str(own), "--run", str(other), "--images", str(test_set["images"]), "--out",
              str(tmp_path / "s.csv"), "--device", "cpu"])


def test_a_dataset_root_as_images_is_refused_naming_its_test_images(run_dirs, raw, tmp_path):
    out = tmp_path / "s.csv"
    with pytest.raises(PredictError) as e:  # was exit 0, with rows like test_images_C1
        main(["--run", str(run_dirs[0]), "--images", str(raw), "--out", str(out), "--device", "cpu",
              "--workers", "0", "--no-progress"])
    assert "dataset root" in str(e.value) and f"--images {raw / 'test_images'}" in str(e.value), e.value
    assert not out.exists()


@pytest.mark.parametrize("content", ["empty", "no-dcm"])
def test_images_without_a_study_directory_are_refused(run_dirs, test_set, tmp_path, content):
    images = tmp_path / "images"
    images.mkdir()
    if content == "no-dcm":  # subfolders, none holding .dcm files (e.g. segmentations/)
        (images / "segmentations").mkdir()
        (images / "segmentations" / "1.2.3.nii").write_bytes(b"")
    out = tmp_path / "s.csv"
    with pytest.raises(PredictError, match="no study directory") as e:  # was exit 0: all prevalence
        main(["--run", str(run_dirs[0]), "--images", str(images), "--sample-submission", str(test_set["sample"]),
              "--out", str(out), "--device", "cpu", "--workers", "0", "--no-progress"])
    assert "dataset root" not in str(e.value)
    assert not out.exists()


def test_the_submission_is_clipped_away_from_0_and_1(tmp_path):
    """float32 sigmoid saturates to exactly 1.0 (and `%.6g` writes anything above 0.9999995 as "1"); a
    wrong "1" costs -log(1e-15) = 34.5 x its weight. The writer clips to [SUBMISSION_CLIP, 1 - SUBMISSION_CLIP]:
    a wrong row then costs at most -log(1e-4) = 9.2, a right one at most 1e-4."""
    from spinestream.engine.metrics import score_submission
    from spinestream.predict import SUBMISSION_CLIP, write_submission

    assert SUBMISSION_CLIP == 1e-4
    frame = pd.DataFrame({"row_id": [f"s_{k}" for k in ROW_TYPES],
                          "fractured": [1.0, 0.9999999, 0.0, 1e-9, 0.25, 0.5, 0.75, 1.0]})
    out = tmp_path / "s.csv"
    write_submission(frame, out)
    got = pd.read_csv(out)
    np.testing.assert_allclose(got.fractured, [0.9999, 0.9999, 1e-4, 1e-4, 0.25, 0.5, 0.75, 0.9999], rtol=0,
                               atol=1e-12)
    assert (frame.fractured.iloc[[0, 2]] == [1.0, 0.0]).all()  # the caller's frame is left alone
    truth = pd.DataFrame({"row_id": got.row_id, "fractured": [0, 0, 1, 1, 0, 1, 0, 0]})  # four confident misses
    assert score_submission(truth, got) < score_submission(truth, frame) / 3
