"""``spinestream compare EVAL_A EVAL_B --shards DIR``: is B better than A on the same studies?

Two evaluations (``RUN/eval-f<k>/`` directories that ``spinestream evaluate`` wrote, e.g. round 1
and round 2 on the same held-out fold) are scored study by study with the competition metric
(its per-study weighted log loss, :func:`spinestream.engine.metrics.study_losses`), and the difference of
the means gets a paired bootstrap over studies: a 95% interval and the share of resamples in
which B scores lower. On a fold of ~60-400 studies a difference of a few thousandths is often
inside the noise; this says whether it is.

It says nothing about how each checkpoint was chosen. ``best.pt`` is the lowest loss among a run's
validations on its validation fold, so on that fold it is optimistic, the more so the more often the run
validated (round 2's ``train.val_every_steps``): compare best.pt files on another fold, or compare the
runs' last checkpoints (``spinestream evaluate --checkpoint last --out RUN/eval-f<k>-last``), as the
pipeline's report does for its verdict (:mod:`spinestream.report`).

    spinestream compare runs/round1/eval-f0 runs/round2/eval-f0 --shards shards-512
    spinestream compare A B --shards S --out compare.json --bootstrap 10000
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from spinestream import InputError, MissingInput
from spinestream.shards.fsutil import atomic_write_json
from spinestream.shards.layout import ROW_TYPES, Layout
from spinestream.shards.tables import read_study_table

from .metrics import solution_from_train, study_losses
from .rundir import EvalLayout

__all__ = ["compare_evals", "describe", "eval_study_losses", "main", "paired_bootstrap", "verdict"]


def eval_study_losses(eval_dir: str | Path, shards: str | Path) -> pd.Series:
    """Per-study competition loss of an evaluation's ``submission.csv`` against the shard set's study labels."""
    path = EvalLayout(Path(eval_dir)).submission
    if not path.is_file():
        raise MissingInput(f"{path}: no such file (run `spinestream evaluate --run RUN` first)")
    sub = pd.read_csv(path)
    uids = sub.row_id.str.extract(r"^(.+)_(?:C[1-7]|patient_overall)$")[0]
    if uids.isna().any():
        raise InputError(f"{path}: row_id(s) not of the form <uid>_C1..C7/_patient_overall, e.g. "
                         f"{sub.row_id[uids.isna()].head(3).tolist()}")
    studies = read_study_table(Layout(Path(shards)).studies, columns=["StudyInstanceUID", *ROW_TYPES])
    studies = studies.set_index("StudyInstanceUID")
    unknown = sorted(set(uids) - set(studies.index))
    if unknown:
        raise InputError(f"{path}: {len(unknown)} studies not in {shards}'s study table, e.g. {unknown[:3]} "
                         f"(another shard set?)")
    truth = studies.loc[uids.unique()].reset_index()
    return study_losses(solution_from_train(truth), sub)


def paired_bootstrap(a: pd.Series, b: pd.Series, *, n: int = 2000, seed: int = 0) -> dict:
    """Mean loss of ``a`` and ``b`` (per-study losses on the same studies), their difference ``b - a`` and
    its paired bootstrap over studies: ``ci95`` and ``p_b_lower`` (share of resamples where b is lower)."""
    if set(a.index) != set(b.index):
        raise InputError(f"the two evaluations cover different studies ({len(a)} and {len(b)}, "
                         f"{len(set(a.index) ^ set(b.index))} not in both): compare evaluations of the same fold")
    d = (b - a.loc[b.index]).to_numpy(dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n, len(d)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return {"studies": len(d), "a": float(a.mean()), "b": float(b.mean()), "diff": float(d.mean()),
            "ci95": [float(lo), float(hi)], "p_b_lower": float((means < 0).mean()), "bootstrap": n, "seed": seed}


def compare_evals(eval_a: str | Path, eval_b: str | Path, shards: str | Path, *, n: int = 2000,
                  seed: int = 0) -> dict:
    """:func:`paired_bootstrap` of two evaluation directories, with their paths."""
    out = paired_bootstrap(eval_study_losses(eval_a, shards), eval_study_losses(eval_b, shards), n=n, seed=seed)
    return {"a_dir": str(eval_a), "b_dir": str(eval_b), **out}


def verdict(r: dict, b: str = "B") -> str:
    """``"<b> is lower"`` / ``"<b> is higher"`` when the 95% interval of ``b - a`` excludes 0, else
    ``"within the noise"``."""
    lo, hi = r["ci95"]
    return f"{b} is lower" if hi < 0 else f"{b} is higher" if lo > 0 else "within the noise"


def describe(r: dict, a: str = "A", b: str = "B") -> str:
    """One line: the two losses, the difference and its interval."""
    lo, hi = r["ci95"]
    return (f"{b} {r['b']:.4f} vs {a} {r['a']:.4f} on {r['studies']} studies: {b} - {a} = {r['diff']:+.4f}, "
            f"95% paired bootstrap interval [{lo:+.4f}, {hi:+.4f}] ({b} lower in {r['p_b_lower']:.0%} of "
            f"{r['bootstrap']} resamples): {verdict(r, b)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spinestream compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path, help="the baseline evaluation directory (RUN/eval-f<k>)")
    p.add_argument("b", type=Path, help="the evaluation to compare with it (same fold, same studies)")
    p.add_argument("--shards", type=Path, required=True, help="the shard set whose study table holds the labels")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    r = compare_evals(args.a, args.b, args.shards, n=args.bootstrap, seed=args.seed)
    names = (args.a.resolve().parent.name, args.b.resolve().parent.name)  # RUN/eval-f<k>: the run names
    a, b = names if names[0] != names[1] else (str(args.a), str(args.b))
    print(describe(r, a=a, b=b))
    if args.out:
        atomic_write_json(args.out, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
