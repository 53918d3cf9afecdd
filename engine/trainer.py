"""The trainer both rounds use. ``engine/train.py`` parses the command line and calls
:func:`run`; the loop itself is :meth:`Trainer.fit`.

Mixed precision (bf16 on sm80+, fp16 + GradScaler below, fp32 on CPU), channels_last,
Adam with warm-up + cosine, gradient accumulation and clipping, EMA weights, atomic
checkpoints every N steps and at epoch ends, resume (model, optimizer, scaler,
scheduler, EMA, step, loader position — with changed hyper-parameters if asked),
early stopping on the study-level competition metric, NaN/inf steps skipped and
counted.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm import tqdm

from shards.config import to_dict
from shards.layout import Layout

from . import checkpoint as ck
from .config import RunConfig
from .device import autocast, pick_device, resolve_precision, set_memory_cap
from .loader import LabelTable, build_loader, select
from .loader.data import oversample_positives
from .loader.studies import StudyReader
from .metrics import classification_report, score_submission, solution_from_train, study_probabilities, \
    submission_frame, weighted_bce
from .model import build_model, check_state_dict, data_config, model_fingerprint


# --------------------------------------------------------------------------- setup helpers


def select_training_shards(cfg: RunConfig):
    """Round 1: the non-negative cohorts' training folds plus negative shards up to the configured balance."""
    d = cfg.data
    others = [c for c in d.train_cohorts if c != "negative"]
    sel = select(d.root, cohorts=others, exclude_folds=[d.val_fold]) if others else None
    if "negative" not in d.train_cohorts:
        return sel
    neg = select(d.root, cohorts=["negative"], exclude_folds=[d.val_fold])
    if sel is not None and d.negatives_per_positive > 0:
        want = d.negatives_per_positive * sel.samples
        rng = np.random.default_rng(cfg.train.seed)
        chosen, n = [], 0
        for k in rng.permutation(len(neg.shards)):  # shards are already shuffled mixes of studies
            if n >= want:
                break
            chosen.append(neg.shards[k])
            n += neg.shards[k]["samples"]
        neg.shards = sorted(chosen, key=lambda s: s["name"])
    if sel is None:
        return neg
    sel.shards = sel.shards + neg.shards
    sel.cohorts = tuple(d.train_cohorts)
    return sel


def auto_batch_size(model, cfg: RunConfig, device: torch.device, precision: str) -> dict:
    """The largest batch (powers of two) whose real forward/backward fits under the memory cap."""
    size = cfg.loader.image_size
    candidates = [2 ** k for k in range(1, 11)]
    if device.type != "cuda":
        # no memory cap to probe on the CPU: the configured loader batch, checked by a real step
        candidates = [b for b in candidates if b <= cfg.loader.batch_size] or [cfg.loader.batch_size]
    best, tried = None, []
    model.train()
    for b in candidates:
        try:
            x = torch.randn(b, 3, size, size, device=device)
            if cfg.train.channels_last and device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(precision, device):
                out = model(x)
            out.float().mean().backward()
            model.zero_grad(set_to_none=True)
            best = b
            tried.append({"batch": b, "ok": True,
                          "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None})
        except (torch.OutOfMemoryError, RuntimeError, MemoryError) as e:
            if device.type == "cuda" and not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e):
                raise
            tried.append({"batch": b, "ok": False})
            break
        finally:
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if best is None:
        raise RuntimeError(f"not even a batch of {candidates[0]} fits at {size}px under "
                           f"train.max_memory_gb={cfg.train.max_memory_gb}")
    return {"batch_size": best, "tried": tried, "image_size": size, "device": str(device), "precision": precision,
            "max_memory_gb": cfg.train.max_memory_gb}


class EMA:
    """Exponential moving average of the weights (floating-point tensors; buffers copied)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # warm-up: early on the average follows the model closely; averaging trained weights with the
        # random initialisation (decay**step of it) gives a network that predicts ~0.5 everywhere
        decay = min(self.decay, (1 + step) / (10 + step))
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(m, 1.0 - decay)
            else:
                e.copy_(m)


def lr_lambda(cfg: RunConfig, total_steps: int):
    warm, floor = cfg.optim.warmup_steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


# --------------------------------------------------------------------------- the trainer


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, *, resume_from: Path | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.device = pick_device(cfg.train.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        torch.manual_seed(cfg.train.seed)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
        set_memory_cap(self.device, cfg.train.max_memory_gb)

        state = ck.load(resume_from, map_location="cpu") if resume_from else None
        # on resume the checkpoint has the weights: never fetch pretrained ones just to overwrite them
        mcfg = dataclasses.replace(cfg.model, pretrained=False, pretrained_path=None) if state else cfg.model
        self.model = build_model(mcfg, image_size=cfg.loader.image_size).to(self.device)
        if state is not None:
            fp = model_fingerprint(self.model)
            if state.get("model_fingerprint") != fp:
                raise ck.RunError(f"{resume_from} holds a {state.get('model_fingerprint', {}).get('name')} "
                                  f"checkpoint; this config builds {fp['name']} (model.* must not change on resume)")
            check_state_dict(self.model, state["model"], source=str(resume_from))
            self.model.load_state_dict(state["model"])
        # channels_last pays off on tensor cores; on the CPU oneDNN's depthwise convolutions get slower
        self.channels_last = cfg.train.channels_last and self.device.type == "cuda"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        dc = data_config(self.model)
        self.loader_cfg = dataclasses.replace(cfg.loader, mean=tuple(dc["mean"]), std=tuple(dc["std"]),
                                              channels_last=self.channels_last)

        # data: shard groups for training, whole studies of the validation fold for the metric
        self.train_sel = select_training_shards(cfg)
        self.labels = LabelTable.load(cfg.data.root, cfg.data.label_tables, n_total=self.train_sel.n_total)
        self.labels.check_covers(self.train_sel)  # before any step: a table that does not fit stops here
        self.train_sel = oversample_positives(self.train_sel, self.labels, cfg.data.oversample_positives,
                                              self.run_dir / "oversample")
        studies = pd.read_parquet(Layout(Path(cfg.data.root)).studies)
        self.val_studies = studies[(studies.fold == cfg.data.val_fold) & studies.cohort.isin(cfg.data.val_cohorts)]
        if self.val_studies.empty:
            raise ValueError(f"no validation studies in fold {cfg.data.val_fold} for cohorts {cfg.data.val_cohorts}")
        self.baseline = constant_baseline_score(studies[studies.fold != cfg.data.val_fold], self.val_studies)

        if cfg.train.batch_size == "auto":
            found = auto_batch_size(self.model, cfg, self.device, self.precision)
            ck.atomic_write_json(self.run_dir / "batch_size.json", found)
            bs = found["batch_size"]
        else:
            bs = cfg.train.batch_size
        self.loader_cfg = dataclasses.replace(self.loader_cfg, batch_size=bs)
        self.loader = build_loader(self.train_sel, self.labels, self.loader_cfg, device=self.device, train=True)
        self.steps_per_epoch = max(1, len(self.loader) // cfg.optim.grad_accum)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch

        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg, self.total_steps))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.ema = EMA(self.model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        self.step, self.nan_streak, self.nan_total = 0, 0, 0
        self.best = {"metric": float("inf"), "step": -1}
        self.bad_vals = 0
        if state is not None:
            self._restore(state)
        self.train_model = torch.compile(self.model) if cfg.train.compile else self.model
        self._wandb = None

    # ----------------------------------------------------------------------- state

    def state(self) -> dict:
        return {
            "config": to_dict(self.cfg),
            "model_fingerprint": model_fingerprint(self.model),
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "loader": self.loader.state_dict(),
            "best": dict(self.best),
            "bad_vals": self.bad_vals,
            "nan_total": self.nan_total,
            "torch_rng": torch.get_rng_state(),
        }

    def _restore(self, s: dict) -> None:
        self.opt.load_state_dict(s["optimizer"])
        for g in self.opt.param_groups:  # changed hyper-parameters win (the "babysitting" resume)
            g["initial_lr"] = self.cfg.optim.lr
            g["weight_decay"] = self.cfg.optim.weight_decay
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(self.cfg, self.total_steps),
                                                       last_epoch=s["step"] - 1)
        self.scaler.load_state_dict(s["scaler"])
        if self.ema is not None and s.get("ema") is not None:
            self.ema.module.load_state_dict(s["ema"])
        self.loader.load_state_dict(s["loader"])
        self.step = int(s["step"])
        self.best = dict(s["best"])
        self.bad_vals = int(s.get("bad_vals", 0))
        self.nan_total = int(s.get("nan_total", 0))
        torch.set_rng_state(s["torch_rng"])

    def save(self, best: bool = False) -> None:
        state = self.state()
        ck.save_step(self.run_dir, self.step, state, self.cfg.train.keep_last)
        if best:
            ck.save(self.run_dir / "best.pt", state)

    # ----------------------------------------------------------------------- logging

    def log(self, record: dict) -> None:
        record = {"step": self.step, "epoch": self.loader.epoch, **record}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(record, step=self.step)

    def _start_wandb(self) -> None:
        if self.cfg.log.wandb == "disabled":
            return
        try:
            import wandb

            self._wandb = wandb.init(project=self.cfg.log.project, name=self.cfg.name, dir=str(self.run_dir),
                                     mode=self.cfg.log.wandb, config=to_dict(self.cfg), reinit="finish_previous")
        except Exception as e:  # logging must never stop training
            print(f"wandb unavailable ({e}); metrics go to metrics.jsonl only", file=sys.stderr)

    # ----------------------------------------------------------------------- the loop

    def fit(self) -> dict:
        cfg, dev = self.cfg, self.device
        self._start_wandb()
        accum = cfg.optim.grad_accum
        bar = tqdm(total=self.total_steps, initial=self.step, desc=cfg.name, unit="step", dynamic_ncols=True)
        stop, micro = False, 0
        t_log, imgs_log, wait_log = time.perf_counter(), 0, 0.0
        try:
            while not stop:
                self.model.train()
                t_ready = time.perf_counter()
                for batch in self.loader:
                    wait_log += time.perf_counter() - t_ready  # time the step waited for data
                    with autocast(self.precision, dev):
                        logits = self.train_model(batch.images)
                    loss = weighted_bce(logits.float(), batch.targets, valid=batch.valid,
                                        focal_gamma=cfg.optim.focal_gamma, pos_weight=cfg.optim.pos_weight)
                    if not torch.isfinite(loss):  # note: a CPU-GPU sync point, once per micro-batch
                        self.nan_streak += 1
                        self.nan_total += 1
                        self.opt.zero_grad(set_to_none=True)
                        micro = 0
                        if self.nan_streak >= cfg.train.max_nan_steps:
                            raise RuntimeError(f"{self.nan_streak} non-finite losses in a row at step {self.step}; "
                                               f"lower optim.lr, or resume from an earlier checkpoint with a new lr")
                        t_ready = time.perf_counter()
                        continue
                    self.nan_streak = 0
                    self.scaler.scale(loss / accum).backward()
                    micro += 1
                    imgs_log += int(batch.valid.sum())
                    if micro < accum:
                        t_ready = time.perf_counter()
                        continue
                    micro = 0
                    if cfg.optim.clip_grad_norm > 0:
                        self.scaler.unscale_(self.opt)
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad_norm)
                    self.scaler.step(self.opt)
                    self.scaler.update()
                    self.opt.zero_grad(set_to_none=True)
                    self.sched.step()
                    if self.ema is not None:
                        self.ema.update(self.model, self.step)
                    self.step += 1
                    bar.update()
                    if self.step % cfg.log.every_steps == 0:
                        dt = time.perf_counter() - t_log
                        rec = {"loss": loss.item(), "lr": self.sched.get_last_lr()[0], "images_per_s": imgs_log / dt,
                               "data_wait": wait_log / dt}
                        self.log(rec)
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.0f}",
                                        wait=f"{rec['data_wait']:.0%}")
                        t_log, imgs_log, wait_log = time.perf_counter(), 0, 0.0
                    if self.step % cfg.train.checkpoint_every_steps == 0:
                        self.save()
                    if self.step >= self.total_steps:
                        stop = True
                        break
                    t_ready = time.perf_counter()
                epoch_done = self.loader.position == 0
                if epoch_done and (self.loader.epoch % cfg.train.val_every_epochs == 0 or stop):
                    stop = self._validate_and_checkpoint() or stop
                elif stop:
                    self._validate_and_checkpoint()
                if self.loader.epoch >= cfg.train.epochs and not cfg.train.max_steps:
                    stop = True
        finally:
            bar.close()
            self.plot()
            if self._wandb is not None:
                self._wandb.finish()
        return dict(self.best)

    def _validate_and_checkpoint(self) -> bool:
        """Validate, save (best too when improved); True when early stopping says stop."""
        result = self.validate()
        result["constant_baseline"] = self.baseline
        improved = result["competition_loss"] < self.best["metric"]
        if improved:
            self.best = {"metric": result["competition_loss"], "step": self.step}
            self.bad_vals = 0
        else:
            self.bad_vals += 1
        self.log({"val": result})
        tqdm.write(f"step {self.step}: val competition loss {result['competition_loss']:.4f} "
                   f"(best {self.best['metric']:.4f} @ {self.best['step']}; constant baseline {self.baseline:.4f}), "
                   f"accuracy {result['accuracy']:.3f}")
        self.save(best=improved)
        p = self.cfg.train.early_stopping_patience
        return bool(p and self.bad_vals >= p)

    @torch.no_grad()
    def predict_studies(self, model=None) -> dict[str, np.ndarray]:
        """Slice probabilities (n_slices, 8) for every validation study, head to feet."""
        model = model or (self.ema.module if self.ema else self.model)
        return predict_studies(model, self.cfg, self.loader_cfg, self.val_studies.StudyInstanceUID.tolist(),
                               self.device, self.precision)

    def validate(self) -> dict:
        probs = self.predict_studies()
        return score_studies(probs, self.val_studies, self.cfg.train.study_rule)

    def plot(self) -> None:
        plot_curves(self.run_dir)


# --------------------------------------------------------------------------- shared with evaluate


@torch.no_grad()
def predict_studies(model, cfg: RunConfig, loader_cfg, studies: list[str], device, precision: str
                    ) -> dict[str, np.ndarray]:
    model.eval()
    out: dict[str, list] = {}
    reader = StudyReader(cfg.data.root, dataclasses.replace(loader_cfg, backend="torch"), studies=studies,
                         device=device)
    for b in reader:
        with autocast(precision, device):
            logits = model(b.images)
        out.setdefault(b.study, []).append(torch.sigmoid(logits.float()).cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def score_studies(probs: dict[str, np.ndarray], studies: pd.DataFrame, rule: str) -> dict:
    """Study-level competition loss, accuracy and the per-vertebra report for these predictions."""
    uids = sorted(probs)
    study_p = {u: study_probabilities(probs[u], rule) for u in uids}
    cols = [f"C{i}" for i in range(1, 8)] + ["patient_overall"]
    truth = studies.set_index("StudyInstanceUID").loc[uids, cols]
    loss = score_submission(solution_from_train(truth.reset_index()), submission_frame(study_p))
    report = classification_report(truth.to_numpy(), np.stack([study_p[u] for u in uids]))
    return {"competition_loss": float(loss), "studies": len(uids),
            "accuracy": float(report.loc["overall", "accuracy"]),
            "report": json.loads(report.reset_index().to_json(orient="records"))}


def constant_baseline_score(train_studies: pd.DataFrame, val_studies: pd.DataFrame) -> float:
    """The competition loss on the validation studies of predicting, for every row, the training
    studies' prevalence of that row type: the number a model has to beat."""
    cols = [f"C{i}" for i in range(1, 8)] + ["patient_overall"]
    prev = train_studies[cols].mean().to_numpy(dtype=np.float64)
    sub = submission_frame({u: prev for u in val_studies.StudyInstanceUID})
    return float(score_submission(solution_from_train(val_studies[["StudyInstanceUID", *cols]]), sub))


def plot_curves(run_dir: Path) -> None:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
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
        axes[1].legend(fontsize=8)
    axes[1].set(title="validation: competition loss (study level)", xlabel="step")
    fig.tight_layout()
    fig.savefig(Path(run_dir) / "curves.png", dpi=110)
    plt.close(fig)


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(run_dir / "config.yaml")
