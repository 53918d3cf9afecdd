"""CLAHE (Contrast Limited Adaptive Histogram Equalization) on a uint8 image batch, in torch, on any device.

What: :func:`clahe` equalizes a ``(B, C, H, W)`` uint8 tensor with OpenCV's CLAHE algorithm
(``cv::createCLAHE(clip_limit, (tiles_x, tiles_y)).apply``), in one of two modes:

* ``luma_only=True`` (the default; RGB input, channel order R, G, B): ``cv::cvtColor(RGB2Lab)`` on 8 bits, CLAHE
  on L only, ``cv::cvtColor(Lab2RGB)`` -- what DALI's CPU ``fn.clahe(luma_only=True)`` does, and what
  albumentations' ``CLAHE`` does on a 3-channel uint8 image (cv2 RGB2LAB, CLAHE on channel 0, LAB2RGB).
* ``luma_only=False``, or any 1-channel input: every channel independently (DALI CPU ``luma_only=False``).

Fully vectorized: one ``scatter_add_`` builds the histograms of all tiles of all planes, clipping and
redistribution are tensor ops over those histograms, a ``cumsum`` gives the LUTs, and four ``gather``s plus a
bilinear blend produce the output; the Lab conversions are integer tensor ops and table lookups. No Python loop
over pixels or tiles, no numpy and no host sync in the hot path, so it runs asynchronously on a CUDA batch.
:func:`clahe_where` applies it to the masked samples only.

Why: the reference training pipeline applied albumentations' ``CLAHE`` (i.e. OpenCV's, on L of LAB for RGB
images) per image on the CPU workers. The DALI loader uses ``fn.clahe(luma_only=True)``; the torch fallback
loader has no CPU budget to spare for per-image OpenCV calls, so it runs this on the GPU batch after upload and
must produce the same augmentation. Parity is with DALI's *CPU* operator (DALI's CPU-only mode, and CI): on a
GPU the DALI loader runs DALI's GPU ``fn.clahe``, a different implementation (see "Caveat, DALI GPU" below)
whose difference from the CPU one is unmeasured until a GPU run. The two modes differ a lot on colour images
(mean |diff| 15-18 grey levels, max 86-111 on the four test images below), so the mode matters; 1-channel input
is the same in both.

Luminance mode, what DALI does (DALI 2.4.0 CPU operator, ``dali/operators/image/clahe/clahe_cpu.cc``, confirmed
bit for bit below): ``cv::cvtColor(src, lab, COLOR_RGB2Lab)`` on the uint8 HWC image, ``clahe->apply`` on
channel 0 (L), ``cv::cvtColor(lab, dst, COLOR_Lab2RGB)``. It is CIE L*a*b* (sRGB, D65), not YCbCr Y, and
OpenCV's 8-bit conversions are integer fixed-point code with lookup tables (``color_lab.cpp``: RGB2Lab_b and
Lab2RGBinteger, the default "bit-exact" path), reproduced here exactly:

* RGB -> Lab: ``R' = sRGBGammaTab_b[R]`` (``round(2040 * srgb_to_linear(R/255))``, same for G, B);
  ``X = LabCbrtTab_b[descale(R'*C0 + G'*C1 + B'*C2, 12)]`` with ``C = round(4096 * sRGB2XYZ / white)``
  (likewise Y, Z); ``LabCbrtTab_b[i] = round(2^15 * f(i / 2040))``, ``f`` = cube root above (6/29)^3 and the
  linear segment below; ``L = descale(296*fY - 1336934, 15)``, ``a = descale(500*(fX - fY) + 128*2^15, 15)``,
  ``b = descale(200*(fY - fZ) + 128*2^15, 15)``, saturated to 0..255 (so L is L* * 255/100, a and b are
  offset by 128). ``descale(v, n) = (v + 2^(n-1)) >> n``; ``round`` is cvRound (half to even).
* Lab -> RGB: ``y, ify = LabToYF_b[L]``; ``adiv = ((5*a*53687 + 128) >> 13) - 4194``,
  ``bdiv = ((b*41943 + 16) >> 9) - 10484``; ``x = abToXZ_b[ify + adiv]``, ``z = abToXZ_b[ify - bdiv]``
  (indexed from -8145); ``R = sRGBInvGammaTab_b[clamp(descale(x*K0 + y*K1 + z*K2, 14), 0, 4095)]`` with
  ``K = round(4096 * XYZ2sRGB * white)``, likewise G, B.
* the tables are built once per process in numpy exactly as OpenCV's ``initLabTabs`` builds them (float32 steps
  where it uses softfloat, float64 for softdouble), then copied once per device as int32 tensors. One detail
  matters: OpenCV's softfloat ``cbrt`` is Turkowski's rational approximation whose float64 result is
  *truncated* to float32; with a correctly rounded cbrt instead, ``LabCbrtTab_b[324]`` (the only reachable
  entry that changes) comes out one higher, grey 111 and some colours get L one higher, and parity with DALI
  drops to 93-99.9% identical, max |diff| 4-13 on the test images.

Consequences: on grey input (R = G = B) a = b = 128 exactly, so the output is grey again (channels at most 1
level apart, from the integer round trip). But luminance CLAHE of a grey image is *not* per-channel CLAHE of
the grey value: L is roughly the cube root of linear luminance, and equalizing L and mapping back is a
different curve (on 64x64..128x128 grey test images: mean |diff| 3.3-4.5 levels, max 15-58, only 12-33% of
pixels within 1). ``bins`` applies to the L histogram (DALI's CPU operator has no bins; OpenCV uses 256).

Caveat, DALI GPU: the public DALI CUDA implementation of luma mode (``clahe_op.cu``, as found in a code index;
whether it is the 2.4.0 one is unverified, and it was not run here: no GPU) is a float re-implementation, not
OpenCV: float32 sRGB/Lab math, tiles by ceil division without OpenCV's reflect padding, LUT
``(cdf * 255/area + 0.5)`` truncated, and the equalized L rounded to integer L* (0..100) before a float
Lab -> RGB. So DALI GPU luma output should be expected to differ from DALI CPU (and from this module) by a few
levels at places; this module matches the CPU operator, i.e. OpenCV/albumentations.

CLAHE algorithm (OpenCV ``modules/imgproc/src/clahe.cpp``, 8-bit path), reproduced step by step:

* tiling: if ``H % tiles_y`` or ``W % tiles_x`` is non-zero, the image is extended at the bottom/right by
  ``BORDER_REFLECT_101`` with ``tiles_y - H % tiles_y`` rows and ``tiles_x - W % tiles_x`` columns. Note the
  OpenCV quirk kept here: when only one side is not divisible, the *other* side is still padded by a full
  ``tiles`` rows/columns (e.g. 96x90 with 8x8 tiles -> 104x96, tile 13x12). Tile size = padded size / tiles.
* per tile a ``bins``-bin histogram; clip limit ``max(int(clip_limit * tile_area / bins), 1)`` (no clipping
  when ``clip_limit <= 0``); the clipped excess is redistributed as ``excess // bins`` to every bin plus one
  more to bins ``0, step, 2*step, ...`` (``residual`` of them, ``step = max(bins // residual, 1)``).
* LUT = ``saturate_cast<uchar>(float32(cdf) * float32(255 / tile_area))`` (round half to even).
* each pixel of the *unpadded* image: ``txf = x * float32(1 / tile_w) - 0.5``, ``tx1 = floor(txf)``,
  ``tx2 = tx1 + 1``, ``xa = txf - tx1``, clamp ``tx1 >= 0``, ``tx2 <= tiles_x - 1``; same for y; the result
  ``(L11*(1-xa) + L12*xa)*(1-ya) + (L21*(1-xa) + L22*xa)*ya`` in float32, rounded half to even, saturated.

Parity (tests/test_clahe.py; structured images -- gradients, ripples, blobs, a flat saturated corner, noise --
3 distinct channels, sizes 64x64, 100x75, 96x90, 128x128):

* per-channel mode vs DALI 2.4.0's CPU ``fn.clahe(luma_only=False)``, which calls
  ``cv::createCLAHE(clip_limit, (tiles_x, tiles_y))->apply`` per channel, i.e. OpenCV itself: max |diff| = 0,
  100% of pixels identical, for clip 2.0 / 8x8 tiles and clip 4.0 / 4x6 tiles (also checked off-test for clip
  0.5, 1, 4, 40, grids 3x5 and 4x6, a 384x384 image, uniform noise, binary noise, constant images and tiny
  5x7, 1x9, 33x1 images: identical everywhere). Padding only the non-divisible side of 96x90 instead of
  OpenCV's both sides leaves just ~3% of pixels identical, so that size guards the quirk.
* luminance mode vs DALI 2.4.0's CPU ``fn.clahe(luma_only=True)``: max |diff| = 0, 100% identical, on the test
  set (the four images above plus 77x91 uniform noise and a grey R=G=B image; clip 2.0 / 8x8 and 4.0 / 4x6)
  and off-test on 4.6M values (16 images: the sizes above plus 384x384, 200x37, 5x7, 1x9, 33x1, uniform
  noise, binary 0/255 primaries, a grey image, a constant colour, near-black, near-white, a 300-colour
  palette; clip/grid 2.0/8x8, 4.0/4x6, 1.0/3x5, 40/8x8, 0.5/2x2) and 18.9M more (two 1024x1024
  uniform-noise images, ~2M random colours, and a 1024x1024 colour field; 2.0/8x8 and 3.0/16x16).
* vs the test's independent pure-numpy references (the CLAHE loop: 7 cases incl. tiles larger than the image,
  clipping off, bins=64; OpenCV's integer Lab with tables built entry by entry): bit-identical.

The tests allow 1 grey level on <= 1% of pixels, for a float32 blend that lands within an ulp of .5 where an
OpenCV build fuses a multiply-add; none was seen. On CUDA the same float32 ops run as separate kernels (no
contraction), ``round`` is half-to-even there too, and the Lab conversions are integer arithmetic (no
rounding to differ).

``bins`` other than 256 (a power of two <= 256) is an extension OpenCV does not have for 8-bit images: the
value ``v`` falls in bin ``v >> (8 - log2(bins))``, the LUT of that bin is used, the clip limit uses ``bins``
as above, and outputs stay on the 0..255 scale. ``bins=256`` is the OpenCV algorithm.
"""

from __future__ import annotations

import struct
import threading

import numpy as np
import torch

__all__ = ["clahe", "clahe_where"]


# ------------------------------------------------------------------------------------------------------------
# OpenCV's 8-bit RGB <-> Lab (modules/imgproc/src/color_lab.cpp: RGB2Lab_b, Lab2RGBinteger), in integers
# ------------------------------------------------------------------------------------------------------------

def _f64(raw: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", raw))[0]


# sRGB2XYZ_D65, XYZ2sRGB_D65 and the D65 white point, as OpenCV stores them (raw IEEE doubles)
_SRGB2XYZ = [_f64(h) for h in (0x3FDA65A14488C60D, 0x3FD6E297396D0918, 0x3FC71819D2391D58,
                               0x3FCB38CDA6E75FF6, 0x3FE6E297396D0918, 0x3FB279AAE6C8F755,
                               0x3F93CC4AC6CDAF4B, 0x3FBE836EB4E98138, 0x3FEE68427418D691)]
_XYZ2SRGB = [_f64(h) for h in (0x4009EC804102FF8F, 0xBFF8982A9930BE0E, 0xBFDFE7FF583A53B9,
                               0xBFEF042528AE74F3, 0x3FFE040F23897204, 0x3FA546D3F9E7B80B,
                               0x3FAC7DE5082CF52C, 0xBFCA1E14BDFD2631, 0x3FF0EABEF06B3786)]
_D65 = [_f64(0x3FEE6A22B3892EE8), 1.0, _f64(0x3FF16B8950763A19)]
# RGB2Lab_b: cvRound(4096 * M[i][j] / white[i]); rows X, Y, Z, columns R, G, B (RGB input: blueIdx = 2)
_RGB2XYZ_I = [[int(np.rint(4096 * _SRGB2XYZ[i * 3 + j] / _D65[i])) for j in range(3)] for i in range(3)]
# Lab2RGBinteger: cvRound(4096 * Minv[r][i] * white[i]); rows R, G, B, columns X, Y, Z
_XYZ2RGB_I = [[int(np.rint(4096 * _XYZ2SRGB[r * 3 + i] * _D65[i])) for i in range(3)] for r in range(3)]
_LAB_BASE = 1 << 14
_MIN_AB = -8145  # abToXZ_b is indexed from this value
_L_SCALE = (116 * 255 + 50) // 100  # 296
_L_SHIFT = -((16 * 255 * (1 << 15) + 50) // 100)


def _soft_cbrt(x: np.ndarray) -> np.ndarray:
    """OpenCV's softfloat ``cbrt`` (f32_cbrt) on positive float32 values: Turkowski's quartic rational in
    float64 on the mantissa scaled to [0.125, 1), whose top 23 mantissa bits are then *truncated* into the
    float32 result. Not correctly rounded; the LabCbrtTab_b entries depend on it (e.g. index 324)."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.int64)
    ex = ((bits >> 23) & 255) - 127
    shx = np.fmod(ex, 3)
    shx = np.where(shx >= 0, shx - 3, shx)
    ex = (ex - shx) // 3 - 1  # exact: ex - shx is a multiple of 3
    fr = (((shx + 1023) << 52) | ((bits & 0x7FFFFF) << 29)).astype(np.uint64).view(np.float64)
    a = [_f64(h) for h in (0x4046A09E6653BA70, 0x406808F46C6116E0, 0x405DCA97439CAE14, 0x402ADD70D2827500,
                           0x3FC4F15F83F55D2D, 0x402D9E20660EDB21, 0x4062FF15C0285815, 0x406510D06A8112CE,
                           0x4040FECBC9E2C375)]
    num = (((a[0] * fr + a[1]) * fr + a[2]) * fr + a[3]) * fr + a[4]
    den = (((a[5] * fr + a[6]) * fr + a[7]) * fr + a[8]) * fr + 1.0
    mant = (((num / den).view(np.uint64) & np.uint64(0xFFFFFFFFFFFFF)) >> np.uint64(29)).astype(np.int64)
    out = (((ex + 127) << 23) | mant).astype(np.uint32).view(np.float32)
    return np.where(bits == 0, np.float32(0), out)


def _build_lab_tables() -> dict[str, np.ndarray]:
    """OpenCV's initLabTabs() 8-bit tables, computed the way it computes them (float32 steps where it uses
    softfloat, float64 where softdouble, cvRound = round half to even)."""
    f32 = np.float32
    i = np.arange(256)
    # sRGBGammaTab_b: cvRound(255 * 8 * gamma(i / 255))
    x = (f32(1) * i.astype(f32)) / f32(255)
    xd = x.astype(np.float64)
    g = np.where(xd <= 809 / 20000, xd / (323 / 25), ((xd + 11 / 200) / (1 + 11 / 200)) ** (12 / 5))
    gamma = np.rint(f32(255 * 8) * g.astype(f32))
    # sRGBInvGammaTab_b: cvRound(255 * invgamma(i / 4096)), 4096 entries
    xd = (f32(1 / 4096) * np.arange(4096).astype(f32)).astype(np.float64)
    ig = np.where(xd <= 7827 / 2500000, xd * (323 / 25), xd ** (1 / (12 / 5)) * (1 + 11 / 200) - 11 / 200)
    inv_gamma = np.rint(f32(255) * ig.astype(f32))
    # LabCbrtTab_b: cvRound(2^15 * f(i / (255 * 8))), f = cbrt above (6/29)^3, else the linear segment (fma)
    x = (f32(1) / (f32(255) * f32(8))) * np.arange(256 * 3 // 2 * 8).astype(f32)
    lthresh, lscale, lbias = f32(216) / f32(24389), f32(841) / f32(108), f32(16) / f32(116)
    lin = (x.astype(np.float64) * np.float64(lscale) + np.float64(lbias)).astype(f32)
    cbrt = np.rint(f32(1 << 15) * np.where(x < lthresh, lin, _soft_cbrt(np.maximum(x, f32(1e-30)))))
    # LabToYF_b: (y, ify) per 8-bit L, on the 2^14 scale
    yf = np.zeros((256, 2), np.int64)
    for k in range(256):
        if k <= 20:
            y = np.rint(f32(k * _LAB_BASE * 20 * 9) / f32(17 * 29 * 29 * 29))
            ify = np.rint(f32(_LAB_BASE) * (f32(16) / f32(116) + f32(k * 5) / f32(3 * 17 * 29)))
        else:
            fy = f32(k * 100 * _LAB_BASE) / f32(255 * 116) + f32(16 * _LAB_BASE) / f32(116)
            ify = np.rint(fy)
            y = np.rint(fy * fy * fy / f32(_LAB_BASE * _LAB_BASE))
        yf[k] = (y, ify)
    # abToXZ_b (C integer division truncates toward zero)
    v = np.arange(_MIN_AB, _LAB_BASE * 9 // 4 + _MIN_AB, dtype=np.int64)
    n = v * 108
    lo = np.sign(n) * (np.abs(n) // 841) - _LAB_BASE * 16 // 116 * 108 // 841
    hi = v * v // _LAB_BASE * v // _LAB_BASE
    ab_to_xz = np.where(v <= 3390, lo, hi)
    return {"gamma": gamma, "inv_gamma": inv_gamma, "cbrt": cbrt, "yf": yf, "ab_to_xz": ab_to_xz}


_TABLES_NP: dict[str, np.ndarray] | None = None
_TABLES: dict[torch.device, dict[str, torch.Tensor]] = {}
_TABLES_LOCK = threading.Lock()


def _lab_tables(device: torch.device) -> dict[str, torch.Tensor]:
    """The tables as int32 tensors on ``device``; built once per process (numpy, ~ms) and copied once per
    device, so the per-batch path has no numpy and no host transfer."""
    global _TABLES_NP
    t = _TABLES.get(device)
    if t is None:
        with _TABLES_LOCK:
            if _TABLES_NP is None:
                _TABLES_NP = _build_lab_tables()
            t = {k: torch.from_numpy(v.astype(np.int32)).to(device) for k, v in _TABLES_NP.items()}
            _TABLES[device] = t
    return t


def _rgb_to_lab8(rgb: torch.Tensor):
    """(B, 3, H, W) uint8 RGB -> L (uint8), and a, b (int32), each (B, H, W): cv::cvtColor(COLOR_RGB2Lab) on
    CV_8U, i.e. RGB2Lab_b: L, a, b = saturate(descale(...)) with L on 0..255 (= L* * 255/100), a, b + 128."""
    t = _lab_tables(rgb.device)
    lin = t["gamma"][rgb.int()]  # linear RGB * 255 * 8 (int32 indices: half the memory of int64)
    r, g, b = lin.unbind(1)
    f = [t["cbrt"][(r * c[0] + g * c[1] + b * c[2] + (1 << 11)) >> 12] for c in _RGB2XYZ_I]
    fx, fy, fz = f
    L = ((_L_SCALE * fy + (_L_SHIFT + (1 << 14))) >> 15).clamp_(0, 255).to(torch.uint8)
    a = ((500 * (fx - fy) + (128 << 15) + (1 << 14)) >> 15).clamp_(0, 255)
    bb = ((200 * (fy - fz) + (128 << 15) + (1 << 14)) >> 15).clamp_(0, 255)
    return L, a, bb


def _lab8_to_rgb(L: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L (uint8), a, b (integer) each (B, H, W) -> (B, 3, H, W) uint8 RGB: cv::cvtColor(COLOR_Lab2RGB) on CV_8U,
    i.e. Lab2RGBinteger (OpenCV's bit-exact path, enabled by default)."""
    t = _lab_tables(L.device)
    a, b = a.to(torch.int32), b.to(torch.int32)  # uint8 would overflow below
    yf = t["yf"][L.int()]
    y, ify = yf[..., 0], yf[..., 1]
    adiv = ((a * (5 * 53687) + (1 << 7)) >> 13) - 128 * _LAB_BASE // 500
    bdiv = ((b * 41943 + (1 << 4)) >> 9) - 128 * _LAB_BASE // 200 + 1
    n = t["ab_to_xz"].numel()
    # the clamp only matters for L = 0 with b = 255, which RGB2Lab never produces (OpenCV reads out of bounds)
    x = t["ab_to_xz"][(ify + adiv - _MIN_AB).clamp_(0, n - 1)]
    z = t["ab_to_xz"][(ify - bdiv - _MIN_AB).clamp_(0, n - 1)]
    out = []
    for c in _XYZ2RGB_I:  # shift = lab_shift + (base_shift - inv_gamma_shift) = 12 + 2
        v = (c[0] * x + c[1] * y + c[2] * z + (1 << 13)) >> 14
        out.append(t["inv_gamma"][v.clamp_(0, 4095)])
    return torch.stack(out, 1).to(torch.uint8)


# ------------------------------------------------------------------------------------------------------------
# CLAHE on uint8 planes
# ------------------------------------------------------------------------------------------------------------


def _reflect101(n: int, size: int, device: torch.device) -> torch.Tensor:
    """Indices 0..size-1 into a length-n axis, past its end mirrored as OpenCV's BORDER_REFLECT_101 does
    (``gfedcb|abcdefgh|gfedcba``), repeated as often as needed (padding may exceed the axis)."""
    i = torch.arange(size, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i % period
    return torch.where(i < n, i, period - i)


def _axis_weights(n: int, tile: int, tiles: int, device: torch.device):
    """Per-pixel (along one axis of the unpadded image) lower/upper tile index and the upper weight, in float32
    exactly as CLAHE_Interpolation_Body computes them."""
    inv = torch.ones((), dtype=torch.float32, device=device) / tile  # 1.0f / tileSize (float32 division)
    f = torch.arange(n, dtype=torch.float32, device=device) * inv - 0.5
    t1 = torch.floor(f)
    a = f - t1  # weight of the upper tile
    t1 = t1.to(torch.int64)
    t2 = (t1 + 1).clamp(max=tiles - 1)
    t1 = t1.clamp(min=0)
    return t1, t2, a, 1.0 - a


def clahe(images: torch.Tensor, *, clip_limit: float = 2.0, tiles: tuple[int, int] = (8, 8),
          bins: int = 256, luma_only: bool = True) -> torch.Tensor:
    """Contrast Limited Adaptive Histogram Equalization of a uint8 batch (B, C, H, W), on whatever device the
    tensor is on (GPU in training). Returns uint8 (B, C, H, W).

    ``luma_only=True`` (default) with C == 3: RGB (in that order) -> OpenCV 8-bit Lab, CLAHE on L only, Lab ->
    RGB, as DALI's CPU ``fn.clahe(luma_only=True)`` and albumentations' ``CLAHE`` do. ``luma_only=False``, or
    C == 1: every channel independently (DALI CPU ``luma_only=False``). C other than 1 or 3 needs
    ``luma_only=False``.

    ``tiles`` is ``(tiles_y, tiles_x)`` (rows, columns of the tile grid; OpenCV's ``tileGridSize`` is
    ``(tiles_x, tiles_y)``, the same for the default square grid). ``clip_limit`` is OpenCV's ``clipLimit``
    (relative to the mean bin height; <= 0 disables clipping). See the module docstring for the algorithm,
    which follows OpenCV's cv::createCLAHE (and cv::cvtColor) step for step.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"clahe expects a uint8 tensor, got {images.dtype}")
    if images.dim() != 4:
        raise ValueError(f"clahe expects (B, C, H, W), got shape {tuple(images.shape)}")
    tiles_y, tiles_x = (int(t) for t in tiles)
    if tiles_y < 1 or tiles_x < 1:
        raise ValueError(f"tiles must be positive, got {tiles}")
    bins = int(bins)
    if bins < 2 or bins > 256 or bins & (bins - 1):
        raise ValueError(f"bins must be a power of two in [2, 256], got {bins}")
    B, C, H, W = images.shape
    if luma_only and C not in (1, 3):
        raise ValueError(f"luma_only=True needs 1 (grey) or 3 (RGB) channels, got {C}; pass luma_only=False")
    if B * C == 0 or H == 0 or W == 0:
        return images.clone()
    if luma_only and C == 3:
        L, a, b = _rgb_to_lab8(images)
        L = _clahe_planes(L, clip_limit, tiles_y, tiles_x, bins)
        return _lab8_to_rgb(L, a, b)
    return _clahe_planes(images.reshape(B * C, H, W), clip_limit, tiles_y, tiles_x, bins).view(B, C, H, W)


def _clahe_planes(x: torch.Tensor, clip_limit: float, tiles_y: int, tiles_x: int, bins: int) -> torch.Tensor:
    """OpenCV's CLAHE on each of the N uint8 planes of ``x`` (N, H, W); returns uint8 (N, H, W)."""
    N, H, W = x.shape
    shift = 8 - (bins.bit_length() - 1)
    dev = x.device
    x = x.contiguous()

    # --- tiling (OpenCV pads both sides as soon as either is not divisible) ---
    if H % tiles_y == 0 and W % tiles_x == 0:
        xp = x
    else:
        Hp = H + tiles_y - H % tiles_y
        Wp = W + tiles_x - W % tiles_x
        xp = x.index_select(1, _reflect101(H, Hp, dev)).index_select(2, _reflect101(W, Wp, dev))
    Hp, Wp = xp.shape[1], xp.shape[2]
    th, tw = Hp // tiles_y, Wp // tiles_x
    area = th * tw
    T = tiles_y * tiles_x

    # --- histograms of all N * T tiles in one scatter_add_ ---
    tile_id = (torch.arange(tiles_y, device=dev).view(tiles_y, 1, 1, 1) * tiles_x
               + torch.arange(tiles_x, device=dev).view(1, 1, tiles_x, 1))
    n_id = torch.arange(N, device=dev).view(N, 1, 1, 1, 1) * T
    offset = ((n_id + tile_id) * bins).expand(N, tiles_y, th, tiles_x, tw)
    flat = xp.view(N, tiles_y, th, tiles_x, tw).to(torch.int64)
    if shift:
        flat >>= shift
    flat = flat.add_(offset).view(-1)  # (n * T + tile) * bins + value
    hist = torch.zeros(N * T * bins, dtype=torch.int32, device=dev)
    hist.scatter_add_(0, flat, torch.ones(1, dtype=torch.int32, device=dev).expand(flat.numel()))
    hist = hist.view(N * T, bins)
    del flat, offset

    # --- clip and redistribute (OpenCV's integer arithmetic, all tiles at once) ---
    if clip_limit > 0:
        limit = max(int(clip_limit * area / bins), 1)
        clipped = (hist - limit).clamp_(min=0).sum(dim=1, keepdim=True, dtype=torch.int32)
        hist = hist.clamp(max=limit)
        batch = torch.div(clipped, bins, rounding_mode="floor")
        residual = clipped - batch * bins
        step = torch.div(bins, residual.clamp(min=1), rounding_mode="floor").clamp_(min=1)
        i = torch.arange(bins, device=dev, dtype=torch.int32).view(1, bins)
        extra = ((i % step) == 0) & (torch.div(i, step, rounding_mode="floor") < residual)
        hist = hist + batch + extra.to(torch.int32)

    # --- LUT: saturate_cast<uchar>(float(cdf) * lutScale), kept in float32 for the blend ---
    scale = torch.full((), 255.0, dtype=torch.float32, device=dev) / area  # float32 like OpenCV's lutScale
    lut = torch.round(torch.cumsum(hist, dim=1).to(torch.float32) * scale).clamp_(0, 255)
    lut = lut.view(N, T * bins)

    # --- bilinear blend of the four neighbouring tiles' LUTs over the unpadded image ---
    ty1, ty2, ya, ya1 = _axis_weights(H, th, tiles_y, dev)
    tx1, tx2, xa, xa1 = _axis_weights(W, tw, tiles_x, dev)
    r1 = (ty1 * (tiles_x * bins)).view(H, 1)
    dr = (ty2 * (tiles_x * bins)).view(H, 1) - r1
    c1 = (tx1 * bins).view(1, W)
    dc = (tx2 * bins).view(1, W) - c1
    idx = x.to(torch.int64)
    if shift:
        idx >>= shift
    idx += (r1 + c1).view(1, H, W)  # lut index of the top-left neighbour; walked in place to the other three
    g = lambda: torch.gather(lut, 1, idx.view(N, H * W)).view(N, H, W)  # noqa: E731
    l11 = g()
    idx += dc.view(1, 1, W)
    l12 = g()
    idx += dr.view(1, H, 1)
    l22 = g()
    idx -= dc.view(1, 1, W)
    l21 = g()
    del idx
    xa = xa.view(1, 1, W)
    xa1 = xa1.view(1, 1, W)
    ya = ya.view(1, H, 1)
    ya1 = ya1.view(1, H, 1)
    # (L11*xa1 + L12*xa)*ya1 + (L21*xa1 + L22*xa)*ya, every op rounded to float32 as in OpenCV's scalar loop
    top = l11.mul_(xa1).add_(l12.mul_(xa)).mul_(ya1)
    bot = l21.mul_(xa1).add_(l22.mul_(xa)).mul_(ya)
    return top.add_(bot).round_().clamp_(0, 255).to(torch.uint8)


def clahe_where(images: torch.Tensor, mask: torch.Tensor, **kw) -> torch.Tensor:
    """``clahe`` applied only to the samples where the boolean ``mask`` (B,) is True; the others are returned
    bit-identical. Only the selected samples are computed (index_select, clahe, index_copy back). Returns a new
    tensor; the input is not modified. (Finding the selected indices of a CUDA mask syncs once; pass
    the mask on the CPU, as the torch loader does with its host-drawn coins, to avoid that.)"""
    if mask.dim() != 1 or mask.shape[0] != images.shape[0]:
        raise ValueError(f"mask must have shape ({images.shape[0]},), got {tuple(mask.shape)}")
    idx = torch.nonzero(mask.to(torch.bool)).squeeze(1)  # on mask's device: no sync for a CPU mask
    n = idx.numel()
    if n == images.shape[0]:
        return clahe(images, **kw)
    out = images.clone()
    if n == 0:
        return out
    if images.is_cuda and not idx.is_cuda:
        idx = idx.pin_memory()  # an asynchronous copy needs pinned memory
    idx = idx.to(images.device, non_blocking=True)
    return out.index_copy_(0, idx, clahe(images.index_select(0, idx), **kw))
