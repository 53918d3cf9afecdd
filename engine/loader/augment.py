"""The reference augmentations on a uint8 batch tensor, on whatever device it is on (GPU in
training): the torch backend's augmentation, and mixup/normalisation for both backends.

Geometry (random resized crop, flips, rotation, and the resize to the output size) is one
affine ``grid_sample`` per batch; intensity (CLAHE, per-channel shift,
brightness/contrast) follows, each with its own probability per sample. With every
probability 0 and the output size equal to the input size the batch comes back
unchanged (no resampling happens at all).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .clahe import clahe_where
from .config import AugmentConfig


def _coin(p: float, n: int, g: torch.Generator, device) -> torch.Tensor:
    if p <= 0:
        return torch.zeros(n, dtype=torch.bool, device=device)
    return torch.rand(n, generator=g, device=device) < p


def _uniform(lo: float, hi: float, shape, g: torch.Generator, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g, device=device)


def geometry(images: torch.Tensor, cfg: AugmentConfig, size: int, g: torch.Generator) -> torch.Tensor:
    """Crop/flip/rotate and resize ``(B, C, H, W)`` uint8 -> float32 ``(B, C, size, size)``."""
    b, _, h, w = images.shape
    dev = images.device
    crop, hf, vf, rot = (_coin(p, b, g, dev) for p in (cfg.p_crop, cfg.p_hflip, cfg.p_vflip, cfg.p_rotate))
    if not (crop.any() or hf.any() or vf.any() or rot.any()):
        x = images.float()
        if (h, w) == (size, size):
            return x
        # no antialiasing: the DALI backend resizes the same way (512 -> 384 barely aliases)
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    # random resized crop in normalised coordinates: half-extent (sw, sh), centre (cx, cy)
    area = _uniform(cfg.crop_scale[0], cfg.crop_scale[1], b, g, dev)
    logr = _uniform(math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), b, g, dev)
    sw = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)
    sh = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
    sw, sh = torch.where(crop, sw, torch.ones_like(sw)), torch.where(crop, sh, torch.ones_like(sh))
    cx = (2 * torch.rand(b, generator=g, device=dev) - 1) * (1 - sw)
    cy = (2 * torch.rand(b, generator=g, device=dev) - 1) * (1 - sh)
    fx = torch.where(hf, -1.0, 1.0).to(dev)
    fy = torch.where(vf, -1.0, 1.0).to(dev)
    ang = torch.where(rot, _uniform(-cfg.max_angle, cfg.max_angle, b, g, dev), torch.zeros(b, device=dev))
    ang = ang * (math.pi / 180)
    cos, sin = torch.cos(ang), torch.sin(ang)
    # input = R(angle) · diag(sw·fx, sh·fy) · output + centre   (B, 2, 3)
    theta = torch.stack([
        torch.stack([cos * sw * fx, -sin * sh * fy, cx], dim=1),
        torch.stack([sin * sw * fx, cos * sh * fy, cy], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, (b, images.shape[1], size, size), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def intensity(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """CLAHE, brightness/contrast and per-channel shift on float ``(B, C, H, W)`` in [0, 255]."""
    b, c = x.shape[:2]
    dev = x.device
    cl = _coin(cfg.p_clahe, b, g, dev)
    if cl.any():
        u8 = x.round().clamp(0, 255).to(torch.uint8)
        x = torch.where(cl[:, None, None, None],
                        clahe_where(u8, cl, clip_limit=cfg.clahe_clip, tiles=(cfg.clahe_tiles, cfg.clahe_tiles)).float(),
                        x)
    # brightness/contrast, saturated, then the per-channel shift (unclipped): the order and
    # clipping of the DALI pipeline, which folds the shift into its normalisation
    bc = _coin(cfg.p_brightness_contrast, b, g, dev)
    if bc.any():
        alpha = 1.0 + _uniform(-cfg.contrast_limit, cfg.contrast_limit, b, g, dev)
        beta = _uniform(-cfg.brightness_limit, cfg.brightness_limit, b, g, dev) * 255.0
        alpha = torch.where(bc, alpha, torch.ones_like(alpha))
        beta = torch.where(bc, beta, torch.zeros_like(beta))
        x = (x * alpha[:, None, None, None] + beta[:, None, None, None]).clamp(0.0, 255.0)
    sh = _coin(cfg.p_shift, b, g, dev)
    if sh.any():
        shift = _uniform(-cfg.shift_limit, cfg.shift_limit, (b, c), g, dev) * 255.0
        x = x + torch.where(sh[:, None], shift, torch.zeros_like(shift))[:, :, None, None]
    return x


def augment(images: torch.Tensor, cfg: AugmentConfig, size: int, g: torch.Generator) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> float32 ``(B, C, size, size)`` in [0, 255], augmented."""
    return intensity(geometry(images, cfg, size, g), cfg, g)


def normalize(x: torch.Tensor, mean, std, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """[0, 255] -> (x/255 - mean) / std in ``dtype``; channels_last memory format if asked."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    x = ((x.float() - m) / s).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def mixup(x: torch.Tensor, y: torch.Tensor, cfg: AugmentConfig, g: torch.Generator):
    """Mixup on the batch with probability ``p_mixup``: a Beta(alpha, alpha) blend with a permutation."""
    if cfg.p_mixup <= 0 or x.shape[0] < 2:
        return x, y
    dev = x.device
    if torch.rand(1, generator=g, device=dev).item() >= cfg.p_mixup:
        return x, y
    # the weight comes from the batch generator too, so a resumed run mixes the same way
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=dev).item())
    lam = float(np.random.default_rng(seed).beta(cfg.mixup_alpha, cfg.mixup_alpha))
    perm = torch.randperm(x.shape[0], generator=g, device=dev)
    return (lam * x + (1 - lam) * x[perm]).to(x.dtype), lam * y + (1 - lam) * y[perm]
