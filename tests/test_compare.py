"""engine.compare: per-study losses average to the competition metric, the paired bootstrap separates a real
difference from noise, the verb and the pipeline report use it on two evaluation directories."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from spinestream.cli import main as cli_main
from spinestream.engine.compare import compare_evals, main, paired_bootstrap
from spinestream.engine.metrics import score_submission, solution_from_train, study_losses, submission_frame
from spinestream.shards.layout import ROW_TYPES, Layout
from spinestream.shards.tables import read_study_table


def _truth(shards) -> pd.DataFrame:
    return read_study_table(Layout(shards).studies, columns=["StudyInstanceUID", *ROW_TYPES])


def _write_eval(d, truth: pd.DataFrame, skill: float, seed: int):
    """An evaluation directory whose submission leans ``skill`` of the way from 0.5 to the truth, with noise."""
    rng = np.random.default_rng(seed)
    y = truth[list(ROW_TYPES)].to_numpy(dtype=float)
    p = np.clip(0.5 + skill * (y - 0.5) + rng.normal(0, 0.1, y.shape), 0.01, 0.99)
    d.mkdir(parents=True)
    submission_frame(dict(zip(truth.StudyInstanceUID, p))).to_csv(d / "submission.csv", index=False)
    return d


def test_study_losses_average_to_the_metric():
    rng = np.random.default_rng(0)
    truth = pd.DataFrame({"StudyInstanceUID": [f"1.2.{i}" for i in range(30)],
                          **{t: rng.integers(0, 2, 30) for t in ROW_TYPES}})
    sub = submission_frame({u: rng.uniform(0.05, 0.95, 8) for u in truth.StudyInstanceUID})
    per = study_losses(solution_from_train(truth), sub)
    assert len(per) == 30 and set(per.index) == set(truth.StudyInstanceUID)
    assert per.mean() == pytest.approx(score_submission(solution_from_train(truth), sub))


def test_the_bootstrap_separates_a_real_difference_from_noise():
    rng = np.random.default_rng(1)
    a = pd.Series(rng.uniform(0.1, 0.6, 200), index=[f"s{i}" for i in range(200)])
    same = paired_bootstrap(a, a.copy())
    assert same["diff"] == 0 and same["ci95"] == [0, 0]
    better = paired_bootstrap(a, a - 0.02 + rng.normal(0, 0.01, 200))
    assert better["ci95"][1] < 0 and better["p_b_lower"] == 1.0
    noise = paired_bootstrap(a, a + rng.normal(0, 0.05, 200))  # no real difference
    assert noise["ci95"][0] < 0 < noise["ci95"][1] and 0.05 < noise["p_b_lower"] < 0.95
    with pytest.raises(ValueError, match="different studies"):
        paired_bootstrap(a, a.iloc[:-1])


def test_compare_two_evaluation_dirs_and_the_verb(shards, tmp_path, capsys):
    truth = _truth(shards)
    weak, strong = _write_eval(tmp_path / "r1" / "eval-f0", truth, 0.2, 0), _write_eval(
        tmp_path / "r2" / "eval-f0", truth, 0.8, 1)
    r = compare_evals(weak, strong, shards)
    assert r["studies"] == len(truth) and r["b"] < r["a"] and r["ci95"][1] < 0
    assert r["a"] == pytest.approx(score_submission(solution_from_train(truth), pd.read_csv(weak / "submission.csv")))
    out = tmp_path / "cmp.json"
    assert main([str(weak), str(strong), "--shards", str(shards), "--out", str(out)]) == 0
    assert "is lower" in capsys.readouterr().out and json.loads(out.read_text())["diff"] == pytest.approx(r["diff"])
    assert cli_main(["compare", str(weak), str(tmp_path / "nowhere"), "--shards", str(shards)]) == 2  # one line
    assert "spinestream evaluate" in capsys.readouterr().err


def test_the_report_compares_round_two_with_round_one_on_the_same_fold(shards, tmp_path):
    """best.pt against best.pt and last against last, side by side; the verdict is the last checkpoints'
    (best.pt was picked on this fold, round 2's from more validations), never best.pt's."""
    from spinestream.report import comparison

    truth = _truth(shards)
    d1, d2 = _write_eval(tmp_path / "a", truth, 0.5, 0), _write_eval(tmp_path / "b", truth, 0.5, 1)
    weak, strong = _write_eval(tmp_path / "w", truth, 0.1, 2), _write_eval(tmp_path / "s", truth, 0.9, 3)

    def e(run, d, checkpoint, fold=0):
        return {"run": run, "dir": str(d), "fold": fold, "checkpoint": checkpoint, "competition_loss": 0.1}

    c = comparison([e("round1", weak, "best"), e("round2", strong, "best"), e("round1", d1, "last"),
                    e("round2", d2, "last")], shards, {"round1": {"validations": 4}, "round2": {"validations": 13}})
    assert c["best"]["a_run"] == "round1" and c["best"]["b_run"] == "round2" and c["best"]["ci95"][1] < 0
    last = c["last"]
    assert (last["a_dir"], last["b_dir"]) == (str(d1), str(d2)) and last["ci95"][0] < last["diff"] < last["ci95"][1]
    assert (c["verdict_on"], c["verdict"]) == ("last", "within the noise")  # not best.pt's "round2 is lower"
    assert c["selection"]["round2"]["validations"] == 13
    only_best = comparison([e("round1", weak, "best"), e("round2", strong, "best")], shards)
    assert only_best["verdict"] is None and "missing" in only_best["last"] and "diff" in only_best["best"]
    other_fold = comparison([e("round1", d1, "last"), e("round2", d2, "last", fold=1)], shards)
    assert other_fold["verdict"] is None and "missing" in other_fold["last"]
