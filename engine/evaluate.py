"""``spinestream evaluate --run RUN_DIR [--fold k] [--shards DIR]``: the study-level competition metric and
the per-vertebra report (accuracy, sensitivity, specificity, AUC) on a held-out fold, from the
Zarr volumes, plus a PNG of per-study slice probabilities (slices × C1..C7 + any heat maps,
as in the reference's figure).

Writes RUN_DIR/eval-f<k>/ (or ``--out DIR``): summary.json (competition loss, constant baseline, accuracy,
rule, fold, checkpoint: what the pipeline's report reads), report.csv, slice_probs.parquet, submission.csv
(Kaggle format), heatmaps.png.

The shards are the run's ``data.root`` unless ``--shards DIR`` names them (the run moved, or was trained
elsewhere); either way they must make the images the run trained on (``RUN_DIR/shard_spec.json``,
:meth:`spinestream.shards.spec.ShardSpec.check_same_images`), else the run is refused. A relative ``data.root`` is
relative to the directory ``spinestream train`` ran in; when it does not exist from the current directory
the error says so and names ``--shards``. A model that gives non-finite probabilities on a study is an
error naming the study (:func:`spinestream.engine.infer.check_finite`): nothing is scored.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from spinestream.shards.config import ConfigError
from spinestream.shards.layout import TARGETS, Layout
from spinestream.shards.tables import read_label_table, read_slice_table, read_study_table

from spinestream.shards.spec import SPEC_FILE, ShardSpec, run_shard_spec

from . import checkpoint as ck
from .config import RunConfig
from .metrics import constant_baseline, study_probabilities, submission_frame
from .model import build_model, check_state_dict, model_fingerprint
from .rundir import EvalLayout, EvalSummary, RunLayout, read_config, write_eval_summary


def load_run_model(run_dir: Path, which: str = "best", device="cpu"):
    """(model with the checkpoint's EMA weights if it has them, config, checkpoint path).

    The model is built as the trainer builds it (:func:`spinestream.engine.build.build_model_for`): at the run's
    ``loader.image_size``, which a fixed-input-size model (a ViT) needs to have the checkpoint's shapes."""
    ck.check_run_dir(run_dir)
    if which == "best":
        ck.sync_best(run_dir)  # a kill between the step checkpoint and best.pt: best.pt is what the record names
    lay = RunLayout(run_dir)
    path = Path(which) if which not in ("best", "last") else (lay.best if which == "best" else ck.latest(run_dir))
    state = ck.load(path)
    cfg = read_config(run_dir)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=False, pretrained_path=None))
    model = build_model(cfg.model, image_size=cfg.loader.image_size)
    if state.get("model_fingerprint") != model_fingerprint(model):
        raise ck.RunError(f"{path} was written by a different model than {lay.config} describes")
    weights = state["ema"] if state.get("ema") is not None else state["model"]
    check_state_dict(model, weights, source=str(path))
    model.load_state_dict(weights)
    return model.to(device).eval(), cfg, path


def with_shards(run_dir: Path, cfg: RunConfig, shards: Path | None, verb: str) -> RunConfig:
    """``cfg`` with ``data.root`` set to the shard set ``verb`` (``evaluate``, ``pseudo-label``) reads: ``shards``
    (its ``--shards``) when given, else the run's own ``data.root``.

    The shard set must make the images the run trained on: its spec is checked against the run's
    (``RUN_DIR/shard_spec.json``; a run without one is checked against its ``data.root`` when that is there,
    else it cannot be and a warning says so). A relative ``data.root`` that does not exist from the current
    directory is a FileNotFoundError naming ``--shards``."""
    if shards is None:
        root = Path(cfg.data.root)
        if not root.is_absolute() and not root.exists():
            raise FileNotFoundError(
                f"{run_dir}: data.root={cfg.data.root} is relative to the directory the run was trained in, and "
                f"{Path.cwd()} has no {root}: run {verb} from that directory, or pass --shards DIR (the run's "
                f"shard directory)")
    else:
        root = Path(shards)
    other = ShardSpec.from_shards(root)
    try:
        own = run_shard_spec(run_dir, cfg.data.root)
    except FileNotFoundError:
        own = None
    if own is None:
        print(f"warning: {run_dir} has no {SPEC_FILE} and its data.root {cfg.data.root} is not there: "
              f"cannot check that {root} makes the images it trained on", file=sys.stderr)
    else:
        own.check_same_images(other, f"{verb} --shards {root}" if shards is not None else f"{verb}: {run_dir}")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(root)))


def slice_truth(shards: Layout, probs: dict[str, np.ndarray], studies: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per boxed study of ``probs``: its slice truth ("any" per slice, head to feet, from the shard set's truth
    table), where it has one row per predicted slice: the heat maps' truth row."""
    boxed = set(studies.StudyInstanceUID[studies.cohort == "boxed"]) & set(probs)
    if not boxed or not shards.truth.is_file():
        return {}
    slices = read_slice_table(shards.slices, columns=["slice_id", "StudyInstanceUID", "index"])
    slices = slices[slices.StudyInstanceUID.isin(boxed)]
    truth = read_label_table(shards.truth).frame.set_index("slice_id")["any"]
    slices = slices[slices.slice_id.isin(truth.index)].sort_values(["StudyInstanceUID", "index"])
    out = {u: truth.loc[g.slice_id].to_numpy(dtype=float) for u, g in slices.groupby("StudyInstanceUID")}
    return {u: t for u, t in out.items() if len(t) == len(probs[u])}


def heatmap_studies(uids, studies: pd.DataFrame, max_studies: int) -> list[str]:
    """Up to ``max_studies`` of ``uids``, fractured and negative ones alternating (boxed first among the
    fractured), so the picture shows what the model does on both; the other kind fills in when one runs out."""
    table = studies.set_index("StudyInstanceUID")
    pos = sorted((u for u in uids if table.loc[u, "patient_overall"] == 1),
                 key=lambda u: (table.loc[u, "cohort"] != "boxed", u))
    neg = sorted(u for u in uids if table.loc[u, "patient_overall"] != 1)
    mixed = [u for pair in zip(pos, neg) for u in pair]
    n = min(len(pos), len(neg))
    return (mixed + pos[n:] + neg[n:])[:max_studies]


def heatmaps(probs: dict[str, np.ndarray], studies: pd.DataFrame, path: Path, max_studies: int = 12, *,
             truth: dict[str, np.ndarray] | None = None):
    """Slice probabilities (slices x C1..C7, any) of fractured and negative studies side by side, with a colour
    bar, and under a boxed study's rows its slice truth (``truth``: :func:`slice_truth`). Written atomically to
    ``path``; returns the (closed) figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, truth = studies.set_index("StudyInstanceUID"), truth or {}
    uids = heatmap_studies(list(probs), studies, max_studies)
    cols = 4
    rows = -(-len(uids) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 0.8, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    im = None
    for ax, u in zip(axes.flat, uids):
        grid, labels = probs[u].T, [t + (" *" if t != "any" and table.loc[u, t] == 1 else "") for t in TARGETS]
        if u in truth:
            grid, labels = np.vstack([grid, truth[u][None, :]]), [*labels, "truth"]
        ax.axis("on")
        im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        if u in truth:
            ax.axhline(len(TARGETS) - 0.5, color="white", lw=1)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("slice (head → feet)", fontsize=7)
        ax.tick_params(axis="x", labelsize=6)
        ax.set_title(f"…{u[-10:]}  {table.loc[u, 'cohort']}  overall={int(table.loc[u, 'patient_overall'])}",
                     fontsize=7)
    fig.suptitle("slice probabilities per vertebra (* = fractured in train.csv; truth = the slice labels of a "
                 "boxed study)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.94, 1))
    if im is not None:
        fig.colorbar(im, cax=fig.add_axes((0.95, 0.15, 0.012, 0.7)), label="probability / label")
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spinestream evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a run directory (runs/<name>)")
    p.add_argument("--fold", type=int, default=None, help="fold to evaluate (default: the run's validation fold)")
    p.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint path")
    p.add_argument("--rule", default=None, help="slice -> study rule (default: the run's train.study_rule)")
    p.add_argument("--shards", type=Path, default=None, help="shard directory (default: the run's data.root); "
                   "it must make the images the run trained on")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: RUN/eval-f<k>; the "
                   "pipeline's compare stage writes --checkpoint last to RUN/eval-f<k>-last)")
    args = p.parse_args(argv)
    from .device import pick_device, resolve_precision
    from .infer import predict_run, score_studies

    try:
        dev = pick_device(args.device)
        model, cfg, path = load_run_model(args.run, args.checkpoint, dev)
        cfg = with_shards(args.run, cfg, args.shards, "evaluate")
        fold = cfg.data.val_fold if args.fold is None else args.fold
        rule = args.rule or cfg.train.study_rule
        studies = read_study_table(Layout(Path(cfg.data.root)).studies)
        chosen = studies[(studies.fold == fold) & studies.cohort.isin(cfg.data.val_cohorts)]
        if chosen.empty:
            raise ValueError(f"no studies in fold {fold} of {cfg.data.root}")
        if fold != cfg.data.val_fold:
            print(f"warning: fold {fold} is not the run's validation fold ({cfg.data.val_fold}): "
                  f"the model may have trained on it", file=sys.stderr)
        precision = resolve_precision(cfg.train.precision, dev)
        probs = predict_run(model, cfg, chosen.StudyInstanceUID.tolist(), dev, precision,
                            batch_size=args.batch_size, progress=True)
        result = score_studies(probs, studies, rule)
        baseline = constant_baseline(chosen, prevalence_from=studies[studies.fold != fold])
    except (ConfigError, ck.RunError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"spinestream evaluate: error: {e}", file=sys.stderr)
        return 2
    out = EvalLayout(args.out) if args.out else RunLayout(args.run).evaluation(fold)
    out.root.mkdir(parents=True, exist_ok=True)
    report = pd.DataFrame(result["report"]).set_index("target")
    report.to_csv(out.report)
    rows = [pd.DataFrame({"StudyInstanceUID": u, "index": np.arange(len(v)), **{t: v[:, k] for k, t in
                                                                                enumerate(TARGETS)}})
            for u, v in probs.items()]
    pd.concat(rows, ignore_index=True).to_parquet(out.slice_probs, index=False)
    submission_frame({u: study_probabilities(v, rule) for u, v in probs.items()}).to_csv(out.submission, index=False)
    heatmaps(probs, studies, out.heatmaps, truth=slice_truth(Layout(Path(cfg.data.root)), probs, studies))
    write_eval_summary(out.root, EvalSummary(
        run=str(args.run), checkpoint=str(path), shards=str(cfg.data.root), fold=int(fold), rule=rule,
        studies=int(result["studies"]), competition_loss=float(result["competition_loss"]),
        constant_baseline=float(baseline), accuracy=float(result["accuracy"]),
        validation_fold=bool(fold == cfg.data.val_fold)))
    with pd.option_context("display.width", 120, "display.precision", 3):
        print(report[["accuracy", "sensitivity", "specificity", "auc", "n_pos", "n_neg"]])
    print(f"\n{path.name}, fold {fold}, {result['studies']} studies, rule={rule}: "
          f"competition loss {result['competition_loss']:.4f} (constant baseline {baseline:.4f}), "
          f"accuracy {result['accuracy']:.3f} -> {out.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
