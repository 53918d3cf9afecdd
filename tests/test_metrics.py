"""engine.metrics: the competition metric against hand computations and an independent loop implementation,
the slice-level training loss, slice -> study aggregation, the classification report and the constant baseline."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from spinestream.engine.metrics import (ROW_TYPES, TARGETS, classification_report, constant_baseline, score_submission,
                            slice_loss_weights, solution_from_train, study_probabilities, submission_frame,
                            weighted_bce)

UID_A = "1.2.826.0.1.3680043.10001"
UID_B = "1.2.826.0.1.3680043.10002"


def long_solution(truth: dict[str, list[int]]) -> pd.DataFrame:
    """{uid: 8 labels C1..C7, patient_overall} -> row_id, fractured."""
    rows = [(f"{u}_{k}", y) for u, ys in truth.items() for k, y in zip(ROW_TYPES, ys)]
    return pd.DataFrame(rows, columns=["row_id", "fractured"])


def subm(probs: dict[str, list[float]]) -> pd.DataFrame:
    return submission_frame({u: np.asarray(p, dtype=float) for u, p in probs.items()})


# ---------------------------------------------------------------------------------------------- score_submission

def test_negative_study_at_half_is_ln2():
    s = score_submission(long_solution({UID_A: [0] * 8}), subm({UID_A: [0.5] * 8}))
    assert s == pytest.approx(math.log(2), rel=1e-12)


def test_positive_study_at_point_nine():
    s = score_submission(long_solution({UID_A: [1] * 8}), subm({UID_A: [0.9] * 8}))
    assert s == pytest.approx(-math.log(0.9), rel=1e-12)


MIXED_Y = [1, 1, 0, 0, 0, 0, 0, 1]
MIXED_P = [0.8, 0.3, 0.1, 0.2, 0.05, 0.5, 0.9, 0.7]
# weights: C1, C2 positive -> 2 each; C3..C7 negative -> 1 each; patient_overall positive -> 14
MIXED_EXPECTED = (2 * -math.log(0.8) + 2 * -math.log(0.3)
                  + -math.log(0.9) + -math.log(0.8) + -math.log(0.95) + -math.log(0.5) + -math.log(0.1)
                  + 14 * -math.log(0.7)) / (2 + 2 + 1 + 1 + 1 + 1 + 1 + 14)


def test_mixed_study_by_hand():
    s = score_submission(long_solution({UID_A: MIXED_Y}), subm({UID_A: MIXED_P}))
    assert s == pytest.approx(MIXED_EXPECTED, rel=1e-12)


def test_two_studies_are_averaged_per_study():
    # the mean of per-study losses, not one pooled weighted mean (the studies' weight sums differ: 15 vs 23)
    s = score_submission(long_solution({UID_A: [0] * 8, UID_B: MIXED_Y}),
                         subm({UID_A: [0.5] * 8, UID_B: MIXED_P}))
    assert s == pytest.approx((math.log(2) + MIXED_EXPECTED) / 2, rel=1e-12)


def test_clipping_at_eps():
    # C3 positive predicted 0 -> -log(1e-15) with weight 2; every other row negative predicted 0 -> -log(1 - 1e-15)
    y = [0, 0, 1, 0, 0, 0, 0, 0]
    s = score_submission(long_solution({UID_A: y}), subm({UID_A: [0.0] * 8}))
    expected = (2 * -math.log(1e-15) + 13 * -math.log1p(-1e-15)) / (2 + 6 + 7)
    assert s == pytest.approx(expected, rel=1e-9)
    assert math.isfinite(s)
    # and p = 1 on a negative row is clipped to 1 - 1e-15 (stored in float64 as 1 - 9.992e-16, which the public
    # np.clip-then-log(1 - p) implementations inherit too, hence the expression); weights 1 + 6 * 1 + 7 = 14
    s1 = score_submission(long_solution({UID_A: [0] * 8}), subm({UID_A: [1.0] + [0.0] * 7}))
    assert s1 == pytest.approx((-math.log(1 - (1 - 1e-15)) + 13 * -math.log1p(-1e-15)) / 14, rel=1e-9)


def test_extra_submission_rows_are_ignored():
    sol = long_solution({UID_A: MIXED_Y})
    sub = subm({UID_B: [0.99] * 8, UID_A: MIXED_P})  # UID_B is in the submission only (test.csv style)
    assert score_submission(sol, sub) == pytest.approx(MIXED_EXPECTED, rel=1e-12)


def test_missing_rows_are_named():
    sol = long_solution({UID_A: MIXED_Y, UID_B: [0] * 8})
    sub = subm({UID_A: MIXED_P, UID_B: [0.1] * 8})
    sub = sub[~sub.row_id.isin([f"{UID_B}_C4", f"{UID_B}_patient_overall"])]
    with pytest.raises(ValueError, match=r"missing 2 .*C4.*patient_overall"):
        score_submission(sol, sub)


def test_wide_solution_accepted():
    wide = pd.DataFrame([{"StudyInstanceUID": UID_A, "patient_overall": 1, **dict(zip(ROW_TYPES[:7], MIXED_Y))},
                         {"StudyInstanceUID": UID_B, "patient_overall": 0, **{c: 0 for c in ROW_TYPES[:7]}}])
    sub = subm({UID_A: MIXED_P, UID_B: [0.5] * 8})
    assert score_submission(wide, sub) == pytest.approx((MIXED_EXPECTED + math.log(2)) / 2, rel=1e-12)
    long = solution_from_train(wide)
    assert list(long.columns) == ["row_id", "fractured"] and len(long) == 16
    assert long.row_id.iloc[7] == f"{UID_A}_patient_overall" and long.fractured.tolist()[:8] == MIXED_Y


def test_row_order_is_irrelevant():
    sol = long_solution({UID_A: MIXED_Y, UID_B: [0, 0, 0, 1, 0, 0, 0, 1]})
    sub = subm({UID_A: MIXED_P, UID_B: [0.2, 0.1, 0.3, 0.6, 0.2, 0.1, 0.05, 0.4]})
    ref = score_submission(sol, sub)
    rng = np.random.default_rng(0)
    for _ in range(3):
        s = score_submission(sol.iloc[rng.permutation(len(sol))], sub.iloc[rng.permutation(len(sub))])
        assert s == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("mutate, match", [
    (lambda s: pd.concat([s, s.iloc[[3]]]), "duplicated"),
    (lambda s: s.assign(fractured=[1.5] + s.fractured.tolist()[1:]), "outside"),
    (lambda s: s.assign(fractured=[-0.1] + s.fractured.tolist()[1:]), "outside"),
    (lambda s: s.assign(fractured=[float("nan")] + s.fractured.tolist()[1:]), "NaN"),
    (lambda s: s.assign(fractured=["x"] + s.fractured.tolist()[1:]), "non-numeric"),
    (lambda s: pd.concat([s, pd.DataFrame({"row_id": [f"{UID_A}_C8"], "fractured": [0.5]})]), "malformed"),
    (lambda s: s.drop(columns="fractured"), "columns"),
])
def test_submission_errors(mutate, match):
    sol = long_solution({UID_A: MIXED_Y})
    with pytest.raises(ValueError, match=match):
        score_submission(sol, mutate(subm({UID_A: MIXED_P})))


def test_solution_errors():
    sub = subm({UID_A: MIXED_P})
    with pytest.raises(ValueError, match="0/1"):
        score_submission(long_solution({UID_A: [0, 2, 0, 0, 0, 0, 0, 1]}), sub)
    with pytest.raises(ValueError, match="without all 8"):
        score_submission(long_solution({UID_A: MIXED_Y}).iloc[:7], sub)
    with pytest.raises(ValueError, match="malformed"):
        score_submission(pd.DataFrame({"row_id": ["nonsense"], "fractured": [0]}), sub)


def reference_score(solution: pd.DataFrame, submission: pd.DataFrame) -> float:
    """Straightforward re-implementation: dicts and a loop over studies."""
    probs = dict(zip(submission.row_id, submission.fractured))
    studies: dict[str, list[tuple[str, int]]] = {}
    for rid, y in zip(solution.row_id, solution.fractured):
        uid, _, kind = rid.partition("_") if "_patient_overall" not in rid else (rid[:-16], "_", "patient_overall")
        studies.setdefault(uid, []).append((kind, int(y)))
    losses = []
    for uid, rows in studies.items():
        num = den = 0.0
        for kind, y in rows:
            p = min(max(probs[f"{uid}_{kind}"], 1e-15), 1 - 1e-15)
            w = (7.0 if kind == "patient_overall" else 1.0) * (2.0 if y == 1 else 1.0)
            num += w * -(y * math.log(p) + (1 - y) * math.log(1 - p))
            den += w
        losses.append(num / den)
    return sum(losses) / len(losses)


def test_cross_check_random_20_studies():
    rng = np.random.default_rng(7)
    uids = [f"1.2.826.0.1.3680043.{20000 + i}" for i in range(20)]
    y = (rng.random((20, 8)) < 0.25).astype(int)
    y[:, 7] = y[:, :7].max(axis=1)
    p = rng.random((20, 8))
    p[0, 2], p[1, 7], p[2, 0] = 0.0, 1.0, 1e-18  # clipping exercised
    sol = long_solution({u: list(r) for u, r in zip(uids, y)})
    sub = subm({**{u: list(r) for u, r in zip(uids, p)}, "1.2.3.extra": [0.5] * 8})
    sub = sub.iloc[rng.permutation(len(sub))]
    assert score_submission(sol, sub) == pytest.approx(reference_score(sol, sub), rel=1e-12)


def test_submission_frame_layout_and_validation():
    f = submission_frame({UID_A: np.arange(8) / 10})
    assert f.row_id.tolist() == [f"{UID_A}_{k}" for k in ROW_TYPES]
    assert f.fractured.tolist() == pytest.approx(list(np.arange(8) / 10))
    with pytest.raises(ValueError, match="8 probabilities"):
        submission_frame({UID_A: np.zeros(7)})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        submission_frame({UID_A: np.full(8, 1.2)})


# ---------------------------------------------------------------------------------------------- weighted_bce

def bce(x: float, t: float) -> float:
    p = 1 / (1 + math.exp(-x))
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def test_slice_loss_weights():
    t = torch.tensor([[0, 1, 0, 0, 0, 0, 0, 1], [0.5, 0, 0, 0, 0, 0, 0, 0.25]])
    w = slice_loss_weights(t)
    assert w.tolist() == [[1, 2, 1, 1, 1, 1, 1, 14], [1.5, 1, 1, 1, 1, 1, 1, 7 + 0.25 * 7]]
    assert TARGETS[-1] == "any"


def test_weighted_bce_by_hand():
    x = torch.tensor([[2.0, -1.0, 0.0, 0.5, -3.0, 1.0, -0.5, 1.5],
                      [-2.0, 0.3, -0.7, 0.0, 0.0, 4.0, -4.0, -1.0]])
    t = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 1], [0.0, 0, 0, 0, 0, 1, 0, 1]])
    num = den = 0.0
    for i in range(2):
        for j in range(8):
            w = (7 if j == 7 else 1) * (2 if t[i, j] == 1 else 1)
            num += w * bce(float(x[i, j]), float(t[i, j]))
            den += w
    got = weighted_bce(x, t)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(num / den, rel=1e-6)
    # focal_gamma = 0 is the plain loss, exactly
    assert torch.equal(weighted_bce(x, t, focal_gamma=0.0), got)


def test_weighted_bce_focal_and_pos_weight_by_hand():
    x = torch.tensor([[1.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5]])
    t = torch.tensor([[1.0, 1.0, 0, 0, 0, 0, 0, 0]])
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    w = [2, 2, 1, 1, 1, 1, 1, 7]
    num = 0.0
    for j in range(8):
        xj, tj = float(x[0, j]), float(t[0, j])
        one_minus_pt = (1 - sig(xj)) if tj == 1 else sig(xj)
        num += w[j] * bce(xj, tj) * one_minus_pt ** 2
    assert float(weighted_bce(x, t, focal_gamma=2.0)) == pytest.approx(num / sum(w), rel=1e-6)
    num = sum(w[j] * (3.0 if t[0, j] == 1 else 1.0) * bce(float(x[0, j]), float(t[0, j])) for j in range(8))
    assert float(weighted_bce(x, t, pos_weight=3.0)) == pytest.approx(num / sum(w), rel=1e-6)


def test_weighted_bce_soft_targets():
    x = torch.tensor([[0.4, -0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 1.2]])
    t = torch.tensor([[0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.6]])
    w = [1.3, 1, 1, 1, 1, 1, 1, 7 * 1.6]  # w_neg + t * (w_pos - w_neg)
    num = sum(w[j] * bce(float(x[0, j]), float(t[0, j])) for j in range(8))
    assert float(weighted_bce(x, t)) == pytest.approx(num / sum(w), rel=1e-6)


def test_weighted_bce_excludes_invalid_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=g)
    t = (torch.rand(4, 8, generator=g) < 0.3).float()
    valid = torch.tensor([True, False, True, False])
    t_bad = t.clone()
    t_bad[1] = float("nan")  # padding rows may carry garbage
    xr = x.clone().requires_grad_(True)
    got = weighted_bce(xr, t_bad, valid=valid)
    assert got.item() == pytest.approx(weighted_bce(x[valid], t[valid]).item(), rel=1e-6)
    got.backward()
    assert torch.isfinite(xr.grad).all() and (xr.grad[~valid] == 0).all()
    # all invalid: zero, still differentiable
    z = weighted_bce(xr, t, valid=torch.zeros(4, dtype=torch.bool))
    assert z.item() == 0.0 and z.requires_grad


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_weighted_bce_extreme_logits_finite(gamma):
    x = torch.tensor([[1e4, -1e4, 200.0, -200.0, 90.0, -90.0, 0.0, 1e4]] * 2, requires_grad=True)
    t = torch.tensor([[1.0, 0, 0, 1, 1, 0, 0.5, 0], [0.0, 1, 1, 0, 0, 1, 1, 1]])
    loss = weighted_bce(x, t, focal_gamma=gamma, pos_weight=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_weighted_bce_under_autocast():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 8, generator=g)
    t = (torch.rand(6, 8, generator=g) < 0.3).float()
    ref = weighted_bce(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = weighted_bce(x.bfloat16(), t)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(ref), rel=2e-2)  # only bf16 rounding of the inputs


def test_weighted_bce_shape_errors():
    with pytest.raises(ValueError):
        weighted_bce(torch.zeros(2, 7), torch.zeros(2, 7))
    with pytest.raises(ValueError):
        weighted_bce(torch.zeros(2, 8), torch.zeros(3, 8))


# ---------------------------------------------------------------------------------------------- study_probabilities

SLICES = np.array([[0.1, 0.0, 0.2, 0.0, 0.0, 0.0, 0.0, 0.3],
                   [0.5, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.6],
                   [0.3, 0.0, 0.4, 0.0, 0.0, 0.0, 1.0, 0.2],
                   [0.2, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.1]])


def test_study_probabilities_rules():
    assert study_probabilities(SLICES).tolist() == pytest.approx([0.5, 0, 0.4, 0, 0, 0, 1.0, 0.6])
    top2 = study_probabilities(SLICES, "mean_top_k", top_k=2)
    assert top2[[0, 2, 7]].tolist() == pytest.approx([0.4, 0.35, 0.45])
    # top_k beyond the slice count is the plain mean
    assert study_probabilities(SLICES, "mean_top_k", top_k=99).tolist() == pytest.approx(SLICES.mean(0).tolist())
    q = study_probabilities(SLICES, "quantile", quantile=0.5)
    assert q.tolist() == pytest.approx(np.median(SLICES, axis=0).tolist())
    assert study_probabilities(SLICES, "quantile", quantile=1.0).tolist() == pytest.approx(SLICES.max(0).tolist())
    nor = study_probabilities(SLICES, "noisy_or")
    assert nor[0] == pytest.approx(1 - 0.9 * 0.5 * 0.7 * 0.8)
    assert nor[1] == 0.0 and nor[6] == 1.0  # all zeros stay 0, one certain slice makes it certain
    assert nor[7] == pytest.approx(1 - 0.7 * 0.4 * 0.8 * 0.9)  # patient_overall from the 'any' column


def test_study_probabilities_errors():
    with pytest.raises(ValueError, match="max, mean_top_k, quantile, noisy_or"):
        study_probabilities(SLICES, "median")
    with pytest.raises(ValueError):
        study_probabilities(SLICES[:, :7])
    with pytest.raises(ValueError):
        study_probabilities(SLICES[:0])


# ---------------------------------------------------------------------------------------------- report, baseline

def test_classification_report_by_hand():
    n = 5
    y = np.zeros((n, 8))
    p = np.full((n, 8), 0.3)
    y[:, 0], p[:, 0] = [1, 1, 0, 0, 0], [0.9, 0.4, 0.6, 0.1, 0.2]  # C1: sens 1/2, spec 2/3, acc 3/5, AUC 5/6
    # C2: all negative -> AUC and sensitivity NaN
    y[:, 2] = [1, 0, 1, 0, 0]  # C3: constant predictions with both classes -> AUC 0.5 (all ties)
    y[:, 3], p[:, 3] = [1, 1, 0, 0, 0], [0.5, 0.7, 0.5, 0.2, 0.2]  # C4: AUC (2.5 + 3) / 6, one tie
    y[:, 7] = y[:, :7].max(axis=1)
    r = classification_report(y, p)
    assert list(r.index) == [*ROW_TYPES, "overall"]
    c1 = r.loc["C1"]
    assert (c1.sensitivity, c1.specificity, c1.accuracy) == pytest.approx((0.5, 2 / 3, 0.6))
    assert c1.auc == pytest.approx(5 / 6)
    assert (c1.n_pos, c1.n_neg) == (2, 3)
    assert np.isnan(r.loc["C2", "auc"]) and np.isnan(r.loc["C2", "sensitivity"])
    assert r.loc["C2", "specificity"] == 1.0
    assert r.loc["C3", "auc"] == 0.5
    assert r.loc["C4", "auc"] == pytest.approx(5.5 / 6)
    ov = r.loc["overall"]
    assert ov.n_pos == int(y[:, :7].sum()) and ov.n_neg == 35 - ov.n_pos
    assert ov.accuracy == pytest.approx(((p[:, :7] >= 0.5) == (y[:, :7] == 1)).mean())
    # the per-column weighted contributions add up to the competition score
    uids = [f"u{i}" for i in range(n)]
    score = score_submission(long_solution({u: list(map(int, r_)) for u, r_ in zip(uids, y)}),
                             subm({u: list(r_) for u, r_ in zip(uids, p)}))
    assert r.loc[list(ROW_TYPES), "weighted_logloss"].sum() == pytest.approx(score, rel=1e-12)
    assert ov.weighted_logloss == pytest.approx(r.loc[list(ROW_TYPES[:7]), "weighted_logloss"].sum())


def random_train(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 7)) < rng.uniform(0.03, 0.2, 7)).astype(int)
    df = pd.DataFrame(y, columns=list(ROW_TYPES[:7]))
    df.insert(0, "patient_overall", y.max(axis=1))
    df.insert(0, "StudyInstanceUID", [f"1.2.826.0.1.3680043.{30000 + i}" for i in range(n)])
    return df


def test_constant_baseline():
    train = random_train(60, 11)
    base = constant_baseline(train)
    sol = solution_from_train(train)
    prev = {k: train[k].mean() for k in ROW_TYPES}
    manual = sol.assign(fractured=[prev[r.rsplit("_", 1)[-1] if not r.endswith("overall") else "patient_overall"]
                                   for r in sol.row_id])
    assert base == pytest.approx(score_submission(sol, manual), rel=1e-12)
    assert constant_baseline(sol) == pytest.approx(base, rel=1e-12)  # long form too
    bad = score_submission(sol, sol.assign(fractured=0.5))
    perfect = score_submission(sol, sol.assign(fractured=sol.fractured.astype(float)))
    assert perfect < 1e-12 < base < bad
