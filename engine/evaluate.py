"""``spinestream evaluate --run RUN_DIR [--fold k] [--shards DIR]``: the study-level competition metric and
the per-vertebra report (accuracy, sensitivity, specificity, AUC) on a held-out fold, from the
Zarr volumes, plus a PNG of per-study slice probabilities (slices × C1..C7 + any heat maps,
as in the reference's figure).

Writes RUN_DIR/eval-f<k>/ (or ``--out DIR``): summary.json (competition loss, constant baseline, accuracy,
rule, fold, checkpoint: what the pipeline's report reads), report.csv, slice_probs.parquet, submission.csv
(Kaggle format), heatmaps.png.

The shards are the run's ``data.root`` unless ``--shards DIR`` names them (the run moved, or was trained
elsewhere); either way they must make the images the run trained on (``RUN_DIR/shard_spec.json``,
:meth:`spinestream.shards.spec.ShardSpec.check_same_images`), else the run is refused. A relative ``data.root`` (a
run's config.yaml from before they were stored absolute) is relative to the run directory, as every path in a
YAML file is to its file (:func:`spinestream.engine.rundir.read_config`). A model that gives non-finite probabilities on a study is an
error naming the study (:func:`spinestream.engine.infer.check_finite`): nothing is scored.

Under ``torchrun --nproc-per-node N $(which spinestream) evaluate ...`` (:mod:`spinestream.engine.dist`) each rank
infers its contiguous part of the studies on its own device (``LOCAL_RANK``), the parts are gathered, every rank
scores all of them, and rank 0 alone writes the outputs and prints the report: the files one process writes.

The options are :class:`EvaluateConfig`'s fields: flags (``--batch-size 16``), a ``-c`` YAML file or ``--set
KEY=VALUE`` (a flag wins over ``--set``, which wins over the file); ``--print-config`` prints such a file.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from spinestream.shards.config import ConfigError, parse_verb_config
from spinestream.shards.layout import TARGETS, Layout
from spinestream.shards.tables import read_label_table, read_slice_table, read_study_table

from spinestream.shards.spec import SPEC_FILE, ShardSpec, run_shard_spec
from spinestream.shards.fsutil import atomic_save_figure, atomic_write_bytes, remove_stale_tmp

from .rundir import EvalLayout, EvalSummary, RunLayout, read_config, write_eval_summary

if TYPE_CHECKING:
    from .config import RunConfig

# torch, timm and the run config (its loader imports torch) are imported where they are used: the pipeline's
# config (spinestream.config) builds on EvaluateConfig, and loading it must not cost a torch import


def load_run_model(run_dir: Path, which: str = "best", device="cpu"):
    """(model with the checkpoint's EMA weights if it has them, config, checkpoint path).

    The model is built as the trainer builds it (:func:`spinestream.engine.build.build_model_for`): at the run's
    ``loader.image_size``, which a fixed-input-size model (a ViT) needs to have the checkpoint's shapes."""
    from . import checkpoint as ck
    from .model import build_model, check_state_dict, model_fingerprint

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
    else it cannot be and a warning says so). A shard set that makes other images is a
    :class:`~spinestream.engine.checkpoint.RunError` naming ``--shards``."""
    from . import dist
    from .checkpoint import RunError

    root = Path(cfg.data.root if shards is None else shards)  # the run's is absolute (read_config resolves it)
    other = ShardSpec.from_shards(root)
    try:
        own = run_shard_spec(run_dir, cfg.data.root)
    except FileNotFoundError:
        own = None
    if own is None:
        if dist.current().main:  # under torchrun: said once
            print(f"warning: {run_dir} has no {SPEC_FILE} and its data.root {cfg.data.root} is not there: "
                  f"cannot check that {root} makes the images it trained on", file=sys.stderr)
    else:
        try:
            own.check_same_images(other, f"{verb} --shards {root}" if shards is not None else f"{verb}: {run_dir}")
        except ValueError as e:  # the refusal itself (spec.py raises nothing else here): a run state, not a bug
            raise RunError(str(e)) from None
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
    atomic_save_figure(fig, path)
    return fig


@dataclass(kw_only=True)
class EvaluateConfig:
    """``spinestream evaluate``: which run, checkpoint and fold, and where the results go (``-c FILE``,
    ``--set KEY=VALUE`` or one flag per field; the pipeline writes one per evaluate stage)."""

    run: str | None = None
    """The run directory (runs/<name>); required."""
    fold: int | None = None
    """Fold to evaluate; unset: the run's validation fold."""
    checkpoint: str = "best"
    """best, last, or a checkpoint path."""
    rule: Literal["max", "mean_top_k", "quantile", "noisy_or"] | None = None
    """Slice -> study rule (engine.metrics.RULES); unset: the run's train.study_rule."""
    shards: str | None = None
    """Shard directory; unset: the run's data.root. It must make the images the run trained on."""
    batch_size: int = 32
    """Slices per model batch."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs (auto: a GPU when one is visible)."""
    out: str | None = None
    """Output directory; unset: RUN/eval-f<k> (the pipeline's compare stage writes the last checkpoint's to
    RUN/eval-f<k>-last)."""

    def __post_init__(self) -> None:
        if self.fold is not None and self.fold < 0:
            raise ValueError(f"fold must be >= 0, got {self.fold}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.checkpoint:
            raise ValueError("checkpoint: best, last, or a checkpoint path")


def report_frame(result: dict) -> pd.DataFrame:
    """The per-vertebra report of :func:`spinestream.engine.infer.score_studies`' ``result``, by target."""
    return pd.DataFrame(result["report"]).set_index("target")


def write_outputs(out: EvalLayout, probs: dict[str, np.ndarray], studies: pd.DataFrame, result: dict, rule: str,
                  shards: Layout) -> pd.DataFrame:
    """report.csv, slice_probs.parquet, submission.csv and heatmaps.png (with the slice truth of ``shards``' boxed
    studies) into ``out``; returns the report."""
    from .metrics import study_probabilities, submission_frame

    # each file atomically: a kill or a full disk leaves the previous evaluation's file whole, never a torn one
    out.root.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out.root)  # those a killed evaluation left (one evaluation writes a folder)
    report = report_frame(result)
    atomic_write_bytes(out.report, report.to_csv().encode())
    rows = [pd.DataFrame({"StudyInstanceUID": u, "index": np.arange(len(v)), **{t: v[:, k] for k, t in
                                                                                enumerate(TARGETS)}})
            for u, v in probs.items()]
    atomic_write_bytes(out.slice_probs, pd.concat(rows, ignore_index=True).to_parquet(None, index=False))
    atomic_write_bytes(out.submission, submission_frame({u: study_probabilities(v, rule) for u, v in probs.items()})
                       .to_csv(index=False).encode())
    heatmaps(probs, studies, out.heatmaps, truth=slice_truth(shards, probs, studies))
    return report


def run(cfg: EvaluateConfig) -> tuple[Path, EvalSummary, pd.DataFrame]:
    """Evaluate ``cfg.run`` and write the outputs (module doc); returns (the output directory, its summary,
    the per-vertebra report).

    Under torchrun (:mod:`spinestream.engine.dist`) each rank infers its part of the studies on its own device
    (``LOCAL_RANK``) and scores all of them; rank 0 alone writes, and every rank returns once it has written."""
    from . import dist
    from .device import pick_device, resolve_precision
    from .infer import predict_run, score_studies
    from .metrics import constant_baseline

    if cfg.run is None:
        raise ConfigError("evaluate: no run to evaluate: pass --run RUN_DIR (or run: in the -c file)")
    d = dist.init_from_env(device_type="cpu" if cfg.device == "cpu" else None)  # a world of one: a no-op
    run_dir = Path(cfg.run)
    dev = pick_device(cfg.device, d.local_rank)
    # every check up to predict_run reads the same files on every rank, so a refusal raises on all of them
    model, rc, path = load_run_model(run_dir, cfg.checkpoint, dev)
    rc = with_shards(run_dir, rc, None if cfg.shards is None else Path(cfg.shards), "evaluate")
    fold = rc.data.val_fold if cfg.fold is None else cfg.fold
    rule = cfg.rule or rc.train.study_rule
    shards = Layout(Path(rc.data.root))
    studies = read_study_table(shards.studies)
    chosen = studies[(studies.fold == fold) & studies.cohort.isin(rc.data.val_cohorts)]
    if chosen.empty:
        raise ConfigError(f"fold {fold}: no {'/'.join(rc.data.val_cohorts)} studies in fold {fold} of "
                          f"{rc.data.root}; choose another --fold")
    if fold != rc.data.val_fold and d.main:
        print(f"warning: fold {fold} is not the run's validation fold ({rc.data.val_fold}): "
              f"the model may have trained on it", file=sys.stderr)
    probs = predict_run(model, rc, chosen.StudyInstanceUID.tolist(), dev, resolve_precision(rc.train.precision, dev),
                        batch_size=cfg.batch_size, progress=True)  # every rank gets every study's probabilities
    result = score_studies(probs, studies, rule)
    baseline = constant_baseline(chosen, prevalence_from=studies[studies.fold != fold])
    out = EvalLayout(Path(cfg.out)) if cfg.out is not None else RunLayout(run_dir).evaluation(fold)
    report = report_frame(result)
    summary = EvalSummary(
        run=str(run_dir), checkpoint=str(path), shards=str(rc.data.root), fold=int(fold), rule=rule,
        studies=int(result["studies"]), competition_loss=float(result["competition_loss"]),
        constant_baseline=float(baseline), accuracy=float(result["accuracy"]),
        validation_fold=bool(fold == rc.data.val_fold))

    def write() -> None:
        write_outputs(out, probs, studies, result, rule, shards)
        write_eval_summary(out.root, summary)

    d.main_only(write, f"writing the evaluation to {out.root}")
    return out.root, summary, report


def main(argv: list[str] | None = None) -> int:
    """Errors are not caught here: the console script prints a project error on one line (exit 2), and
    anything else is a bug that keeps its traceback."""
    cfg = parse_verb_config(EvaluateConfig, "spinestream evaluate", __doc__, argv)
    if cfg is None:  # --print-config
        return 0
    out, s, report = run(cfg)
    from .dist import current

    if not current().main:  # under torchrun rank 0 reports, as it writes
        return 0
    with pd.option_context("display.width", 120, "display.precision", 3):
        print(report[["accuracy", "sensitivity", "specificity", "auc", "n_pos", "n_neg"]])
    print(f"\n{Path(s.checkpoint).name}, fold {s.fold}, {s.studies} studies, rule={s.rule}: competition loss "
          f"{s.competition_loss:.4f} (constant baseline {s.constant_baseline:.4f}), accuracy {s.accuracy:.3f} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
