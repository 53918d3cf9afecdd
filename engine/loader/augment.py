"""The reference augmentations on a uint8 batch tensor, on whatever device it is on (GPU in
training): the torch backend's augmentation, and mixup/normalisation for both backends.

Geometry (random resized crop, flips, rotation, and the resize to the output size) is one
affine ``grid_sample`` per batch; intensity (CLAHE, per-channel shift,
brightness/contrast) follows, each with its own probability per sample. With every
probability 0 and the output size equal to the input size the batch comes back
unchanged (no resampling happens at all).

Every random decision comes in as :class:`spinestream.engine.loader.params.AugParams`, drawn on the
host (the DALI backend consumes the same parameters): the branches here test host arrays,
and the parameters reach the device in one copy per batch, so nothing in this file reads a
GPU tensor back (no host sync).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .clahe import clahe_where
from .config import AugmentConfig
from .params import AugParams, MixParams


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on ``device``: through pinned memory on CUDA, so the copy is asynchronous."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _device_params(p: AugParams, device: torch.device) -> dict[str, torch.Tensor]:
    """The float parameters of a batch as device tensors, packed into one host-to-device copy."""
    packed = np.concatenate([p.roi, p.hflip[:, None], p.vflip[:, None], p.angle[:, None], p.contrast[:, None],
                             p.brightness[:, None], p.shift], axis=1).astype(np.float32)  # (B, 12)
    t = _to_device(packed, device)
    return {"roi": t[:, 0:4], "hflip": t[:, 4], "vflip": t[:, 5], "angle": t[:, 6], "contrast": t[:, 7],
            "brightness": t[:, 8], "shift": t[:, 9:12]}


def geometry(images: torch.Tensor, p: AugParams, t: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """Crop/flip/rotate and resize ``(B, C, H, W)`` uint8 -> float32 ``(B, C, size, size)``."""
    b, _, h, w = images.shape
    if not p.geometric:  # decided on the host: no sync
        x = images.float()
        if (h, w) == (size, size):
            return x
        # no antialiasing: the DALI backend resizes the same way (512 -> 384 barely aliases)
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    # the crop box (x0, y0, w, h) relative to the image -> half-extent (sw, sh) and centre (cx, cy)
    # in grid_sample's [-1, 1] coordinates; the whole image where no crop was drawn
    x0, y0, sw, sh = t["roi"].unbind(1)
    cx, cy = 2 * x0 + sw - 1, 2 * y0 + sh - 1
    fx, fy = 1 - 2 * t["hflip"], 1 - 2 * t["vflip"]
    ang = t["angle"] * (math.pi / 180)
    cos, sin = torch.cos(ang), torch.sin(ang)
    # input = R(angle) · diag(sw·fx, sh·fy) · output + centre   (B, 2, 3)
    theta = torch.stack([
        torch.stack([cos * sw * fx, -sin * sh * fy, cx], dim=1),
        torch.stack([sin * sw * fx, cos * sh * fy, cy], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, (b, images.shape[1], size, size), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def intensity(x: torch.Tensor, p: AugParams, t: dict[str, torch.Tensor], cfg: AugmentConfig) -> torch.Tensor:
    """CLAHE, brightness/contrast and per-channel shift on float ``(B, C, H, W)`` in [0, 255]."""
    if p.clahe.any():
        u8 = x.round().clamp(0, 255).to(torch.uint8)
        # a CPU mask: clahe_where finds the selected rows on the host, no sync
        x = clahe_where(u8, torch.from_numpy(p.clahe), clip_limit=cfg.clahe_clip,
                        tiles=(cfg.clahe_tiles, cfg.clahe_tiles)).float()
    # brightness/contrast, saturated, then the per-channel shift (unclipped): the order and
    # clipping of the DALI pipeline, which folds the shift into its normalisation.
    # Neutral parameters (contrast 1, shift 0) where a sample's coin was False.
    if (p.contrast != 1).any() or (p.brightness != 0).any():
        alpha = t["contrast"][:, None, None, None]
        beta = (t["brightness"] * 255.0)[:, None, None, None]
        x = (x * alpha + beta).clamp(0.0, 255.0)
    if p.shift.any():
        x = x + (t["shift"] * 255.0)[:, :, None, None]
    return x


def augment(images: torch.Tensor, cfg: AugmentConfig, size: int, p: AugParams) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> float32 ``(B, C, size, size)`` in [0, 255], augmented as ``p`` says."""
    t = _device_params(p, images.device)
    return intensity(geometry(images, p, t, size), p, t, cfg)


_NORM: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _scale_bias(mean, std, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, C, 1, 1) ``1 / std`` and ``-mean / std`` on the 0..255 scale, built once per device (no per-batch copy)."""
    key = (tuple(mean), tuple(std), device)
    if key not in _NORM:
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        _NORM[key] = ((1 / s).to(device), (-m / s).to(device))
    return _NORM[key]


def normalize(x: torch.Tensor, mean, std, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """[0, 255] -> (x/255 - mean) / std in ``dtype``; channels_last memory format if asked."""
    scale, bias = _scale_bias(mean, std, x.device)
    x = x.float()
    if channels_last:  # the normalisation writes in the input's layout: no copy after it
        x = x.contiguous(memory_format=torch.channels_last)
    return torch.addcmul(bias, x, scale).to(dtype)


def mixup(x: torch.Tensor, y: torch.Tensor, mix: MixParams):
    """Mixup of a batch as ``mix`` says (:func:`spinestream.engine.loader.params.draw_mixup`): row ``i`` becomes
    ``lam * row_i + (1 - lam) * row_partner[i]``; padding rows are their own partner, so they are
    never blended into a real sample."""
    if not mix.on:
        return x, y
    partner = _to_device(mix.partner, x.device)
    return (mix.lam * x + (1 - mix.lam) * x[partner]).to(x.dtype), mix.lam * y + (1 - mix.lam) * y[partner]
