"""The competition metric, the training loss derived from it, and evaluation helpers.

RSNA 2022 Cervical Spine Fracture Detection is scored with a weighted multi-label log loss: every study has
8 rows (``<uid>_C1`` .. ``<uid>_C7``, ``<uid>_patient_overall``); a vertebra row weighs 1 when negative and 2
when positive, the patient_overall row 7 / 14; a study's loss is ``sum(w * L) / sum(w)`` over its rows and the
score is the mean over studies, probabilities clipped to ``[1e-15, 1 - 1e-15]`` (the form the public
re-implementations agree on -- Kaggle's own scorer code was never published; see FACTS.md).

    from spinestream.engine.metrics import weighted_bce, study_probabilities, score_submission
    loss = weighted_bce(logits, batch.targets, valid=batch.valid)          # training, slice level
    probs = study_probabilities(slice_probs, "max")                         # (n_slices, 8) -> (8,)
    score = score_submission(solution_from_train(train), submission_frame({uid: probs}))

Conventions: slice-level arrays have the 8 columns of :data:`TARGETS` (C1..C7, ``any``); study-level arrays
have the 8 columns of :data:`ROW_TYPES` (C1..C7, ``patient_overall``) -- the same positions, the last column
renamed, because a study's patient_overall is the study-level counterpart of the slice-level ``any``.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from spinestream.shards.layout import ROW_TYPES, TARGETS, VERTEBRAE

__all__ = ["EPS", "ROW_TYPES", "RULES", "TARGETS", "VERTEBRAE", "classification_report", "constant_baseline",
           "row_weights", "score_submission", "slice_loss_weights", "solution_from_train", "study_losses",
           "study_probabilities", "submission_frame", "weighted_bce"]

RULES = ("max", "mean_top_k", "quantile", "noisy_or")
EPS = 1e-15  # the clipping of the public re-implementations

# (negative weight, positive weight) per column: vertebrae 1 / 2, any / patient_overall 7 / 14. Positive = 2 x
# negative in both cases, so a weight is base * (1 + y) -- used by both the slice loss and the study metric.
_BASE = np.array([1.0] * 7 + [7.0])

# "<StudyInstanceUID>_<C1..C7|patient_overall>"; the UID itself is dotted digits but anything non-empty is
# accepted (synthetic data uses other ids). Greedy .+ backtracks, so "x_patient_overall" -> ("x", "patient_overall").
_ROW_ID = re.compile(r"^(?P<uid>.+)_(?P<kind>C[1-7]|patient_overall)$")


# --------------------------------------------------------------------------------------------------------------
# training loss (slice level)
# --------------------------------------------------------------------------------------------------------------

def slice_loss_weights(targets: torch.Tensor) -> torch.Tensor:
    """Per-element weights of the competition metric, for ``(..., 8)`` targets (C1..C7, any) in ``[0, 1]``.

    Vertebra columns weigh 1 (negative) / 2 (positive), the ``any`` column 7 / 14, i.e. ``base * (1 + t)``. Soft
    targets (mixup, pseudo-labels) interpolate linearly, ``w = w_neg + t * (w_pos - w_neg)``, which is the same
    formula -- so a 50/50 mixup of a positive and a negative weighs the mean of their weights.
    """
    if targets.shape[-1] != len(TARGETS):
        raise ValueError(f"targets must have {len(TARGETS)} columns ({', '.join(TARGETS)}), got shape "
                         f"{tuple(targets.shape)}")
    base = torch.as_tensor(_BASE, dtype=targets.dtype if targets.is_floating_point() else torch.float32,
                           device=targets.device)
    return base * (1.0 + targets)


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, *, valid: torch.Tensor | None = None,
                 focal_gamma: float = 0.0, pos_weight: float = 1.0) -> torch.Tensor:
    """The training loss: the competition's weighted BCE at slice level, a float32 scalar.

    ``sum(w * L) / sum(w)`` over every element of the ``(B, 8)`` batch, ``w`` from :func:`slice_loss_weights`
    (so the batch is normalised like one big "study", not row by row: a batch of many negatives is not inflated).

    - ``valid``: ``(B,)`` (epoch padding, as in ``Batch.valid``) or ``(B, 8)`` (per-label) bool; excluded elements
      contribute neither loss nor weight, and their targets may be anything, NaN included (they are replaced
      before the loss is computed, so no NaN reaches the gradient). All excluded -> 0 (still differentiable).
    - ``focal_gamma > 0``: each term is multiplied by ``(1 - p_t)^gamma``; for soft targets ``p_t`` interpolates
      linearly like the weights, ``1 - p_t = t * (1 - p) + (1 - t) * p`` (equal to the usual form for hard
      targets). Computed from ``sigmoid(+-x)`` directly so it stays accurate when ``p`` is near 0 or 1.
    - ``pos_weight``: scales the positive part of each term (``torch``'s ``pos_weight`` semantics), an alternative
      to oversampling positive studies. The denominator ``sum(w)`` is left alone so that ``pos_weight`` acts as a
      gradient multiplier on positives rather than being renormalised away.

    Computed in float32 with autocast disabled: under bf16/fp16 autocast the log terms and the weighted sums lose
    too much precision (``binary_cross_entropy_with_logits`` keeps it numerically stable for extreme logits).
    """
    if logits.shape != targets.shape or logits.shape[-1] != len(TARGETS) or logits.ndim != 2:
        raise ValueError(f"logits and targets must both be (B, {len(TARGETS)}), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if focal_gamma < 0:
        raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma}")
    if pos_weight <= 0:
        raise ValueError(f"pos_weight must be > 0, got {pos_weight}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        x = logits.float()
        t = targets.to(device=x.device, dtype=torch.float32)
        if valid is None:
            mask = torch.ones_like(x, dtype=torch.bool)
        else:
            v = valid.to(device=x.device, dtype=torch.bool)
            if v.ndim == 1:
                v = v[:, None]
            mask = v.expand_as(x)
            t = torch.where(mask, t, torch.zeros_like(t))  # invalid rows may carry NaN/garbage targets
        w = slice_loss_weights(t) * mask
        pw = None if pos_weight == 1.0 else torch.tensor(pos_weight, dtype=torch.float32, device=x.device)
        loss = F.binary_cross_entropy_with_logits(x, t, reduction="none", pos_weight=pw)
        if focal_gamma > 0:
            one_minus_pt = t * torch.sigmoid(-x) + (1.0 - t) * torch.sigmoid(x)
            # the clamp keeps d/dx of z**gamma finite at z == 0 (gamma < 1 would give inf * 0 = NaN there)
            loss = loss * one_minus_pt.clamp_min(1e-12).pow(focal_gamma)
        terms = torch.where(mask, w * loss, torch.zeros_like(loss))
        return terms.sum() / w.sum().clamp_min(1e-12)


# --------------------------------------------------------------------------------------------------------------
# slices -> study
# --------------------------------------------------------------------------------------------------------------

def study_probabilities(slice_probs: np.ndarray, rule: str = "max", *, top_k: int = 5,
                        quantile: float = 0.98) -> np.ndarray:
    """Aggregate one study's ``(n_slices, 8)`` slice probabilities (C1..C7, any) to ``(8,)`` study probabilities
    (C1..C7, patient_overall), each column independently by ``rule``:

    - ``max``: the most confident slice (the default; a fracture shows on a few slices only, so means dilute it);
    - ``mean_top_k``: the mean of the ``min(top_k, n_slices)`` highest -- max, less sensitive to one noisy slice;
    - ``quantile``: ``np.quantile(.., quantile)`` (linear interpolation) -- a softer max;
    - ``noisy_or``: ``1 - prod(1 - p)`` -- slices as independent detectors; saturates towards 1 on long studies
      unless the slice probabilities are small, so it suits calibrated, sparse slice outputs.

    patient_overall is taken from the slice-level ``any`` column by the same rule, not derived from the seven
    vertebra columns: ``any`` is trained directly against the label that carries half of the metric's weight
    (7/14 against 1/2), and deriving it (e.g. ``max`` or noisy-or of C1..C7) would compound the vertebra errors.
    Callers who want a derived value can combine the returned vertebra columns themselves.
    """
    p = np.asarray(slice_probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(TARGETS):
        raise ValueError(f"slice_probs must be (n_slices, {len(TARGETS)}) with columns {', '.join(TARGETS)}, "
                         f"got shape {p.shape}")
    if p.shape[0] == 0:
        raise ValueError("slice_probs has no slices")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("slice_probs must be finite probabilities in [0, 1]")
    if rule == "max":
        out = p.max(axis=0)
    elif rule == "mean_top_k":
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        k = min(int(top_k), p.shape[0])
        out = np.sort(p, axis=0)[-k:].mean(axis=0)
    elif rule == "quantile":
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {quantile}")
        out = np.quantile(p, quantile, axis=0)
    elif rule == "noisy_or":
        with np.errstate(divide="ignore"):  # log1p(-1) = -inf -> exp -> 0 -> probability 1, as intended
            out = 1.0 - np.exp(np.log1p(-p).sum(axis=0))
    else:
        raise ValueError(f"unknown aggregation rule {rule!r}; allowed: {', '.join(RULES)}")
    return np.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------------------------------------------
# the competition metric on Kaggle's CSV formats
# --------------------------------------------------------------------------------------------------------------

def row_weights(kind: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Metric weights of rows given their row types (``C1``..``C7``/``patient_overall``) and 0/1 truth."""
    base = np.where(np.asarray(kind) == "patient_overall", 7.0, 1.0)
    return base * (1.0 + np.asarray(y, dtype=np.float64))


def _parse_row_ids(row_ids: pd.Series, what: str) -> pd.DataFrame:
    """row_id -> columns uid, kind; ValueError naming a few malformed ids."""
    ids = row_ids.astype(str)
    parts = ids.str.extract(_ROW_ID)
    bad = parts["uid"].isna()
    if bad.any():
        raise ValueError(f"{what}: {int(bad.sum())} malformed row_id(s), e.g. {ids[bad].head(5).tolist()}; "
                         f"expected '<StudyInstanceUID>_<{'|'.join(ROW_TYPES)}>'")
    return pd.DataFrame({"row_id": ids.to_numpy(), "uid": parts["uid"].astype(str).to_numpy(),
                         "kind": parts["kind"].astype(str).to_numpy()})


def _is_wide(df: pd.DataFrame) -> bool:
    return "row_id" not in df.columns and {"StudyInstanceUID", *ROW_TYPES} <= set(df.columns)


def _check_binary(values: pd.Series, what: str) -> np.ndarray:
    y = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isin(y, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"{what}: truth must be 0/1, found {values[bad].head(5).tolist()}")
    return y


def solution_from_train(train: pd.DataFrame) -> pd.DataFrame:
    """Wide ``train.csv`` (StudyInstanceUID, patient_overall, C1..C7) -> Kaggle's long solution form: ``row_id``
    (``f"{uid}_{C1..C7|patient_overall}"``) and ``fractured`` (0/1 int), 8 rows per study in ROW_TYPES order."""
    missing = [c for c in ("StudyInstanceUID", *ROW_TYPES) if c not in train.columns]
    if missing:
        raise ValueError(f"train frame lacks column(s) {missing}; expected StudyInstanceUID, "
                         f"{', '.join(ROW_TYPES)}")
    uids = train["StudyInstanceUID"].astype(str)
    if uids.duplicated().any():
        raise ValueError(f"duplicated StudyInstanceUID(s): {uids[uids.duplicated()].head(5).tolist()}")
    y = np.stack([_check_binary(train[c], f"train column {c}") for c in ROW_TYPES], axis=1)
    row_id = (uids.to_numpy()[:, None] + "_" + np.asarray(ROW_TYPES, dtype=object)[None, :]).ravel()
    return pd.DataFrame({"row_id": row_id.astype(str), "fractured": y.ravel().astype(np.int64)})


def _long_solution(solution: pd.DataFrame) -> pd.DataFrame:
    """Either solution form -> row_id, uid, kind, y (float), validated: unique ids, 0/1 truth, 8 rows per study."""
    if _is_wide(solution):
        solution = solution_from_train(solution)
    if not {"row_id", "fractured"} <= set(solution.columns):
        raise ValueError(f"solution must have columns row_id, fractured (or be the wide train.csv form: "
                         f"StudyInstanceUID, {', '.join(ROW_TYPES)}); got {list(solution.columns)}")
    if len(solution) == 0:
        raise ValueError("solution is empty")
    sol = _parse_row_ids(solution["row_id"].reset_index(drop=True), "solution")
    dup = sol["row_id"].duplicated()
    if dup.any():
        raise ValueError(f"solution: duplicated row_id(s), e.g. {sol['row_id'][dup].head(5).tolist()}")
    sol["y"] = _check_binary(solution["fractured"].reset_index(drop=True), "solution")
    # a study with fewer than its 8 rows would be scored on a different weight mix: almost surely a bug upstream
    counts = sol.groupby("uid", sort=False).size()
    short = counts[counts != len(ROW_TYPES)]
    if len(short):
        raise ValueError(f"solution: {len(short)} stud(y/ies) without all {len(ROW_TYPES)} rows, e.g. "
                         f"{short.index[:5].tolist()}")
    return sol


def study_losses(solution: pd.DataFrame, submission: pd.DataFrame, *, eps: float = EPS) -> pd.Series:
    """Each study's weighted log loss (indexed by StudyInstanceUID): the competition metric before its mean
    over studies, so two models on the same studies can be compared pair by pair (a paired bootstrap).
    Inputs and errors as :func:`score_submission`."""
    sol = _long_solution(solution)
    if not {"row_id", "fractured"} <= set(submission.columns):
        raise ValueError(f"submission must have columns row_id, fractured; got {list(submission.columns)}")
    sub = _parse_row_ids(submission["row_id"].reset_index(drop=True), "submission")
    dup = sub["row_id"].duplicated()
    if dup.any():
        raise ValueError(f"submission: duplicated row_id(s), e.g. {sub['row_id'][dup].unique()[:5].tolist()}")
    raw = submission["fractured"].reset_index(drop=True)
    p_all = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~((p_all >= 0.0) & (p_all <= 1.0))  # NaN compares False, so NaN counts as bad
    if bad.any():
        raise ValueError(f"submission: {int(bad.sum())} probabilit(y/ies) NaN, non-numeric or outside [0, 1], "
                         f"e.g. rows {sub['row_id'][bad].head(5).tolist()} = {raw[bad].head(5).tolist()}")
    probs = pd.Series(p_all, index=pd.Index(sub["row_id"]))
    present = sol["row_id"].isin(probs.index)
    if not present.all():
        miss = sol["row_id"][~present]
        raise ValueError(f"submission is missing {len(miss)} of the solution's {len(sol)} rows, e.g. "
                         f"{miss.head(5).tolist()}")
    p = np.clip(probs.loc[sol["row_id"]].to_numpy(), eps, 1.0 - eps)
    y = sol["y"].to_numpy()
    loss = -(y * np.log(p) + (1.0 - y) * np.log1p(-p))
    w = row_weights(sol["kind"].to_numpy(), y)
    per = pd.DataFrame({"uid": sol["uid"], "wl": w * loss, "w": w}).groupby("uid", sort=False).sum()
    return per["wl"] / per["w"]


def score_submission(solution: pd.DataFrame, submission: pd.DataFrame, *, eps: float = EPS) -> float:
    """The competition metric (lower is better): the mean of :func:`study_losses` (each study counts equally).

    ``solution``: ``row_id`` + ``fractured`` (0/1), or the wide ``train.csv`` form, converted with
    :func:`solution_from_train`; every study must have all 8 rows. ``submission``: ``row_id`` + ``fractured``
    (probability); other columns are ignored. Per study, ``sum(w * L) / sum(w)`` over its 8 rows with
    ``w`` = 1 / 2 for a negative / positive vertebra row and 7 / 14 for patient_overall, ``L`` the log loss of the
    probability clipped to ``[eps, 1 - eps]``.

    Raises ValueError for submission rows missing from the solution's (naming a few), duplicated row_ids,
    probabilities that are NaN/non-numeric or outside [0, 1], and malformed row_ids. Extra submission rows are
    ignored: Kaggle's test.csv lists studies absent from the scored set.
    """
    return float(study_losses(solution, submission, eps=eps).mean())


def submission_frame(study_probs: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """``{uid: (8,) probabilities C1..C7, patient_overall}`` -> Kaggle's ``row_id, fractured`` frame, studies in
    mapping order, rows in ROW_TYPES order. Probabilities are validated, not clipped (the scorer clips)."""
    uids, rows = [], []
    for uid, probs in study_probs.items():
        p = np.asarray(probs, dtype=np.float64).reshape(-1)
        if p.shape != (len(ROW_TYPES),):
            raise ValueError(f"study {uid}: expected {len(ROW_TYPES)} probabilities ({', '.join(ROW_TYPES)}), "
                             f"got shape {np.shape(probs)}")
        if not ((p >= 0) & (p <= 1)).all():
            raise ValueError(f"study {uid}: probabilities must be in [0, 1], got {p.tolist()}")
        uids.append(str(uid))
        rows.append(p)
    if not uids:
        return pd.DataFrame({"row_id": pd.Series([], dtype=str), "fractured": pd.Series([], dtype=np.float64)})
    row_id = (np.asarray(uids, dtype=object)[:, None] + "_" + np.asarray(ROW_TYPES, dtype=object)[None, :]).ravel()
    return pd.DataFrame({"row_id": row_id.astype(str), "fractured": np.stack(rows).ravel()})


# --------------------------------------------------------------------------------------------------------------
# error analysis
# --------------------------------------------------------------------------------------------------------------

def _auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC by the rank (Mann-Whitney U) formula with average ranks for ties; NaN with one class only.
    Ties between a positive and a negative count 1/2, so constant scores give exactly 0.5."""
    n_pos = int((y == 1).sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # average 1-based rank of each group of equal scores
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = np.repeat(avg, counts)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def classification_report(y_true: np.ndarray, y_prob: np.ndarray, *, threshold: float = 0.5,
                          eps: float = EPS) -> pd.DataFrame:
    """Study-level error analysis: ``(n_studies, 8)`` truth (0/1) and probabilities, columns C1..C7,
    patient_overall -> a frame indexed by those 8 names plus ``overall`` (micro-average over the 7 vertebrae:
    all their study/vertebra pairs pooled), with columns

    - ``accuracy``, ``sensitivity`` (recall of positives; NaN without positives), ``specificity`` (NaN without
      negatives), at ``prob >= threshold``;
    - ``auc`` (threshold-free; NaN when only one class is present);
    - ``n_pos``, ``n_neg``;
    - ``logloss``: the plain (unweighted) mean log loss of the column;
    - ``weighted_logloss``: the column's contribution to the competition score -- the mean over studies of
      ``w * L / sum(w of the study's 8 rows)``; the 8 per-column values sum to :func:`score_submission`'s score
      and ``overall`` holds the vertebrae's share, so it says where the score is lost.

    The reference solution reported only a "fracture accuracy"; with ~7% positive vertebrae accuracy hides
    missed fractures, hence sensitivity/specificity/AUC here.
    """
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != len(ROW_TYPES):
        raise ValueError(f"y_true and y_prob must both be (n_studies, {len(ROW_TYPES)}) "
                         f"({', '.join(ROW_TYPES)}), got {y.shape} and {p.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y_true must be 0/1")
    if not ((p >= 0) & (p <= 1)).all():
        raise ValueError("y_prob must be probabilities in [0, 1] (NaN is not)")
    pc = np.clip(p, eps, 1.0 - eps)
    loss = -(y * np.log(pc) + (1.0 - y) * np.log1p(-pc))
    w = _BASE[None, :] * (1.0 + y)
    contrib = (w * loss) / w.sum(axis=1, keepdims=True)  # (n, 8): per-study share, rows sum to the study loss
    n = y.shape[0]

    def stats(yt: np.ndarray, pp: np.ndarray, ll: np.ndarray, wl: float) -> dict:
        pred = pp >= threshold
        pos, neg = yt == 1, yt == 0
        n_pos, n_neg = int(pos.sum()), int(neg.sum())
        return {
            "accuracy": float((pred == pos).mean()) if len(yt) else float("nan"),
            "sensitivity": float(pred[pos].mean()) if n_pos else float("nan"),
            "specificity": float((~pred[neg]).mean()) if n_neg else float("nan"),
            "auc": _auc(yt, pp),
            "n_pos": n_pos,
            "n_neg": n_neg,
            "logloss": float(ll.mean()) if len(yt) else float("nan"),
            "weighted_logloss": wl,
        }

    rows = {name: stats(y[:, j], p[:, j], loss[:, j], float(contrib[:, j].sum() / n) if n else float("nan"))
            for j, name in enumerate(ROW_TYPES)}
    rows["overall"] = stats(y[:, :7].ravel(), p[:, :7].ravel(), loss[:, :7].ravel(),
                            float(contrib[:, :7].sum() / n) if n else float("nan"))
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "target"
    return out


def constant_baseline(train_like: pd.DataFrame, prevalence_from: pd.DataFrame | None = None) -> float:
    """The score on ``train_like``'s studies of predicting, for every row, the prevalence of its row type
    (C1..C7, patient_overall) -- the number a model has to beat. The prevalence is taken from
    ``prevalence_from`` when given (the training studies, when scoring a validation fold), else from the
    scored studies themselves. Both accept the wide train.csv form or the long solution form.

    Note: prevalence is the natural, not the optimal, constant: the metric's 2x weight on positives and per-study
    normalisation make the loss-minimising constant somewhat higher than the prevalence.
    """
    sol = _long_solution(train_like)
    src = sol if prevalence_from is None else _long_solution(prevalence_from)
    prev = src.groupby("kind")["y"].mean()
    submission = pd.DataFrame({"row_id": sol["row_id"], "fractured": sol["kind"].map(prev).to_numpy()})
    return score_submission(sol[["row_id"]].assign(fractured=sol["y"].astype(np.int64)), submission)
