"""Training configuration: one typed dataclass per component, loaded from YAML with
``spinestream.shards.config.load_config`` (unknown keys and wrong types fail with the key path) and
``--set a.b=value`` overrides. The resolved config is saved in every run directory and
checkpoint."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from spinestream.shards.config import ConfigError, FilePath
from spinestream.shards.layout import COHORTS

from .loader.config import LoaderConfig


def _require(ok: bool, key: str, value, rule: str) -> None:
    """Raise with the full key path (``train.val_every_epochs must be >= 1, got 0``).

    A ConfigError passes through ``load_config`` unchanged, so the message keeps the whole path
    instead of being prefixed with the section only.
    """
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


def _cohorts(key: str, names: list[str]) -> None:
    _require(bool(names), key, names, "a non-empty list of cohorts")
    unknown = [c for c in names if c not in COHORTS]
    if unknown:
        raise ConfigError(f"{key}: unknown cohort(s) {unknown}; known: {list(COHORTS)}")
    _require(len(set(names)) == len(names), key, names, "a list without repeats")


@dataclass(kw_only=True)
class DataConfig:
    root: FilePath = "shards"
    """A directory written by `spinestream shard`."""
    train_cohorts: list[str] = field(default_factory=lambda: ["boxed", "negative"])
    """Shard groups to train on (round 1: boxed + negative; round 2: all three)."""
    negatives_per_positive: float = 1.0
    """Round 1's balance: negative shards are added until their samples reach this multiple of the other
    cohorts' samples (0 = all negative shards)."""
    oversample_positives: int = 1
    """Positive oversampling: training slices whose ``any`` target is >= 0.5 are read this many times per
    epoch (1 = off). No image is copied (subset ``.idx`` files in the run directory); the loss-side
    alternative is ``optim.pos_weight``."""
    val_fold: int = 0
    """Fold held out for validation (whole studies); its shards are never trained on."""
    val_cohorts: list[str] = field(default_factory=lambda: ["boxed", "negative", "positive-unboxed"])
    """Studies of the validation fold scored at study level (study labels are known for every cohort)."""
    label_tables: list[str] = field(default_factory=lambda: ["labels/truth.parquet"])
    """Label tables, relative to root; earlier ones win (round 2: truth, then pseudo-labels)."""

    def __post_init__(self) -> None:
        _require(bool(self.root), "data.root", self.root, "a shard directory")
        _cohorts("data.train_cohorts", self.train_cohorts)
        _cohorts("data.val_cohorts", self.val_cohorts)
        _require(self.negatives_per_positive >= 0, "data.negatives_per_positive", self.negatives_per_positive,
                 ">= 0 (0 = all negative shards)")
        _require(self.oversample_positives >= 1, "data.oversample_positives", self.oversample_positives,
                 ">= 1 (1 = off)")
        _require(self.val_fold >= 0, "data.val_fold", self.val_fold, ">= 0")
        _require(bool(self.label_tables), "data.label_tables", self.label_tables, "a non-empty list")


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "tf_efficientnetv2_s"
    """Any timm model name."""
    num_classes: int = 8
    drop_rate: float = 0.2
    """Dropout before the classifier (the reference used 0.2)."""
    pretrained: bool = True
    """ImageNet weights from timm's hub (needs the network) ..."""
    pretrained_path: FilePath | None = None
    """... or from a local file (.pth/.pt/.safetensors); used instead of the hub when set."""
    init_from: FilePath | None = None
    """Start from a run's checkpoint (round 2: runs/round1/best.pt): its EMA weights when it has them, else
    its weights; it must be of the model this config builds (fingerprint-checked). Replaces pretrained
    weights; ignored on resume (the run's own checkpoint has the weights). Its run must have held out this
    run's data.val_fold (see init_from_any_fold)."""
    init_from_any_fold: bool = False
    """Allow model.init_from's run to have held out another fold than data.val_fold. Dangerous: that run
    trained on this run's validation fold, so the validation loss (best.pt's choice, early stopping, the
    comparison with round 1) is measured on studies the starting weights have already fitted, and is
    optimistic. Off: such a checkpoint is refused, naming both folds."""

    def __post_init__(self) -> None:
        _require(bool(self.name), "model.name", self.name, "a timm model name")
        _require(0 <= self.drop_rate < 1, "model.drop_rate", self.drop_rate, "in [0, 1)")
        _require(self.num_classes == 8, "model.num_classes", self.num_classes, "8 (C1..C7 + any)")
        _require(self.init_from is None or bool(self.init_from), "model.init_from", self.init_from,
                 "a checkpoint path or null")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    """Adam, as in the reference."""
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    """Cosine decay from lr to lr * min_lr_ratio over the run."""
    grad_accum: int = 1
    clip_grad_norm: float = 5.0
    """0 = no clipping."""
    ema_decay: float = 0.999
    """0 = no EMA of the weights; validation uses the EMA weights when on."""
    focal_gamma: float = 0.0
    pos_weight: float = 1.0
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """Under torchrun, scale optim.lr with the number of ranks (the global batch is train.batch_size x ranks
    x grad_accum): linear (Goyal et al.: lr x ranks, with warm-up), sqrt (lr x sqrt(ranks), gentler for Adam) or
    none (optim.lr as written, whatever the world size). optim.lr is the one-process value in every case."""

    def __post_init__(self) -> None:
        _require(0 < self.lr < 1, "optim.lr", self.lr, "in (0, 1)")
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, ">= 0")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio,
                 "in [0, 1] (the cosine's floor as a fraction of optim.lr)")
        _require(self.grad_accum >= 1, "optim.grad_accum", self.grad_accum, ">= 1")
        _require(self.clip_grad_norm >= 0, "optim.clip_grad_norm", self.clip_grad_norm, ">= 0 (0 = no clipping)")
        _require(0 <= self.ema_decay < 1, "optim.ema_decay", self.ema_decay, "in [0, 1) (0 = no EMA)")
        _require(self.focal_gamma >= 0, "optim.focal_gamma", self.focal_gamma, ">= 0 (0 = plain BCE)")
        _require(self.pos_weight > 0, "optim.pos_weight", self.pos_weight, "> 0 (1 = unweighted)")


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 10
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = epochs decide)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """auto: bf16 on sm80+, fp16 + GradScaler below (the P100 has no bf16), fp32 on CPU."""
    batch_size: int | Literal["auto"] = "auto"
    """Per rank. auto: the largest batch whose whole step (forward, backward, Adam, EMA), probed on a copy of the
    model, stays under max_memory_gb - memory_headroom_gb (CPU: loader.batch_size); reused on resume; under
    torchrun rank 0 probes and every rank uses its answer."""
    max_memory_gb: float = 16.0
    """Memory cap (set_per_process_memory_fraction) so a bigger card behaves like the 16 GB reference card."""
    memory_headroom_gb: float = 1.5
    """What batch_size: auto leaves under max_memory_gb for memory torch's allocator does not see (CUDA
    context, DALI's pool, nvJPEG): the probe's peak must stay below max_memory_gb - this."""
    compile: bool = False
    channels_last: bool = True
    cudnn_benchmark: bool = True
    seed: int = 0
    val_every_epochs: int = 1
    val_every_steps: int = 0
    """Also validate every this many optimizer steps, mid-epoch (0 = at epoch ends only): round 2's epochs
    are ~630k slices, hours on one card."""
    checkpoint_every_steps: int = 500
    keep_last: int = 2
    early_stopping_patience: int = 0
    """Stop after this many validations in a row without improvement (0 = never). The unit is validations,
    not epochs: epoch-end and train.val_every_steps validations count alike, so with val_every_steps it spans
    at most patience x val_every_steps steps, maybe less than an epoch (configs/round2.yaml sets 15: about
    round 1's 3 epochs)."""
    max_nan_steps: int = 10
    """Non-finite losses in a row before the run stops (each one skips its step)."""
    study_rule: Literal["max", "mean_top_k", "quantile", "noisy_or"] = "max"
    """How slice probabilities become study probabilities."""
    sync_batchnorm: bool = False
    """Under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm; one collective per
    BatchNorm layer and step), for per-rank batches too small for good statistics. Off: each rank normalises
    with its own batch and DDP keeps rank 0's running statistics (plain BatchNorm, the usual choice)."""
    dist_timeout_s: float = 1800.0
    """Under torchrun: how long a rank waits for the others at a collective (a step's gradients, a validation's
    results, a checkpoint) before it stops with an error naming the wait (a rank died or hangs)."""

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "train.epochs", self.epochs, ">= 1")
        _require(self.max_steps >= 0, "train.max_steps", self.max_steps, ">= 0 (0 = train.epochs decide)")
        _require(self.batch_size == "auto" or self.batch_size >= 1, "train.batch_size", self.batch_size,
                 ">= 1 or 'auto'")
        _require(0 < self.max_memory_gb <= 1024, "train.max_memory_gb", self.max_memory_gb, "in (0, 1024] GB")
        _require(0 <= self.memory_headroom_gb < self.max_memory_gb, "train.memory_headroom_gb",
                 self.memory_headroom_gb, "in [0, train.max_memory_gb)")
        _require(self.val_every_epochs >= 1, "train.val_every_epochs", self.val_every_epochs, ">= 1")
        _require(self.val_every_steps >= 0, "train.val_every_steps", self.val_every_steps,
                 ">= 0 (0 = at epoch ends only)")
        _require(self.checkpoint_every_steps >= 1, "train.checkpoint_every_steps", self.checkpoint_every_steps,
                 ">= 1")
        _require(self.keep_last >= 1, "train.keep_last", self.keep_last, ">= 1")
        _require(self.early_stopping_patience >= 0, "train.early_stopping_patience", self.early_stopping_patience,
                 ">= 0 (0 = never stop early)")
        _require(self.max_nan_steps >= 1, "train.max_nan_steps", self.max_nan_steps, ">= 1")
        _require(self.dist_timeout_s > 0, "train.dist_timeout_s", self.dist_timeout_s, "> 0 seconds")


@dataclass(kw_only=True)
class LogConfig:
    wandb: Literal["offline", "online", "disabled"] = "offline"
    """offline: no network needed, `wandb sync RUN_DIR/wandb/...` later. ``WANDB_MODE``, when set, wins over this
    (engine/trainlog.py), except that ``disabled`` here never imports wandb."""
    project: str = "spinestream"
    every_steps: int = 10
    """Log (and read the loss on the host: a CPU-GPU sync) every this many optimizer steps."""

    def __post_init__(self) -> None:
        _require(bool(self.project), "log.project", self.project, "a non-empty name")
        _require(self.every_steps >= 1, "log.every_steps", self.every_steps, ">= 1")


@dataclass(kw_only=True)
class RunConfig:
    """Everything one `spinestream train` run needs."""

    name: str = "round1"
    out_dir: FilePath = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name, "name", self.name, "a run name without '/'")
        _require(bool(self.out_dir), "out_dir", self.out_dir, "a directory")

    def with_absolute_paths(self) -> RunConfig:
        """This config with ``out_dir``, ``data.root`` and ``model.init_from`` absolute and resolved (against the
        current directory): how ``spinestream train`` stores them in ``RUN_DIR/config.yaml``, so a run directory
        works from anywhere, and how ``spinestream run`` compares a run's config with the one it would train."""
        def a(p: str | None) -> str | None:
            return None if p is None else str(Path(p).expanduser().resolve())

        return dataclasses.replace(self, out_dir=a(self.out_dir),
                                   data=dataclasses.replace(self.data, root=a(self.data.root)),
                                   model=dataclasses.replace(self.model, init_from=a(self.model.init_from)))
