"""How a training sample is built from a windowed volume — shared by the writer and every reader.

The convert job builds each shard sample with :func:`sample_image`, and pseudo-labelling,
evaluation and prediction build theirs from the Zarr volume with the same function, so
the inputs a model sees at inference equal (up to JPEG error) those it trained on.

Channel modes (recorded in the manifest as ``image.channels``):

* ``neighbours`` — one window; channels are the slices ``offset_mm`` above, the slice
  itself, and the slice ``offset_mm`` below (nearest by z, clamped at the ends). Choosing
  the offset in millimetres keeps the context the same across 0.5–1 mm slices.
  Volume shape ``(Z, H, W)``.
* ``windows`` — three windows of the same slice. Volume shape ``(Z, H, W, 3)``.
"""
from __future__ import annotations

import io

import numpy as np

CHANNEL_MODES = ("neighbours", "windows")


def neighbour_index(z: np.ndarray, offset_mm: float) -> np.ndarray:
    """``(Z, 3)`` volume indices ``[above, self, below]`` for a head-to-feet volume.

    ``z`` is descending (index 0 most superior). The neighbour is the slice whose z is
    nearest to ``z_i ± offset_mm``; at the ends the slice itself stands in (clamped).
    """
    z = np.asarray(z, dtype=np.float64)
    n = len(z)
    idx = np.arange(n)
    if n == 0:
        return np.zeros((0, 3), dtype=np.int64)
    if offset_mm <= 0 or n == 1:
        return np.stack([idx, idx, idx], axis=1)
    asc = z[::-1]  # ascending for searchsorted

    def nearest(target: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(asc, target), 1, n - 1)
        left, right = asc[pos - 1], asc[pos]
        pos = pos - ((target - left) <= (right - target))
        return (n - 1) - pos  # back to descending indices

    above = nearest(z + offset_mm)
    below = nearest(z - offset_mm)
    # beyond the ends there is no slice offset_mm away: use the slice itself, not the edge slice
    above = np.where(z + offset_mm > z[0] + 1e-6 + 0.5 * abs(offset_mm), idx, above)
    below = np.where(z - offset_mm < z[-1] - 1e-6 - 0.5 * abs(offset_mm), idx, below)
    return np.stack([above, idx, below], axis=1).astype(np.int64)


def sample_image(volume, i: int, nbr: np.ndarray | None, channels: str) -> np.ndarray:
    """The ``(H, W, 3)`` uint8 image of slice ``i`` (``volume`` may be a numpy or Zarr array)."""
    if channels == "neighbours":
        a, b, c = (int(x) for x in nbr[i])
        return np.stack([volume[a], volume[b], volume[c]], axis=-1)
    if channels == "windows":
        return np.asarray(volume[i])
    raise ValueError(f"unknown channel mode {channels!r} (expected one of {CHANNEL_MODES})")


def encode_jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    """``(H, W, 3)`` uint8 -> JPEG bytes, 4:4:4 (chroma subsampling would blur the neighbour channels)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> ``(H, W, 3)`` uint8 (the CPU reference decoder for tests and tools)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))  # writable: torch.from_numpy needs that
