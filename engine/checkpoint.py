"""Run directories and checkpoints.

```
runs/<name>/run.json            marks a run directory (format, version)
runs/<name>/config.yaml         the resolved config (rewritten on resume with changed hyper-parameters)
runs/<name>/batch_size.json     what batch_size: auto found
runs/<name>/metrics.jsonl       one JSON object per log line / validation
runs/<name>/curves.png          loss and validation curves
runs/<name>/ckpt-<step>.pt      the last keep_last checkpoints
runs/<name>/best.pt             best by the validation metric (lower is better)
```

Checkpoints are written to a temporary file and renamed, and read with
``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from shards.fsutil import atomic_write_json

RUN_FORMAT = "spinestream-run"
RUN_VERSION = 1
CKPT_RE = re.compile(r"^ckpt-(\d{9})\.pt$")


class RunError(ValueError):
    """A run directory or checkpoint that cannot be used (message says why and what to do)."""


def mark_run(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "run.json", {"format": RUN_FORMAT, "version": RUN_VERSION})


def check_run_dir(run_dir: Path) -> None:
    marker = Path(run_dir) / "run.json"
    if not marker.is_file():
        raise RunError(f"{run_dir} is not a spinestream run directory (no run.json); "
                       f"pass the directory `spinestream train` created, e.g. runs/round1")
    meta = json.loads(marker.read_text())
    if meta.get("format") != RUN_FORMAT or meta.get("version") != RUN_VERSION:
        raise RunError(f"{marker}: unsupported run format {meta}")


def save(path: Path, state: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path, map_location="cpu") -> dict:
    if not Path(path).is_file():
        raise RunError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise RunError(f"{path}: cannot be read as a spinestream checkpoint ({e})") from e


def checkpoints(run_dir: Path) -> list[Path]:
    """Step checkpoints, oldest first."""
    return sorted(p for p in Path(run_dir).iterdir() if CKPT_RE.match(p.name))


def latest(run_dir: Path) -> Path:
    found = checkpoints(run_dir)
    if not found:
        raise RunError(f"{run_dir} has no checkpoint to resume from (ckpt-*.pt)")
    return found[-1]


def save_step(run_dir: Path, step: int, state: dict, keep_last: int) -> Path:
    path = Path(run_dir) / f"ckpt-{step:09d}.pt"
    save(path, state)
    for old in checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path
