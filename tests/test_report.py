"""Issue 17: report.md answers "did it work": a headline from the records, warnings when a round ends worse
than the constant baseline or the pseudo-labels are degenerate, heat maps with a colour bar, negative studies
and the slice truth of boxed ones."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spinestream.engine.rundir import (EvalSummary, PositivesPerStudy, PseudoSummary, RunLayout, append_metrics,
                                       read_eval_summary, read_pseudo_summary, write_eval_summary,
                                       write_pseudo_summary)
from spinestream.shards.fsutil import atomic_write_json
from spinestream.shards.layout import ROW_TYPES, TARGETS

STAGES = "stages=[round1,evaluate1,pseudo,round2,evaluate2,compare,report]"


def _summary(run: str, loss: float, baseline: float = 0.6) -> EvalSummary:
    return EvalSummary(run=run, checkpoint="best.pt", shards="s", fold=0, rule="max", studies=20,
                       competition_loss=loss, constant_baseline=baseline, accuracy=0.8, validation_fold=True)


def _pseudo(positive_any: int, slices: int = 100) -> PseudoSummary:
    return PseudoSummary(table="t", run="round1", checkpoint="best.pt", shards="s", mode="hard", thresholds=None,
                         studies=5, slices=slices, positive_slices={"any": positive_any}, per_study={},
                         positive_slices_per_study=PositivesPerStudy(mean=positive_any / 5, min=0, max=slices // 5))


def _pipeline(root: Path, losses: dict[tuple[str, bool], float], pseudo: PseudoSummary) -> None:
    """A pipeline directory as its stages leave it: per (run, last) an evaluation (summary, report, a
    submission of that skill), both rounds' hardware records, stage records and a pseudo-label summary."""
    from spinestream.engine.metrics import submission_frame
    from spinestream.plan import Paths

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(40, len(ROW_TYPES)))
    studies = pd.DataFrame({"StudyInstanceUID": [f"1.2.{i}" for i in range(40)], "fold": [0, 1] * 20,
                            "cohort": "boxed", **{c: y[:, k] for k, c in enumerate(ROW_TYPES)}})
    (root / "shards").mkdir(parents=True)
    studies.to_parquet(root / "shards/studies.parquet")
    val = studies[studies.fold == 0]
    for (run, last), loss in losses.items():
        ev = RunLayout(Paths(root).run(run)).evaluation(0, last=last)
        ev.root.mkdir(parents=True)
        pd.DataFrame({"target": ["overall"], "accuracy": [0.8]}).to_csv(ev.report, index=False)
        skill = 0.8 if loss < 0.5 else 0.1
        p = np.clip(0.5 + skill * (val[list(ROW_TYPES)].to_numpy() - 0.5) + rng.normal(0, 0.05, (20, 8)), 0.01, 0.99)
        submission_frame(dict(zip(val.StudyInstanceUID, p))).to_csv(ev.submission, index=False)
        write_eval_summary(ev.root, _summary(run, loss))
    for run in ("round1", "round2"):
        Paths(root).run(run).mkdir(parents=True, exist_ok=True)
        append_metrics(Paths(root).run(run), {"step": 0, "hardware": "box: 16 cores, NVIDIA H100", "precision": "bf16"})
    for s, secs in (("round1", 100.0), ("round2", 80.0), ("report", None)):
        if secs:
            atomic_write_json(root / f"stages/{s}.json", {"format": "spinestream-stage", "stage": s,
                                                          "state": "complete", "status": "run", "seconds": secs})
    write_pseudo_summary(Paths(root).pseudo, pseudo)


def _report(root: Path, stages: str = STAGES) -> dict:
    from spinestream.config import PipelineConfig
    from spinestream.engine.config import RunConfig
    from spinestream.plan import Paths
    from spinestream.report import write_report
    from spinestream.shards.config import load_config

    cfg = load_config(PipelineConfig, None, [stages])
    rcs = {r: load_config(RunConfig, None, ["model.name=test_resnet", "loader.image_size=96"])
           for r in ("round1", "round2")}
    return write_report(Paths(root), cfg, rcs)


HEALTHY = {("round1", False): 0.45, ("round2", False): 0.40, ("round1", True): 0.46, ("round2", True): 0.41}


def test_headline_numbers_are_the_records_and_a_healthy_run_warns_of_nothing(tmp_path):
    from spinestream.plan import Paths

    root = tmp_path / "out"
    _pipeline(root, HEALTHY, _pseudo(positive_any=20))
    rep = _report(root)
    h = rep["headline"]
    best = read_eval_summary(RunLayout(Paths(root).run("round2")).evaluation(0).root)
    assert (h["best"]["run"], h["best"]["checkpoint"]) == ("round2", "best")
    assert (h["best"]["competition_loss"], h["best"]["constant_baseline"]) == (best.competition_loss,
                                                                              best.constant_baseline)
    last = rep["comparison"]["last"]
    r = h["round2_vs_round1"]
    assert r["on"] == "last" and (r["diff"], r["ci95"]) == (last["diff"], last["ci95"])
    assert h["wall_seconds"] == 180.0 and h["hardware"]["machines"] == ["box: 16 cores, NVIDIA H100"]
    assert h["model"] == {"round1": "test_resnet", "round2": "test_resnet"} and h["image_size"]["round2"] == 96
    assert rep["warnings"] == []
    md = (root / "report.md").read_text()
    head = md.split("## Evaluations")[0]
    assert "## Headline" in head and "**0.4000**" in head and "0.6000" in head and "3.0 min" in head
    assert f"{last['diff']:+.4f}, 95% interval [{last['ci95'][0]:+.4f}, {last['ci95'][1]:+.4f}]" in head
    assert "NVIDIA H100" in head and "test_resnet at 96 px" in head and "## Warnings" not in md


def test_headline_says_what_is_missing_without_round_2_or_a_compare_stage(tmp_path):
    root = tmp_path / "out"
    _pipeline(root, {("round1", False): 0.45}, _pseudo(positive_any=20))
    rep = _report(root, "stages=[round1,evaluate1,report]")
    h = rep["headline"]
    assert h["best"]["competition_loss"] == 0.45 and "missing" in h["round2_vs_round1"]
    assert "round 2 against round 1: missing (" in (root / "report.md").read_text()


def test_a_round_ending_worse_than_the_baseline_is_a_warning(tmp_path):
    root = tmp_path / "out"
    _pipeline(root, {**HEALTHY, ("round2", True): 0.7}, _pseudo(positive_any=20))  # baseline 0.6
    rep = _report(root)
    (w,) = rep["warnings"]
    assert w.startswith("round2 ends worse than the constant baseline") and "0.7000" in w and "0.6000" in w
    assert f"- **{w}**" in (root / "report.md").read_text().split("## Evaluations")[0]


@pytest.mark.parametrize("positive, words", [(100, "100% of the 100"), (0, "none of the 100")])
def test_degenerate_pseudo_labels_are_a_warning(tmp_path, positive, words):
    from spinestream.plan import Paths

    root = tmp_path / "out"
    _pipeline(root, HEALTHY, _pseudo(positive_any=positive))
    assert read_pseudo_summary(Paths(root).pseudo).positive_slices["any"] == positive
    (w,) = _report(root)["warnings"]
    assert w.startswith("the pseudo-labels look degenerate") and words in w


def _colour_bars(fig) -> int:
    return sum(im.colorbar is not None for ax in fig.axes for im in ax.images)


def test_evaluation_heat_maps_have_a_colour_bar_negatives_and_the_truth_row_of_boxed_studies(tmp_path):
    from spinestream.engine.evaluate import heatmaps

    rows = [("b1", "boxed", 1), ("b2", "boxed", 1), ("u1", "positive-unboxed", 1), ("u2", "positive-unboxed", 1),
            ("u3", "positive-unboxed", 1), ("n1", "negative", 0), ("n2", "negative", 0)]
    studies = pd.DataFrame([{"StudyInstanceUID": u, "cohort": c, "patient_overall": o,
                             **{t: o for t in ROW_TYPES[:7]}} for u, c, o in rows])
    rng = np.random.default_rng(0)
    probs = {u: rng.uniform(size=(10, len(TARGETS))) for u, _, _ in rows}
    truth = {"b1": (np.arange(10) > 6).astype(float)}
    fig = heatmaps(probs, studies, tmp_path / "h.png", max_studies=4, truth=truth)
    assert (tmp_path / "h.png").is_file() and _colour_bars(fig) == 1
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 4 and sum("negative" in t for t in titles) == 2  # not only the fractured ones
    boxed = next(ax for ax in fig.axes if ax.get_title().startswith("…b1"))
    assert [t.get_text() for t in boxed.get_yticklabels()][-1] == "truth"
    assert np.array_equal(boxed.images[0].get_array()[-1], truth["b1"])
    other = next(ax for ax in fig.axes if ax.get_title().startswith("…n1"))
    assert "truth" not in [t.get_text() for t in other.get_yticklabels()]


def test_pseudo_label_heat_map_has_a_colour_bar(tmp_path):
    from spinestream.engine.pseudo import PROB_COLUMNS, heatmaps

    slices = pd.DataFrame({"slice_id": range(20), "StudyInstanceUID": ["a"] * 10 + ["b"] * 10})
    df = pd.DataFrame({"slice_id": range(20), **{c: np.linspace(0, 1, 20) for c in (*PROB_COLUMNS, *TARGETS)}})
    fig = heatmaps(df, slices, tmp_path / "p.png")
    assert (tmp_path / "p.png").is_file() and _colour_bars(fig) == 1
