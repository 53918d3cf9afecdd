"""``spinestream bench reliability``: every verb killed at random points of its write sequence, and fed a full
disk at its writes, then rerun: does it finish with the clean run's result, losing nothing?

    spinestream bench reliability --trials 20                 # every stage, 20 kill trials each
    python -m spinestream.benchmarks.reliability --trials 3 --stages shard train-torch --diskfull 0

Two suites, on a tiny synthetic dataset (10 studies, 48 px) and a tiny model (``test_resnet``):

**Kills.** Each stage's command runs once cleanly (the reference, its write events counted), then per trial:
its outputs are removed (or, for the verbs that overwrite, left as the reference wrote them), the command
runs with one fault -- SIGKILL to its whole process group before a random *op* (an open for writing, a
rename, an fsync, an unlink, a mkdir), in the middle of a random *write* (a torn write), or after a random
delay -- sometimes a second fault hits the rerun too, then the rerun finishes (``spinestream train --resume
RUN`` once the run has a checkpoint, as the trainer says; the same command for every other verb) within a
timeout. Then: the outputs equal the reference (shards byte-identical; training: the same checkpoints and
``best.pt`` with weights equal to 1e-7, the same ``metrics.jsonl`` records, none repeated; tables with every
slice exactly once), ``best.pt`` is the checkpoint the newest record names as best, no temporary file or
partial directory is left, and no file under its final name was ever torn (checked right after each kill).
Faults are injected by :mod:`spinestream.faultinject` (patched file-system calls in the verb's own process;
verbs are forked from a zygote that imported torch once, so a trial costs the verb's work, not its imports).

**Full disk.** ``OSError(ENOSPC)`` at each write event in turn (every one when a stage has few, else a seeded
sample of ``--diskfull`` of them), with the reference outputs in place: the verb must stop with one line naming
the path (a SpinestreamError, exit 2; shard: never a study recorded as failed), leave every file it had written
before byte-identical, and a rerun once "space is back" must give the reference result.

Figures per stage (trials, faults injected and survived, data lost, the problems seen) go to
``benchmarks/results/reliability.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# --------------------------------------------------------------------------- the zygote


class Zygote:
    """A ``python -m spinestream.faultinject serve`` process: :meth:`run` forks one verb from it and waits for it
    (one at a time). The verb runs in a session of its own, so a kill takes its workers with it."""

    def __init__(self, python: str | None = None):
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        if (Path(root) / "pyproject.toml").is_file():  # a checkout: the zygote imports this tree
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        env.setdefault("WANDB_MODE", "disabled")
        self.proc = subprocess.Popen([python or sys.executable, "-m", "spinestream.faultinject", "serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def run(self, argv: list, *, log: str | os.PathLike, mode: str = "plain", at: str | None = None, seed: int = 0,
            counts: str | os.PathLike | None = None, timeout: float = 600, kill_after: float | None = None,
            cwd: str | os.PathLike | None = None, env: dict | None = None) -> dict:
        """``{"rc", "seconds", "timed_out", "killed_by_timer", "log"}``; rc -9: killed."""
        req = {"argv": [str(a) for a in argv], "log": str(log), "mode": mode, "at": at, "seed": seed,
               "counts": None if counts is None else str(counts), "timeout": timeout, "kill_after": kill_after,
               "cwd": None if cwd is None else str(cwd), "env": env or {}}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fault-injection zygote died (exit {self.proc.poll()})")
        out = json.loads(line)
        out["log"] = Path(log).read_text(errors="replace") if Path(log).is_file() else ""
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    kind: str
    """lost (an output missing or different: data lost), bytes (a checkpoint with the uninterrupted run's entries in
    other bytes), torn (a torn file under its final name after a kill),
    duplicate (a record twice), stray (a temporary file or partial directory left), extra (a file the clean run
    has not), stuck (the rerun ran past its timeout), failed (the rerun failed), error (a full disk reported
    without the path, or as a traceback), misreported (a full disk recorded as bad input)."""
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


LOST_KINDS = ("lost", "failed", "stuck")
TMP_RE = re.compile(r"\.tmp(-\d+)?($|\.)")


def strays(root: Path) -> list[Problem]:
    """Temporary files (``*.tmp-<pid>``, ``*.tmp``), a shard job's ``_work``, a pipeline's ``.trash`` or
    ``superseded`` runs (a kill must never make the pipeline retrain)."""
    out = []
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if TMP_RE.search(p.name):
            out.append(Problem("stray", f"temporary {rel}"))
        elif p.is_dir() and p.name in ("_work", "superseded") or (p.name == ".trash" and any(p.iterdir())):
            out.append(Problem("stray", f"left directory {rel}"))
    return out


def files(root: Path) -> dict[str, Path]:
    if root.is_file():
        return {root.name: root}
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() \
        else {}


def compare_tree(ref: Path, out: Path, special: dict[str, Callable[[Path, Path], list[Problem]]] | None = None,
                 skip: Callable[[str], bool] = lambda rel: False) -> list[Problem]:
    """Every file of ``ref`` in ``out`` with the same bytes (or as ``special[pattern]`` compares it), nothing
    else there but temporary files (reported by :func:`strays`)."""
    special = special or {}
    a, b = files(ref), files(out)
    probs = [Problem("lost", f"{rel} missing") for rel in a if rel not in b and not skip(rel)]
    probs += [Problem("extra", f"{rel} not in the clean run") for rel in b
              if rel not in a and not TMP_RE.search(rel) and not skip(rel) and "/_work/" not in f"/{rel}"]
    for rel in a:
        if rel not in b or skip(rel):
            continue
        fn = next((f for pat, f in special.items() if re.fullmatch(pat, rel)), None)
        if fn is not None:
            probs += fn(a[rel], b[rel])
        elif a[rel].read_bytes() != b[rel].read_bytes():
            probs.append(Problem("lost", f"{rel} differs from the clean run"))
    return probs


def torn_finals(ref: Path, out: Path, finals: Callable[[str], bool]) -> list[Problem]:
    """Right after a kill: each final output present (``finals(rel)``) must be the clean run's bytes (a file is
    written whole under its final name, or not at all; the previous good one stays until then)."""
    a, b = files(ref), files(out)
    return [Problem("torn", f"{rel} under its final name differs from a whole file") for rel in b
            if finals(rel) and rel in a and a[rel].read_bytes() != b[rel].read_bytes()]


# --------------------------------------------------------------------------- shards


def shard_structure(out: Path) -> list[Problem]:
    """Every slice of the slice table in exactly one shard (read from the shards' own indexes)."""
    from spinestream.shards.layout import Layout
    from spinestream.shards.manifest import read_manifest
    from spinestream.shards.tables import read_slice_table
    from spinestream.shards.wds import read_index

    lay = Layout(out)
    if not lay.manifest.is_file():
        return [Problem("lost", "manifest.json missing")]
    m = read_manifest(out)
    ids = read_slice_table(lay.slices, columns=["slice_id"]).slice_id.to_numpy()
    seen: Counter = Counter()
    for s in m.shards:
        for sample in read_index(out / s.index):
            seen.update(int(name.split(".")[0]) for ext, _, _, name in sample if ext == "jpg")
    probs = []
    if list(ids) != list(range(len(ids))):
        probs.append(Problem("lost", "slices.parquet: slice_id is not 0..N-1"))
    twice = sorted(k for k, v in seen.items() if v > 1)
    missing = sorted(set(range(len(ids))) - set(seen))
    if twice:
        probs.append(Problem("duplicate", f"{len(twice)} slices in more than one shard sample (e.g. {twice[:3]})"))
    if missing:
        probs.append(Problem("lost", f"{len(missing)} slices in no shard (e.g. {missing[:3]})"))
    return probs


def shard_finals(rel: str) -> bool:
    return not rel.startswith("_work/") and not TMP_RE.search(rel) and not rel.startswith("volumes.zarr/")


# --------------------------------------------------------------------------- training runs


def _state_problems(rel: str, a: Path, b: Path, tol: float = 1e-7) -> list[Problem]:
    """A checkpoint against the uninterrupted run's: every entry (weights, EMA, optimizer, scheduler, loader
    position, generators, records) equal, tensors to ``tol``."""
    import torch

    try:
        sa = torch.load(a, map_location="cpu", weights_only=True)
        sb = torch.load(b, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn checkpoint
        return [Problem("lost", f"{rel}: cannot be read ({type(e).__name__})")]
    diffs: list[str] = []

    def walk(x, y, path):
        if len(diffs) >= 4:
            return
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                diffs.append(f"{path} {tuple(y.shape)} {y.dtype} (uninterrupted: {tuple(x.shape)} {x.dtype})")
            elif x.numel() and (x.double() - y.double()).abs().max().item() > tol:
                diffs.append(f"{path} by {(x.double() - y.double()).abs().max().item():.3g}")
        elif isinstance(x, dict) and isinstance(y, dict):
            if x.keys() != y.keys():
                diffs.append(f"{path}: keys {sorted(map(str, x.keys() ^ y.keys()))[:3]}")
            for k in x.keys() & y.keys():
                walk(x[k], y[k], f"{path}.{k}")
        elif isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{path}[{i}]")
        elif x != y and not (x != x and y != y):  # (NaN equals NaN here)
            diffs.append(f"{path}: {str(y)[:40]} (uninterrupted: {str(x)[:40]})")

    walk(sa, sb, "")
    return [Problem("lost", f"{rel}: differs from the uninterrupted run's at {d}") for d in diffs]


def _checkpoint_problems(a: Path, b: Path) -> list[Problem]:
    """Byte for byte the uninterrupted run's checkpoint; else every entry compared (:func:`_state_problems`): a
    difference there is data lost, equal entries in other bytes are ``bytes`` (the pipeline fingerprints best.pt)."""
    if a.read_bytes() == b.read_bytes():
        return []
    return _state_problems(b.name, a, b) or [Problem("bytes", f"{b.name}: the uninterrupted run's entries, other bytes")]


def _records(path: Path) -> tuple[list[dict], int]:
    rows, torn = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            torn += 1
    return rows, torn


def _kind(rec: dict) -> str:
    return next((k for k in rec if k not in ("step", "epoch")), "?")


COMPARED = {"loss": ("loss", "lr"), "val": ("val",), "reference": ("reference",)}
"""metrics.jsonl kinds compared with the clean run, and their fields (the rest are clocks)."""


def metrics_problems(a: Path, b: Path) -> list[Problem]:
    """No record twice (a kind at a step), none torn, and the training and validation records of the clean run,
    in its order, with its values (losses to 1e-6)."""
    ref, _ = _records(a)
    got, torn = _records(b)
    probs = [Problem("lost", f"metrics.jsonl: {torn} torn line(s)")] if torn else []
    dup = sorted(k for k, v in Counter((r.get("step"), _kind(r)) for r in got).items() if v > 1)
    if dup:
        probs.append(Problem("duplicate", f"metrics.jsonl: records repeated (step, kind): {dup[:4]}"))

    def key(rows):
        out = []
        for r in rows:
            k = _kind(r)
            if k in COMPARED:
                out.append((r["step"], k, *(r.get(f) for f in COMPARED[k])))
        return out

    ka, kb = key(ref), key(got)
    if [x[:2] for x in ka] != [x[:2] for x in kb]:
        probs.append(Problem("lost", f"metrics.jsonl: records {[x[:2] for x in kb]} where the clean run has "
                                     f"{[x[:2] for x in ka]}"))
    else:
        for x, y in zip(ka, kb):
            if x[1] == "loss" and (abs(x[2] - y[2]) > 1e-6 or x[3] != y[3]):
                probs.append(Problem("lost", f"metrics.jsonl: step {x[0]} loss {y[2]} lr {y[3]} where the clean run "
                                             f"has {x[2]} {x[3]}"))
            elif x[1] == "val" and abs(x[2]["competition_loss"] - y[2]["competition_loss"]) > 1e-6:
                probs.append(Problem("lost", f"metrics.jsonl: step {x[0]} validation differs"))
    return probs


def run_problems(ref: Path, out: Path) -> list[Problem]:
    """A training run against the uninterrupted one (:func:`_state_problems` for every checkpoint and best.pt,
    :func:`metrics_problems`, the other files byte for byte), and best.pt as the newest record names it."""
    import torch

    from spinestream.engine.rundir import CKPT_RE, RunLayout

    lay = RunLayout(out)
    probs = compare_tree(ref, out, {
        CKPT_RE.pattern.strip("^$"): _checkpoint_problems,
        re.escape(lay.best.name): _checkpoint_problems,
        re.escape(lay.metrics.name): metrics_problems,
    })
    ckpts = lay.checkpoints()
    if ckpts and lay.best.is_file():
        try:
            newest = torch.load(ckpts[-1], map_location="cpu", weights_only=True, mmap=True)
            best = torch.load(lay.best, map_location="cpu", weights_only=True, mmap=True)
            if newest["best"]["step"] != best["step"]:
                probs.append(Problem("lost", f"best.pt holds step {best['step']}; the newest record "
                                             f"({ckpts[-1].name}) names step {newest['best']['step']}"))
        except Exception as e:
            probs.append(Problem("lost", f"best.pt or {ckpts[-1].name} cannot be read ({type(e).__name__})"))
    return probs


def run_finals(out: Path) -> list[Problem]:
    """Right after a kill: every checkpoint and best.pt under its final name reads."""
    import torch

    probs = []
    for p in sorted(out.glob("*.pt")):
        try:
            torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            probs.append(Problem("torn", f"{p.name} under its final name cannot be read"))
    return probs


# --------------------------------------------------------------------------- the stages


TRAIN_SETS = ["model.name=test_resnet", "model.pretrained=false", "loader.image_size=32", "loader.batch_size=16",
              "loader.num_threads=1", "loader.augment.p_clahe=0", "train.batch_size=16", "train.epochs=2",
              "train.val_every_epochs=1", "train.checkpoint_every_steps=2", "train.keep_last=2",
              "log.wandb=disabled", "log.every_steps=1", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1",
              "data.val_fold=1", "data.train_cohorts=[boxed]", "data.val_cohorts=[negative]"]
"""A training run of a few steps over two epochs: a checkpoint mid-epoch and at each epoch's end, a validation
per epoch, keep_last deleting older checkpoints, best.pt written when validation improves."""

SHARD_SETS = ["image_size=48", "folds=2", "shard_max_samples=40"]

STAGES = ("shard", "train-torch", "train-torch-accum", "train-dali", "train-dali-accum", "pseudo-label", "evaluate",
          "predict", "run")
CHEAP = ("shard", "pseudo-label", "evaluate", "predict")
"""Stages whose trials take seconds: ``--cheap-factor`` times ``--trials`` each."""
DISKFULL = ("shard", "train-torch", "pseudo-label", "evaluate", "predict")
"""The full-disk suite's stages: a shard and a volume, a checkpoint, a label table, a report and a submission."""


@dataclass
class Stage:
    name: str
    argv: list[str]
    out: Path
    """What the command writes (a directory or a file): removed before a trial."""
    check: Callable[[Path, Path], list[Problem]]
    """(reference copy, output) -> problems."""
    finals: Callable[[Path, Path], list[Problem]] | None = None
    """(reference copy, output) -> torn final outputs, right after a kill."""
    rerun: Callable[[], list[str]] | None = None
    overwrite: bool = False
    """Trials may start with the reference outputs in place (verbs that rewrite their outputs)."""
    diskfull: bool = False


class Workspace:
    """The inputs (a synthetic dataset, its shards, a trained run) and each stage's reference under ``root``."""

    def __init__(self, root: Path, zygote: Zygote, log=print, raw: Path | None = None):
        """``raw``: a dataset to use (10 studies, 1 test study, as :meth:`ensure_raw` makes), read only."""
        self.root, self.z, self.log = Path(root), zygote, log
        self.raw = Path(raw) if raw is not None else self.root / "raw"
        self.refs: dict[str, dict] = {}
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self._n = 0

    def logfile(self, what: str) -> Path:
        self._n += 1
        return self.root / "logs" / f"{self._n:05d}-{what}.log"

    # inputs, built once
    def ensure_raw(self) -> Path:
        if not (self.raw / "SYNTH_COMPLETE").is_file():
            from spinestream.preprocess.synth import make_dataset

            make_dataset(self.raw, studies=10, seed=3, size=64, slices=(32, 40), test_studies=1, force=True)
        return self.raw

    @property
    def shards(self) -> Path:
        return self.reference("shard")["copy"]

    @property
    def model(self) -> Path:
        return self.reference("train-torch")["copy"]

    def stage(self, name: str) -> Stage:
        st = self._stage(name)
        st.diskfull = name in DISKFULL
        return st

    def _stage(self, name: str) -> Stage:
        r = self.root
        if name == "shard":
            out = r / "shard" / "out"
            return Stage(name, ["shard", "--data", self.ensure_raw(), "--out", out, *_sets(SHARD_SETS), "--workers",
                                "2", "--no-progress"], out,
                         check=lambda ref, o: compare_tree(ref, o) + shard_structure(o),
                         finals=lambda ref, o: torn_finals(ref, o, shard_finals))
        if name.startswith("train-"):
            from spinestream.engine.rundir import RunLayout

            backend = name.split("-")[1]
            accum = ["optim.grad_accum=2"] if name.endswith("-accum") else []
            base = r / name
            run_dir = base / "t"
            argv = ["train", *_sets([f"data.root={self.shards}", f"out_dir={base}", "name=t",
                                     f"loader.backend={backend}", *TRAIN_SETS, *accum]), "--no-progress"]
            return Stage(name, argv, run_dir, check=run_problems, finals=lambda ref, o: run_finals(o),
                         rerun=lambda: (["train", "--resume", str(run_dir), "--no-progress"]
                                        if RunLayout(run_dir).checkpoints() else argv), overwrite=False)
        if name == "pseudo-label":
            out = r / "pseudo" / "pseudo-t.parquet"
            argv = ["pseudo-label", "--run", self.model, "--out", out, "--device", "cpu", "--no-progress"]
            return Stage(name, argv, out.parent, check=pseudo_problems,
                         finals=lambda ref, o: torn_finals(ref, o, lambda rel: True), overwrite=True)
        if name == "evaluate":
            out = r / "evaluate" / "eval"
            argv = ["evaluate", "--run", self.model, "--out", out, "--device", "cpu", "--no-progress"]
            return Stage(name, argv, out, check=evaluate_problems,
                         finals=lambda ref, o: torn_finals(ref, o, lambda rel: True), overwrite=True)
        if name == "predict":
            out = r / "predict" / "submission.csv"
            raw = self.ensure_raw()
            argv = ["predict", "--run", self.model, "--images", raw / "test_images", "--sample-submission",
                    raw / "sample_submission.csv", "--out", out, "--workers", "2", "--device", "cpu", "--no-progress"]
            return Stage(name, argv, out.parent, check=predict_problems,
                         finals=lambda ref, o: torn_finals(ref, o, lambda rel: True), overwrite=True)
        if name == "run":
            out = r / "smoke"
            return Stage(name, ["run", "-c", "smoke", "--out", out, "--set", "workers=2", "--no-progress"], out,
                         check=pipeline_problems)
        raise ValueError(f"unknown stage {name!r} (stages: {' '.join(STAGES)})")

    def reference(self, name: str) -> dict:
        """The stage's clean run: its outputs copied to ``root/ref/<stage>``, its seconds and write events."""
        if name in self.refs:
            return self.refs[name]
        st = self.stage(name)
        _remove(st.out)
        counts = self.root / "logs" / f"count-{name}.json"
        res = self.z.run(st.argv, log=self.logfile(f"ref-{name}"), mode="count", counts=counts, timeout=900)
        if res["rc"] != 0:
            raise RuntimeError(f"the clean run of {name} failed (exit {res['rc']}):\n{res['log'][-3000:]}")
        copy = self.root / "ref" / name / st.out.name
        _remove(copy)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(st.out, copy, symlinks=True)
        ev = json.loads(counts.read_text())
        self.refs[name] = {"copy": copy, "seconds": res["seconds"], "ops": ev["ops"], "writes": ev["writes"]}
        self.log(f"reference {name}: {res['seconds']:.1f}s, {ev['ops']} ops, {ev['writes']} writes")
        return self.refs[name]


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def pseudo_problems(ref: Path, out: Path) -> list[Problem]:
    import pandas as pd

    probs = compare_tree(ref, out)
    table = out / "pseudo-t.parquet"
    if table.is_file():
        ids = pd.read_parquet(table, columns=["slice_id"]).slice_id
        want = pd.read_parquet(ref / "pseudo-t.parquet", columns=["slice_id"]).slice_id
        if ids.duplicated().any():
            probs.append(Problem("duplicate", "pseudo-label table: a slice twice"))
        if set(ids) != set(want):
            probs.append(Problem("lost", f"pseudo-label table: {len(set(want) - set(ids))} slices missing"))
    return probs


def evaluate_problems(ref: Path, out: Path) -> list[Problem]:
    import pandas as pd

    from spinestream.engine.rundir import EvalLayout

    probs = compare_tree(ref, out)
    sp = EvalLayout(out).slice_probs
    if sp.is_file():
        df = pd.read_parquet(sp, columns=["StudyInstanceUID", "index"])
        want = pd.read_parquet(EvalLayout(ref).slice_probs, columns=["StudyInstanceUID", "index"])
        if df.duplicated().any():
            probs.append(Problem("duplicate", "slice_probs.parquet: a slice twice"))
        if len(df.drop_duplicates()) != len(want):
            probs.append(Problem("lost", f"slice_probs.parquet: {len(df.drop_duplicates())} slices of {len(want)}"))
    return probs


def predict_problems(ref: Path, out: Path) -> list[Problem]:
    import pandas as pd

    probs = compare_tree(ref, out)
    sub = out / "submission.csv"
    if sub.is_file() and pd.read_csv(sub).row_id.duplicated().any():
        probs.append(Problem("duplicate", "submission.csv: a row twice"))
    return probs


def pipeline_problems(ref: Path, out: Path) -> list[Problem]:
    """The smoke pipeline: dataset and shards byte for byte, round 1 as :func:`run_problems`, the submission
    byte for byte, every stage recorded complete; the report's clocks are not compared."""
    probs = compare_tree(ref / "raw", out / "raw")
    probs += compare_tree(ref / "shards", out / "shards") + shard_structure(out / "shards")
    probs += run_problems(ref / "runs" / "round1", out / "runs" / "round1")
    probs += compare_tree(ref / "submission.csv", out / "submission.csv")
    probs += compare_tree(ref / "stages", out / "stages", {r".*\.json": _stage_complete},
                          skip=lambda rel: rel.startswith(".trash"))
    for rel in ("report.md", "report.json"):
        if not (out / rel).is_file():
            probs.append(Problem("lost", f"{rel} missing"))
    others = {p.name for p in out.iterdir()} - {p.name for p in ref.iterdir()} if out.is_dir() else set()
    probs += [Problem("extra", f"{n} not in the clean run") for n in sorted(others) if not TMP_RE.search(n)]
    return probs


def _stage_complete(a: Path, b: Path) -> list[Problem]:
    try:
        rec = json.loads(b.read_text())
    except ValueError:
        return [Problem("lost", f"stages/{b.name} cannot be read")]
    ra = json.loads(a.read_text())
    probs = [] if rec.get("state") == "complete" else [Problem("lost", f"stages/{b.name}: {rec.get('state')}")]
    if "records" in (ra.get("inputs") or {}):  # the report's inputs: the other records' hashes (with their clocks)
        return probs
    if rec.get("inputs") != ra.get("inputs"):
        probs.append(Problem("lost", f"stages/{b.name}: other inputs than the clean run's"))
    return probs


# --------------------------------------------------------------------------- the kill suite


@dataclass
class Trial:
    stage: str
    index: int
    faults: list[dict] = field(default_factory=list)
    """Each fault: how it was placed (mode, at / after) and what the log says it hit."""
    injected: int = 0
    overwrite: bool = False
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"stage": self.stage, "trial": self.index, "faults": self.faults, "injected": self.injected,
                "overwrite": self.overwrite, "problems": [str(p) for p in self.problems],
                "seconds": round(self.seconds, 2)}


def _fault_line(log: str) -> str:
    """What the injector says it did ('' when the point it was given could not fail: "no fault: ...")."""
    found = [ln.strip()[len("faultinject: "):] for ln in log.splitlines() if ln.strip().startswith("faultinject:")]
    return found[-1] if found and not found[-1].startswith("no fault") else ""


WEIGHTS = {"run": (2, 1, 2)}
"""How each stage's faults are placed: (before an op, in a write, after a delay); default (5, 3, 2). The pipeline's
ops and writes are mostly the synthetic dataset's DICOM files: its faults go by time more often."""


PIPELINE_POINTS = ("op:replace:raw/SYNTH_COMPLETE", "op:unlink:samples.bin:{k}", "op:replace:shards/manifest.json",
                   "op:open:stages/round1.yaml.tmp", "op:open:round1/ckpt-000000002.pt.tmp",
                   "op:replace:round1/ckpt-000000004.pt", "op:open:round1/best.pt.tmp", "write:round1/metrics.jsonl:{k}",
                   "op:open:round1/curves.png.tmp", "op:replace:stages/round1.json", "op:replace:submission.csv",
                   "op:replace:stages/predict.json", "op:replace:report.md")
"""Named points across the smoke pipeline's stages (``{k}``: 1 to 6): its random ops are mostly the synthetic
DICOM files and its rerun skips what is done, so half its faults go to one of these (round 1 and after)."""


def _place(rng: random.Random, ref: dict, stage: str = "") -> dict:
    """A fault: SIGKILL before a random op, in a random write (torn), or after a random delay; for the pipeline,
    half the time at one of :data:`PIPELINE_POINTS`."""
    if stage == "run" and rng.random() < 0.5:
        return {"mode": "kill", "at": rng.choice(PIPELINE_POINTS).format(k=rng.randint(1, 6))}
    mode = rng.choices(["kill-op", "tear", "time"], weights=WEIGHTS.get(stage, (5, 3, 2)))[0]
    if mode == "kill-op":
        return {"mode": "kill", "at": f"ops:{rng.randint(1, ref['ops'])}"}
    if mode == "tear":
        return {"mode": "tear", "at": f"writes:{rng.randint(1, max(1, ref['writes']))}", "seed": rng.randrange(1 << 30)}
    return {"mode": "plain", "kill_after": round(rng.uniform(0.05, ref["seconds"]), 3)}


def kill_trial(ws: Workspace, name: str, index: int, rng: random.Random) -> Trial:
    """One trial (module doc): outputs removed (or the reference's in place), one fault, sometimes a second in the
    rerun, the rerun to the end, the checks."""
    st, ref = ws.stage(name), ws.reference(name)
    t = Trial(name, index, overwrite=st.overwrite and rng.random() < 0.5)
    t0 = time.perf_counter()
    _remove(st.out)
    if t.overwrite:
        shutil.copytree(ref["copy"], st.out, symlinks=True)
    timeout = max(120.0, 6 * ref["seconds"])
    faults = 2 if rng.random() < 0.25 else 1
    argv = st.argv
    for k in range(faults):
        f = _place(rng, ref, name)
        res = ws.z.run(argv, log=ws.logfile(f"{name}-{index}-fault{k}"), timeout=timeout,
                       **{k2: v for k2, v in f.items()})
        hit = res["rc"] == -9
        f["rc"], f["hit"] = res["rc"], _fault_line(res["log"]) if not res["killed_by_timer"] else \
            f"SIGKILL after {f['kill_after']}s"
        t.faults.append(f)
        if hit:
            t.injected += 1
            if st.finals is not None:
                t.problems += st.finals(ref["copy"], st.out)
        elif res["rc"] != 0:
            t.problems.append(Problem("failed", f"run {k + 1} exited {res['rc']}: {_tail(res['log'])}"))
        argv = st.rerun() if st.rerun else st.argv
    res = ws.z.run(argv, log=ws.logfile(f"{name}-{index}-rerun"), timeout=timeout)
    if res["timed_out"]:
        t.problems.append(Problem("stuck", f"the rerun ran past {timeout:.0f}s"))
    elif res["rc"] != 0:
        t.problems.append(Problem("failed", f"the rerun exited {res['rc']}: {_tail(res['log'])}"))
    t.problems += st.check(ref["copy"], st.out) + strays(st.out if st.out.is_dir() else st.out.parent)
    _keep_failed(ws, st, t)
    t.seconds = time.perf_counter() - t0
    return t


def _keep_failed(ws: Workspace, st: Stage, t: Trial) -> None:
    """A failed trial's outputs, copied to ``root/failed/<stage>-<trial>`` for a look (the next trial reuses them)."""
    if t.problems and st.out.exists():
        dest = ws.root / "failed" / f"{t.stage}-{t.index}-{t.faults[0].get('mode')}"
        _remove(dest)
        shutil.copytree(st.out if st.out.is_dir() else st.out.parent, dest, symlinks=True)


def _tail(log: str, n: int = 3) -> str:
    lines = [ln for ln in log.splitlines() if ln.strip() and "faultinject" not in ln]
    return " | ".join(lines[-n:])[-600:]


# --------------------------------------------------------------------------- the full-disk suite


ONE_LINE = re.compile(r"^spinestream [\w-]+: .+", re.M)


def diskfull_trial(ws: Workspace, name: str, at: str) -> Trial:
    """ENOSPC at ``at`` with the reference outputs in place (a first run's for shard and train): the verb stops
    with one line naming a path, what was there before is intact, and a rerun gives the reference result."""
    st, ref = ws.stage(name), ws.reference(name)
    t = Trial(name, 0, overwrite=st.overwrite)
    t0 = time.perf_counter()
    _remove(st.out)
    if st.overwrite:
        shutil.copytree(ref["copy"], st.out, symlinks=True)
    res = ws.z.run(st.argv, log=ws.logfile(f"{name}-enospc-{at.replace(':', '')}"), mode="enospc", at=at,
                   timeout=max(120.0, 6 * ref["seconds"]))
    hit = _fault_line(res["log"])
    t.faults.append({"mode": "enospc", "at": at, "rc": res["rc"], "hit": hit})
    if hit:
        t.injected = 1
        t.problems += _enospc_report(res, hit)
        if st.finals is not None:
            t.problems += st.finals(ref["copy"], st.out)
    if hit or res["rc"] != 0:
        rerun = ws.z.run(st.rerun() if st.rerun else st.argv, log=ws.logfile(f"{name}-enospc-rerun"),
                         timeout=max(120.0, 6 * ref["seconds"]))
        if rerun["rc"] != 0:
            t.problems.append(Problem("failed", f"the rerun exited {rerun['rc']}: {_tail(rerun['log'])}"))
    t.problems += st.check(ref["copy"], st.out) + strays(st.out if st.out.is_dir() else st.out.parent)
    t.seconds = time.perf_counter() - t0
    return t


def _enospc_report(res: dict, hit: str) -> list[Problem]:
    """Exit 2 with one ``spinestream <verb>: ...`` line naming a path and the cause, no traceback."""
    log = res["log"]
    if res["rc"] == 0:
        return [Problem("misreported", f"a full disk ({hit}) and the verb exited 0: {_tail(log)}")]
    if "Traceback" in log:
        return [Problem("error", f"a full disk ({hit}) gave a traceback: {_tail(log, 2)}")]
    lines = ONE_LINE.findall(log)
    if res["rc"] != 2 or not lines:
        return [Problem("error", f"a full disk ({hit}) exited {res['rc']} without one error line: {_tail(log)}")]
    line = lines[-1]
    if "No space left on device" not in line or "/" not in line:
        return [Problem("error", f"the error line does not name the path and the cause: {line}")]
    return []


def diskfull_points(ref: dict, n: int, rng: random.Random) -> list[str]:
    """Every op and write event when there are at most ``n`` of them, else a seeded sample of ``n``: half ops,
    half writes, each sample spread evenly over its sequence."""
    out = []
    for seq, share in (("ops", (n + 1) // 2), ("writes", n // 2)):
        total = ref[seq]
        if total <= share:
            out += [f"{seq}:{i}" for i in range(1, total + 1)]
        else:
            step = total / share
            out += [f"{seq}:{1 + int(i * step + rng.uniform(0, step))}" for i in range(share)]
    return out


# --------------------------------------------------------------------------- figures


def summarize(trials: list[Trial]) -> dict:
    by: dict[str, dict] = {}
    for t in trials:
        s = by.setdefault(t.stage, {"trials": 0, "faults_injected": 0, "faults_survived": 0, "trials_passed": 0,
                                    "data_lost": 0, "problems": Counter(), "faults_by_mode": Counter(),
                                    "seconds": 0.0})
        s["trials"] += 1
        s["faults_injected"] += t.injected
        s["seconds"] += t.seconds
        for f in t.faults:
            s["faults_by_mode"][f.get("mode") if f.get("kill_after") is None else "time"] += 1
        ok = not t.problems
        s["trials_passed"] += ok
        s["faults_survived"] += t.injected if ok else 0
        s["data_lost"] += any(p.kind in LOST_KINDS for p in t.problems)
        s["problems"].update(p.kind for p in t.problems)
    for s in by.values():
        s["problems"], s["faults_by_mode"] = dict(s["problems"]), dict(s["faults_by_mode"])
        s["seconds"] = round(s["seconds"], 1)
    return by


def markdown(result: dict) -> str:
    """The figures of a :func:`main` result as two markdown tables (kills, full disk), totals last."""
    out = []
    for suite, title in (("kills", "Kills (SIGKILL before an op, in a write, after a delay), then the rerun"),
                         ("diskfull", "Full disk (ENOSPC at a write), then the rerun once space is back")):
        per = result[suite]["per_stage"]
        if not per:
            continue
        out += [f"**{title}**", "",
                "| stage | trials | faults injected | faults survived | trials passed | data lost | problems |",
                "|---|---:|---:|---:|---:|---:|---|"]
        tot = Counter()
        for name, s in per.items():
            probs = ", ".join(f"{k} {v}" for k, v in sorted(s["problems"].items())) or "none"
            out.append(f"| {name} | {s['trials']} | {s['faults_injected']} | {s['faults_survived']} | "
                       f"{s['trials_passed']} | {s['data_lost']} | {probs} |")
            tot.update({k: s[k] for k in ("trials", "faults_injected", "faults_survived", "trials_passed",
                                          "data_lost")})
        out.append(f"| **all** | {tot['trials']} | {tot['faults_injected']} | {tot['faults_survived']} | "
                   f"{tot['trials_passed']} | {tot['data_lost']} | |")
        out.append("")
    return "\n".join(out)


def machine() -> dict:
    import torch

    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError):
        pass
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "memory_gb": mem, "torch": torch.__version__, "gpu": torch.cuda.is_available()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spinestream bench reliability", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10, help="kill trials per stage (training stages and run)")
    p.add_argument("--cheap-factor", type=int, default=3,
                   help=f"kill trials of the quick stages ({', '.join(CHEAP)}): this many times --trials")
    p.add_argument("--run-factor", type=int, default=2, help="kill trials of the pipeline: this many times --trials")
    p.add_argument("--diskfull", type=int, default=12,
                   help=f"full-disk points per stage of {', '.join(DISKFULL)} (0: skip the suite)")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=None, help="workspace (default: a temporary directory, removed)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/reliability.json"))
    args = p.parse_args(argv)
    if "dali" in " ".join(args.stages):
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            args.stages = [s for s in args.stages if "dali" not in s]
            print("reliability: nvidia-dali is not installed: the train-dali stages are left out", file=sys.stderr)
    work = args.work or Path(tempfile.mkdtemp(prefix="spinestream-reliability-"))
    t_start = time.perf_counter()
    kills: list[Trial] = []
    full: list[Trial] = []
    refs = {}
    try:
        with Zygote() as z:
            ws = Workspace(work, z, log=lambda s: print(f"reliability: {s}", flush=True))
            for name in args.stages:
                rng = random.Random(f"{args.seed}-{name}")
                ref = ws.reference(name)
                refs[name] = {k: ref[k] for k in ("seconds", "ops", "writes")}
                factor = args.cheap_factor if name in CHEAP else args.run_factor if name == "run" else 1
                for i in range(args.trials * factor):
                    t = kill_trial(ws, name, i, rng)
                    kills.append(t)
                    _say_trial(t)
                if args.diskfull and ws.stage(name).diskfull:
                    for at in diskfull_points(ref, args.diskfull, rng):
                        t = diskfull_trial(ws, name, at)
                        full.append(t)
                        _say_trial(t)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "command": "python -m spinestream.benchmarks.reliability " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed, "machine": machine(), "seconds": round(time.perf_counter() - t_start, 1),
        "references": refs,
        "kills": {"per_stage": summarize(kills), "trials": [t.to_json() for t in kills]},
        "diskfull": {"per_stage": summarize(full), "trials": [t.to_json() for t in full]},
    }
    from spinestream.shards.fsutil import atomic_write_json

    atomic_write_json(args.out, result)
    print("\n" + markdown(result))
    print(f"-> {args.out}")
    bad = sum(bool(t.problems) for t in kills + full)
    return 1 if bad else 0


def _say_trial(t: Trial) -> None:
    hits = "; ".join(f.get("hit") or f"(no fault: exit {f.get('rc')})" for f in t.faults)
    verdict = "ok" if not t.problems else "PROBLEMS: " + " / ".join(map(str, t.problems[:4]))
    print(f"  {t.stage} #{t.index}{' (over the reference)' if t.overwrite else ''}: {hits} -> {verdict} "
          f"[{t.seconds:.1f}s]", flush=True)


if __name__ == "__main__":
    sys.exit(main())
