"""What a training run reports as it goes, apart from the training itself: wandb, the progress bar, and the
clocks behind the log line (images/s, data wait), the epoch-time projection and the validation-share
warning (whose rules stay in the trainer). The :class:`~spinestream.engine.trainer.Trainer` holds one :class:`TrainLog` (issue 18: these were
13 attributes of the trainer).

wandb, quiet and where the user asks:

* ``log.wandb: disabled`` never imports wandb (whatever ``WANDB_MODE`` says);
* otherwise ``WANDB_MODE``, when set, wins over ``log.wandb`` (:func:`wandb_mode`): wandb's own messages
  tell users to set it, and a ``mode=`` passed to ``wandb.init`` would silently override it;
* its files go under ``RUN_DIR/wandb/`` (never the current directory) and its banner is silenced
  (``Settings(silent=True)``): the console lines of a run are the trainer's.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spinestream.shards import progress
from spinestream.shards.config import to_dict

WANDB_MODES = ("online", "offline", "disabled")


def wandb_mode(configured: str, env: Mapping[str, str] | None = None) -> str:
    """The wandb mode a run uses: ``disabled`` when configured so, else ``WANDB_MODE`` when set (``dryrun`` is
    wandb's old name for offline; a value wandb does not know is named in a warning and ignored), else
    ``configured``."""
    if configured == "disabled":
        return "disabled"
    env = os.environ if env is None else env
    mode = env.get("WANDB_MODE", "").strip().lower()
    mode = "offline" if mode == "dryrun" else mode
    if mode and mode not in WANDB_MODES:
        print(f"spinestream: warning: WANDB_MODE={mode!r} is not one of {', '.join(WANDB_MODES)}; using "
              f"log.wandb={configured}", file=sys.stderr)
        return configured
    return mode or configured


@dataclass
class TrainLog:
    """The trainer's reporting state; ``bar`` is a disabled bar until :meth:`open_bar` (the trainer's steps
    update it, also when a test or benchmark drives them without ``fit``)."""

    run_dir: Path
    wandb: Any = None  # the wandb run, once started
    bar: progress.Bar = field(default_factory=lambda: progress.bar(disable=True))
    last_loss: Any = None  # the newest micro-batch's loss, a device tensor (read at the log line only)
    t_log: float = field(default_factory=time.perf_counter)  # since the last log line: its start,
    images: int = 0  # the images trained on,
    wait: float = 0.0  # and the seconds spent waiting for the loader
    t_fit: float | None = None  # when fit() started in this process
    fit_step0: int = 0  # the step it started at
    val_seconds: float = 0.0  # validation time in this process
    val_warned: bool = False
    proj_mark: tuple[int, float] | None = None  # (step, time less validation) where the projection's clock started
    projection: dict | None = None

    def start(self, cfg, step: int, total_steps: int) -> None:
        """At fit(): start wandb (:meth:`start_wandb`), the clocks and the bar."""
        self.start_wandb(cfg)
        self.t_fit, self.fit_step0 = time.perf_counter(), step
        self.bar = progress.bar(total=total_steps, initial=step, desc=cfg.name, unit="step", dynamic_ncols=True)

    def start_wandb(self, cfg) -> None:
        mode = wandb_mode(cfg.log.wandb)
        if mode == "disabled":
            return
        try:
            import wandb

            self.wandb = wandb.init(project=cfg.log.project, name=cfg.name, dir=str(Path(self.run_dir).resolve()),
                                    mode=mode, config=to_dict(cfg), reinit="finish_previous",
                                    settings=wandb.Settings(silent=True))
        except Exception as e:  # logging must never stop training
            print(f"wandb unavailable ({e}); metrics go to metrics.jsonl only", file=sys.stderr)

    def send(self, record: dict, step: int) -> None:
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def rates(self) -> dict:
        """Images/s and the share of time spent waiting for data since the last call (the log line)."""
        dt = time.perf_counter() - self.t_log
        out = {"images_per_s": self.images / dt, "data_wait": self.wait / dt}
        self.t_log, self.images, self.wait = time.perf_counter(), 0, 0.0
        return out

    def close(self) -> None:
        self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
