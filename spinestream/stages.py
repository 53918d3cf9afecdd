"""The stage runner of ``spinestream run``: skip what is done, resume what was interrupted, redo what changed.

A :class:`Stage` is a name, a ``run`` callable, an ``inputs`` callable and the paths it writes. Before a
stage runs, ``DIR/stages/<name>.json`` is written (atomically) with ``"state": "running"`` and its inputs;
after it returns, the same file with ``"state": "complete"``, the seconds it took and the fingerprints of
its outputs. ``inputs()`` is evaluated when the stage's turn comes, after the stages before it ran, so it
can fingerprint what they wrote. Then, in order:

* complete, same inputs, outputs present, nothing before it (re)ran, not ``--from`` it: **skipped**;
* ``running`` with the same inputs (an interrupted attempt), or no record: **resumed** / **run**, with its
  outputs kept: every verb resumes (shard skips committed studies, training continues from its last
  checkpoint);
* anything else (inputs changed, ``--from``, a stage before it ran, outputs missing): **redone**: its
  outputs are moved into ``DIR/stages/.trash`` (one rename each, so a kill leaves either the old output or
  none) and deleted, then it runs from scratch.

Once a stage is not skipped, every stage after it is redone: they consumed what it rewrote.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shards.fsutil import atomic_write_json, sha256_file

RECORD_FORMAT = "spinestream-stage"


class StageError(RuntimeError):
    """A stage's verb failed (its exit status and name are in the message)."""


@dataclass
class Stage:
    """One step of the pipeline. ``run()`` raises :class:`StageError` (or anything) on failure; ``inputs()``
    returns a JSON-able dict of everything that decides its outputs (resolved config and arguments,
    fingerprints of the upstream outputs it reads)."""

    name: str
    run: Callable[[], None]
    inputs: Callable[[], dict]
    outputs: Sequence[Path] = ()
    """Files or directories the stage writes: removed before a redo; all must exist for a skip."""
    required: Sequence[Path] = ()
    """Outputs that must exist after a skip is allowed (default: all of ``outputs``)."""


@dataclass
class StageResult:
    name: str
    status: str  # skipped | run | resumed | redone
    seconds: float
    reason: str = ""
    record: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- fingerprints


def fingerprint(path: str | Path) -> dict | None:
    """``{"sha256", "size"}`` of a file, None when it does not exist. Every fingerprinted file is small or
    written once by an atomic rename (manifest, tables, best.pt, config), so its hash is both cheap enough
    (best.pt of tf_efficientnetv2_s: ~0.3 s) and exact, where size + mtime would miss a same-size rewrite
    and flag a mere copy."""
    p = Path(path)
    if not p.is_file():
        return None
    return {"sha256": sha256_file(p), "size": p.stat().st_size}


def canonical(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples as lists, paths as strings): what inputs are compared as."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


# --------------------------------------------------------------------------- records


def record_path(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / f"{name}.json"


def read_record(state_dir: Path, name: str) -> dict | None:
    """The stage's record, or None when there is none or it cannot be read (then the stage reruns)."""
    path = record_path(state_dir, name)
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        print(f"spinestream run: warning: {path} is unreadable; stage {name} runs again", file=sys.stderr)
        return None
    return rec if isinstance(rec, dict) and rec.get("format") == RECORD_FORMAT else None


def _write_record(state_dir: Path, name: str, state: str, inputs: dict, **extra: Any) -> dict:
    rec = {"format": RECORD_FORMAT, "stage": name, "state": state, "inputs": inputs, **extra}
    atomic_write_json(record_path(state_dir, name), rec)
    return rec


# --------------------------------------------------------------------------- removing outputs


def remove_outputs(paths: Sequence[Path], root: Path, trash: Path) -> None:
    """Delete a stage's outputs, refusing anything outside ``root`` (the pipeline's directory) or ``root``
    itself. Each path is first renamed into ``trash`` (atomic, same file system), then deleted."""
    root = Path(root).resolve()
    for p in paths:
        p = Path(p)
        if not (p.exists() or p.is_symlink()):
            continue
        real = p.resolve() if not p.is_symlink() else p.parent.resolve() / p.name
        if real == root or root not in real.parents:
            raise ValueError(f"refusing to delete {p}: not inside the pipeline directory {root}")
        trash.mkdir(parents=True, exist_ok=True)
        dest = trash / f"{p.name}.{os.getpid()}.{time.monotonic_ns()}"
        os.replace(p, dest)
        _delete(dest)


def _delete(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def empty_trash(trash: Path) -> None:
    """Finish deletions a kill interrupted."""
    if trash.is_dir():
        for p in trash.iterdir():
            _delete(p)


# --------------------------------------------------------------------------- the runner


def check_stage(names: Sequence[str], name: str | None, what: str = "--from") -> None:
    """ValueError naming the stages when ``name`` is not one of them."""
    if name is not None and name not in names:
        raise ValueError(f"{what} {name!r}: not a stage of this pipeline; its stages, in order: {' '.join(names)}")


def decide(stage: Stage, rec: dict | None, inputs: dict, *, forced: str) -> tuple[str, str]:
    """(status, reason) for a stage given its record, its current inputs and why it must be redone
    ('' when nothing upstream forces it)."""
    required = stage.required or stage.outputs
    missing = [str(p) for p in required if not Path(p).exists()]
    if forced:
        return ("redone", forced) if rec or any(Path(p).exists() for p in stage.outputs) else ("run", "")
    if rec is None:
        return ("resumed", "outputs of an unrecorded attempt kept") if any(
            Path(p).exists() for p in stage.outputs) else ("run", "")
    if rec.get("inputs") != inputs:
        return "redone", f"inputs changed ({changed_keys(rec.get('inputs') or {}, inputs)})"
    if rec.get("state") == "complete":
        return ("skipped", "") if not missing else ("redone", f"output missing: {missing[0]}")
    return "resumed", "interrupted"


def changed_keys(old: dict, new: dict, prefix: str = "") -> str:
    """The dotted keys whose values differ between two input dicts (a few of them)."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = changed_keys(a, b, f"{prefix}{k}.")
            keys += [sub] if sub else []
        elif a != b:
            keys.append(f"{prefix}{k}")
    return ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")


def run_stages(stages: Sequence[Stage], state_dir: Path, root: Path, *, from_stage: str | None = None,
               log: Callable[[str], None] = print) -> list[StageResult]:
    """Run ``stages`` in order (see the module docstring); one status line per stage goes to ``log``.
    Returns what happened to each; a failing stage raises (its record stays ``running``)."""
    names = [s.name for s in stages]
    check_stage(names, from_stage)
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    trash = state_dir / ".trash"
    empty_trash(trash)
    results: list[StageResult] = []
    forced = ""
    for stage in stages:
        if stage.name == from_stage:
            forced = f"--from {from_stage}"
        inputs = canonical(stage.inputs())
        rec = read_record(state_dir, stage.name)
        status, reason = decide(stage, rec, inputs, forced=forced)
        if status == "skipped":
            results.append(StageResult(stage.name, status, 0.0, record=rec))
            log(f"[{stage.name:<9}] skipped (complete, same inputs; took {rec.get('seconds', 0):.1f}s)")
            continue
        if status == "redone":
            remove_outputs(stage.outputs, root, trash)
        log(f"[{stage.name:<9}] {status}" + (f" ({reason})" if reason else "") + " ...")
        t0 = time.perf_counter()
        _write_record(state_dir, stage.name, "running", inputs, status=status)
        stage.run()
        seconds = time.perf_counter() - t0
        rec = _write_record(state_dir, stage.name, "complete", inputs, status=status, seconds=round(seconds, 3),
                            finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            outputs={str(p): fingerprint(p) for p in stage.outputs if Path(p).is_file()})
        results.append(StageResult(stage.name, status, seconds, reason, rec))
        log(f"[{stage.name:<9}] {status}: done in {seconds:.1f}s")
        forced = forced or f"{stage.name} ran"
    return results
