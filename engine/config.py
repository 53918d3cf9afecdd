"""Training configuration: one typed dataclass per component, loaded from YAML with
``shards.config.load_config`` (unknown keys and wrong types fail with the key path) and
``--set a.b=value`` overrides. The resolved config is saved in every run directory and
checkpoint."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .loader.config import LoaderConfig


@dataclass(kw_only=True)
class DataConfig:
    root: str = "shards"
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
        if self.negatives_per_positive < 0:
            raise ValueError(f"negatives_per_positive must be >= 0, got {self.negatives_per_positive}")
        if self.oversample_positives < 1:
            raise ValueError(f"oversample_positives must be >= 1 (1 = off), got {self.oversample_positives}")
        if not self.train_cohorts:
            raise ValueError("train_cohorts must name at least one cohort")


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "tf_efficientnetv2_s"
    """Any timm model name."""
    num_classes: int = 8
    drop_rate: float = 0.2
    """Dropout before the classifier (the reference used 0.2)."""
    pretrained: bool = True
    """ImageNet weights from timm's hub (needs the network) ..."""
    pretrained_path: str | None = None
    """... or from a local file (.pth/.pt/.safetensors); used instead of the hub when set."""

    def __post_init__(self) -> None:
        if not 0 <= self.drop_rate < 1:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate}")
        if self.num_classes != 8:
            raise ValueError("num_classes must be 8 (C1..C7 + any)")


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

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.grad_accum < 1 or self.warmup_steps < 0:
            raise ValueError("lr > 0, grad_accum >= 1 and warmup_steps >= 0 are required")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 10
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = epochs decide)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """auto: bf16 on sm80+, fp16 + GradScaler below (the P100 has no bf16), fp32 on CPU."""
    batch_size: int | Literal["auto"] = "auto"
    """auto: the largest batch whose forward/backward fits under max_memory_gb (CPU: loader.batch_size)."""
    max_memory_gb: float = 16.0
    """Memory cap (set_per_process_memory_fraction) so a bigger card behaves like the 16 GB reference card."""
    compile: bool = False
    channels_last: bool = True
    cudnn_benchmark: bool = True
    seed: int = 0
    val_every_epochs: int = 1
    checkpoint_every_steps: int = 500
    keep_last: int = 2
    early_stopping_patience: int = 0
    """Stop after this many validations without improvement (0 = never)."""
    max_nan_steps: int = 10
    """Non-finite losses in a row before the run stops (each one skips its step)."""
    study_rule: Literal["max", "mean_top_k", "quantile", "noisy_or"] = "max"
    """How slice probabilities become study probabilities."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.max_steps < 0 or self.keep_last < 1 or self.max_nan_steps < 1:
            raise ValueError("epochs >= 1, max_steps >= 0, keep_last >= 1 and max_nan_steps >= 1 are required")
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or 'auto', got {self.batch_size}")


@dataclass(kw_only=True)
class LogConfig:
    wandb: Literal["offline", "online", "disabled"] = "offline"
    """offline: no network needed, `wandb sync RUN_DIR/wandb/...` later."""
    project: str = "spinestream"
    every_steps: int = 10


@dataclass(kw_only=True)
class RunConfig:
    """Everything one `spinestream train` run needs."""

    name: str = "round1"
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
