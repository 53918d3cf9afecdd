"""The stage runner of ``spinestream run``: skip what is done, resume what was interrupted, redo what changed.

A :class:`Stage` is a name, a ``run`` callable, an ``inputs`` callable and the paths it writes. Before a
stage runs, ``DIR/stages/<name>.json`` is written (atomically) with ``"state": "running"`` and its inputs;
after it returns, the same file with ``"state": "complete"``, the seconds it took and the fingerprints of
its outputs. ``inputs()`` is evaluated when the stage's turn comes, after the stages before it ran, so it
can fingerprint what they wrote. Then, in order:

* complete, same inputs, outputs present, nothing before it (re)ran, not ``--from`` it: **skipped**;
* ``running`` with the same inputs (an interrupted attempt), or no record: **resumed** / **run**, with its
  outputs kept: every verb resumes (shard skips committed studies, training continues from its last
  checkpoint). A stage with a ``check_resume`` (training: the run directory's ``config.yaml`` must be the
  config the stage would train with) is redone instead when that check names a reason: a run made by
  another config is never continued under this one;
* anything else (inputs changed, ``--from``, a stage before it ran, outputs missing): **redone**, from
  scratch. Its outputs are removed first, each named in the status line with its file count and size: a
  ``keep`` stage's (training: ``DIR/runs/round1``, days of GPU time) are **moved aside**, never deleted, to
  ``<parent>/superseded/<name>-<UTC time>-<hash of the old inputs>/`` with a ``superseded.json`` naming
  the stage, the reason and the changed input keys; the others' are moved into ``DIR/stages/.trash`` (one
  rename each, so a kill leaves either the old output or none) and deleted. Nothing outside the pipeline's
  directory is moved or deleted.

Once a stage is not skipped, every stage after it is redone: they consumed what it rewrote.
``refuse_retrain`` (``spinestream run --no-retrain``) decides every stage first and refuses, before
anything runs or is moved, when a ``keep`` stage's existing outputs would be redone.

A complete record that lacks only keys of :data:`ADOPTED_KEYS` (written before spinestream fingerprinted
them) is adopted: the stage is skipped, its record gets the current fingerprints, and the log says how to
redo it if those inputs changed since. So is one whose inputs, brought to today's form by the stage's
``upgrade`` (a verb's recorded argv read as the typed options it meant), equal the current ones.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spinestream import InputError, SpinestreamError
from spinestream.shards.fsutil import atomic_write_json, remove_stale_tmp, sha256_file

RECORD_FORMAT = "spinestream-stage"
SUPERSEDED_FORMAT = "spinestream-superseded"

#: input keys (dotted) that spinestream fingerprints since issue 16: a complete record without them is adopted
ADOPTED_KEYS = ("dataset.segmentations", "label_tables")


class StageError(SpinestreamError, RuntimeError):
    """A stage's verb failed (its exit status and name are in the message)."""


class RetrainRefused(SpinestreamError, ValueError):
    """``refuse_retrain``: a training stage's existing run would be redone (nothing was run or moved)."""


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
    feeds_later: bool = True
    """Whether later stages read what it writes: when it ran, they are redone. False for checks and reports
    (verify, bench, evaluate, compare): editing ``verify.quick`` must not retrain anything (the report still
    reruns, since it fingerprints every stage's record)."""
    keep: bool = False
    """On a redo, move the outputs aside (``<parent>/superseded/...``) instead of deleting them: training runs."""
    check_resume: Callable[[], tuple[str, list[str]]] | None = None
    """Before resuming existing outputs: (why they cannot be resumed, '' when they can; the changed keys, for
    ``superseded.json``). A reason makes a redo."""
    upgrade: Callable[[dict], dict] | None = None
    """An older record's inputs in today's form (e.g. a verb's argv, recorded before the verbs had typed configs,
    as the options it meant): a complete record that then equals the current inputs is adopted, not redone."""


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


def _inside(p: Path, root: Path, what: str) -> None:
    """ValueError unless ``p`` is inside ``root`` (the pipeline's directory) and not ``root`` itself."""
    root = Path(root).resolve()
    real = p.resolve() if not p.is_symlink() else p.parent.resolve() / p.name
    if real == root or root not in real.parents:
        raise InputError(f"refusing to {what} {p}: not inside the pipeline directory {root}")


def remove_outputs(paths: Sequence[Path], root: Path, trash: Path) -> None:
    """Delete a stage's outputs, refusing anything outside ``root`` (the pipeline's directory) or ``root``
    itself. Each path is first renamed into ``trash`` (atomic, same file system), then deleted."""
    for p in paths:
        p = Path(p)
        if not (p.exists() or p.is_symlink()):
            continue
        _inside(p, root, "delete")
        trash.mkdir(parents=True, exist_ok=True)
        dest = trash / f"{p.name}.{os.getpid()}.{time.monotonic_ns()}"
        os.replace(p, dest)
        _delete(dest)


def short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(canonical(obj), sort_keys=True).encode()).hexdigest()[:8]


def supersede(p: Path, root: Path, note: dict) -> Path:
    """Move ``p`` (inside ``root``) to ``p.parent/superseded/<name>-<UTC time>-<hash of note["inputs"]>`` (one
    rename: same file system) and write ``superseded.json`` there (when ``p`` is a directory); the new path."""
    p = Path(p)
    _inside(p, root, "move")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = p.parent / "superseded" / f"{p.name}-{stamp}-{short_hash(note.get('inputs'))}"
    dest, n = base, 1
    while dest.exists() or dest.is_symlink():
        n += 1
        dest = base.with_name(f"{base.name}-{n}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(p, dest)
    if dest.is_dir() and not dest.is_symlink():
        atomic_write_json(dest / "superseded.json", {"format": SUPERSEDED_FORMAT, "moved_from": str(p),
                                                     "moved_at": stamp, **canonical(note)})
    return dest


def describe(p: Path) -> str:
    """``"N files, X GB"`` of a file or directory tree (symbolic links not followed)."""
    if p.is_symlink() or not p.is_dir():
        files, size = 1, p.lstat().st_size
    else:
        files = size = 0
        for d, _, names in os.walk(p):
            for f in names:
                files += 1
                size += os.lstat(os.path.join(d, f)).st_size
    amount = f"{size} B"
    for unit in ("kB", "MB", "GB", "TB"):
        if size < 1000:
            break
        size /= 1000
        amount = f"{size:.1f} {unit}"
    return f"{files:,} file{'s' * (files != 1)}, {amount}"


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
    """InputError naming the stages when ``name`` is not one of them."""
    if name is not None and name not in names:
        raise InputError(f"{what} {name!r}: not a stage of this pipeline; its stages, in order: {' '.join(names)}")


def decide(stage: Stage, rec: dict | None, inputs: dict, *, forced: str) -> tuple[str, str]:
    """(status, reason) for a stage given its record, its current inputs and why it must be redone
    ('' when nothing upstream forces it). Status: skipped, adopted (a skip whose record gains keys of
    :data:`ADOPTED_KEYS`), run, resumed or redone."""
    required = stage.required or stage.outputs
    missing = [str(p) for p in required if not Path(p).exists()]
    present = any(Path(p).exists() for p in stage.outputs)
    old = (rec or {}).get("inputs") or {}
    if forced:
        if not (rec or present):
            return "run", ""
        keys = changed_keys(old, inputs) if rec and old != inputs else ""
        return "redone", forced + (f": inputs changed ({keys})" if keys else "")
    if rec is None:
        if not present:
            return "run", ""
        why = stage.check_resume()[0] if stage.check_resume else ""
        return ("redone", f"no record, and {why}") if why else ("resumed", "outputs of an unrecorded attempt kept")
    if old != inputs:
        keys = changed_key_list(old, inputs)
        if (rec.get("state") == "complete" and not missing and keys
                and all(k in ADOPTED_KEYS and _dotted(old, k) is _ABSENT for k in keys)):
            return "adopted", f"predates fingerprinting {', '.join(keys)}"
        if rec.get("state") == "complete" and not missing and stage.upgrade and \
                canonical(stage.upgrade(old)) == inputs:
            return "adopted", "holds the same options in an older form (a verb's arguments)"
        return "redone", f"inputs changed ({changed_keys(old, inputs)})"
    if rec.get("state") == "complete":
        return ("skipped", "") if not missing else ("redone", f"output missing: {missing[0]}")
    why = stage.check_resume()[0] if stage.check_resume and present else ""
    return ("redone", f"interrupted, but {why}") if why else ("resumed", "interrupted")


_ABSENT = object()


def _dotted(d: dict, key: str) -> Any:
    for k in key.split("."):
        if not isinstance(d, dict) or k not in d:
            return _ABSENT
        d = d[k]
    return d


def changed_key_list(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Every dotted key whose value differs between two input dicts (a file's fingerprint is one value)."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and "sha256" not in a and "sha256" not in b:
            keys += changed_key_list(a, b, f"{prefix}{k}.")
        elif a != b or (k in old) != (k in new):
            keys.append(f"{prefix}{k}")
    return keys


def changed_keys(old: dict, new: dict, prefix: str = "") -> str:
    """The dotted keys whose values differ between two input dicts (a few of them)."""
    keys = changed_key_list(old, new, prefix)
    return ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")


def run_stages(stages: Sequence[Stage], state_dir: Path, root: Path, *, from_stage: str | None = None,
               log: Callable[[str], None] = print, refuse_retrain: bool = False) -> list[StageResult]:
    """Run ``stages`` in order (see the module docstring); one status line per stage goes to ``log``.
    Returns what happened to each; a failing stage raises (its record stays ``running``);
    :class:`RetrainRefused` (before anything ran) when ``refuse_retrain`` and a ``keep`` stage would be redone."""
    names = [s.name for s in stages]
    check_stage(names, from_stage)
    state_dir = Path(state_dir)
    if refuse_retrain:
        _refuse_retrain(stages, state_dir, from_stage)
    state_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(state_dir)  # records a kill cut short (one pipeline per directory)
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
        tag = f"[{stage.name:<9}]"
        if status == "adopted":
            rec = _write_record(state_dir, stage.name, "complete", inputs,
                                **{k: v for k, v in rec.items() if k not in ("format", "stage", "state", "inputs")})
            results.append(StageResult(stage.name, "skipped", 0.0, record=rec))
            log(f"{tag} skipped (complete; its record {reason}: the current inputs are recorded now; if they "
                f"changed since that run, rerun with --from {stage.name})")
            continue
        if status == "skipped":
            results.append(StageResult(stage.name, status, 0.0, record=rec))
            log(f"{tag} skipped (complete, same inputs; took {rec.get('seconds', 0):.1f}s)")
            continue
        line = f"{tag} {status}" + (f" ({reason})" if reason else "")
        if status == "redone":
            line += _clear_outputs(stage, rec, inputs, reason, root, trash)
        log(line + " ...")
        t0 = time.perf_counter()
        _write_record(state_dir, stage.name, "running", inputs, status=status)
        stage.run()
        seconds = time.perf_counter() - t0
        rec = _write_record(state_dir, stage.name, "complete", inputs, status=status, seconds=round(seconds, 3),
                            finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            outputs={str(p): fingerprint(p) for p in stage.outputs if Path(p).is_file()})
        results.append(StageResult(stage.name, status, seconds, reason, rec))
        log(f"{tag} {status}: done in {seconds:.1f}s")
        if stage.feeds_later:
            forced = forced or f"{stage.name} ran"
    return results


def _clear_outputs(stage: Stage, rec: dict | None, inputs: dict, reason: str, root: Path, trash: Path) -> str:
    """Remove a redone stage's outputs (a ``keep`` stage's: move them aside); what became of them, for the log."""
    said = []
    for p in map(Path, stage.outputs):
        if not (p.exists() or p.is_symlink()):
            continue
        if stage.keep:
            finished = all(Path(q).exists() for q in stage.required or stage.outputs)
            old = (rec or {}).get("inputs")
            changed = changed_key_list(old, inputs) if old is not None else \
                stage.check_resume()[1] if stage.check_resume else []
            note = {"stage": stage.name, "reason": reason, "record_state": (rec or {}).get("state"),
                    "changed": changed,
                    "inputs": old, "current_inputs": inputs, "contents": describe(p)}
            dest = supersede(p, root, note)
            said.append(f"the {'finished' if finished else 'unfinished'} run was kept at {dest} "
                        f"({note['contents']}; not deleted)")
        else:
            what = describe(p)
            remove_outputs([p], root, trash)
            said.append(f"removed {p} ({what})")
    return "".join(f"; {s}" for s in said)


def _refuse_retrain(stages: Sequence[Stage], state_dir: Path, from_stage: str | None) -> None:
    """Decide every stage as :func:`run_stages` would, without running one; RetrainRefused naming the first
    ``keep`` stage whose existing outputs would be redone. Until a stage is not skipped nothing has changed, so
    its decision is the real one; every stage after it is forced."""
    forced = ""
    for stage in stages:
        if stage.name == from_stage:
            forced = f"--from {from_stage}"
        rec = read_record(state_dir, stage.name)
        status, reason = decide(stage, rec, canonical(stage.inputs()), forced=forced)
        if status == "redone" and stage.keep and any(Path(p).exists() for p in stage.outputs):
            raise RetrainRefused(
                f"{stage.name} would be redone ({reason}) and its run {', '.join(map(str, stage.outputs))} moved "
                f"aside; --no-retrain refuses: nothing was run or moved. Rerun without --no-retrain to retrain "
                f"(the old run is kept under superseded/), or undo the change")
        if status not in ("skipped", "adopted") and stage.feeds_later:
            forced = forced or f"{stage.name} ran"
