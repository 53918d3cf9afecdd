"""The trainer both rounds use. ``engine/train.py`` parses the command line and calls
:class:`Trainer`; setup is the ``build_*`` functions of :mod:`spinestream.engine.build`, the loop is
:meth:`Trainer.fit`.

Mixed precision (bf16 on sm80+, fp16 + GradScaler below, fp32 on CPU), channels_last,
Adam with warm-up + cosine, gradient accumulation and clipping, EMA weights, atomic
checkpoints every N steps and at epoch ends, resume (model, optimizer, scaler,
scheduler, EMA, step, loader position, every RNG -- with changed hyper-parameters if asked),
early stopping on the study-level competition metric, non-finite steps skipped and counted.

Guarantees (tests/test_train.py, tests/test_trainer_*.py):

* **Resume is exact.** A run killed after a checkpoint and resumed ends with the weights an
  uninterrupted run has, also with ``optim.grad_accum > 1``: an accumulation window never
  crosses a checkpoint (they are written right after an optimizer step) or an epoch end (the
  epoch's last window is stepped short, its gradient the mean of its micro-batches), so no
  pending gradient exists when the state is saved.
* **Resume works from any checkpoint**: mid-epoch, at an epoch end, or a finished run's last one. A
  checkpoint is never taken between an epoch's last batch and its end-of-epoch validation (that
  validation and the checkpoint after it come first), and the loader records the end of an epoch as
  the next one's start; a finished run resumed with the same config trains nothing, and with more
  ``train.epochs`` continues with the next epoch's permutation.
* **A skipped step is not a step.** A non-finite loss or gradient (and GradScaler's overflow in
  fp16) skips the update on the device; the step counter, the schedule and the EMA do not advance,
  every buffer the window's forward passes changed (BatchNorm statistics) is put back
  (:mod:`spinestream.engine.buffers`), and the step is counted in ``nan_total``; ``train.max_nan_steps`` in a row
  stop the run.
* **best.pt follows the record.** ``best.pt`` is written right after the step checkpoint whose record
  names it; a kill between the two is repaired from that checkpoint when the run is resumed or its
  best is read (:func:`spinestream.engine.checkpoint.sync_best`).
* **Ctrl-C** finishes the step in flight, saves a checkpoint and raises :class:`TrainingInterrupted`
  (``spinestream train`` prints the resume command); a second Ctrl-C stops at once.
* **Data-parallel under torchrun** (:mod:`spinestream.engine.dist`; tests/test_ddp.py, 2 ranks with gloo): each rank
  trains on its disjoint part of the epoch's permutation (the loader's split), DDP averages the gradients (only in
  an accumulation window's last backward: ``no_sync`` before it), a non-finite loss on any rank skips the step on
  every rank, the EMA copy starts from rank 0's weights, the logged loss is the ranks' mean and images/s their sum;
  rank 0 alone writes checkpoints (with every rank's generators), metrics, plots and wandb; validation splits
  the studies and gathers them (rank 0's BatchNorm statistics broadcast first), so its metric is one process's.
  A checkpoint resumes on the same number of ranks exactly; on another only from an epoch's start (refused
  mid-epoch, naming the fix). Ctrl-C under torchrun stops every rank at once (resume from the last checkpoint).
* **No host sync per step** in bf16/fp32 beyond the log line every ``log.every_steps`` steps
  (``loss.item()``), checkpoints and validation: the skip is decided on the device and learned by
  the host a step or more late (:mod:`spinestream.engine.skips`). fp16 adds none either (fused Adam takes
  GradScaler's found-inf flag on the device).
"""
from __future__ import annotations

import contextlib
import os
import platform
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from spinestream import SpinestreamError
from spinestream.shards.config import to_dict
from spinestream.shards.fsutil import atomic_save_figure
from spinestream.shards.progress import write
from spinestream.shards.spec import ShardSpec

from . import checkpoint as ck, dist
from .autobatch import resolve_batch_size
from .buffers import BufferSnapshot
from .build import build_data, build_device, build_loader_cfg, build_model_for, build_optimization, effective_lr, \
    init_reference, init_weights, select_training_shards, steps_per_epoch
from .config import RunConfig
from .device import autocast
from .infer import predict_run, score_studies
from .loader import build_loader
from .metrics import constant_baseline, weighted_bce
from .model import model_fingerprint
from .rundir import RunLayout, append_metrics, read_metrics, truncate_metrics, write_config
from .skips import StepFlags
from .trainlog import TrainLog

__all__ = ["Trainer", "TrainingInterrupted", "constant_baseline_score", "plot_curves", "rng_state",
           "select_training_shards", "set_rng_state", "write_config"]

PROJECT_WARMUP_STEPS = 5
"""Steps left out of the epoch-time projection (model warm-up, cudnn autotuning, the loader's first fill)."""
PROJECT_STEPS = 20
"""Steps the projection is measured over (at the first log line after warm-up + these)."""
VAL_SHARE_WARN = 0.25
"""Validation taking more than this share of the run's time gets one warning."""


def rng_state() -> dict:
    """Every generator a run draws from: torch's CPU one, each CUDA device's, numpy's and python's global ones
    (as tensors, numbers and lists: ``torch.load(weights_only=True)`` reads them back)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def set_rng_state(s: dict | torch.Tensor) -> None:
    """Restore :func:`rng_state`; an old checkpoint's bare CPU state (``torch_rng``) is accepted too."""
    if isinstance(s, torch.Tensor):
        torch.set_rng_state(s)
        return
    torch.set_rng_state(s["torch"])
    if len(s["cuda"]) and torch.cuda.is_available():
        n = min(len(s["cuda"]), torch.cuda.device_count())  # resumed on fewer cards: those it has
        torch.cuda.set_rng_state_all(list(s["cuda"])[:n])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = s["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))


def _interned(obj):
    """``obj`` with every string in its plain dicts, lists and tuples interned, keys and values, recursively (a
    module's state dict, an OrderedDict with metadata, is left as it is). Pickle shares a string by identity: the
    keys a resumed run read back from its checkpoint (the optimizer's ``lr``, the record's ``step`` ...) and the
    config values it read from config.yaml are copies where the uninterrupted run has interned literals, so its
    checkpoints held the same values in other bytes (and best.pt another sha256)."""
    if type(obj) is str:
        return sys.intern(obj)
    if type(obj) is dict:
        return {_interned(k): _interned(v) for k, v in obj.items()}
    if type(obj) is list:
        return [_interned(v) for v in obj]
    if type(obj) is tuple:
        return tuple(_interned(v) for v in obj)
    return obj


def constant_baseline_score(train_studies: pd.DataFrame, val_studies: pd.DataFrame) -> float:
    """:func:`spinestream.engine.metrics.constant_baseline` of ``val_studies`` with the training studies' prevalence."""
    return constant_baseline(val_studies, prevalence_from=train_studies)


class TrainingDiverged(SpinestreamError, RuntimeError):
    """``train.max_nan_steps`` non-finite losses in a row: the run diverged (the message says what to change)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training at ``step``; ``saved_now``: a checkpoint of that step was just written."""

    def __init__(self, step: int, saved_now: bool):
        super().__init__(f"interrupted at step {step}")
        self.step, self.saved_now = step, saved_now


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """One training run in ``run_dir``: build with :mod:`spinestream.engine.build`, then :meth:`fit`."""

    def __init__(self, cfg: RunConfig, run_dir: Path, *, resume_from: Path | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        # under torchrun: this rank's place in the group (a world of one otherwise; engine/dist.py)
        self.dist = d = dist.init_from_env(cfg.train.dist_timeout_s)
        # every check before anything in the run directory is written (a failed resume leaves it as it was)
        spec = self._check_shard_spec(cfg, resume_from)
        if self.run_dir.is_dir() and d.main:
            ck.clean_stale(self.run_dir)
        self.device, self.precision = build_device(cfg, d)
        state = ck.load(resume_from, map_location="cpu") if resume_from else None
        init = init_weights(cfg) if state is None else None  # model.init_from (ignored on resume)
        self.model, self.channels_last = build_model_for(cfg, self.device, state, str(resume_from), init=init)
        # round 1's best on this validation fold, drawn beside this run's curve (kept across resumes)
        self.reference = state.get("reference") if state is not None else init_reference(cfg, init)
        del init
        with d.main_first("rank 0's oversampling indexes"):  # rank 0 writes RUN/oversample, the others read it
            data = build_data(cfg, self.run_dir)
        self.train_sel, self.labels, self.val_studies, self.baseline = \
            data.train_sel, data.labels, data.val_studies, data.baseline
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # predict's copy of the shard spec; never rewritten on resume
        if d.main and (resume_from is None or not RunLayout(self.run_dir).shard_spec.is_file()):
            spec.save(self.run_dir)
        bs = resolve_batch_size(cfg, self.model, self.run_dir, self.device, self.precision,
                                channels_last=self.channels_last, resuming=state is not None) if d.main else None
        bs = d.broadcast(bs)  # per rank, probed once (rank 0; the ranks' cards are alike) and used by every rank
        self.loader_cfg = build_loader_cfg(cfg, self.model, self.device, self.precision, self.channels_last, bs)
        self.loader = build_loader(self.train_sel, self.labels, self.loader_cfg, device=self.device, train=True,
                                   rank=d.rank, world=d.world)
        self.steps_per_epoch = steps_per_epoch(len(self.loader), cfg.optim.grad_accum)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        if cfg.train.sync_batchnorm and d.enabled:  # before the optimizer and the EMA copy see the modules
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.opt, self.sched, self.scaler, self.ema = build_optimization(cfg, self.model, self.precision,
                                                                         self.device, self.total_steps, d.world)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self.step, self.nan_streak, self.nan_total, self.bad_vals = 0, 0, 0, 0
        self.best = {"metric": float("inf"), "step": -1}
        self._micro, self._window_bad = 0, torch.zeros((), dtype=torch.bool, device=self.device)
        self._flags = StepFlags(self.device)
        self._buffers = BufferSnapshot(self.model)
        self._saved_step, self._interrupt = -1, False
        self.logbook = TrainLog(self.run_dir)  # wandb, the bar and the clocks of the log line
        self._last_val_step, self._early_stop = -1, False
        if state is not None:
            self._restore(state)
            if d.main:
                truncate_metrics(self.run_dir, self.step)  # the steps after the checkpoint run again
                ck.sync_best(self.run_dir)  # a kill between this checkpoint and best.pt
        elif d.main:
            truncate_metrics(self.run_dir, -1)  # a fresh start: the records of an attempt killed before its first
            # checkpoint are redone
        # data-parallel under torchrun: DDP averages the gradients in the backward pass (and broadcasts rank 0's
        # weights and buffers at construction, so every rank starts from the same ones)
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None) if d.enabled else None
        if self.ema is not None:
            d.broadcast_module(self.ema.module)  # the EMA copy starts from rank 0's weights too
        wrapped = self.ddp if self.ddp is not None else self.model
        self.train_model = torch.compile(wrapped) if cfg.train.compile else wrapped

    def _check_shard_spec(self, cfg: RunConfig, resume_from: Path | None) -> ShardSpec:
        """The shard set's spec; on resume it must make the images the run's ``shard_spec.json`` records."""
        spec = ShardSpec.from_shards(cfg.data.root, exclude_fold=cfg.data.val_fold)  # prevalence: training folds
        own = RunLayout(self.run_dir).shard_spec
        if resume_from is not None and own.is_file():
            ShardSpec.load(own).check_same_images(spec, f"cannot resume {self.run_dir} with data.root="
                                                        f"{cfg.data.root}")
        return spec

    # ----------------------------------------------------------------------- state

    def state(self) -> dict:
        """Everything :meth:`_restore` needs to continue exactly (no accumulation window is ever pending)."""
        assert self._micro == 0 and len(self._flags) == 0, "state() inside an accumulation window or unsettled"
        rngs = self.dist.gather(rng_state())
        return _interned({
            "config": to_dict(self.cfg),
            "model_fingerprint": model_fingerprint(self.model),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "loader": self.loader.state_dict(),
            "best": dict(self.best),
            "bad_vals": self.bad_vals,
            "nan_total": self.nan_total,
            "nan_streak": self.nan_streak,
            "rng": rngs[0],
            **({"rng_ranks": rngs} if len(rngs) > 1 else {}),  # each rank's generators (a collective)
            "world": self.dist.world,
            "reference": self.reference,
        })

    def _restore(self, s: dict) -> None:
        self.opt.load_state_dict(s["optimizer"])
        for g in self.opt.param_groups:  # changed hyper-parameters win (the "babysitting" resume)
            g["initial_lr"] = effective_lr(self.cfg, self.dist.world)
            g["weight_decay"] = self.cfg.optim.weight_decay
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.sched.lr_lambdas[0], last_epoch=s["step"] - 1)
        # its count of step() calls as the uninterrupted run has it (rebuilt, it would restart at 1), so a resumed
        # run's checkpoints are the uninterrupted run's, byte for byte
        self.sched._step_count = int(s["scheduler"].get("_step_count", self.sched._step_count))
        self.scaler.load_state_dict(s["scaler"])
        if self.ema is not None and s.get("ema") is not None:
            self.ema.load_state_dict(s["ema"])
        self.loader.load_state_dict(s["loader"])
        self.step = int(s["step"])
        self.best = dict(s["best"])
        self.bad_vals = int(s.get("bad_vals", 0))
        self.nan_total = int(s.get("nan_total", 0))
        self.nan_streak = int(s.get("nan_streak", 0))
        ranks = s.get("rng_ranks") or []
        if len(ranks) == self.dist.world:  # each rank continues with its own generators
            set_rng_state(ranks[self.dist.rank])
        else:  # one process, or resumed on another number of ranks: rank 0's (then the seeds differ by rank)
            set_rng_state(s["rng"] if "rng" in s else s["torch_rng"])

    def save(self, best: bool = False) -> None:
        """The step checkpoint, then best.pt (a kill between the two: :func:`spinestream.engine.checkpoint.sync_best`)."""
        state = self.state()  # on every rank (it gathers their generators); rank 0 writes
        if self.dist.main:
            ck.save_step(self.run_dir, self.step, state, self.cfg.train.keep_last)
            if best:
                ck.save(RunLayout(self.run_dir).best, state)
        self._saved_step = self.step

    def _say(self, line: str) -> None:
        """A console line (above the bar), from rank 0 only."""
        if self.dist.main:
            write(line)

    def _length_reached(self) -> bool:
        """The run's length is done: its last step, or (without train.max_steps) its epochs, which skipped steps
        can end with step < total_steps."""
        t = self.cfg.train
        return self.step >= self.total_steps or (not t.max_steps and self.loader.epoch >= t.epochs)

    def finished(self) -> bool:
        """Nothing left to train: the run's length done, or early stopping's patience used up."""
        p = self.cfg.train.early_stopping_patience
        return self._length_reached() or bool(p and self.bad_vals >= p)

    # ----------------------------------------------------------------------- logging

    def log(self, record: dict) -> None:
        """A metrics.jsonl record (and wandb's), from rank 0 only."""
        if not self.dist.main:
            return
        record = {"step": self.step, "epoch": self.loader.epoch, **record}
        append_metrics(self.run_dir, record)
        self.logbook.send(record, self.step)

    def _log_train(self) -> None:
        self._settle(block=True)  # the loss is read below anyway
        d = self.dist
        if d.enabled:  # the ranks' mean loss; images and the data wait over every rank (a collective)
            lb = self.logbook
            lb.last_loss = d.mean(lb.last_loss.float())
            totals = d.sum_(torch.tensor([float(lb.images), lb.wait], dtype=torch.float64,
                                         device=self.device))
            lb.images, lb.wait = int(totals[0].item()), float(totals[1].item()) / d.world
        rec = {"loss": self.logbook.last_loss.item(),  # note: CPU-GPU sync point, once per log.every_steps steps
               "lr": self.sched.get_last_lr()[0], **self.logbook.rates(), "nan_total": self.nan_total}
        if d.enabled:
            rec["images_per_s_rank"], rec["ranks"] = rec["images_per_s"] / d.world, d.world
        self.log(rec)
        self.logbook.bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.0f}",
                              wait=f"{rec['data_wait']:.0%}")
        self._project()

    def _project(self) -> None:
        """Once, at a log line (the host has just synced): the epoch and run time projected from the steps
        since warm-up, validation excluded; printed and logged (``{"projection": ...}``)."""
        lb = self.logbook
        if lb.projection is not None:
            return
        now = time.perf_counter() - lb.val_seconds
        if lb.proj_mark is None:
            if self.step - lb.fit_step0 >= PROJECT_WARMUP_STEPS:
                lb.proj_mark = (self.step, now)
            return
        s0, t0 = lb.proj_mark
        if self.step - s0 < PROJECT_STEPS:
            return
        per_step = (now - t0) / (self.step - s0)
        left = max(0, self.total_steps - self.step)
        lb.projection = {"seconds_per_step": per_step, "steps_per_epoch": self.steps_per_epoch,
                         "epoch_seconds": per_step * self.steps_per_epoch, "remaining_seconds": per_step * left,
                         "measured_steps": self.step - s0}
        self.log({"projection": lb.projection})
        self._say(f"projected: {_hms(lb.projection['epoch_seconds'])} per epoch "
                   f"({self.steps_per_epoch} steps at {per_step:.3g} s/step), {_hms(per_step * left)} for the "
                   f"{left} steps left, validation not included")

    # ----------------------------------------------------------------------- the loop

    def fit(self) -> dict:
        """Train until train.max_steps / train.epochs or early stopping; the best validation result."""
        if self.finished():  # before wandb and the bar: nothing to report
            self._say(f"{self.run_dir}: already complete at step {self.step} (best {self.best['metric']:.4f} at step "
                  f"{self.best['step']}); nothing to train: raise train.epochs or train.max_steps to continue")
            if self.dist.main and not RunLayout(self.run_dir).curves.is_file():
                self.plot()  # killed after its last checkpoint, before the plot
            return dict(self.best)
        if self.dist.main:  # wandb, the clocks and the bar (the clocks are restarted below on every rank)
            self.logbook.start(self.cfg, self.step, self.total_steps)
        else:
            self.logbook.t_fit, self.logbook.fit_step0 = time.perf_counter(), self.step
        self.log({"hardware": hardware(self.device, self.dist.world), "precision": self.precision})  # headline
        if self.step == 0 and self.reference is not None:
            self.log({"reference": self.reference})
        try:
            with self._sigint_deferred():
                self._loop()
            self.dist.barrier("rank 0's last checkpoint")  # torchrun's success means the files are written
        finally:
            self.logbook.close()
            if self.dist.main:
                self.plot()
        return dict(self.best)

    def _loop(self) -> None:
        stop = False
        while not stop:
            self.model.train()
            try:
                for batch in self._timed(self.loader):
                    # at an epoch end or the last step, Ctrl-C waits for the validation and checkpoint due there
                    end = self.loader.at_epoch_end
                    if self._step(batch, last=end) and \
                            (self._after_step(epoch_end=end) or (self._interrupt and not end)):
                        break
            except Exception as e:
                if self._interrupt and "DataLoader worker" in str(e):  # Ctrl-C also reached the loader's workers
                    self._stop_interrupted()
                raise
            if self._interrupt and self.loader.position != 0 and self.step < self.total_steps:  # mid-epoch
                self._stop_interrupted()
            stop = self._end_epoch()
            if self._interrupt and not stop:
                self._stop_interrupted()

    @contextlib.contextmanager
    def _sigint_deferred(self):
        """Ctrl-C sets a flag the loop reads after the step in flight (a consistent place to checkpoint);
        a second Ctrl-C raises KeyboardInterrupt at once. Only in the main thread (signals go there)."""
        self._interrupt = False
        if threading.current_thread() is not threading.main_thread() or self.dist.enabled or \
                signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # e.g. started with `&` from a script
            # under torchrun the ranks would stop at different steps: Ctrl-C stops the group at once (torchrun
            # ends every rank) and the run resumes from its last checkpoint
            yield
            return
        owner = os.getpid()

        def handler(signum, frame):
            if os.getpid() != owner:  # a forked DataLoader worker inherited the handler: the trainer decides
                return
            if self._interrupt:
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self._interrupt = True
            self._say("interrupted: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _stop_interrupted(self) -> None:
        """Save where the run stands (outside an accumulation window) and raise :class:`TrainingInterrupted`."""
        saved_now = False
        if self._micro == 0 and self._saved_step != self.step and self.step > 0 and not self.loader.at_epoch_end:
            self._settle(block=True)
            if self._saved_step != self.step:
                self.save()
                saved_now = True
        raise TrainingInterrupted(self.step, saved_now)

    def _timed(self, loader):
        """The loader's batches, with the time the step waited for each one added to the log line."""
        it = iter(loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.logbook.wait += time.perf_counter() - t
            yield batch

    def _step(self, batch, last: bool = False) -> bool:
        """One micro-batch (forward, loss, backward); at the end of an accumulation window the optimizer
        step. True when an optimizer step was issued (the device may still skip it: see :meth:`_settle`).
        ``last``: the epoch's last batch (its window ends here, short or not). Under DDP the gradients are
        averaged across ranks only in the window's last backward (``no_sync`` on the others)."""
        o = self.cfg.optim
        if self._micro == 0:
            self._buffers.take()  # a skipped window gives back what its forward passes did to BatchNorm
        window_end = last or self._micro + 1 >= o.grad_accum
        with (self.ddp.no_sync() if self.ddp is not None and not window_end else contextlib.nullcontext()):
            with autocast(self.precision, self.device):
                logits = self.train_model(batch.images)
            loss = weighted_bce(logits.float(), batch.targets, valid=batch.valid, focal_gamma=o.focal_gamma,
                                pos_weight=o.pos_weight)
            self._window_bad |= ~torch.isfinite(loss)  # decided on the device: no `if` on a device tensor here
            self.scaler.scale(loss / o.grad_accum).backward()
        self.logbook.last_loss = loss.detach()
        self._micro += 1
        self.logbook.images += batch.n_valid  # counted on the host by the loader
        if self._micro < o.grad_accum:
            return False
        self._optimizer_step()
        return True

    def _optimizer_step(self) -> None:
        """Unscale, clip, Adam, EMA, schedule for the window's accumulated gradients (skipped on the device
        when the window had a non-finite loss or gradient)."""
        o = self.cfg.optim
        # one rank's non-finite loss skips the step on every rank (gradients are averaged, so a non-finite one is
        # already everywhere; a loss is not): one collective on the device, no host sync
        self._window_bad = self.dist.any_(self._window_bad)
        grads = [p.grad for p in self._params if p.grad is not None]
        if self.scaler.is_enabled():
            # a non-finite loss with finite gradients (an fp16 logit overflow) must skip Adam too: GradScaler only
            # sees the gradients, so they are made NaN on the device when the window's loss was not finite
            torch._foreach_mul_(grads, torch.where(self._window_bad, float("nan"), 1.0))
            self.scaler.unscale_(self.opt)  # found-inf recorded on the device
        if self._micro < o.grad_accum:  # the epoch's last, short window: the mean of its micro-batches
            torch._foreach_mul_(grads, o.grad_accum / self._micro)
        norm = torch.nn.utils.get_total_norm(grads)
        if o.clip_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self._params, o.clip_grad_norm, norm)
        skipped = self._window_bad | ~torch.isfinite(norm)
        self._settle()  # earlier steps' flags, before this step reads its learning rate
        if self.scaler.is_enabled():
            self.scaler.step(self.opt)  # fused Adam: GradScaler hands it found_inf, no .item()
            self.scaler.update()
        else:
            self.opt.found_inf, self.opt.grad_scale = skipped.float(), None  # fused Adam's on-device skip
            try:
                self.opt.step()
            finally:
                del self.opt.found_inf, self.opt.grad_scale
        self.opt.zero_grad(set_to_none=True)
        self._buffers.restore_if(skipped)  # before the EMA reads the model's buffers
        if self.ema is not None:
            self.ema.update(self.step, applied=(~skipped).float())
        self._flags.push(skipped)
        self.sched.step()
        self.step += 1
        self.logbook.bar.update()
        self._micro = 0
        self._window_bad = torch.zeros((), dtype=torch.bool, device=self.device)

    def _settle(self, block: bool = False) -> None:
        """Account for the steps the device has finished: a skipped one is taken back (counter, schedule)
        and counted; train.max_nan_steps in a row stop the run."""
        for skipped in self._flags.ready(block):
            if not skipped:
                self.nan_streak = 0
                continue
            self.nan_streak += 1
            self.nan_total += 1
            self.step -= 1
            self.logbook.bar.update(-1)
            self.sched.last_epoch -= 1
            lrs = [base * self.sched.lr_lambdas[0](self.sched.last_epoch) for base in self.sched.base_lrs]
            for g, lr in zip(self.opt.param_groups, lrs):
                g["lr"] = lr
            self.sched._last_lr = lrs  # what get_last_lr() reports
            if self.nan_streak >= self.cfg.train.max_nan_steps:
                raise TrainingDiverged(f"{self.nan_streak} non-finite losses in a row at step {self.step}; "
                                       f"lower optim.lr, or resume from an earlier checkpoint with a new lr")

    def _after_step(self, epoch_end: bool = False) -> bool:
        """Log, validate (train.val_every_steps) and checkpoint on schedule; True when the run has reached its
        last step or early stopping says stop. After the epoch's last batch (``epoch_end``) only the log: the
        epoch's end validates and checkpoints (:meth:`_end_epoch`), so no checkpoint falls between the two."""
        t = self.cfg.train
        if self.step % self.cfg.log.every_steps == 0:
            self._log_train()
        if epoch_end:
            return False
        if self.step >= self.total_steps:
            return True  # the last step validates and checkpoints in _end_epoch (never a checkpoint before that)
        if t.val_every_steps and self.step % t.val_every_steps == 0:
            self._settle(block=True)
            if self.step % t.val_every_steps == 0 and self.step != self._last_val_step:
                self._early_stop = self._validate_and_checkpoint()
                return self._early_stop
        if self.step % t.checkpoint_every_steps == 0:
            self._settle(block=True)  # note: CPU-GPU sync point, once per checkpoint
            if self.step % t.checkpoint_every_steps == 0:  # a skip may have taken the step back
                self.save()
        return self.step >= self.total_steps

    def _end_epoch(self) -> bool:
        """After the loader stopped (epoch end, or the last step): step a short last window, validate and
        checkpoint when due; True when the run is over."""
        t = self.cfg.train
        epoch_done = self.loader.position == 0  # the iterator finished: the loader is at the next epoch's start
        if epoch_done and self._micro:
            self._optimizer_step()
            self._after_step(epoch_end=True)
        self._settle(block=True)
        finished = self._length_reached()
        stop = finished or self._early_stop
        fresh = self.step != self._last_val_step  # not validated at this step already (val_every_steps)
        due = finished or (epoch_done and (self.loader.epoch % t.val_every_epochs == 0
                                           or bool(t.val_every_steps and self.step % t.val_every_steps == 0)))
        if fresh and due:
            stop = self._validate_and_checkpoint() or stop
        elif epoch_done and self.step % t.checkpoint_every_steps == 0 and self._saved_step != self.step:
            self.save()
        return stop

    def _validate_and_checkpoint(self) -> bool:
        """Validate, save (best too when improved); True when early stopping says stop."""
        t0 = time.perf_counter()
        result = self.validate()
        seconds = time.perf_counter() - t0
        self.logbook.val_seconds += seconds
        self._last_val_step = self.step
        result["constant_baseline"] = self.baseline
        result["seconds"] = seconds
        if self.reference is not None:
            result["reference"] = self.reference["competition_loss"]
        improved = result["competition_loss"] < self.best["metric"]
        if improved:
            self.best = {"metric": result["competition_loss"], "step": self.step}
            self.bad_vals = 0
        else:
            self.bad_vals += 1
        self.log({"val": result})
        ref = "" if self.reference is None else (f"; {self.reference['name']} best "
                                                 f"{self.reference['competition_loss']:.4f}")
        self._say(f"step {self.step}: val competition loss {result['competition_loss']:.4f} "
                   f"(best {self.best['metric']:.4f} @ {self.best['step']}; constant baseline {self.baseline:.4f}"
                   f"{ref}), accuracy {result['accuracy']:.3f}, {seconds:.1f} s")
        self._check_val_share()
        self.save(best=improved)
        p = self.cfg.train.early_stopping_patience
        return bool(p and self.bad_vals >= p)

    def _check_val_share(self) -> None:
        """One warning when validation has taken more than VAL_SHARE_WARN of this process's run time."""
        lb = self.logbook
        if lb.val_warned or lb.t_fit is None:
            return
        total = time.perf_counter() - lb.t_fit
        share = lb.val_seconds / total if total > 0 else 0.0
        if share > VAL_SHARE_WARN:
            lb.val_warned = True
            t = self.cfg.train
            every = f"train.val_every_steps={t.val_every_steps}" if t.val_every_steps else \
                f"train.val_every_epochs={t.val_every_epochs}"
            self._say(f"warning: validation has taken {share:.0%} of the run so far ({lb.val_seconds:.0f} s of "
                       f"{total:.0f} s, {len(self.val_studies)} studies each time): validate less often "
                       f"(now {every}) or on fewer studies (data.val_cohorts)")
            self.log({"warning": f"validation share {share:.2f}"})

    def validate(self) -> dict:
        """The study-level competition loss on the validation fold, with the EMA weights when on (study
        inference on the device: :mod:`spinestream.engine.infer`)."""
        model = self.ema.module if self.ema else self.model
        self.dist.broadcast_buffers(model)  # rank 0's BatchNorm statistics: every rank scores the same model
        probs = predict_run(model, self.cfg, self.val_studies.StudyInstanceUID.tolist(), self.device,
                            self.precision, batch_size=self.loader_cfg.batch_size)
        self.model.train()  # inference left it in eval mode; training may go on mid-epoch (val_every_steps)
        return score_studies(probs, self.val_studies, self.cfg.train.study_rule)

    def plot(self) -> None:
        plot_curves(self.run_dir)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def hardware(device: torch.device, world: int = 1) -> str:
    """The machine a run trains on, as the report names it: host, cores and accelerator (and the ranks)."""
    acc = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    ranks = f", {world} ranks (torchrun)" if world > 1 else ""
    return f"{platform.node() or 'host'}: {os.cpu_count()} cores, {acc}{ranks}"


def plot_curves(run_dir: Path) -> None:
    rows = read_metrics(run_dir)
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [r for r in rows if "loss" in r]
    va = [r for r in rows if "val" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if tr:
        axes[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], lw=1)
    axes[0].set(title="training loss (weighted BCE)", xlabel="step")
    if va:
        axes[1].plot([r["step"] for r in va], [r["val"]["competition_loss"] for r in va], "o-", label="model")
        if "constant_baseline" in va[-1]["val"]:
            axes[1].axhline(va[-1]["val"]["constant_baseline"], color="grey", ls="--", label="constant baseline")
    ref = next((r["reference"] for r in rows if "reference" in r), None)
    if ref is not None:  # round 1's best on the same fold (a run started with model.init_from)
        axes[1].axhline(ref["competition_loss"], color="tab:green", ls=":",
                        label=f"{ref['name']} best (fold {ref['fold']})")
    if va or ref is not None:
        axes[1].legend(fontsize=8)
    axes[1].set(title="validation: competition loss (study level)", xlabel="step")
    fig.tight_layout()
    atomic_save_figure(fig, RunLayout(run_dir).curves)
