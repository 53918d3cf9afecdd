"""The pipeline's report: ``DIR/report.md`` (with PNGs) and the same figures in ``DIR/report.json``.

Everything is read from what the stages wrote; a piece that is not there is reported as missing
(``{"missing": "<the file looked for>"}``), never invented:

* ``evaluations``: per evaluate stage its run, fold, slice-to-study rule, competition loss, the constant
  baseline and the per-vertebra table (``RUN/eval-f<k>/report.csv``). When the evaluation wrote a
  ``summary.json`` its numbers are used; otherwise the loss is scored from its ``submission.csv`` against the
  shard set's study labels, and the baseline is the trainer's: the prevalence of each row type among the
  studies outside fold k, predicted for every evaluated study (``"source"`` says which);
* ``pseudo_labels``: the pseudo-label summary (counts; precision/recall/F1 on synthetic data);
* ``throughput``: loader images/s per line (``DIR/bench/loader.json``) and training images/s (median of the
  runs' ``metrics.jsonl`` log windows);
* ``stages``: status and seconds per stage (``DIR/stages/*.json``); ``submission``: its path and rows.
"""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from shards.fsutil import atomic_write_bytes, atomic_write_json
from shards.layout import ROW_TYPES, Layout

from .stages import read_record


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
    from engine.compare import eval_study_losses
    from engine.metrics import constant_baseline
    from shards.tables import read_study_table

    losses = eval_study_losses(eval_dir, shards)
    studies = read_study_table(Layout(shards).studies, columns=["StudyInstanceUID", "fold", *ROW_TYPES])
    chosen = studies[studies.StudyInstanceUID.isin(losses.index)]
    baseline = constant_baseline(chosen[["StudyInstanceUID", *ROW_TYPES]],
                                 prevalence_from=studies[studies.fold != fold][["StudyInstanceUID", *ROW_TYPES]])
    return {"competition_loss": float(losses.mean()), "constant_baseline": baseline, "studies": len(losses),
            "source": f"recomputed from {eval_dir / 'submission.csv'} and the study labels"}


def evaluation(name: str, run: str, eval_dir: Path, rule: str, shards: Path) -> dict:
    """One entry of ``evaluations``."""
    import pandas as pd

    fold = int(eval_dir.name.removeprefix("eval-f"))
    out = {"name": name, "run": run, "fold": fold, "rule": rule, "dir": str(eval_dir)}
    if not (eval_dir / "report.csv").is_file():
        return {**out, "competition_loss": None, "constant_baseline": None, **_missing(eval_dir / "report.csv")}
    summary = _read_json(eval_dir / "summary.json")
    if summary is not None and "competition_loss" in summary:
        scores = {k: summary.get(k) for k in ("competition_loss", "constant_baseline", "studies", "accuracy")}
        scores["rule"] = summary.get("rule", rule)
        scores["source"] = str(eval_dir / "summary.json")
    elif (eval_dir / "submission.csv").is_file() and Layout(shards).studies.is_file():
        scores = recompute_scores(eval_dir, shards, fold)
    else:
        scores = {"competition_loss": None, "constant_baseline": None, **_missing(eval_dir / "submission.csv")}
    table = pd.read_csv(eval_dir / "report.csv")
    heat = eval_dir / "heatmaps.png"
    return {**out, **scores, "per_vertebra": json.loads(table.to_json(orient="records")),
            "heatmaps": str(heat) if heat.is_file() else None}


def comparison(evals: list[dict], shards: Path) -> dict:
    """Round 2 against round 1 on the same studies (engine.compare's paired bootstrap), when both evaluated
    the same fold."""
    from engine.compare import compare_evals

    done = [e for e in evals if e.get("competition_loss") is not None]
    if len(done) != 2 or done[0]["fold"] != done[1]["fold"]:
        return {"missing": "needs evaluate1 and evaluate2 on the same fold"}
    try:
        r = compare_evals(done[0]["dir"], done[1]["dir"], shards)
        return {"a_run": done[0]["run"], "b_run": done[1]["run"], **r}
    except (OSError, ValueError) as e:
        return {"missing": str(e)}


# --------------------------------------------------------------------------- the other pieces


def pseudo_labels(table: Path) -> dict:
    s = _read_json(table.with_suffix(".summary.json"))
    if s is None:
        return _missing(table.with_suffix(".summary.json"))
    q = s.get("quality") or {}
    out = {k: s.get(k) for k in ("table", "mode", "studies", "slices", "positive_slices", "positive_slices_per_study",
                                 "thresholds", "threshold_source")}
    out["f1"] = ({k: q[k].get("f1") for k in q if isinstance(q[k], dict)} if q else
                 {"missing": "no crack truth (real data, or pseudo.synth_truth off)"})
    out["precision_recall"] = {k: {m: q[k].get(m) for m in ("precision", "recall")} for k in ("overall", "any")
                               if isinstance(q.get(k), dict)}
    heat = table.with_suffix(".heatmap.png")
    out["heatmap"] = str(heat) if heat.is_file() else None
    return out


def training_throughput(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return _missing(path)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
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


# --------------------------------------------------------------------------- assembling


def collect(paths, cfg, configs: dict) -> dict:
    """The report as a dict (what report.json holds); ``paths`` is a plan.Paths, ``configs`` the resolved run
    configs by round (for the validation fold and the study rule)."""
    from .plan import eval_dir

    evals = []
    for name in ("evaluate1", "evaluate2"):
        if name not in cfg.stages:
            continue
        run, stage = f"round{name[-1]}", getattr(cfg, name)
        rule = stage.rule or configs[run].train.study_rule
        evals.append(evaluation(name, run, eval_dir(stage, configs[run], paths.run(run)), rule, paths.shards))
    runs = [r for r in ("round1", "round2") if r in cfg.stages]
    return {
        "out": str(paths.root),
        "evaluations": evals,
        "comparison": comparison(evals, paths.shards),
        "pseudo_labels": pseudo_labels(paths.pseudo) if "pseudo" in cfg.stages else {"missing": "no pseudo stage"},
        "throughput": {"loader": loader_throughput(paths.bench / "loader.json") if "bench" in cfg.stages
                       else {"missing": "no bench stage"},
                       "training": {r: training_throughput(paths.run(r)) for r in runs}},
        "stages": stage_times(paths.stages, [s for s in cfg.stages if s != "report"]),
        "submission": submission(paths.submission) if "predict" in cfg.stages else {"missing": "no predict stage"},
        "figures": figures(paths, runs),
    }


def figures(paths, runs: list[str]) -> list[str]:
    """PNGs the stages wrote, relative to DIR (the report links them; nothing is copied)."""
    found = [paths.bench / "loader.png", *[paths.run(r) / "curves.png" for r in runs],
             *sorted(paths.runs.glob("*/eval-f*/heatmaps.png")), paths.pseudo.with_suffix(".heatmap.png")]
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
    ax.set_xticks(list(xs), [f"{e['run']}\nfold {e['fold']}" for e in have], fontsize=8)
    ax.set(title="competition loss (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def _f(v, fmt: str = ".4f") -> str:
    return "missing" if v is None else format(v, fmt) if isinstance(v, (int, float)) else str(v)


def markdown(rep: dict) -> str:
    """report.md from the report dict (paths relative to DIR)."""
    root = Path(rep["out"])
    rel = lambda p: os.path.relpath(p, root) if p else None  # noqa: E731
    lines = [f"# spinestream pipeline report: {root}", "", "## Evaluations", ""]
    lines += ["| stage | run | fold | rule | studies | competition loss | constant baseline |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {e['name']} | {e['run']} | {e['fold']} | {e['rule']} | {_f(e.get('studies'), 'd')} | "
              f"{_f(e.get('competition_loss'))} | {_f(e.get('constant_baseline'))} |" for e in rep["evaluations"]]
    c = rep.get("comparison") or {}
    if "diff" in c:
        from engine.compare import describe

        lines += ["", describe(c, a=c["a_run"], b=c["b_run"]) + " (`spinestream compare`)."]
    if "losses.png" in rep.get("report_figures", []):
        lines += ["", "![losses](report/losses.png)"]
    for e in rep["evaluations"]:
        lines += ["", f"### {e['name']}: {e['run']}, fold {e['fold']} per vertebra", ""]
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
    rep = collect(paths, cfg, configs)
    rep["report_figures"] = ["losses.png"] if loss_chart(rep["evaluations"], paths.report_dir / "losses.png") else []
    atomic_write_json(paths.report_json, rep)
    atomic_write_bytes(paths.report_md, markdown(rep).encode())
    return rep
