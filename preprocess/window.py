"""HU -> windowed uint8 images at the output size. Pure functions, no I/O.

A window is ``(level, width)`` in HU: values map linearly from ``level - width/2`` (0) to
``level + width/2`` (255), clipped. Resizing happens on the float HU image, before
quantisation, so a resized slice loses no more than one rounding step.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def window_u8(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Float HU ``(H, W)`` -> uint8 ``(H, W)`` through one window (rounded to nearest)."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    lo = level - width / 2.0
    scale = np.float32(255.0 / width)
    out = np.subtract(hu, np.float32(lo), dtype=np.float32)
    out *= scale
    out += np.float32(0.5)
    np.clip(out, 0.0, 255.0, out=out)
    return out.astype(np.uint8)


def resize_hu(hu: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of a float HU slice to ``size × size``."""
    if hu.shape == (size, size):
        return hu
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(hu, dtype=np.float32), mode="F")
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float32)


def make_slice_fn(windows: Sequence[Sequence[float]], size: int) -> Callable[[np.ndarray], np.ndarray]:
    """The per-slice transform the convert job applies while reading a series.

    One window -> ``(size, size)`` uint8; several -> ``(size, size, n_windows)`` uint8.
    """
    wins = [(float(l), float(w)) for l, w in windows]
    if not wins:
        raise ValueError("at least one window is needed")

    def fn(hu: np.ndarray) -> np.ndarray:
        hu = resize_hu(hu, size)
        if len(wins) == 1:
            return window_u8(hu, *wins[0])
        return np.stack([window_u8(hu, l, w) for l, w in wins], axis=-1)

    return fn
