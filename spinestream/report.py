"""The pipeline's report: ``DIR/report.md`` (with PNGs) and the same figures in ``DIR/report.json``.

Everything is read from what the stages wrote; a piece that is not there is reported as missing
(``{"missing": "<the file looked for>"}``), never invented:

* ``evaluations``: per evaluation its stage, run, ``checkpoint`` (``best``: the evaluate stages'
  ``RUN/eval-f<k>/``; ``last``: the compare stage's ``RUN/eval-f<k>-last/``), fold, slice-to-study rule,
  competition loss, the constant baseline and the per-vertebra table (``report.csv``). When the evaluation
  wrote a ``summary.json`` its numbers are used; otherwise the loss is scored from its ``submission.csv``
  against the shard set's study labels, and the baseline is the trainer's: the prevalence of each row type
  among the studies outside fold k, predicted for every evaluated study (``"source"`` says which);
* ``comparison``: round 2 against round 1 on the same studies (:mod:`spinestream.engine.compare`'s paired bootstrap),
  for the best.pt evaluations (``"best"``) and for the last checkpoints (``"last"``), side by side, with
  how each round's best.pt was chosen (``"selection"``: its number of validations, the ``"val"`` records of
  ``metrics.jsonl``, and the steps of the best and the last). The ``"verdict"`` ("round2 is lower" /
  "within the noise" / "round2 is higher") is the last checkpoints' (``"verdict_on": "last"``), never
  best.pt's: best.pt is the minimum of a run's validations on the very fold reported here, so its loss
  there is biased low by the selection, and the more validations it was picked from, the more; round 2
  validates 4-5 times an epoch (``train.val_every_steps``), round 1 once, so best against best favours
  round 2 whether or not it is better. The last checkpoint is the run's end, not chosen by its loss on the
  fold (early stopping, when on, does look at the fold, but stops ``early_stopping_patience`` validations
  *after* the best: a mild effect, against the run). Without both last evaluations (no compare stage)
  there is no verdict, and the report says why rather than falling back on best.pt;
* ``pseudo_labels``: the pseudo-label summary (counts; precision/recall/F1 on synthetic data);
* ``throughput``: loader images/s per line (``DIR/bench/loader.json``) and training images/s (median of the
  runs' ``metrics.jsonl`` log windows);
* ``stages``: status and seconds per stage (``DIR/stages/*.json``); ``submission``: its path and rows;
* ``headline`` (what report.md opens with): the best held-out loss against its constant baseline, round 2
  against round 1 with its interval (the last checkpoints', else best.pt's, said), total wall time of the
  timed stages, hardware (the runs' ``hardware`` log records, else the loader benchmark's machine), model and
  image size; each piece that is not there says so;
* ``warnings``: a round whose end (its last checkpoint's evaluation, else best.pt's) scores no better than
  the constant baseline; pseudo-labels with more than :data:`DEGENERATE_SHARE` of their slices positive, or
  none.

The run directories' files are read through :mod:`spinestream.engine.rundir`'s layouts and records.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
from pathlib import Path

from spinestream.engine.rundir import (EvalLayout, PseudoLayout, RunLayout, read_eval_summary, read_metrics,
                                       read_pseudo_summary)
from spinestream.shards.fsutil import atomic_save_figure, atomic_write_bytes, atomic_write_json, remove_stale_tmp
from spinestream.shards.layout import ROW_TYPES, Layout

from .stages import read_record

DEGENERATE_SHARE = 0.9
"""Pseudo-labels with more than this share of their slices positive ("any") are called degenerate: every
pseudo-labelled study is fractured, but a fracture spans a few vertebrae of a scan, not nearly all of it."""


def _missing(path: Path) -> dict:
    return {"missing": str(path)}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, ValueError):
        return None


# --------------------------------------------------------------------------- evaluations


def recompute_scores(eval_dir: Path, shards: Path, fold: int) -> dict:
    """(competition loss, constant baseline) of an evaluation from its submission.csv and the study labels."""
    from spinestream.engine.compare import eval_study_losses
    from spinestream.engine.metrics import constant_baseline
    from spinestream.shards.tables import read_study_table

    losses = eval_study_losses(eval_dir, shards)
    studies = read_study_table(Layout(shards).studies, columns=["StudyInstanceUID", "fold", *ROW_TYPES])
    chosen = studies[studies.StudyInstanceUID.isin(losses.index)]
    baseline = constant_baseline(chosen[["StudyInstanceUID", *ROW_TYPES]],
                                 prevalence_from=studies[studies.fold != fold][["StudyInstanceUID", *ROW_TYPES]])
    return {"competition_loss": float(losses.mean()), "constant_baseline": baseline, "studies": len(losses),
            "source": f"recomputed from {EvalLayout(eval_dir).submission} and the study labels"}


def evaluation(name: str, run: str, eval_dir: Path, rule: str, shards: Path, *, fold: int,
               checkpoint: str = "best") -> dict:
    """One entry of ``evaluations``."""
    import pandas as pd

    lay = EvalLayout(eval_dir)
    out = {"name": name, "run": run, "checkpoint": checkpoint, "fold": fold, "rule": rule, "dir": str(eval_dir)}
    if not lay.report.is_file():
        return {**out, "competition_loss": None, "constant_baseline": None, **_missing(lay.report)}
    summary = read_eval_summary(eval_dir)
    if summary is not None:
        scores = {k: getattr(summary, k) for k in ("competition_loss", "constant_baseline", "studies", "accuracy",
                                                   "rule")}
        scores["source"] = str(lay.summary)
    elif lay.submission.is_file() and Layout(shards).studies.is_file():
        scores = recompute_scores(eval_dir, shards, fold)
    else:
        scores = {"competition_loss": None, "constant_baseline": None, **_missing(lay.submission)}
    table = pd.read_csv(lay.report)
    heat = lay.heatmaps
    return {**out, **scores, "per_vertebra": json.loads(table.to_json(orient="records")),
            "heatmaps": str(heat) if heat.is_file() else None}


def paired(evals: list[dict], shards: Path, checkpoint: str) -> dict:
    """Round 2 against round 1 on the same studies (engine.compare's paired bootstrap) for one kind of
    checkpoint (``best`` / ``last``), when both rounds evaluated it on the same fold."""
    from spinestream.engine.compare import compare_evals

    done = {}
    for e in evals:
        if e.get("checkpoint") == checkpoint and e.get("competition_loss") is not None:
            done.setdefault(e["run"], e)
    stage = "the compare stage" if checkpoint == "last" else "evaluate1 and evaluate2"
    if set(done) != {"round1", "round2"} or done["round1"]["fold"] != done["round2"]["fold"]:
        return {"missing": f"needs round1's and round2's {checkpoint} checkpoint evaluated on the same fold "
                           f"({stage})"}
    try:
        r = compare_evals(done["round1"]["dir"], done["round2"]["dir"], shards)
        return {"a_run": "round1", "b_run": "round2", **r}
    except (OSError, ValueError) as e:
        return {"missing": str(e)}


def comparison(evals: list[dict], shards: Path, selection: dict | None = None) -> dict:
    """Round 2 against round 1, best.pt and last checkpoint side by side; the verdict is the last's (see the
    module docstring). ``selection``: :func:`selection` per round."""
    from spinestream.engine.compare import verdict

    last, best = paired(evals, shards, "last"), paired(evals, shards, "best")
    out = {"verdict_on": "last", "verdict": verdict(last, "round2") if "diff" in last else None,
           "last": last, "best": best, "selection": selection or {}}
    if out["verdict"] is None:
        out["no_verdict"] = (f"no last-checkpoint comparison ({last['missing']}); best.pt against best.pt is not "
                             f"a verdict: each was picked on this fold, from as many validations as its round made")
    return out


def selection(run_dir: Path) -> dict:
    """How the run's best.pt was chosen: the number of its validations (``"val"`` records of metrics.jsonl,
    epoch-end and ``train.val_every_steps`` ones alike), the step of the best (the first lowest loss: the
    trainer keeps a strictly lower one) and of the last."""
    path = RunLayout(run_dir).metrics
    if not path.is_file():
        return _missing(path)
    vals = [r for r in read_metrics(run_dir) if isinstance(r.get("val"), dict) and "competition_loss" in r["val"]]
    if not vals:
        return {"validations": 0, "missing": f"no val records in {path}"}
    best = min(vals, key=lambda r: r["val"]["competition_loss"])
    return {"validations": len(vals), "best_step": best.get("step"), "best_val_loss": best["val"]["competition_loss"],
            "last_step": vals[-1].get("step"), "source": str(path)}


# --------------------------------------------------------------------------- the other pieces


def pseudo_labels(table: Path) -> dict:
    s = read_pseudo_summary(table)
    if s is None:
        return _missing(PseudoLayout(table).summary)
    q = s.quality or {}
    out = {k: getattr(s, k) for k in ("table", "mode", "studies", "slices", "positive_slices", "thresholds",
                                      "threshold_source")}
    out["positive_slices_per_study"] = dataclasses.asdict(s.positive_slices_per_study)
    out["f1"] = ({k: q[k].get("f1") for k in q if isinstance(q[k], dict)} if q else
                 {"missing": "no crack truth (real data, or pseudo.synth_truth off)"})
    out["precision_recall"] = {k: {m: q[k].get(m) for m in ("precision", "recall")} for k in ("overall", "any")
                               if isinstance(q.get(k), dict)}
    heat = PseudoLayout(table).heatmap
    out["heatmap"] = str(heat) if heat.is_file() else None
    return out


def training_throughput(run_dir: Path) -> dict:
    path = RunLayout(run_dir).metrics
    if not path.is_file():
        return _missing(path)
    rows = read_metrics(run_dir)
    ips = [r["images_per_s"] for r in rows if "images_per_s" in r]
    if not ips:
        return {"missing": f"no images_per_s in {path}"}
    wait = [r["data_wait"] for r in rows if "data_wait" in r]
    return {"images_per_s_median": statistics.median(ips), "images_per_s_max": max(ips), "windows": len(ips),
            "data_wait_median": statistics.median(wait) if wait else None, "source": str(path)}


def loader_throughput(bench_json: Path) -> dict:
    b = _read_json(bench_json)
    if b is None or "lines" not in b:
        return _missing(bench_json)
    return {"machine": b.get("machine"), "image_size": b.get("image_size"), "batch_size": b.get("batch_size"),
            "images_per_s": {k: v.get("images_per_s") for k, v in b["lines"].items()}, "source": str(bench_json)}


def stage_times(state_dir: Path, names: list[str]) -> list[dict]:
    out = []
    for n in names:
        rec = read_record(state_dir, n)
        if rec is None:
            out.append({"name": n, "state": None, "seconds": None, "missing": str(state_dir / f"{n}.json")})
        else:
            out.append({"name": n, "state": rec.get("state"), "status": rec.get("status"),
                        "seconds": rec.get("seconds"), "finished": rec.get("finished")})
    return out


def submission(path: Path) -> dict:
    if not path.is_file():
        return _missing(path)
    with open(path) as f:
        rows = sum(1 for _ in f) - 1
    return {"path": str(path), "rows": rows, "studies": rows // len(ROW_TYPES)}


# --------------------------------------------------------------------------- did it work


def best_evaluation(evals: list[dict]) -> dict:
    """The lowest held-out loss of the evaluations, with its constant baseline."""
    have = [e for e in evals if e.get("competition_loss") is not None]
    if not have:
        return {"missing": "no evaluation was scored (no evaluate stage, or it has not run)"}
    e = min(have, key=lambda e: e["competition_loss"])
    return {k: e.get(k) for k in ("name", "run", "checkpoint", "fold", "competition_loss", "constant_baseline")}


def round_change(c: dict) -> dict:
    """Round 2 minus round 1 with its 95% interval: on the last checkpoints (the verdict's), else on best.pt
    (said: each best.pt was picked on the fold, so it is no verdict)."""
    for on in ("last", "best"):
        r = c.get(on) or {}
        if "diff" in r:
            return {"on": on, "round1": r["a"], "round2": r["b"], "diff": r["diff"], "ci95": r["ci95"],
                    "verdict": c.get("verdict") if on == "last" else None}
    return {"missing": (c.get("last") or {}).get("missing") or "no round 2 against round 1 comparison"}


def hardware(paths, runs: list[str], loader: dict) -> dict:
    """The machines the runs trained on (their ``hardware`` log records), else the loader benchmark's."""
    seen = [r["hardware"] for run in runs for r in read_metrics(paths.run(run)) if "hardware" in r]
    if seen:
        return {"machines": list(dict.fromkeys(seen)), "source": "the runs' metrics"}
    if "machine" in loader:
        return {"machines": [loader["machine"]], "source": "the loader benchmark"}
    return {"missing": "no run logged its hardware (runs from before the trainer did) and no bench stage"}


def headline(rep: dict, paths, runs: list[str], configs: dict) -> dict:
    """What report.md opens with: did it work, on what, in how long."""
    timed = [s["seconds"] for s in rep["stages"] if s.get("seconds") is not None]
    rounds = {r: configs[r] for r in runs}
    return {"best": best_evaluation(rep["evaluations"]), "round2_vs_round1": round_change(rep["comparison"]),
            "wall_seconds": sum(timed) if timed else None, "stages_timed": len(timed), "stages": len(rep["stages"]),
            "hardware": hardware(paths, runs, rep["throughput"]["loader"]),
            "model": {r: rc.model.name for r, rc in rounds.items()},
            "image_size": {r: rc.loader.image_size for r, rc in rounds.items()}}


def warnings(rep: dict) -> list[str]:
    """What says a stage did not work: a round that ends worse than the constant baseline (its last
    checkpoint's evaluation when the compare stage made one, else its best.pt's), degenerate pseudo-labels."""
    out = []
    for run in dict.fromkeys(e["run"] for e in rep["evaluations"]):
        scored = [e for e in rep["evaluations"] if e["run"] == run and e.get("competition_loss") is not None
                  and e.get("constant_baseline") is not None]
        if not scored:
            continue
        end = next((e for e in scored if e.get("checkpoint") == "last"), scored[0])
        if end["competition_loss"] >= end["constant_baseline"]:
            out.append(f"{run} ends worse than the constant baseline: its {end.get('checkpoint', 'best')} "
                       f"checkpoint scores {end['competition_loss']:.4f} on fold {end['fold']}, predicting the "
                       f"training prevalence scores {end['constant_baseline']:.4f}")
    p = rep["pseudo_labels"]
    if "missing" not in p and p.get("slices"):
        share = (p.get("positive_slices") or {}).get("any", 0) / p["slices"]
        if share > DEGENERATE_SHARE:
            out.append(f"the pseudo-labels look degenerate: {share:.0%} of the {p['slices']} pseudo-labelled slices "
                       f"are positive (any); check the thresholds ({p.get('threshold_source')})")
        elif share == 0:
            out.append(f"the pseudo-labels look degenerate: none of the {p['slices']} slices of {p['studies']} "
                       f"fractured studies is positive; check the thresholds ({p.get('threshold_source')})")
    return out


# --------------------------------------------------------------------------- assembling


def collect(paths, cfg, configs: dict) -> dict:
    """The report as a dict (what report.json holds); ``paths`` is a plan.Paths, ``configs`` the resolved run
    configs by round (for the validation fold and the study rule)."""
    evals = []
    todo = [(name, f"round{name[-1]}", False) for name in ("evaluate1", "evaluate2") if name in cfg.stages]
    todo += [("compare", run, True) for run in ("round1", "round2") if "compare" in cfg.stages]
    for name, run, last in todo:
        stage, rc, run_dir = getattr(cfg, f"evaluate{run[-1]}"), configs[run], paths.run(run)
        rule = stage.rule or rc.train.study_rule
        d = RunLayout(run_dir).evaluation(stage.fold_of(rc), last=last).root
        evals.append(evaluation(name, run, d, rule, paths.shards, fold=stage.fold_of(rc),
                                checkpoint="last" if last else stage.checkpoint))
    runs = [r for r in ("round1", "round2") if r in cfg.stages]
    chosen = {r: selection(paths.run(r)) for r in ("round1", "round2") if r in configs}
    rep = {
        "out": str(paths.root),
        "evaluations": evals,
        "comparison": comparison(evals, paths.shards, chosen),
        "pseudo_labels": pseudo_labels(paths.pseudo) if "pseudo" in cfg.stages else {"missing": "no pseudo stage"},
        "throughput": {"loader": loader_throughput(paths.bench / "loader.json") if "bench" in cfg.stages
                       else {"missing": "no bench stage"},
                       "training": {r: training_throughput(paths.run(r)) for r in runs}},
        "stages": stage_times(paths.stages, [s for s in cfg.stages if s != "report"]),
        "submission": submission(paths.submission) if "predict" in cfg.stages else {"missing": "no predict stage"},
        "figures": figures(paths, runs),
    }
    rep["headline"] = headline(rep, paths, [r for r in ("round1", "round2") if r in configs], configs)
    rep["warnings"] = warnings(rep)
    return rep


def figures(paths, runs: list[str]) -> list[str]:
    """PNGs the stages wrote, relative to DIR (the report links them; nothing is copied)."""
    evals = [e.heatmaps for d in sorted(paths.runs.glob("*")) for e in RunLayout(d).evaluations()]
    found = [paths.bench / "loader.png", *[RunLayout(paths.run(r)).curves for r in runs], *evals,
             PseudoLayout(paths.pseudo).heatmap]
    return [str(p.relative_to(paths.root)) for p in found if p.is_file()]


def loss_chart(evals: list[dict], path: Path) -> bool:
    """Competition loss beside the constant baseline per evaluation; False when there is nothing to draw."""
    have = [e for e in evals if e.get("competition_loss") is not None]
    if not have:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(have), 3.2))
    xs = range(len(have))
    ax.bar([x - 0.2 for x in xs], [e["competition_loss"] for e in have], 0.4, label="model")
    ax.bar([x + 0.2 for x in xs], [e["constant_baseline"] or 0 for e in have], 0.4, label="constant baseline",
           color="grey")
    ax.set_xticks(list(xs), [f"{e['run']} {e.get('checkpoint', 'best')}\nfold {e['fold']}" for e in have],
                  fontsize=8)
    ax.set(title="competition loss (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path)
    return True


def _f(v, fmt: str = ".4f") -> str:
    return "missing" if v is None else format(v, fmt) if isinstance(v, (int, float)) else str(v)


def markdown(rep: dict) -> str:
    """report.md from the report dict (paths relative to DIR)."""
    root = Path(rep["out"])
    rel = lambda p: os.path.relpath(p, root) if p else None  # noqa: E731
    lines = [f"# spinestream pipeline report: {root}", *_headline_md(rep["headline"])]
    lines += ["", "## Warnings", ""] + [f"- **{w}**" for w in rep["warnings"]] if rep["warnings"] else []
    lines += ["", "## Evaluations", ""]
    lines += ["| stage | run | checkpoint | fold | rule | studies | competition loss | constant baseline |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {e['name']} | {e['run']} | {e.get('checkpoint', 'best')} | {e['fold']} | {e['rule']} | "
              f"{_f(e.get('studies'), 'd')} | {_f(e.get('competition_loss'))} | {_f(e.get('constant_baseline'))} |"
              for e in rep["evaluations"]]
    lines += _comparison_md(rep.get("comparison") or {})
    if "losses.png" in rep.get("report_figures", []):
        lines += ["", "![losses](report/losses.png)"]
    for e in rep["evaluations"]:
        lines += ["", f"### {e['name']}: {e['run']} {e.get('checkpoint', 'best')} checkpoint, fold {e['fold']} "
                      f"per vertebra", ""]
        if "per_vertebra" not in e:
            lines.append(f"missing: {e.get('missing')}")
            continue
        cols = ["target", "accuracy", "sensitivity", "specificity", "auc", "n_pos", "n_neg", "weighted_logloss"]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_f(r.get(c), ".3f") if c not in ("target", "n_pos", "n_neg") else str(r.get(c))
                                    for c in cols) + " |" for r in e["per_vertebra"]]
        if e.get("heatmaps"):
            lines += ["", f"![{e['name']} heat maps]({rel(e['heatmaps'])})"]
    lines += _pseudo_md(rep["pseudo_labels"]) + _throughput_md(rep["throughput"])
    lines += ["", "## Time per stage", "", "| stage | last status | seconds |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s.get('status') or s.get('state') or 'missing'} | {_f(s.get('seconds'), '.1f')} |"
              for s in rep["stages"]]
    sub = rep["submission"]
    lines += ["", "## Submission", "", f"{rel(sub['path'])}: {sub['rows']} rows ({sub['studies']} studies)"
              if "path" in sub else f"missing: {sub['missing']}"]
    lines += ["", "## Figures", ""] + [f"- [{f}]({f})" for f in rep["figures"]]
    return "\n".join(lines) + "\n"


def _headline_md(h: dict) -> list[str]:
    """Did it work: the best held-out loss against the baseline, round 2 against round 1, time and setup."""
    b, r = h["best"], h["round2_vs_round1"]
    best = (f"missing ({b['missing']})" if "missing" in b else
            f"**{b['competition_loss']:.4f}** ({b['run']} {b['checkpoint']}, fold {b['fold']}) against the constant "
            f"baseline's {_f(b['constant_baseline'])}")
    change = (f"missing ({r['missing']})" if "missing" in r else
              f"{r['round2']:.4f} vs {r['round1']:.4f}: {r['diff']:+.4f}, 95% interval [{r['ci95'][0]:+.4f}, "
              f"{r['ci95'][1]:+.4f}] on the {r['on']} checkpoints" + (
                  f" ({r['verdict']})" if r.get("verdict") else " (best.pt, picked on this fold: not a verdict)"))
    secs = h["wall_seconds"]
    wall = "missing (no stage record)" if secs is None else (
        f"{secs / 60:.1f} min ({h['stages_timed']} of {h['stages']} stages timed)")
    hw = h["hardware"]
    setup = ", ".join(f"{k}: {v} at {h['image_size'][k]} px" for k, v in h["model"].items()) or "missing"
    return ["", "## Headline", "", f"- best held-out competition loss: {best}",
            f"- round 2 against round 1: {change}", f"- wall time: {wall}",
            f"- hardware: {'; '.join(hw['machines']) if 'machines' in hw else 'missing (' + hw['missing'] + ')'}",
            f"- model: {setup}"]


def _comparison_md(c: dict) -> list[str]:
    """Round 2 against round 1: best.pt and last checkpoint side by side, the verdict on the last."""
    if "last" not in c:
        return []
    from spinestream.engine.compare import describe

    sel = c.get("selection") or {}
    n = {r: (sel.get(r) or {}).get("validations") for r in ("round1", "round2")}
    step = {r: (sel.get(r) or {}).get("last_step") for r in ("round1", "round2")}
    picked = f"lowest of round1's {_f(n['round1'], 'd')} / round2's {_f(n['round2'], 'd')} validations on this fold"
    lines = ["", "## Round 2 against round 1 (competition loss, lower is better)", "",
             "| checkpoint | round1 | round2 | round2 - round1 | 95% paired bootstrap interval | round2 lower in |",
             "|---|---|---|---|---|---|"]
    for key, label in (("best", f"best.pt ({picked})"),
                       ("last", f"last (steps {_f(step['round1'], 'd')} / {_f(step['round2'], 'd')}; not picked "
                                "on this fold)")):
        r = c[key]
        if "diff" in r:
            lines.append(f"| {label} | {r['a']:.4f} | {r['b']:.4f} | {r['diff']:+.4f} | [{r['ci95'][0]:+.4f}, "
                         f"{r['ci95'][1]:+.4f}] | {r['p_b_lower']:.0%} of {r['bootstrap']} |")
        else:
            lines.append(f"| {label} | missing: {r.get('missing')} | | | | |")
    why = (f"best.pt is each round's lowest loss among its validations on this same fold (round1: "
           f"{_f(n['round1'], 'd')}, round2: {_f(n['round2'], 'd')}), so its figures are optimistic, the more so "
           f"for the round that validated more; the last checkpoints were not picked on the fold, so the verdict "
           f"compares them.")
    if c.get("verdict"):
        last = c["last"]
        lines += ["", f"**Verdict, on the last checkpoints: {c['verdict']}.** "
                      f"{describe(last, a=last['a_run'], b=last['b_run'])} (`spinestream compare`).", "", why]
    else:
        lines += ["", f"**No verdict**: {c.get('no_verdict')}.", "", why]
    return lines


def _pseudo_md(p: dict) -> list[str]:
    lines = ["", "## Pseudo-labels", ""]
    if "missing" in p:
        return lines + [f"missing: {p['missing']}"]
    lines.append(f"{p['mode']} labels for {p['slices']} slices of {p['studies']} studies -> {p['table']}")
    pos = p.get("positive_slices") or {}
    lines += ["", "positive slices: " + ", ".join(f"{k} {v}" for k, v in pos.items())]
    f1 = p["f1"]
    lines += ["", "F1 against the synthetic crack truth: " + ("missing: " + f1["missing"] if "missing" in f1 else
                                                             ", ".join(f"{k} {_f(v, '.3f')}" for k, v in f1.items()))]
    return lines


def _throughput_md(t: dict) -> list[str]:
    lines = ["", "## Throughput (images/s)", ""]
    ld = t["loader"]
    lines.append("loader: " + (f"missing: {ld['missing']}" if "missing" in ld else
                               f"{ld['machine']}, {ld['image_size']} px, batch {ld['batch_size']}: " +
                               ", ".join(f"{k} {_f(v, '.0f')}" for k, v in ld["images_per_s"].items())))
    for run, tr in t["training"].items():
        lines.append("")
        lines.append(f"training {run}: " + (f"missing: {tr['missing']}" if "missing" in tr else
                                             f"median {tr['images_per_s_median']:.0f} over {tr['windows']} log "
                                             f"windows (max {tr['images_per_s_max']:.0f}), data wait "
                                             f"{_f(tr['data_wait_median'], '.0%')}"))
    return lines


def write_report(paths, cfg, configs: dict) -> dict:
    """Write DIR/report.json, DIR/report.md and DIR/report/losses.png; returns the report dict."""
    remove_stale_tmp(paths.root, (paths.report_json.name, paths.report_md.name))  # what a killed report left
    remove_stale_tmp(paths.report_dir)
    rep = collect(paths, cfg, configs)
    rep["report_figures"] = ["losses.png"] if loss_chart(rep["evaluations"], paths.report_dir / "losses.png") else []
    atomic_write_json(paths.report_json, rep)
    atomic_write_bytes(paths.report_md, markdown(rep).encode())
    return rep
