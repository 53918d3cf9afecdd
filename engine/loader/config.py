"""Loader configuration (the ``loader:`` section of a training config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

BACKENDS = ("auto", "dali", "torch")


def torch_dtype(name: str):
    """LoaderConfig.dtype -> torch dtype."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


@dataclass(kw_only=True)
class AugmentConfig:
    """The reference pipeline's augmentations, each with its own probability (0 = off).

    Applied on the GPU: by DALI operators in the DALI backend, by ``spinestream.engine.loader.augment``
    on the batch in the torch backend. Geometry is expressed relative to the image so
    both backends draw from the same distributions.
    """

    p_crop: float = 0.3
    """Random resized crop: area fraction in crop_scale, aspect ratio in crop_ratio."""
    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (0.8, 1.25)
    p_hflip: float = 0.3
    p_vflip: float = 0.3
    p_rotate: float = 0.3
    max_angle: float = 15.0
    """Degrees; uniform in [-max_angle, max_angle], zero fill."""
    p_shift: float = 0.3
    """Per-channel additive shift (albumentations' RGBShift) ..."""
    shift_limit: float = 0.08
    """... uniform in ±shift_limit of the full range, independently per channel."""
    p_brightness_contrast: float = 0.3
    brightness_limit: float = 0.1
    """Brightness shift in ±limit of the full range; contrast factor in 1 ± contrast_limit."""
    contrast_limit: float = 0.1
    p_clahe: float = 0.3
    clahe_clip: float = 2.0
    clahe_tiles: int = 8
    p_mixup: float = 0.0
    """Mixup on the GPU batch (both backends, in torch): probability per batch ..."""
    mixup_alpha: float = 0.4
    """... and Beta(alpha, alpha) mixing weight."""

    def __post_init__(self) -> None:
        for name in ("p_crop", "p_hflip", "p_vflip", "p_rotate", "p_shift", "p_brightness_contrast", "p_clahe",
                     "p_mixup"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {v}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")
        if self.clahe_tiles < 1 or self.clahe_clip <= 0 or self.mixup_alpha <= 0:
            raise ValueError("clahe_tiles >= 1, clahe_clip > 0 and mixup_alpha > 0 are required")

    def off(self) -> AugmentConfig:
        """The same settings with every probability 0 (validation, tests)."""
        import dataclasses

        return dataclasses.replace(self, **{f: 0.0 for f in (
            "p_crop", "p_hflip", "p_vflip", "p_rotate", "p_shift", "p_brightness_contrast", "p_clahe", "p_mixup")})


@dataclass(kw_only=True)
class LoaderConfig:
    """How shards become GPU batches."""

    backend: Literal["auto", "dali", "torch"] = "auto"
    """'auto' = DALI when it is installed, else the torch fallback (with a one-line notice)."""
    batch_size: int = 32
    image_size: int = 384
    """Output side; shard images (e.g. 512) are resized (or randomly cropped and resized) to it."""
    num_threads: int = 2
    """DALI CPU threads / torch DataLoader worker processes. DALI's threads run the CPU operators
    (all of them in CPU mode; with ``device="mixed"`` the host stage of nvJPEG — the whole Huffman
    decode on cards without a hardware JPEG decoder (P100, T4), a share of it with one (A100/H100/H200,
    see hw_decoder_load)); the JPEG reads run in the training process. Default 2: a Kaggle GPU
    session has 2 physical cores. ``bench loader`` uses this value unless told otherwise."""
    prefetch: int = 2
    """Batches prepared ahead (DALI prefetch_queue_depth / DataLoader prefetch_factor)."""
    dali_reader: Literal["index", "webdataset"] = "index"
    """DALI: 'index' = JPEG bytes read by ``.idx`` offset in one global permutation per epoch (an
    external source; every stretch of an epoch has the epoch's composition, engine/loader/base.py).
    'webdataset' = the legacy ``fn.readers.webdataset`` pipeline, which walks the shard list in order
    and mixes only inside initial_fill: it does not mix across shards. Only the loader benchmark's
    before/after line builds it (benchmarks/dali_webdataset.py); training refuses it."""
    initial_fill: int = 4096
    """The legacy webdataset reader's shuffle buffer (samples); unused by the index reader."""
    hw_decoder_load: float | Literal["auto"] = "auto"
    """DALI mixed decode: the share of images sent to nvJPEG's hardware decoder. auto = 0.65 on a
    card that has one (A100/A30/H100/H200, engine.device.has_hw_jpeg_decoder), else 0."""
    seed: int = 0
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    channels_last: bool = True
    torch_decode: Literal["auto", "cpu", "gpu"] = "auto"
    """torch backend: decode JPEG in the DataLoader workers (cpu) or as a batch with nvJPEG through
    torchvision (gpu); auto = gpu only on a CUDA card with a hardware JPEG decoder (A100/H100/H200).
    Without one torchvision's CUDA decode runs the Huffman stage on the host, one image at a time,
    in the training thread: CPU decode in the workers is the better default there."""
    bad_samples: Literal["error", "skip"] = "error"
    """A corrupt sample (its bytes fail their CRC-32 in the shard's ``.sums``, or its JPEG does not decode):
    'error' stops with one line naming the shard and the sample (ShardError); 'skip' trains on without it:
    the sample keeps its place in the epoch as an invalid row (valid == False, like padding: no loss, no
    mixup partner, not counted in n_valid), is counted in ``Loader.skipped`` and named in a warning."""
    verify_samples: bool = True
    """Check each JPEG against its CRC-32 as it is read (~27 µs per 120 KB sample on this project's 2-core
    VM: in the DataLoader workers for the torch backend, in the training thread for DALI's). Shards
    written before the ``.sums`` files existed are read unchecked either way."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.bad_samples not in ("error", "skip"):
            raise ValueError(f"bad_samples must be 'error' or 'skip', got {self.bad_samples!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 16 <= self.image_size <= 2048:
            raise ValueError(f"image_size must be in [16, 2048], got {self.image_size}")
        if self.num_threads < 0 or self.prefetch < 1 or self.initial_fill < 1:
            raise ValueError("num_threads >= 0, prefetch >= 1 and initial_fill >= 1 are required")
        if self.hw_decoder_load != "auto" and not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ValueError(f"hw_decoder_load must be 'auto' or in [0, 1], got {self.hw_decoder_load}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
