"""``spinestream pseudo-label --run ROUND1_RUN``: slice labels for the positive studies without boxes.

    spinestream pseudo-label --run runs/round1                       # -> <shards>/labels/pseudo-round1.parquet
    spinestream pseudo-label --run runs/round1 --mode soft --tta
    spinestream pseudo-label --run runs/round1 --threshold 0.4       # one global threshold
    spinestream pseudo-label --run runs/round1 --truth crack-truth.parquet   # synthetic data: measured quality
    spinestream pseudo-label --run /abs/runs/round1 --shards /abs/shards-512  # shards checked against the run's

The round-1 model (its EMA weights when the checkpoint has them) runs over every slice of
every ``positive-unboxed`` study (``spinestream.engine.infer``, inputs built on the device) and the
result is a label table round 2 unions with ``labels/truth.parquet``: one row per slice with
``slice_id, C1..C7, any`` (the targets) and ``p_C1..p_C7, p_any`` (the model's raw
probabilities), written as a :mod:`spinestream.shards.tables` label table whose metadata records the run,
checkpoint, mode, rule and thresholds (:func:`read_table` returns it).

Targets. ``hard`` (the default, as the reference): vertebra v of a slice is 1 when
``p_v >= t_v``; the thresholds are one global value, seven given values, or chosen by a method
(``--threshold train-share``, the default, or ``val``). ``soft``: the probabilities themselves
(the loss interpolates its weights for soft targets). In both modes the study labels of
train.csv hold: a vertebra negative for the study is 0 on every slice; a positive vertebra is
1 on at least its most likely slice; ``any`` is the max of C1..C7. Negative studies need no
pseudo-labels (truth already says 0 on every slice).

Where the thresholds come from. Round 2 validates on round 1's validation fold (``model.init_from``
refuses another), so thresholds tuned on that fold's labels leak them into round 2's training
targets and its validation loss is optimistic. Round 1 trained on every boxed study outside that fold,
so no labelled study is unseen by both rounds; of the leakage-free choices:

* ``train-share`` (the default): per vertebra v, the share of positive slices among the slices of
  the boxed *training* studies fractured at v (their truth, from the boxes; the validation fold's
  studies are never read) is matched in the pseudo-labelled studies fractured at v: ``t_v`` is the
  probability of the ``round(share x slices)``-th most likely of their slices (at least one). It
  uses labels round 1 already trained on, but no model output on them, so it is not biased by
  the model's in-sample confidence (best-F1 thresholds on training studies would be: round 1 is
  surer of slices it trained on, which pushes the F1 optimum up and the recall on unseen studies
  down); it assumes what the competition's boxing suggests, that a fracture spans a similar share
  of a study's slices with or without boxes -- class-balanced self-training (Zou et al., ECCV 2018)
  picks its per-class thresholds by the same proportion rule. It needs no extra inference. No boxed
  training study fractured at v (or none pseudo-labelled) -> 0.5 for v, said in ``threshold_detail``.
* ``val``: best slice F1 per vertebra on the boxed studies of round 1's validation fold (0.5 for a
  vertebra none is fractured at) -- the old default, kept for comparison; it warns, because round 2
  is scored on those studies.
* a given value (or seven): no labels at all.

The metadata (and the summary) record it: ``threshold_method``, ``threshold_source`` (in words),
``threshold_studies`` (the studies whose labels were used), ``threshold_folds`` and
``threshold_excludes_fold`` (the validation fold, never used by ``train-share``), and
``threshold_detail`` per vertebra.

Shards: the run's ``data.root``, or ``--shards DIR``; either must make the images the run trained on
(:func:`spinestream.engine.evaluate.with_shards`). A model that gives non-finite probabilities on a study is an
error naming it (:func:`spinestream.engine.infer.check_finite`): no label is ever written from NaN.

Beside the table: ``<name>.summary.json`` (positive slices per vertebra and per study, the
thresholds, and the slice-level precision/recall/F1 against ``--truth`` when given: the
synthetic generator knows every crack, see ``preprocess/synth_truth.py``) and
``<name>.heatmap.png`` (slices x vertebrae for a sample of studies, probabilities beside
the labels).

Under ``torchrun --nproc-per-node N $(which spinestream) pseudo-label ...`` (:mod:`spinestream.engine.dist`) each
rank infers its contiguous part of the studies on its own device (``LOCAL_RANK``), the parts are gathered, every
rank makes the whole table, and rank 0 alone writes it (with its summary and heat map): the table one process
writes.

The options are :class:`PseudoLabelConfig`'s fields: flags (``--mode soft``), a ``-c`` YAML file or ``--set
KEY=VALUE`` (a flag wins over ``--set``, which wins over the file); ``--print-config`` prints such a file.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from spinestream import SpinestreamError
from spinestream.shards.config import ConfigError, parse_verb_config
from spinestream.shards.fsutil import atomic_save_figure, remove_stale_tmp
from spinestream.shards.layout import TARGETS, VERTEBRAE, Layout
from spinestream.shards.tables import LabelTable, read_label_table, read_slice_table, read_study_table, write_label_table

from .rundir import PseudoLayout, PseudoSummary, write_pseudo_summary

PROB_COLUMNS = tuple(f"p_{t}" for t in TARGETS)
THRESHOLD_METHODS = ("train-share", "val")  # threshold words; PseudoLabelConfig's default is the first
COHORT = "positive-unboxed"  # the shards.layout.COHORTS member it labels


class PseudoLabelError(SpinestreamError, ValueError):
    """A shard set or truth table that cannot be pseudo-labelled or measured against (the message says why)."""


RULE = ("hard: C_v = p_v >= threshold_v; soft: C_v = p_v. Then: a vertebra negative in the study labels is 0 on "
        "every slice; a positive one is 1 on at least its most likely slice; any = max(C1..C7)")


# --------------------------------------------------------------------------- targets


def study_targets(probs: np.ndarray, labels: np.ndarray, mode: str, thresholds: np.ndarray | None) -> np.ndarray:
    """``(n, 8)`` targets (C1..C7, any) of one study from its ``(n, 8)`` probabilities and ``(7,)`` study labels."""
    if mode not in ("hard", "soft"):
        raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")
    p = np.asarray(probs, np.float32)[:, :7]
    y = (p >= thresholds[None, :]).astype(np.float32) if mode == "hard" else p.copy()
    positive = np.asarray(labels, bool)
    y[:, ~positive] = 0.0
    top = p.argmax(axis=0)  # each vertebra's most likely slice
    cols = np.flatnonzero(positive)
    y[top[cols], cols] = 1.0
    return np.concatenate([y, y.max(axis=1, keepdims=True)], axis=1)


def pseudo_table(probs: dict[str, np.ndarray], studies: pd.DataFrame, *, mode: str = "hard",
                 thresholds: np.ndarray | None = None) -> pd.DataFrame:
    """One row per slice of the studies in ``probs``: ``slice_id, C1..C7, any, p_C1..p_any``, by slice_id."""
    if mode == "hard" and (thresholds is None or len(thresholds) != 7):
        raise ValueError("hard pseudo-labels need 7 thresholds (one per vertebra)")
    from .infer import check_finite

    check_finite(probs, "pseudo-label")  # never labels from NaN
    table = studies.set_index("StudyInstanceUID")
    parts = []
    for uid, p in probs.items():
        row = table.loc[uid]
        if p.shape != (int(row.n_slices), len(TARGETS)):
            raise ValueError(f"study {uid}: probabilities of shape {p.shape}, the study has {row.n_slices} slices")
        y = study_targets(p, row[list(VERTEBRAE)].to_numpy(int), mode, thresholds)
        ids = int(row.slice_id_offset) + np.arange(len(p), dtype=np.int64)
        cols = {"slice_id": ids}
        cols.update({t: (y[:, k].astype(np.uint8) if mode == "hard" else y[:, k]) for k, t in enumerate(TARGETS)})
        cols.update({c: p[:, k].astype(np.float32) for k, c in enumerate(PROB_COLUMNS)})
        parts.append(pd.DataFrame(cols))
    if not parts:
        raise PseudoLabelError("no studies to pseudo-label")
    return pd.concat(parts, ignore_index=True).sort_values("slice_id", ignore_index=True)


# --------------------------------------------------------------------------- thresholds


def best_f1_threshold(p: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 of ``p >= threshold`` against 0/1 ``y``; (0.5, 0.0) without positives."""
    p, y = np.asarray(p, np.float64), np.asarray(y, bool)
    if not y.any():
        return 0.5, 0.0
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    tp = np.cumsum(ys)
    k = np.arange(1, len(ps) + 1)
    last = np.r_[ps[1:] != ps[:-1], True]  # a cut can only fall between distinct values
    f1 = np.where(last, 2 * tp / (k + y.sum()), -1.0)
    i = int(np.argmax(f1))
    return float(ps[i]), float(f1[i])


def choose_thresholds(probs: dict[str, np.ndarray], studies: pd.DataFrame, truth: pd.DataFrame
                      ) -> tuple[np.ndarray, dict]:
    """Per-vertebra thresholds maximising slice F1 on labelled studies (the hard rule's own setting: only
    studies fractured at v count for v, since the study labels zero the others anyway)."""
    table = studies.set_index("StudyInstanceUID")
    t = truth.set_index("slice_id")
    thr, detail = np.full(7, 0.5), {}
    for v, name in enumerate(VERTEBRAE):
        ps, ys = [], []
        for uid, p in probs.items():
            row = table.loc[uid]
            if int(row[name]) != 1:
                continue
            ids = int(row.slice_id_offset) + np.arange(len(p))
            ps.append(p[:, v])
            ys.append(t.loc[ids, name].to_numpy() >= 0.5)
        if ps and np.concatenate(ys).any():
            y = np.concatenate(ys)
            thr[v], f1 = best_f1_threshold(np.concatenate(ps), y)
            detail[name] = {"threshold": thr[v], "f1": f1, "studies": len(ps), "positives": int(y.sum())}
        else:
            detail[name] = {"threshold": 0.5, "f1": None, "studies": len(ps), "positives": 0, "fallback": True}
    return thr, detail


def share_thresholds(probs: dict[str, np.ndarray], studies: pd.DataFrame, truth: pd.DataFrame,
                     tune: list[str]) -> tuple[np.ndarray, dict]:
    """``train-share`` (module doc): per vertebra v, the threshold at which the studies of ``probs`` fractured
    at v have the share of positive slices that the ``tune`` studies fractured at v have in ``truth``
    (pooled over their slices); 0.5 where either side has no study fractured at v."""
    table = studies.set_index("StudyInstanceUID")
    t = truth.set_index("slice_id")
    pos, n, count = np.zeros(7), np.zeros(7), np.zeros(7, int)
    for uid in tune:
        row = table.loc[uid]
        ids = int(row.slice_id_offset) + np.arange(int(row.n_slices))
        y = t.reindex(ids)[list(VERTEBRAE)].to_numpy(np.float64)
        if np.isnan(y).any():
            raise PseudoLabelError(f"study {uid}: the truth table lacks some of its {len(ids)} slices (made for another "
                             f"shard set?)")
        fractured = row[list(VERTEBRAE)].to_numpy(int) == 1
        pos += np.where(fractured, (y >= 0.5).sum(axis=0), 0)
        n += np.where(fractured, len(ids), 0)
        count += fractured
    thr, detail = np.full(7, 0.5), {}
    for v, name in enumerate(VERTEBRAE):
        ps = [p[:, v] for uid, p in probs.items() if int(table.loc[uid, name]) == 1]
        info = {"tuning_studies": int(count[v]), "tuning_slices": int(n[v]), "labelled_studies": len(ps)}
        if n[v] == 0 or not ps:
            detail[name] = {"threshold": 0.5, "share": None, **info, "fallback": True}
            continue
        share = float(pos[v] / n[v])
        p = np.sort(np.concatenate(ps).astype(np.float64))[::-1]
        k = min(len(p), max(1, round(share * len(p))))
        thr[v] = float(p[k - 1])
        detail[name] = {"threshold": thr[v], "share": share, **info, "positive_slices": k}
    return thr, detail


def parse_thresholds(text: str) -> np.ndarray | None:
    """A method of :data:`THRESHOLD_METHODS` -> None (chosen by that method); ``t`` -> 7 x t; ``t1,..,t7`` ->
    those."""
    if text in THRESHOLD_METHODS:
        return None
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"threshold: {' or '.join(map(repr, THRESHOLD_METHODS))}, one number, or 7 "
                         f"comma-separated numbers; got {text!r}") from None
    if len(vals) not in (1, 7) or not all(0.0 <= v <= 1.0 for v in vals):
        raise ValueError(f"threshold: one or 7 values in [0, 1] (C1..C7), got {text!r}")
    return np.array(vals * 7 if len(vals) == 1 else vals, np.float64)


# --------------------------------------------------------------------------- the table on disk


def write_table(path: str | Path, df: pd.DataFrame, meta: dict) -> None:
    """Write the table (a :func:`spinestream.shards.tables.write_label_table` label table, ``meta`` as its metadata)."""
    write_label_table(path, LabelTable(df, meta))


def read_table(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """(the table, its metadata) as :func:`write_table` wrote them."""
    t = read_label_table(path)
    if t.metadata.get("kind") != "pseudo-labels":
        raise PseudoLabelError(f"{path}: not a pseudo-label table (its metadata's kind is {t.metadata.get('kind')!r})")
    return t.frame, t.metadata


# --------------------------------------------------------------------------- quality and summary


def _prf(yt: np.ndarray, yp: np.ndarray) -> dict:
    tp, fp, fn = int((yt & yp).sum()), int((~yt & yp).sum()), int((yt & ~yp).sum())
    prec = tp / (tp + fp) if tp + fp else None
    rec = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"precision": prec, "recall": rec, "f1": f1, "tp": tp, "fp": fp, "fn": fn, "positives": tp + fn}


def quality(pseudo_df: pd.DataFrame, truth_df: pd.DataFrame, threshold: float = 0.5) -> dict:
    """Slice-level precision/recall/F1 of the pseudo-labels (targets >= ``threshold``) against a truth table
    (``slice_id, C1..C7, any``): ``overall`` (micro over C1..C7), ``any``, and per vertebra."""
    t = truth_df.set_index("slice_id")
    missing = ~pseudo_df.slice_id.isin(t.index)
    if missing.any():
        raise PseudoLabelError(f"the truth table lacks {int(missing.sum())} of the {len(pseudo_df)} pseudo-labelled slices "
                         f"(made for another shard set?)")
    yt = t.loc[pseudo_df.slice_id, list(TARGETS)].to_numpy() >= 0.5
    yp = pseudo_df[list(TARGETS)].to_numpy() >= threshold
    out = {"slices": len(pseudo_df), "overall": _prf(yt[:, :7].ravel(), yp[:, :7].ravel()),
           "any": _prf(yt[:, 7], yp[:, 7])}
    out.update({v: _prf(yt[:, k], yp[:, k]) for k, v in enumerate(VERTEBRAE)})
    return out


def summarize(df: pd.DataFrame, slices: pd.DataFrame, threshold: float = 0.5) -> dict:
    """Positive slices (targets >= ``threshold``) per vertebra and per study."""
    study = slices.set_index("slice_id").loc[df.slice_id, "StudyInstanceUID"].to_numpy()
    pos = df[list(TARGETS)].ge(threshold)
    per_study = pos.groupby(study).sum().astype(int)
    per_study["slices"] = pd.Series(study).value_counts()
    return {
        "studies": int(len(per_study)), "slices": int(len(df)),
        "positive_slices": {t: int(pos[t].sum()) for t in TARGETS},
        "positive_slices_per_study": {"mean": float(per_study["any"].mean()), "min": int(per_study["any"].min()),
                                      "max": int(per_study["any"].max())},
        "per_study": {u: {k: int(v) for k, v in r.items()} for u, r in per_study.iterrows()},
    }


def heatmaps(df: pd.DataFrame, slices: pd.DataFrame, path: Path, max_studies: int = 8):
    """For a sample of studies: slices x (C1..C7, any) probabilities beside the targets, with a colour bar;
    returns the (closed) figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study = slices.set_index("slice_id").loc[df.slice_id, "StudyInstanceUID"].to_numpy()
    uids = sorted(set(study))[:max_studies]
    fig, axes = plt.subplots(len(uids), 2, figsize=(9.6, 1.6 * len(uids) + 0.6), squeeze=False)
    for (ax_p, ax_y), u in zip(axes, uids):
        rows = df[study == u]
        for ax, cols, what in ((ax_p, PROB_COLUMNS, "probability"), (ax_y, TARGETS, "label")):
            im = ax.imshow(rows[list(cols)].to_numpy().T, aspect="auto", cmap="magma", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_yticks(range(len(TARGETS)), TARGETS, fontsize=6)
            ax.tick_params(axis="x", labelsize=6)
            ax.set_title(f"…{u[-10:]}  {what}", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("slice (head → feet)", fontsize=7)
    fig.suptitle("pseudo-labels: model probabilities (left) and targets (right)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    fig.colorbar(im, cax=fig.add_axes((0.94, 0.15, 0.015, 0.7)), label="probability / target")
    atomic_save_figure(fig, path)
    return fig


# --------------------------------------------------------------------------- the verb


@dataclass(kw_only=True)
class PseudoLabelConfig:
    """``spinestream pseudo-label``: which run labels, how, and where the table goes (``-c FILE``, ``--set
    KEY=VALUE`` or one flag per field; the pipeline's pseudo stage writes one)."""

    run: str | None = None
    """The round-1 run directory; required."""
    out: str | None = None
    """Table path; unset: <shards>/labels/pseudo-<run>.parquet."""
    mode: Literal["hard", "soft"] = "hard"
    """hard: 0/1 targets at the thresholds; soft: the probabilities themselves."""
    threshold: str = "train-share"
    """Hard mode: 'train-share' (per vertebra, the share of positive slices of the boxed training studies; never
    the validation fold), 'val' (best F1 on the run's validation fold: leaks it into round 2), one global value,
    or 7 values C1..C7 separated by commas (a number in YAML is quoted: '0.4')."""
    checkpoint: str = "best"
    """best, last, or a checkpoint path."""
    shards: str | None = None
    """Shard directory; unset: the run's data.root. It must make the images the run trained on."""
    truth: str | None = None
    """A slice truth table (slice_id, C1..C7, any), e.g. from `python -m spinestream.preprocess.synth_truth`: adds
    precision/recall/F1 to the summary."""
    tta: bool = False
    """Average with the horizontally flipped image."""
    batch_size: int = 64
    """Slices per model batch."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs (auto: a GPU when one is visible)."""
    heatmap_studies: int = 8
    """Studies drawn in <name>.heatmap.png (0: no figure)."""

    def __post_init__(self) -> None:
        parse_thresholds(self.threshold)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.heatmap_studies < 0:
            raise ValueError(f"heatmap_studies must be >= 0, got {self.heatmap_studies}")


def _thresholds(cfg: PseudoLabelConfig, probs: dict[str, np.ndarray], studies: pd.DataFrame, tune: pd.DataFrame,
                root: Path, k: int) -> tuple[np.ndarray | None, str | None, dict | None]:
    """(thresholds, their source in words, per-vertebra detail) of ``cfg.threshold``; a ``val`` method pops its
    tuning studies out of ``probs``."""
    thresholds = parse_thresholds(cfg.threshold) if cfg.mode == "hard" else None
    if cfg.mode != "hard" or thresholds is not None:
        return thresholds, None if cfg.mode != "hard" else "given", None
    truth = read_label_table(Layout(root).truth).frame
    if cfg.threshold == "val":
        vp = {u: probs.pop(u) for u in tune.StudyInstanceUID}
        thresholds, detail = choose_thresholds(vp, studies, truth)
        return thresholds, (f"val: best slice F1 per vertebra on {len(vp)} boxed studies of validation fold {k} "
                            f"(leaks that fold's labels into round 2, which is scored on it)"), detail
    thresholds, detail = share_thresholds(probs, studies, truth, tune.StudyInstanceUID.tolist())
    if not len(tune):
        from .dist import current

        if current().main:  # under torchrun: said once
            print(f"warning: {root} has no boxed study outside validation fold {k}: thresholds 0.5", file=sys.stderr)
        return thresholds, (f"train-share: no boxed study outside validation fold {k} to take the shares from: 0.5 "
                            f"for every vertebra"), detail
    folds = sorted(int(f) for f in set(tune.fold))
    return thresholds, (f"train-share: per vertebra, the share of positive slices in the truth of {len(tune)} boxed "
                        f"training studies (folds {folds}; validation fold {k} not used), matched in the "
                        f"pseudo-labelled studies"), detail


def run(cfg: PseudoLabelConfig) -> dict:
    """Inference, thresholds, table, summary and heat map; returns the summary.

    Under torchrun (:mod:`spinestream.engine.dist`) each rank infers its part of the studies on its own device
    (``LOCAL_RANK``) and builds the whole table and summary from all of them; rank 0 alone writes, and every
    rank returns the summary once it has written."""
    import torch

    from . import dist
    from .device import pick_device, resolve_precision
    from .evaluate import load_run_model, with_shards
    from .infer import predict_run

    if cfg.run is None:
        raise ConfigError("pseudo-label: no run to label with: pass --run RUN_DIR (or run: in the -c file)")
    d = dist.init_from_env(device_type="cpu" if cfg.device == "cpu" else None)  # a world of one: a no-op
    run_dir = Path(cfg.run)
    dev = pick_device(cfg.device, d.local_rank)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes (engine.infer): tuned once
    # every check up to predict_run reads the same files on every rank, so a refusal raises on all of them
    model, rc, ckpt = load_run_model(run_dir, cfg.checkpoint, dev)
    rc = with_shards(run_dir, rc, None if cfg.shards is None else Path(cfg.shards), "pseudo-label")
    root = Path(rc.data.root)
    studies = read_study_table(Layout(root).studies)
    targets = studies[studies.cohort == COHORT]
    if targets.empty:
        raise PseudoLabelError(f"{root}: no {COHORT} studies to pseudo-label")
    method = (cfg.threshold if cfg.threshold in THRESHOLD_METHODS else "given") if cfg.mode == "hard" else None
    k = rc.data.val_fold
    boxed = studies[studies.cohort == "boxed"]
    tune = boxed[boxed.fold == k] if method == "val" else boxed[boxed.fold != k] if method == "train-share" \
        else boxed.iloc[:0]
    if method == "val" and d.main:
        print(f"warning: threshold val tunes the thresholds on the {len(tune)} boxed studies of validation fold "
              f"{k}, the fold round 2 is scored on: its validation loss will be optimistic (the default, "
              f"train-share, never reads that fold)", file=sys.stderr)
    uids = targets.StudyInstanceUID.tolist() + (tune.StudyInstanceUID.tolist() if method == "val" else [])
    probs = predict_run(model, rc, uids, dev, resolve_precision(rc.train.precision, dev),
                        batch_size=cfg.batch_size, tta=cfg.tta, progress=sys.stderr.isatty())  # all, on every rank
    # from here on every rank computes the same from the same probabilities (a refusal raises on all of them)
    thresholds, source, detail = _thresholds(cfg, probs, studies, tune, root, k)
    df = pseudo_table(probs, studies, mode=cfg.mode, thresholds=thresholds)
    out = Path(cfg.out) if cfg.out is not None else PseudoLayout.default(root, run_dir).table
    meta = {"kind": "pseudo-labels", "run": str(run_dir), "checkpoint": str(ckpt), "model": rc.model.name,
            "mode": cfg.mode, "rule": RULE, "tta": cfg.tta, "shards": str(root), "cohort": COHORT,
            "thresholds": None if thresholds is None else dict(zip(VERTEBRAE, map(float, thresholds))),
            "threshold_method": method, "threshold_source": source,
            "threshold_studies": None if method is None else sorted(tune.StudyInstanceUID),
            "threshold_folds": None if method is None else sorted(int(f) for f in set(tune.fold)),
            "threshold_excludes_fold": int(k) if method == "train-share" else None,
            "threshold_detail": detail}
    slices = read_slice_table(Layout(root).slices, columns=["slice_id", "StudyInstanceUID"])
    summary = make_summary(cfg, df, meta, out, slices)

    def write() -> None:
        side = PseudoLayout(out)
        remove_stale_tmp(out.parent, (out.name, side.summary.name, side.heatmap.name))  # what a killed run left
        write_table(out, df, meta)
        _write_summary(cfg, df, summary, out, slices)

    d.main_only(write, f"writing the pseudo-labels to {out}")
    return summary


def make_summary(cfg: PseudoLabelConfig, df: pd.DataFrame, meta: dict, out: Path, slices: pd.DataFrame) -> dict:
    """The summary of the table ``df`` written to ``out`` (``slices``: the shard set's slice_id ->
    StudyInstanceUID), with its quality against ``cfg.truth`` when given."""
    keys = ("run", "checkpoint", "shards", "mode", "thresholds", "threshold_method", "threshold_source",
            "threshold_studies", "threshold_folds", "threshold_excludes_fold")
    summary = {"table": str(out), **{k: meta[k] for k in keys}, **summarize(df, slices)}
    if cfg.truth is not None:
        summary["quality"] = quality(df, read_label_table(cfg.truth).frame)
    PseudoSummary.from_dict(summary)  # checked where it is made: a summary that does not fit raises on every rank
    return summary


def _write_summary(cfg: PseudoLabelConfig, df: pd.DataFrame, summary: dict, out: Path, slices: pd.DataFrame) -> None:
    write_pseudo_summary(out, PseudoSummary.from_dict(summary))
    if cfg.heatmap_studies > 0:
        heatmaps(df, slices, PseudoLayout(out).heatmap, cfg.heatmap_studies)


def _print(summary: dict) -> None:
    pos = summary["positive_slices"]
    print(f"pseudo-labels ({summary['mode']}): {summary['slices']} slices of {summary['studies']} studies -> "
          f"{summary['table']}")
    if summary["thresholds"]:
        print("  thresholds   " + "  ".join(f"{k} {v:.3f}" for k, v in summary["thresholds"].items())
              + f"  ({summary['threshold_source']})")
    print("  positive slices  " + "  ".join(f"{t} {pos[t]}" for t in TARGETS))
    per = summary["positive_slices_per_study"]
    print(f"  positive slices per study: mean {per['mean']:.1f}, min {per['min']}, max {per['max']}")
    q = summary.get("quality")
    if q:
        f = lambda r: "-" if r is None else f"{r:.3f}"  # noqa: E731
        print("  vs truth     " + "  ".join(f"{k} P {f(q[k]['precision'])} R {f(q[k]['recall'])} F1 {f(q[k]['f1'])}"
                                            for k in ("overall", "any")))
        print("  F1 per vertebra  " + "  ".join(f"{v} {f(q[v]['f1'])}" for v in VERTEBRAE))


def main(argv: list[str] | None = None) -> int:
    """Errors are not caught here: the console script prints a project error on one line (exit 2), and
    anything else is a bug that keeps its traceback."""
    cfg = parse_verb_config(PseudoLabelConfig, "spinestream pseudo-label", __doc__, argv)
    if cfg is None:  # --print-config
        return 0
    summary = run(cfg)
    from .dist import current

    if current().main:  # under torchrun rank 0 reports, as it writes
        _print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
