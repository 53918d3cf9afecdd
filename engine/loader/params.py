"""Every random augmentation decision of a batch, drawn on the host: one definition of the
augmentation distributions for both backends.

The DALI pipeline receives these arrays as external-source inputs (coins as BOOL for its
conditionals) and the torch backend uses them on the batch, so neither holds random state
of its own: a sample's augmentations are a pure function of ``(seed, epoch, rank, position)``
— the seed of the run, the epoch, the rank and the sample's position in this rank's part
of the epoch — whatever the batch size. A counter-based generator (Philox, keyed by seed,
epoch and rank, its counter set from the position) gives that for one vectorised draw per
batch. That is what makes a mid-epoch resume a seek (same samples, same pixels) and what
gives every rank its own draws. Coins come from a CPU generator, so deciding what to run
never reads a GPU tensor (no host sync). Mixup is a batch operation: its draw is seeded by
(seed, epoch, rank, the batch's first position).

Every field is always drawn (whatever the probabilities), so switching one augmentation
on or off does not change the draws of the others.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import AugmentConfig

_AUG, _MIX = 0xA06, 0x313  # stream tags: augmentations and mixup draw from separate generators
_PER_SAMPLE = 20  # uniforms reserved per sample: 5 Philox blocks of 4 x 64 bits (17 used)


def batch_rng(seed: int, epoch: int, rank: int, position: int, stream: int = _MIX) -> np.random.Generator:
    """The generator of one batch (mixup): seeded by (seed, epoch, rank, first position, stream)."""
    return np.random.default_rng([seed, epoch, rank, position, stream])


def sample_key(seed: int, epoch: int, rank: int) -> np.ndarray:
    """The Philox key of one rank's epoch (compute it once per epoch: ~60 us)."""
    return np.random.SeedSequence([seed, epoch, rank, _AUG]).generate_state(2, np.uint64)


def sample_uniforms(key: np.ndarray, start: int, n: int) -> np.ndarray:
    """``(n, 20)`` uniforms of the positions ``start .. start + n - 1``: row ``i`` depends on
    ``start + i`` only (each position owns 5 counter blocks), so any batching draws the same."""
    bg = np.random.Philox(key=key, counter=[start * (_PER_SAMPLE // 4), 0, 0, 0])
    return np.random.Generator(bg).random((n, _PER_SAMPLE))


@dataclass
class AugParams:
    """One batch's augmentation parameters, (B,) arrays unless noted; neutral where a coin is False."""

    crop: np.ndarray  # bool: random resized crop drawn
    roi: np.ndarray  # (B, 4) float32 x0, y0, w, h relative to the image; (0, 0, 1, 1) = whole image
    hflip: np.ndarray  # bool
    vflip: np.ndarray  # bool
    rotate: np.ndarray  # bool
    angle: np.ndarray  # float32 degrees, 0 where not rotated
    clahe: np.ndarray  # bool
    contrast: np.ndarray  # float32 factor, 1 where not drawn
    brightness: np.ndarray  # float32 shift as a fraction of the full range, 0 where not drawn
    shift: np.ndarray  # (B, 3) float32 per-channel shift, fraction of the full range, 0 where not drawn

    @property
    def geometric(self) -> bool:
        """Whether any sample needs resampling beyond the plain resize (a host-side bool: no sync)."""
        return bool(self.crop.any() or self.hflip.any() or self.vflip.any() or self.rotate.any())


def draw_params(aug: AugmentConfig, u: np.ndarray) -> AugParams:
    """The augmentation parameters of ``len(u)`` samples from their uniforms (:func:`sample_uniforms`),
    with ``aug``'s distributions (the reference pipeline's)."""
    coin = lambda k, p: u[:, k] < p  # noqa: E731
    crop = coin(0, aug.p_crop)
    area = aug.crop_scale[0] + (aug.crop_scale[1] - aug.crop_scale[0]) * u[:, 1]
    lo, hi = math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1])
    ratio = np.exp(lo + (hi - lo) * u[:, 2])
    w = np.where(crop, np.minimum(np.sqrt(area * ratio), 1.0), 1.0)
    h = np.where(crop, np.minimum(np.sqrt(area / ratio), 1.0), 1.0)
    roi = np.stack([u[:, 3] * (1 - w), u[:, 4] * (1 - h), w, h], axis=1).astype(np.float32)
    rotate = coin(7, aug.p_rotate)
    bc = coin(9, aug.p_brightness_contrast)
    sh = coin(12, aug.p_shift)
    shift = (2 * u[:, 14:17] - 1) * aug.shift_limit
    return AugParams(
        crop=crop, roi=roi, hflip=coin(5, aug.p_hflip), vflip=coin(6, aug.p_vflip), rotate=rotate,
        angle=np.where(rotate, (2 * u[:, 8] - 1) * aug.max_angle, 0.0).astype(np.float32),
        clahe=coin(13, aug.p_clahe),
        contrast=np.where(bc, 1 + (2 * u[:, 10] - 1) * aug.contrast_limit, 1.0).astype(np.float32),
        brightness=np.where(bc, (2 * u[:, 11] - 1) * aug.brightness_limit, 0.0).astype(np.float32),
        shift=np.where(sh[:, None], shift, 0.0).astype(np.float32))


@dataclass
class MixParams:
    """Mixup of one batch: whether it runs, the weight, and each row's partner."""

    on: bool
    lam: float
    partner: np.ndarray  # (B,) int64: a permutation of the valid rows; padding rows are their own partner


def draw_mixup(aug: AugmentConfig, n: int, n_valid: int, rng: np.random.Generator) -> MixParams:
    """Mixup parameters for a batch of ``n`` rows whose first ``n_valid`` are real samples.

    Only real samples are blended, with each other: the padding rows (``valid == False``, always
    at the end of a rank's part) are never anybody's partner, so no sample is counted twice.
    """
    u, lam = rng.random(), float(rng.beta(aug.mixup_alpha, aug.mixup_alpha))
    partner = np.arange(n, dtype=np.int64)
    partner[:n_valid] = rng.permutation(n_valid)
    return MixParams(on=aug.p_mixup > 0 and n_valid >= 2 and u < aug.p_mixup, lam=lam, partner=partner)
