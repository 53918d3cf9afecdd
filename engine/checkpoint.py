"""Checkpoints of a run directory (its layout and records: :mod:`spinestream.engine.rundir`).

Checkpoints are written to a temporary file, fsynced, renamed, and the directory fsynced
(a crash leaves the old file or the new one, never half of one, also after a power cut), and
read with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only.

Guarantees (tested in tests/test_checkpoint.py): :func:`latest` returns the newest checkpoint
that can be read, with a warning naming every newer one that cannot; :func:`save_step` keeps
the newest ``keep_last`` *readable* checkpoints (an unreadable newest file never costs an older
good one); :func:`clean_stale` removes the ``*.tmp-*`` files a killed save left;
:func:`spinestream.engine.rundir.truncate_metrics` drops the log lines past the step a resumed run continues from;
:func:`sync_best` makes ``best.pt`` the checkpoint the newest record names as best after a kill
between the two writes (the trainer writes the step checkpoint first).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch

from spinestream.shards.fsutil import fsync_dir, remove_stale_tmp, writing

# the run directory's names, for the callers that know them from here
from .rundir import BEST, RunError, RunLayout, check_run_dir, mark_run, truncate_metrics  # noqa: F401



def save(path: Path, state: dict) -> None:
    """Write ``state`` atomically: temporary file, fsync, rename, fsync of the directory. A failed write
    leaves ``path`` as it was and no temporary file; a full disk is a WriteError naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path):
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # the rename itself is durable only once the directory is


def readable(path: Path) -> bool:
    """Whether ``path`` opens as a checkpoint (zip directory and pickle read; tensors mapped, not loaded)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # truncated, zeroed, foreign: anything torch.load rejects
        return False
    return True


def load(path: Path, map_location="cpu") -> dict:
    """A checkpoint a spinestream run wrote, read with ``weights_only=True`` (no code in it ever runs).

    Raises RunError, one line: the file is missing, truncated or not a torch file, holds Python objects
    beyond plain data (a pickle from another program), or is a torch file of another kind (a bare state
    dict, another project's checkpoint: no ``step``)."""
    import pickle

    if not Path(path).is_file():
        raise RunError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message runs to a dozen lines: one is enough here
        raise RunError(f"{path}: not a spinestream checkpoint: it holds Python objects beyond tensors, numbers, "
                       f"strings, lists and dicts (a pickle from another program; spinestream never runs a "
                       f"checkpoint's code): pass a checkpoint a spinestream run wrote") from e
    except Exception as e:  # a truncated or foreign file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RunError(f"{path}: cannot be read as a spinestream checkpoint (truncated, or not a torch file: "
                       f"{first})") from e
    if not isinstance(state, dict) or "step" not in state:
        what = f"a dict with keys {sorted(map(str, state))[:4]}" if isinstance(state, dict) else type(state).__name__
        raise RunError(f"{path}: a torch file, but not a spinestream checkpoint ({what}; no 'step'): pass "
                       f"a checkpoint a spinestream run wrote (<run>/best.pt or ckpt-*.pt)")
    return state


def checkpoints(run_dir: Path) -> list[Path]:
    """Step checkpoints, oldest first; none when ``run_dir`` does not exist."""
    return RunLayout(run_dir).checkpoints()


def latest(run_dir: Path) -> Path:
    """The newest readable step checkpoint; every newer unreadable one is named in a warning."""
    found = checkpoints(run_dir)
    if not found:
        raise RunError(f"{run_dir} has no step checkpoint to resume from")
    for path in reversed(found):
        if readable(path):
            return path
        print(f"spinestream: warning: {path} cannot be read (truncated or corrupt); trying an older checkpoint",
              file=sys.stderr)
    raise RunError(f"{run_dir}: none of its {len(found)} checkpoints can be read "
                   f"({', '.join(p.name for p in found)}); start a new run")


def save_step(run_dir: Path, step: int, state: dict, keep_last: int) -> Path:
    """Save ``ckpt-<step>.pt`` and delete what is older than the newest ``keep_last`` readable ones."""
    lay = RunLayout(run_dir)
    path = lay.checkpoint(step)
    save(path, state)
    good = 0
    for old in reversed(lay.checkpoints()):
        if good >= keep_last:
            old.unlink(missing_ok=True)
        elif readable(old):
            good += 1
        # an unreadable file newer than the keep_last-th good one stays (latest() skips it, naming it)
    return path


def _steps(path: Path) -> tuple[int, int] | None:
    """(step, best step) of a checkpoint, reading no tensor data; None when it cannot be read."""
    try:
        s = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(s["step"]), int((s.get("best") or {}).get("step", -1))
    except Exception:  # truncated, foreign, missing: as readable() does
        return None


def sync_best(run_dir: Path) -> bool:
    """Repair ``best.pt`` after a kill between a step checkpoint and ``best.pt``: when the newest readable
    checkpoint's record says it is the best and ``best.pt`` is missing or holds another step, copy it there
    (atomically). True when it repaired; a note goes to stderr."""
    lay = RunLayout(run_dir)
    found = ((p, _steps(p)) for p in reversed(lay.checkpoints()))
    newest, steps = next(((p, s) for p, s in found if s is not None), (None, None))  # the newest readable one
    if steps is None or steps[0] != steps[1]:
        return False
    best = lay.best
    held = _steps(best) if best.is_file() else None
    if held is not None and held[0] >= steps[0]:  # (a newer best.pt, when the newest checkpoint is unreadable)
        return False
    tmp = best.with_name(f"{best.name}.tmp-{os.getpid()}")
    try:
        with writing(best):
            shutil.copyfile(newest, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, best)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(lay.root)
    print(f"spinestream: {best} did not hold the best checkpoint its record names (step {steps[0]}; interrupted "
          f"between the two writes); restored it from {newest.name}", file=sys.stderr)
    return True


def clean_stale(run_dir: Path) -> list[Path]:
    """Remove ``*.tmp-<pid>`` files a killed save left in the run directory and its ``oversample/`` indexes
    (one trainer per run)."""
    return [p for d in (Path(run_dir), Path(run_dir) / "oversample") for p in remove_stale_tmp(d)]
