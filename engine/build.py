"""The pieces a training run is built from, one small function each, shared by the trainer
(:class:`spinestream.engine.trainer.Trainer`) and ``spinestream bench train`` so neither retypes the GPU setup.

    device, precision = build_device(cfg)
    model, channels_last = build_model_for(cfg, device, state)
    data = build_data(cfg, run_dir)                      # selection, labels, validation studies, baseline
    loader_cfg = build_loader_cfg(cfg, model, device, precision, channels_last, batch_size)
    opt, sched, scaler, ema = build_optimization(cfg, model, precision, device, total_steps)
"""
from __future__ import annotations

import dataclasses
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from spinestream import InputError, MissingInput
from spinestream.shards.layout import Layout
from spinestream.shards.manifest import read_manifest
from spinestream.shards.tables import read_study_table

from . import checkpoint as ck
from .config import RunConfig
from .dist import Dist
from .device import channels_last_default, compile_unsupported, pick_device, resolve_loader_dtype, \
    resolve_precision, set_memory_cap
from .ema import ModelEma
from .loader import DeviceLabels, Selection, oversample_positives, select
from .metrics import constant_baseline
from .model import build_model, check_state_dict, data_config, model_fingerprint


def build_device(cfg: RunConfig, d: Dist | None = None) -> tuple[torch.device, str]:
    """The indexed device (the local rank's under torchrun) and precision; seeds torch, python's ``random`` and
    numpy's global generator (``train.seed`` + rank: ranks draw different dropout masks), sets cudnn.benchmark and
    the memory cap."""
    d = d or Dist()
    device = pick_device(cfg.train.device, d.local_rank)
    precision = resolve_precision(cfg.train.precision, device)
    if cfg.train.compile and (why := compile_unsupported(device)):
        raise InputError(f"train.compile=true: {why}; set train.compile=false")
    if cfg.train.sync_batchnorm and d.enabled and device.type != "cuda":
        raise InputError("train.sync_batchnorm=true needs CUDA devices (SyncBatchNorm has no CPU kernel); set "
                         "train.sync_batchnorm=false")
    torch.manual_seed(cfg.train.seed + d.rank)
    # python's and numpy's global generators: unused by training, but checkpointed; seeded, a run's checkpoints are
    # byte-reproducible (the pipeline fingerprints best.pt; an unseeded state differed in every process)
    random.seed(cfg.train.seed + d.rank)
    np.random.seed((cfg.train.seed + d.rank) % 2 ** 32)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    set_memory_cap(device, cfg.train.max_memory_gb)
    return device, precision


def build_model_for(cfg: RunConfig, device: torch.device, state: dict | None = None, source: str = "", *,
                    init: dict | None = None) -> tuple[torch.nn.Module, bool]:
    """The model on ``device`` and whether it is channels_last: a checkpoint's weights when ``state`` is given
    (resume), else those of ``init`` (``model.init_from``'s checkpoint, :func:`init_weights`; round 2 from
    round 1), else pretrained or random ones."""
    if state is not None:
        init = None  # resume: the run's own checkpoint wins
    # a checkpoint has the weights: never fetch pretrained ones just to overwrite them
    mcfg = dataclasses.replace(cfg.model, pretrained=False, pretrained_path=None) \
        if state is not None or init is not None else cfg.model
    model = build_model(mcfg, image_size=cfg.loader.image_size).to(device)
    if state is not None:
        fp = model_fingerprint(model)
        if state.get("model_fingerprint") != fp:
            raise ck.RunError(f"{source} holds a {state.get('model_fingerprint', {}).get('name')} "
                              f"checkpoint; this config builds {fp['name']} (model.* must not change on resume)")
        check_state_dict(model, state["model"], source=source)
        model.load_state_dict(state["model"])
    elif init is not None:
        _load_init(model, init, cfg.model.init_from)
    channels_last = channels_last_default(device, cfg.train.channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, channels_last


def init_weights(cfg: RunConfig) -> dict | None:
    """``model.init_from``'s checkpoint (read with ``weights_only=True``), or None when not set."""
    path = cfg.model.init_from
    if not path:
        return None
    if not Path(path).is_file():
        raise MissingInput(f"model.init_from={path}: no such checkpoint (train round 1 first, or set "
                           f"model.init_from=null to start from pretrained weights)")
    return ck.load(Path(path))


def _load_init(model: torch.nn.Module, state: dict, path: str) -> None:
    """The EMA weights of ``state`` (else its weights) into ``model``, refusing another model's checkpoint."""
    fp = model_fingerprint(model)
    theirs = state.get("model_fingerprint") or {}
    if theirs != fp:
        raise ck.RunError(f"model.init_from={path} holds a {theirs.get('name')} checkpoint "
                          f"({theirs.get('n_params')} parameters); this config builds {fp['name']} "
                          f"({fp['n_params']}): set model.name to the round-1 run's model, or drop model.init_from")
    weights = state["ema"] if state.get("ema") is not None else state["model"]
    check_state_dict(model, weights, source=path)
    model.load_state_dict(weights)


def init_reference(cfg: RunConfig, state: dict | None) -> dict | None:
    """What ``model.init_from``'s run reached on the same validation fold (``{"name", "competition_loss",
    "step", "fold"}``), for the log and curves.png; None when not set.

    That run must have held out this run's ``data.val_fold``: it trained on every other fold, so another
    held-out fold means this run validates on studies its starting weights were trained on. Refused
    (:class:`spinestream.engine.checkpoint.RunError` naming both folds and the fix), as is a checkpoint that does not
    record its fold, unless ``model.init_from_any_fold`` accepts it (then with a warning, and no reference:
    a loss on another fold is none)."""
    if state is None:
        return None
    run_cfg = state.get("config") or {}
    fold = (run_cfg.get("data") or {}).get("val_fold")
    if fold != cfg.data.val_fold:
        held = (f"its run held out data.val_fold={fold}, so it trained on fold {cfg.data.val_fold}"
                if fold is not None else "it does not record which fold its run held out (no config in it)")
        if not cfg.model.init_from_any_fold:
            fix = f"set data.val_fold={fold} (the fold it held out)" if fold is not None else \
                "start from a checkpoint `spinestream train` wrote"
            raise ck.RunError(
                f"model.init_from={cfg.model.init_from}: {held}, the fold this run validates on "
                f"(data.val_fold={cfg.data.val_fold}): its validation loss would be measured on studies the "
                f"starting weights were trained on. {fix[0].upper() + fix[1:]}, or set "
                f"model.init_from_any_fold=true to accept an optimistic validation")
        print(f"warning: model.init_from={cfg.model.init_from}: {held}; model.init_from_any_fold=true: "
              f"this run's validation on fold {cfg.data.val_fold} is optimistic", file=sys.stderr)
        return None
    best = state.get("best") or {}
    metric = best.get("metric")
    if metric is None or not math.isfinite(float(metric)):
        return None
    return {"name": str(run_cfg.get("name") or Path(cfg.model.init_from).parent.name),
            "competition_loss": float(metric), "step": int(best.get("step", -1)), "fold": int(fold)}


# --------------------------------------------------------------------------- data


@dataclass
class TrainData:
    """What a run trains and validates on."""

    train_sel: Selection  # training shards (validation fold excluded, negatives balanced, positives oversampled)
    labels: DeviceLabels
    val_studies: pd.DataFrame  # whole studies of the validation fold, scored at study level
    baseline: float  # competition loss of predicting the training studies' prevalence on val_studies


def check_cohorts(cfg: RunConfig, studies: pd.DataFrame) -> None:
    """Every configured cohort must exist in this shard set (before any step, not as a silent empty group)."""
    d = cfg.data
    shard_cohorts = {s.cohort for s in read_manifest(d.root).shards if s.fold != d.val_fold}
    missing = [c for c in d.train_cohorts if c not in shard_cohorts]
    if missing:
        raise InputError(f"data.train_cohorts: {d.root} has no training shards (outside data.val_fold="
                         f"{d.val_fold}) for cohort(s) {missing}; it has {sorted(shard_cohorts)}")
    present = set(studies.cohort)
    missing = [c for c in d.val_cohorts if c not in present]
    if missing:
        raise InputError(f"data.val_cohorts: {d.root} has no studies of cohort(s) {missing}; "
                         f"it has {sorted(present)}")


def select_training_shards(cfg: RunConfig) -> Selection:
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
            n += neg.shards[k].samples
        neg.shards = sorted(chosen, key=lambda s: s.name)
    if sel is None:
        return neg
    sel.shards = sel.shards + neg.shards
    sel.cohorts = tuple(d.train_cohorts)
    return sel


def build_data(cfg: RunConfig, run_dir: Path) -> TrainData:
    """Shard groups for training, whole studies of the validation fold for the metric."""
    d = cfg.data
    studies = read_study_table(Layout(Path(d.root)).studies)
    check_cohorts(cfg, studies)
    sel = select_training_shards(cfg)
    labels = DeviceLabels.load(d.root, d.label_tables, n_total=sel.n_total)
    labels.check_covers(sel)  # before any step: a table that does not fit stops here
    sel = oversample_positives(sel, labels, d.oversample_positives, Path(run_dir) / "oversample")
    val = studies[(studies.fold == d.val_fold) & studies.cohort.isin(d.val_cohorts)]
    if val.empty:
        raise InputError(f"data.val_fold={d.val_fold}: no validation studies for data.val_cohorts={d.val_cohorts}")
    baseline = constant_baseline(val, prevalence_from=studies[studies.fold != d.val_fold])
    return TrainData(sel, labels, val, baseline)


# --------------------------------------------------------------------------- loader and optimisation


def build_loader_cfg(cfg: RunConfig, model: torch.nn.Module, device: torch.device, precision: str,
                     channels_last: bool, batch_size: int):
    """The loader config for this model and device: its normalisation, layout, batch size and a dtype
    the device can feed (a half-precision loader on an fp32 CPU run becomes float32)."""
    dc = data_config(model)
    return dataclasses.replace(cfg.loader, mean=tuple(dc["mean"]), std=tuple(dc["std"]), channels_last=channels_last,
                               batch_size=batch_size,
                               dtype=resolve_loader_dtype(cfg.loader.dtype, device, precision))


def steps_per_epoch(batches: int, grad_accum: int) -> int:
    """Optimizer steps per epoch: an accumulation window never crosses an epoch end (the last one may be short)."""
    return max(1, math.ceil(batches / grad_accum))


def lr_lambda(cfg: RunConfig, total_steps: int):
    """Linear warm-up to optim.lr, then cosine to optim.lr * min_lr_ratio at total_steps."""
    warm, floor = cfg.optim.warmup_steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def effective_lr(cfg: RunConfig, world: int) -> float:
    """``optim.lr`` scaled for ``world`` ranks as ``optim.lr_scaling`` says (none: as written)."""
    factor = {"none": 1.0, "linear": float(world), "sqrt": math.sqrt(world)}[cfg.optim.lr_scaling]
    return cfg.optim.lr * factor


def build_optimization(cfg: RunConfig, model: torch.nn.Module, precision: str, device: torch.device,
                       total_steps: int, world: int = 1):
    """Adam (fused: it takes a found-inf flag and skips the update on the device, no host sync; its learning
    rate :func:`effective_lr` for ``world`` ranks), the warm-up + cosine schedule, the GradScaler (on for fp16
    only) and the EMA (None when off)."""
    opt = torch.optim.Adam(model.parameters(), lr=effective_lr(cfg, world), weight_decay=cfg.optim.weight_decay,
                           fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ema = ModelEma(model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    return opt, sched, scaler, ema
