"""Pseudo-labels (engine.pseudo) and the synthetic crack truth (preprocess.synth_truth).

The table covers exactly the positive-unboxed slices, once each, and with truth covers round 2's
whole selection; the study labels hold in both modes; the metadata round-trips; the default thresholds
are tuned on studies disjoint from the validation fold round 2 is scored on; the F1 threshold search is exact; and on synthetic data a trained round-1 model's pseudo-labels reach a measured
slice-level F1 against where the cracks really are (the last test; its fixture trains one).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from spinestream.engine import checkpoint as ck
from spinestream.engine.pseudo import PROB_COLUMNS, VERTEBRAE, best_f1_threshold, choose_thresholds, main, parse_thresholds, \
    quality, read_table, study_targets
from spinestream.shards.config import ConfigError
from spinestream.shards.layout import TARGETS, Layout


def _write_run(run_dir: Path, overrides: list[str], model=None) -> Path:
    """A run directory as `spinestream train` leaves it (config.yaml, run.json, best.pt), untrained weights."""
    from spinestream.engine.config import RunConfig
    from spinestream.engine.model import build_model, model_fingerprint
    from spinestream.shards.config import load_config, to_dict

    cfg = load_config(RunConfig, "configs/demo-round1.yaml", overrides)
    ck.mark_run(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    torch.manual_seed(0)
    model = model or build_model(cfg.model)
    ck.save(run_dir / "best.pt", {"model_fingerprint": model_fingerprint(model), "model": model.state_dict(),
                                  "ema": None, "step": 0})
    return run_dir


@pytest.fixture(scope="module")
def run_dir(shards, tmp_path_factory) -> Path:
    return _write_run(tmp_path_factory.mktemp("runs") / "round1",
                      [f"data.root={shards}", "loader.image_size=48", "log.wandb=disabled"])


@pytest.fixture(scope="module")
def tables(run_dir, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("pseudo")
    paths = {"hard": shards / "labels" / "pseudo-round1.parquet", "soft": out / "soft.parquet"}
    assert main(["--run", str(run_dir), "--device", "cpu", "--batch-size", "16"]) == 0  # default path, hard, val
    assert main(["--run", str(run_dir), "--device", "cpu", "--mode", "soft", "--out", str(paths["soft"]),
                 "--heatmap-studies", "0"]) == 0
    yield paths
    for suffix in (".parquet", ".summary.json", ".heatmap.png"):  # the shared shard set stays as it was
        paths["hard"].with_suffix(suffix).unlink(missing_ok=True)


def test_the_table_covers_exactly_the_positive_unboxed_slices_once(tables, shards):
    from spinestream.engine.loader import DeviceLabels, select

    slices = pd.read_parquet(Layout(shards).slices)
    want = np.sort(slices.slice_id[slices.cohort == "positive-unboxed"].to_numpy())
    assert len(want) > 0
    for path in tables.values():
        df, _ = read_table(path)
        assert list(df.columns) == ["slice_id", *TARGETS, *PROB_COLUMNS]
        np.testing.assert_array_equal(df.slice_id.to_numpy(), want)  # sorted, no duplicate, none missing
    # round 2: truth + pseudo cover every cohort's slices (the loader's own check)
    labels = DeviceLabels.load(shards, ["labels/truth.parquet", "labels/pseudo-round1.parquet"])
    labels.check_covers(select(shards))


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_study_labels_hold(tables, shards, mode):
    df, _ = read_table(tables[mode])
    studies = pd.read_parquet(Layout(shards).studies).set_index("StudyInstanceUID")
    slices = pd.read_parquet(Layout(shards).slices).set_index("slice_id")
    df["study"] = slices.loc[df.slice_id, "StudyInstanceUID"].to_numpy()
    for uid, rows in df.groupby("study"):
        for k, v in enumerate(VERTEBRAE):
            y, p = rows[v].to_numpy(float), rows[PROB_COLUMNS[k]].to_numpy()
            if studies.loc[uid, v] == 0:
                assert (y == 0).all(), (uid, v)
            else:
                assert y[np.argmax(p)] == 1.0, (uid, v)  # at least its most likely slice
                if mode == "soft":  # elsewhere the probability itself
                    np.testing.assert_allclose(np.delete(y, np.argmax(p)), np.delete(p, np.argmax(p)), rtol=0,
                                               atol=1e-7)
        np.testing.assert_array_equal(rows["any"].to_numpy(), rows[list(VERTEBRAE)].to_numpy().max(axis=1))
    values = df[list(TARGETS)].to_numpy(float)
    assert set(np.unique(values)) <= {0.0, 1.0} if mode == "hard" else ((values >= 0) & (values <= 1)).all()


def test_metadata_summary_and_heatmap(tables, run_dir, shards):
    _, meta = read_table(tables["hard"])
    assert meta["kind"] == "pseudo-labels" and meta["mode"] == "hard"
    assert meta["run"] == str(run_dir) and Path(meta["checkpoint"]) == run_dir / "best.pt"
    assert list(meta["thresholds"]) == list(VERTEBRAE) and all(0 <= t <= 1 for t in meta["thresholds"].values())
    assert meta["threshold_method"] == "train-share" and "most likely slice" in meta["rule"]
    # round 1 held out fold 0, where the tiny set's one boxed study is: nothing to take shares from
    assert meta["threshold_studies"] == [] and meta["threshold_excludes_fold"] == 0
    assert "validation fold 0" in meta["threshold_source"] and set(meta["thresholds"].values()) == {0.5}
    _, soft = read_table(tables["soft"])
    assert soft["mode"] == "soft" and soft["thresholds"] is None
    summary = json.loads(tables["hard"].with_suffix(".summary.json").read_text())
    df, _ = read_table(tables["hard"])
    assert summary["positive_slices"] == {t: int(df[t].sum()) for t in TARGETS}
    assert sum(s["slices"] for s in summary["per_study"].values()) == len(df)
    assert tables["hard"].with_suffix(".heatmap.png").stat().st_size > 1000


def test_given_thresholds_and_their_validation(run_dir, tmp_path):
    out = tmp_path / "t.parquet"
    assert main(["--run", str(run_dir), "--device", "cpu", "--threshold", "0.3", "--out", str(out),
                 "--heatmap-studies", "0"]) == 0
    df, meta = read_table(out)
    assert meta["thresholds"] == {v: 0.3 for v in VERTEBRAE} and meta["threshold_source"] == "given"
    with pytest.raises(ConfigError, match=r"threshold: one or 7 values .*'0\.3,0\.4'"):  # before any model loads
        main(["--run", str(run_dir), "--threshold", "0.3,0.4", "--out", str(out)])
    np.testing.assert_array_equal(parse_thresholds("0.1,0.2,0.3,0.4,0.5,0.6,0.7"), np.arange(1, 8) / 10)
    assert parse_thresholds("val") is None


def test_thresholds_are_tuned_without_the_validation_fold(shards, tmp_path):
    """Round 2 is scored on round 1's validation fold, so the default thresholds (``train-share``) come from
    the boxed studies outside it; the table's metadata and the summary say which."""
    run = _write_run(tmp_path / "round1", [f"data.root={shards}", "loader.image_size=48", "log.wandb=disabled",
                                           "data.val_fold=1"])
    out = tmp_path / "p.parquet"
    assert main(["--run", str(run), "--device", "cpu", "--out", str(out), "--heatmap-studies", "0"]) == 0
    _, meta = read_table(out)
    studies = pd.read_parquet(Layout(shards).studies)
    used = set(meta["threshold_studies"])
    assert used and not used & set(studies.StudyInstanceUID[studies.fold == 1])  # disjoint from validation
    assert used == set(studies.StudyInstanceUID[(studies.fold != 1) & (studies.cohort == "boxed")])
    assert meta["threshold_excludes_fold"] == 1 and meta["threshold_folds"] == [0]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["threshold_studies"] == meta["threshold_studies"]
    assert "validation fold 1 not used" in summary["threshold_source"]


def test_share_thresholds_match_the_tuning_studies_share_and_ignore_others():
    from spinestream.engine.pseudo import share_thresholds

    studies = pd.DataFrame({"StudyInstanceUID": ["tune", "val", "x"], "slice_id_offset": [0, 8, 16],
                            "n_slices": [8, 8, 8], **{v: [1, 1, 1] if v == "C1" else [0, 0, 0] for v in VERTEBRAE}})
    c1 = [1, 1, 0, 0, 0, 0, 0, 0] + [1] * 8 + [0] * 8  # the tune study: 2 of 8 slices; val: all 8
    truth = pd.DataFrame({"slice_id": range(24), **{t: c1 if t in ("C1", "any") else [0] * 24 for t in TARGETS}})
    p = np.tile(np.linspace(0.1, 0.8, 8)[:, None], (1, 8)).astype(np.float32)
    thr, detail = share_thresholds({"x": p}, studies, truth, ["tune"])
    assert thr[0] == pytest.approx(p[-2, 0]) and (p[:, 0] >= thr[0]).sum() == 2  # 2 of 8, as in "tune"
    assert detail["C1"]["share"] == 0.25 and detail["C1"]["tuning_studies"] == 1
    assert (thr[1:] == 0.5).all() and detail["C2"]["fallback"]  # no study fractured there


def test_study_targets_by_hand():
    p = np.array([[0.1, 0.9, 0.2, 0, 0, 0, 0, .5],
                  [0.3, 0.2, 0.1, 0, 0, 0, 0, .5],
                  [0.2, 0.95, 0.1, 0, 0, 0, 0, .5]], np.float32)
    labels = np.array([1, 0, 1, 0, 0, 0, 0])
    y = study_targets(p, labels, "hard", np.full(7, 0.5))
    # C1: nothing over 0.5 -> its most likely slice (1); C2 negative in the study -> 0 despite 0.9; C3 -> slice 0
    np.testing.assert_array_equal(y[:, :3], [[0, 0, 1], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(y[:, 7], [1, 1, 0])
    s = study_targets(p, labels, "soft", None)
    np.testing.assert_allclose(s[:, 0], [0.1, 1.0, 0.2])
    np.testing.assert_allclose(s[:, 7], [1.0, 1.0, 0.2])


def test_best_f1_threshold_is_the_brute_force_optimum():
    rng = np.random.default_rng(1)
    for _ in range(20):
        y = rng.random(60) < 0.2
        p = np.round(np.clip(0.3 * y + rng.random(60) * 0.7, 0, 1), 2)  # ties included
        t, f1 = best_f1_threshold(p, y)

        def f1_at(c):
            pred = p >= c
            tp = (pred & y).sum()
            return 2 * tp / (pred.sum() + y.sum())

        assert f1 == pytest.approx(max(f1_at(c) for c in np.unique(p)))
        assert f1_at(t) == pytest.approx(f1)
    assert best_f1_threshold(np.array([0.2, 0.7]), np.array([0, 0])) == (0.5, 0.0)  # no positives: fallback


def test_choose_thresholds_uses_only_studies_fractured_there():
    studies = pd.DataFrame({"StudyInstanceUID": ["a", "b"], "slice_id_offset": [0, 3],
                            **{v: [int(v == "C1"), 0] for v in VERTEBRAE}})
    p = {"a": np.tile([[0.9], [0.6], [0.1]], (1, 8)).astype(np.float32),
         "b": np.full((2, 8), 0.95, np.float32)}  # b's 0.95s would be false positives, but b has no C1 fracture
    truth = pd.DataFrame({"slice_id": range(5), **{v: [1, 1, 0, 0, 0] if v == "C1" else [0] * 5 for v in TARGETS}})
    thr, detail = choose_thresholds(p, studies, truth)
    assert thr[0] == pytest.approx(0.6) and detail["C1"]["f1"] == pytest.approx(1.0)
    assert (thr[1:] == 0.5).all() and detail["C2"]["fallback"]


def test_quality_counts():
    truth = pd.DataFrame({"slice_id": range(4),
                          **{t: [1, 1, 0, 0] if t in ("C2", "any") else [0] * 4 for t in TARGETS}})
    pseudo = truth.copy()
    pseudo.loc[1, "C2"] = 0
    pseudo.loc[3, "C5"] = 1
    pseudo["any"] = pseudo[list(VERTEBRAE)].max(axis=1)
    q = quality(pseudo, truth)
    assert (q["C2"]["tp"], q["C2"]["fp"], q["C2"]["fn"]) == (1, 0, 1)
    assert q["overall"]["precision"] == 0.5 and q["overall"]["recall"] == 0.5
    assert q["C5"]["f1"] == 0.0 and q["C1"]["f1"] is None  # nothing to find, nothing claimed
    with pytest.raises(ValueError, match="lacks 1"):
        quality(pseudo.assign(slice_id=[0, 1, 2, 99]), truth)


def test_crack_truth_agrees_with_the_boxes_and_the_study_labels(raw, shards):
    from spinestream.preprocess.synth_truth import crack_truth

    truth = crack_truth(raw, shards)
    slices = pd.read_parquet(Layout(shards).slices)
    assert truth.slice_id.tolist() == sorted(slices.slice_id)
    boxes = pd.read_parquet(Layout(shards).truth)  # boxed (a box on every cracked slice) and negative studies
    joined = boxes.merge(truth, on="slice_id", suffixes=("_box", ""))
    assert len(joined) == len(boxes) and (joined.any_box == joined["any"]).all()
    study_max = truth.merge(slices[["slice_id", "StudyInstanceUID"]]).groupby("StudyInstanceUID")[list(VERTEBRAE)].max()
    studies = pd.read_parquet(Layout(shards).studies).set_index("StudyInstanceUID")
    np.testing.assert_array_equal(study_max.to_numpy(), studies.loc[study_max.index, list(VERTEBRAE)].to_numpy())
    assert truth.loc[truth.slice_id.isin(slices.slice_id[slices.cohort == "positive-unboxed"]), "any"].sum() > 0


def test_round2_config_trains_on_every_cohort_with_truth_then_pseudo(tables, shards):
    from spinestream.engine.config import RunConfig
    from spinestream.engine.loader import DeviceLabels, select
    from spinestream.shards.config import load_config
    from spinestream.shards.layout import COHORTS

    r1 = load_config(RunConfig, "configs/round1.yaml")
    r2 = load_config(RunConfig, "configs/round2.yaml", [f"data.root={shards}"])
    assert sorted(r2.data.train_cohorts) == sorted(COHORTS) and r2.data.val_fold == r1.data.val_fold
    assert r2.data.label_tables == ["labels/truth.parquet", "labels/pseudo-round1.parquet"]  # truth wins
    probs = ("p_crop", "p_hflip", "p_vflip", "p_rotate", "p_shift", "p_brightness_contrast", "p_clahe")
    assert all(getattr(r1.loader.augment, p) == 0.3 and getattr(r2.loader.augment, p) == 0.4 for p in probs)
    # the pseudo table the verb wrote, with truth, labels every slice of round 2's training selection
    sel = select(shards, cohorts=r2.data.train_cohorts, exclude_folds=[r2.data.val_fold])
    DeviceLabels.load(shards, r2.data.label_tables).check_covers(sel)
    from spinestream.shards.manifest import read_manifest

    outside = {(s.cohort, s.fold) for s in read_manifest(shards).shards if s.fold != r2.data.val_fold}
    assert {(s.cohort, s.fold) for s in sel.shards} == outside  # every group but the validation fold's


# --------------------------------------------------------------------------- a trained round 1 on synthetic data

@pytest.mark.dali  # the demo config's loader is DALI (CPU-only mode) where it is installed, as in test_learning
@pytest.mark.timeout(900)  # its session fixture trains 1,080 steps (~131 s idle): a loaded 2-core machine
# slows torch's threads several-fold, and pytest's 300 s default then fails a correct run
def test_pseudo_labels_find_the_synthetic_cracks(learned_round1, tmp_path):
    """Measured (2-core dev VM, shared): hard labels with thresholds from the validation fold reach slice F1
    0.774 over C1..C7 (P 0.70, R 0.87; `any` F1 0.87; per vertebra C1 .83 C2 .67 C3 1.0 C4 1.0 C5 .57 C6 .82
    C7 .79) on the 33 positive-unboxed studies (660 slices, 55 cracked). The default since, train-share
    thresholds from the 60 boxed training studies (never the validation fold), measured on one trained
    run beside `--threshold val` on the same run: F1 0.847 (P 0.79, R 0.91; `any` 0.94) against 0.855
    (P 0.81, R 0.91; `any` 0.94). Labelling every slice of a fractured
    vertebra scores 0.10; an untrained model's most likely slice about 0.06. The floors leave room for
    machine-to-machine differences in training without letting a model that learned nothing pass."""
    from spinestream.preprocess.synth_truth import crack_truth

    raw, shards, run_dir = learned_round1
    truth_path = tmp_path / "crack-truth.parquet"
    crack_truth(raw, shards).to_parquet(truth_path, index=False)
    out = tmp_path / "pseudo.parquet"
    assert main(["--run", str(run_dir), "--device", "cpu", "--out", str(out), "--truth", str(truth_path),
                 "--heatmap-studies", "0"]) == 0
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    q = summary["quality"]
    assert summary["studies"] >= 20 and q["overall"]["positives"] >= 30  # enough cracks for F1 to mean something
    assert q["overall"]["f1"] >= 0.5, q
    assert q["any"]["f1"] >= 0.6, q
    # soft targets binarised at 0.5 find the cracks too
    soft = tmp_path / "soft.parquet"
    assert main(["--run", str(run_dir), "--device", "cpu", "--mode", "soft", "--out", str(soft), "--truth",
                 str(truth_path), "--heatmap-studies", "0"]) == 0
    assert json.loads(soft.with_suffix(".summary.json").read_text())["quality"]["overall"]["f1"] >= 0.5
