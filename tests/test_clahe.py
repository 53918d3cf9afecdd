"""engine.loader.clahe: parity with OpenCV's CLAHE (through DALI's CPU fn.clahe, which calls cv::createCLAHE,
per channel or -- luma_only=True, the default -- on the L of cv::cvtColor(RGB2Lab) 8-bit), parity with independent
pure-numpy references (the CLAHE loop, OpenCV's integer Lab conversion), and basic properties."""

import struct

import numpy as np
import pytest
import torch

from spinestream.engine.loader.clahe import clahe, clahe_where


def structured(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    """HWC uint8: per-channel different smooth gradients and ripples, bright/dark Gaussian blobs, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = []
    for c in range(channels):
        g = 50 + 90 * (xx / w) * (c + 1) / channels + 35 * np.sin(yy / (6 + 3 * c)) + 20 * (yy / h) ** 2
        for _ in range(5):
            cy, cx, s, a = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, 12), rng.uniform(-70, 100)
            g += a * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        g[: h // 5, : w // 4] = 0 if c != 1 else 255  # a flat, saturated corner (heavy clipping)
        g += rng.normal(0, 5, (h, w))
        out.append(g)
    return np.clip(np.stack(out, -1), 0, 255).astype(np.uint8)


def to_bchw(hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(hwc).permute(2, 0, 1)[None].contiguous()


def to_hwc(bchw: torch.Tensor) -> np.ndarray:
    return bchw[0].permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------------------------------------
# pure-numpy reference: OpenCV's modules/imgproc/src/clahe.cpp (8-bit path), written as plain loops
# ----------------------------------------------------------------------------------------------------------

def _border_reflect_101(p: int, n: int) -> int:
    """cv::borderInterpolate(p, n, BORDER_REFLECT_101)."""
    if n == 1:
        return 0
    while p < 0 or p >= n:
        p = -p if p < 0 else 2 * n - 2 - p
    return p


def clahe_reference(img: np.ndarray, clip_limit: float, tiles_x: int, tiles_y: int, bins: int = 256) -> np.ndarray:
    """One 2-D uint8 channel, OpenCV's algorithm (bins != 256: value v falls in bin v >> shift)."""
    h, w = img.shape
    shift = 8 - int(np.log2(bins))
    if w % tiles_x == 0 and h % tiles_y == 0:
        src = img
    else:  # copyMakeBorder(0, tiles_y - h % tiles_y, 0, tiles_x - w % tiles_x, BORDER_REFLECT_101)
        hp, wp = h + tiles_y - h % tiles_y, w + tiles_x - w % tiles_x
        src = np.empty((hp, wp), np.uint8)
        for y in range(hp):
            for x in range(wp):
                src[y, x] = img[_border_reflect_101(y, h), _border_reflect_101(x, w)]
    th, tw = src.shape[0] // tiles_y, src.shape[1] // tiles_x
    area = th * tw
    lut_scale = np.float32(255) / np.float32(area)
    limit = max(int(clip_limit * area / bins), 1) if clip_limit > 0 else 0

    lut = np.zeros((tiles_y, tiles_x, bins), np.uint8)
    for ty in range(tiles_y):
        for tx in range(tiles_x):
            hist = [0] * bins
            for y in range(ty * th, (ty + 1) * th):
                for x in range(tx * tw, (tx + 1) * tw):
                    hist[int(src[y, x]) >> shift] += 1
            if limit > 0:
                clipped = 0
                for i in range(bins):
                    if hist[i] > limit:
                        clipped += hist[i] - limit
                        hist[i] = limit
                batch = clipped // bins
                residual = clipped - batch * bins
                for i in range(bins):
                    hist[i] += batch
                if residual:
                    step = max(bins // residual, 1)
                    i = 0
                    while i < bins and residual > 0:
                        hist[i] += 1
                        i += step
                        residual -= 1
            s = 0
            for i in range(bins):
                s += hist[i]
                lut[ty, tx, i] = np.clip(np.rint(np.float32(s) * lut_scale), 0, 255)

    def axis(n, tile, tiles):
        inv = np.float32(1.0) / np.float32(tile)
        rows = []
        for p in range(n):
            f = np.float32(p) * inv - np.float32(0.5)
            t1 = int(np.floor(f))
            a = np.float32(f - np.float32(t1))
            rows.append((max(t1, 0), min(t1 + 1, tiles - 1), a, np.float32(1.0) - a))
        return rows

    cols = axis(w, tw, tiles_x)
    out = np.empty((h, w), np.uint8)
    for y, (ty1, ty2, ya, ya1) in enumerate(axis(h, th, tiles_y)):
        for x, (tx1, tx2, xa, xa1) in enumerate(cols):
            v = int(img[y, x]) >> shift
            l11, l12 = np.float32(lut[ty1, tx1, v]), np.float32(lut[ty1, tx2, v])
            l21, l22 = np.float32(lut[ty2, tx1, v]), np.float32(lut[ty2, tx2, v])
            res = (l11 * xa1 + l12 * xa) * ya1 + (l21 * xa1 + l22 * xa) * ya
            out[y, x] = np.clip(np.rint(res), 0, 255)
    return out


@pytest.mark.parametrize(
    "h, w, tiles, clip, bins",
    [
        (40, 48, (8, 8), 2.0, 256),   # divisible: no padding
        (37, 45, (8, 8), 2.0, 256),   # neither side divisible
        (32, 27, (8, 8), 4.0, 256),   # H divisible, W not: OpenCV still pads 8 rows (quirk)
        (30, 41, (3, 5), 1.0, 256),   # non-square grid, (tiles_y, tiles_x) order
        (6, 5, (8, 8), 2.0, 256),     # tiles larger than the image: padding wraps (reflect-101 repeated)
        (33, 35, (4, 4), 0.0, 256),   # clipping disabled
        (36, 40, (4, 4), 3.0, 64),    # coarser histogram (extension)
    ],
)
def test_matches_numpy_reference(h, w, tiles, clip, bins):
    img = structured(h, w, seed=h * 100 + w, channels=2)
    got = to_hwc(clahe(to_bchw(img), clip_limit=clip, tiles=tiles, bins=bins, luma_only=False))
    for c in range(img.shape[2]):
        ref = clahe_reference(img[:, :, c], clip, tiles_x=tiles[1], tiles_y=tiles[0], bins=bins)
        d = np.abs(got[:, :, c].astype(int) - ref.astype(int))
        # measured: bit-identical on every case
        assert d.max() <= 1 and (d == 0).mean() >= 0.99, (c, d.max(), (d == 0).mean())


# ----------------------------------------------------------------------------------------------------------
# DALI's CPU fn.clahe (cv::createCLAHE(clip_limit, (tiles_x, tiles_y))->apply per channel)
# ----------------------------------------------------------------------------------------------------------

def dali_clahe(images: list[np.ndarray], **kw) -> list[np.ndarray]:
    """DALI CPU fn.clahe on a batch of HWC uint8 images (kw: tiles_x, tiles_y, clip_limit, luma_only)."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: images, layout="HWC", batch=True)
        return fn.clahe(x, **kw)

    p = pipe()
    p.build()
    (out,) = p.run()
    return [np.asarray(out[i]) for i in range(len(images))]


@pytest.mark.dali
@pytest.mark.parametrize("tiles, clip", [((8, 8), 2.0), ((4, 6), 4.0)])
def test_matches_dali_cpu_clahe(tiles, clip):
    pytest.importorskip("nvidia.dali")
    # 100x75: neither side divisible by 8; 96x90: only W is (OpenCV then pads H by a full 8 rows too --
    # padding only W instead leaves ~3% of pixels identical, so this size checks the quirk)
    sizes = [(64, 64), (100, 75), (96, 90), (128, 128)]
    images = [structured(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    refs = dali_clahe(images, tiles_x=tiles[1], tiles_y=tiles[0], clip_limit=clip, luma_only=False)
    for img, ref in zip(images, refs):
        got = to_hwc(clahe(to_bchw(img), clip_limit=clip, tiles=tiles, luma_only=False))
        assert got.shape == ref.shape and ref.dtype == np.uint8
        d = np.abs(got.astype(int) - ref.astype(int))
        within1 = (d <= 1).mean()
        # measured with DALI 2.4.0: max |diff| 0, 100% identical, on every image and both settings
        assert within1 >= 0.99, (img.shape, within1, d.max())
        assert (d == 0).mean() >= 0.99, (img.shape, (d == 0).mean(), d.max())


# ----------------------------------------------------------------------------------------------------------
# luminance mode: pure-numpy reference of OpenCV's 8-bit RGB2Lab_b / Lab2RGBinteger (color_lab.cpp), tables
# built entry by entry as initLabTabs() does (float32 where OpenCV uses softfloat, float64 for softdouble)
# ----------------------------------------------------------------------------------------------------------

def _d(h: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", h))[0]


def _cv_cbrt(x: np.float32) -> np.float32:
    """OpenCV softfloat f32_cbrt (x > 0): Turkowski's rational in float64, mantissa truncated to float32."""
    bits = int(np.array([x], np.float32).view(np.uint32)[0])
    ex = ((bits >> 23) & 255) - 127
    shx = int(np.fmod(ex, 3))
    shx -= 3 if shx >= 0 else 0
    ex = (ex - shx) // 3 - 1
    fr = _d(((shx + 1023) << 52) | ((bits & 0x7FFFFF) << 29))
    a = [_d(h) for h in (0x4046A09E6653BA70, 0x406808F46C6116E0, 0x405DCA97439CAE14, 0x402ADD70D2827500,
                         0x3FC4F15F83F55D2D, 0x402D9E20660EDB21, 0x4062FF15C0285815, 0x406510D06A8112CE,
                         0x4040FECBC9E2C375)]
    fr = ((((a[0] * fr + a[1]) * fr + a[2]) * fr + a[3]) * fr + a[4]) / (
        (((a[5] * fr + a[6]) * fr + a[7]) * fr + a[8]) * fr + 1.0)
    mant = (struct.unpack("<Q", struct.pack("<d", fr))[0] & 0xFFFFFFFFFFFFF) >> 29
    return np.array([((ex + 127) << 23) | mant], np.uint32).view(np.float32)[0]


class LabReference:
    """cv::cvtColor(COLOR_RGB2Lab / COLOR_Lab2RGB) for CV_8U, scalar table construction."""

    def __init__(self):
        f32, rint = np.float32, lambda v: int(np.rint(v))
        m = [_d(h) for h in (0x3FDA65A14488C60D, 0x3FD6E297396D0918, 0x3FC71819D2391D58, 0x3FCB38CDA6E75FF6,
                             0x3FE6E297396D0918, 0x3FB279AAE6C8F755, 0x3F93CC4AC6CDAF4B, 0x3FBE836EB4E98138,
                             0x3FEE68427418D691)]
        mi = [_d(h) for h in (0x4009EC804102FF8F, 0xBFF8982A9930BE0E, 0xBFDFE7FF583A53B9, 0xBFEF042528AE74F3,
                              0x3FFE040F23897204, 0x3FA546D3F9E7B80B, 0x3FAC7DE5082CF52C, 0xBFCA1E14BDFD2631,
                              0x3FF0EABEF06B3786)]
        white = [_d(0x3FEE6A22B3892EE8), 1.0, _d(0x3FF16B8950763A19)]
        self.cf = np.array([[rint(4096 * m[i * 3 + j] / white[i]) for j in range(3)] for i in range(3)])
        self.ci = np.array([[rint(4096 * mi[r * 3 + i] * white[i]) for i in range(3)] for r in range(3)])

        def gamma(x):
            x = float(x)
            return f32(x / (323 / 25) if x <= 809 / 20000 else ((x + 11 / 200) / (1 + 11 / 200)) ** (12 / 5))

        def inv_gamma(x):
            x = float(x)
            return f32(x * (323 / 25) if x <= 7827 / 2500000 else x ** (1 / (12 / 5)) * (1 + 11 / 200) - 11 / 200)

        self.gamma = np.array([rint(f32(2040) * gamma(f32(i) / f32(255))) for i in range(256)])
        self.inv_gamma = np.array([rint(f32(255) * inv_gamma(f32(1 / 4096) * f32(i))) for i in range(4096)])
        thresh, slope, bias = f32(216) / f32(24389), f32(841) / f32(108), f32(16) / f32(116)
        cb = []
        for i in range(3072):
            x = (f32(1) / (f32(255) * f32(8))) * f32(i)
            cb.append(rint(f32(32768) * (f32(float(x) * float(slope) + float(bias)) if x < thresh else _cv_cbrt(x))))
        self.cbrt = np.array(cb)
        yf = []
        for i in range(256):
            if i <= 20:
                yf.append((rint(f32(i * 16384 * 180) / f32(17 * 29 ** 3)),
                           rint(f32(16384) * (f32(16) / f32(116) + f32(i * 5) / f32(3 * 17 * 29)))))
            else:
                fy = f32(i * 100 * 16384) / f32(255 * 116) + f32(16 * 16384) / f32(116)
                yf.append((rint(fy * fy * fy / f32(16384 * 16384)), rint(fy)))
        self.yf = np.array(yf)
        xz = []
        for i in range(-8145, 16384 * 9 // 4 - 8145):
            if i <= 3390:
                q = abs(i * 108) // 841
                xz.append((q if i >= 0 else -q) - 16384 * 16 // 116 * 108 // 841)
            else:
                xz.append(i * i // 16384 * i // 16384)
        self.ab_to_xz = np.array(xz)

    def rgb2lab(self, img: np.ndarray) -> np.ndarray:
        """HWC uint8 RGB -> HWC uint8 Lab (L = L* * 255 / 100, a, b offset by 128)."""
        r, g, b = (self.gamma[img[..., c].astype(np.int64)] for c in range(3))
        fx, fy, fz = (self.cbrt[(r * k[0] + g * k[1] + b * k[2] + 2048) >> 12] for k in self.cf)
        lab = [(296 * fy - 1336934 + (1 << 14)) >> 15,  # Lscale = (116*255+50)/100, Lshift = -(16*255*2^15+50)/100
               (500 * (fx - fy) + (128 << 15) + (1 << 14)) >> 15,
               (200 * (fy - fz) + (128 << 15) + (1 << 14)) >> 15]
        return np.clip(np.stack(lab, -1), 0, 255).astype(np.uint8)

    def lab2rgb(self, lab: np.ndarray) -> np.ndarray:
        L, a, b = (lab[..., c].astype(np.int64) for c in range(3))
        y, ify = self.yf[L, 0], self.yf[L, 1]
        adiv = ((5 * a * 53687 + 128) >> 13) - 128 * 16384 // 500
        bdiv = ((b * 41943 + 16) >> 9) - 128 * 16384 // 200 + 1
        x = self.ab_to_xz[np.clip(ify + adiv + 8145, 0, len(self.ab_to_xz) - 1)]
        z = self.ab_to_xz[np.clip(ify - bdiv + 8145, 0, len(self.ab_to_xz) - 1)]
        rgb = [self.inv_gamma[np.clip((k[0] * x + k[1] * y + k[2] * z + 8192) >> 14, 0, 4095)] for k in self.ci]
        return np.stack(rgb, -1).astype(np.uint8)


@pytest.fixture(scope="module")
def lab_ref() -> LabReference:
    return LabReference()


def clahe_luma_reference(img: np.ndarray, lab_ref: LabReference, clip: float, tiles_x: int, tiles_y: int):
    lab = lab_ref.rgb2lab(img)
    lab[..., 0] = clahe_reference(lab[..., 0], clip, tiles_x, tiles_y)
    return lab_ref.lab2rgb(lab)


def test_lab_conversion_matches_numpy_reference(lab_ref):
    from spinestream.engine.loader.clahe import _lab8_to_rgb, _rgb_to_lab8

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
    rgb[0, 0, :8] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
                     [128, 128, 128], [1, 1, 1]]
    L, a, b = _rgb_to_lab8(torch.from_numpy(rgb).permute(0, 3, 1, 2))
    ref = lab_ref.rgb2lab(rgb)
    np.testing.assert_array_equal(np.stack([L.numpy(), a.numpy(), b.numpy()], -1), ref)
    assert tuple(ref[0, 0, 0]) == (0, 128, 128) and tuple(ref[0, 0, 1]) == (255, 128, 128)
    lab = rng.integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)  # arbitrary L, a, b (not only RGB2Lab outputs)
    lab[..., 2] = np.minimum(lab[..., 2], 254)  # (L=0, b=255) indexes out of OpenCV's table
    got = _lab8_to_rgb(*(torch.from_numpy(lab[..., c]).to(torch.uint8 if c == 0 else torch.int32) for c in range(3)))
    np.testing.assert_array_equal(got.permute(0, 2, 3, 1).numpy(), lab_ref.lab2rgb(lab))


@pytest.mark.parametrize("h, w, tiles, clip", [(37, 45, (8, 8), 2.0), (32, 27, (4, 6), 4.0)])
def test_luma_matches_numpy_reference(h, w, tiles, clip, lab_ref):
    img = structured(h, w, seed=h + w)
    got = to_hwc(clahe(to_bchw(img), clip_limit=clip, tiles=tiles))  # luma_only=True is the default
    ref = clahe_luma_reference(img, lab_ref, clip, tiles_x=tiles[1], tiles_y=tiles[0])
    np.testing.assert_array_equal(got, ref)  # measured: bit-identical


@pytest.mark.dali
@pytest.mark.parametrize("tiles, clip", [((8, 8), 2.0), ((4, 6), 4.0)])
def test_luma_matches_dali_cpu_clahe(tiles, clip):
    pytest.importorskip("nvidia.dali")
    sizes = [(64, 64), (100, 75), (96, 90), (128, 128)]
    images = [structured(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    rng = np.random.default_rng(1)
    images.append(rng.integers(0, 256, (77, 91, 3), dtype=np.uint8))  # uniform noise: all hues, all levels
    images.append(np.repeat(structured(50, 70, seed=9, channels=1), 3, axis=2))  # grey, R = G = B
    refs = dali_clahe(images, tiles_x=tiles[1], tiles_y=tiles[0], clip_limit=clip, luma_only=True)
    for img, ref in zip(images, refs):
        got = to_hwc(clahe(to_bchw(img), clip_limit=clip, tiles=tiles, luma_only=True))
        assert got.shape == ref.shape and ref.dtype == np.uint8
        d = np.abs(got.astype(int) - ref.astype(int))
        # measured with DALI 2.4.0: max |diff| 0, 100% identical, on every image and both settings
        assert (d <= 1).mean() >= 0.99 and (d == 0).mean() >= 0.99, (img.shape, (d == 0).mean(), d.max())


def test_luma_on_grey_stays_grey_and_equalizes_lightness(lab_ref):
    """R = G = B: a = b = 128 exactly, so only L is equalized and the output is grey again (OpenCV's integer
    Lab -> RGB leaves at most 1 level between the channels). It is NOT per-channel CLAHE of the grey value:
    L is ~ the cube root of linear luminance, so equalizing L and mapping back differs from equalizing the
    grey value (measured on 64x64..128x128 grey images: mean |diff| 3.3-4.5 levels, max up to 58)."""
    g = structured(64, 80, seed=4, channels=1)
    x = to_bchw(np.repeat(g, 3, axis=2))
    out = clahe(x).int()
    assert int((out.max(1).values - out.min(1).values).max()) <= 1
    # the output grey is the grey whose OpenCV L is the CLAHE'd L (to 1 level)
    grey_L = lab_ref.rgb2lab(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, 1)[None])[0, :, 0].astype(int)
    L = lab_ref.rgb2lab(np.repeat(g, 3, axis=2))[..., 0]
    L2 = clahe_reference(L, 2.0, 8, 8).astype(int)
    lo = np.searchsorted(grey_L, L2, side="left")  # first grey level with L >= L2
    hi = np.searchsorted(grey_L, L2, side="right") - 1  # last grey level with L <= L2
    o = out[0, 1].numpy()
    assert np.all((o >= np.minimum(lo, hi) - 1) & (o <= np.maximum(lo, hi) + 1))
    per_channel = clahe(x, luma_only=False).int()
    assert (out - per_channel).abs().float().mean() > 1.0  # a different augmentation, not a rounding change


def test_luma_is_default_for_rgb_only():
    rgb = to_bchw(structured(40, 56, seed=21))
    assert torch.equal(clahe(rgb), clahe(rgb, luma_only=True))
    assert not torch.equal(clahe(rgb), clahe(rgb, luma_only=False))
    grey = to_bchw(structured(40, 56, seed=21, channels=1))
    assert torch.equal(clahe(grey), clahe(grey, luma_only=False))


# ----------------------------------------------------------------------------------------------------------
# properties
# ----------------------------------------------------------------------------------------------------------

def test_dtype_shape_and_channel_independence():
    imgs = torch.from_numpy(np.stack([structured(50, 70, seed=s) for s in range(3)])).permute(0, 3, 1, 2)
    out = clahe(imgs, luma_only=False)  # non-contiguous input (permuted HWC) on purpose
    assert out.dtype == torch.uint8 and out.shape == imgs.shape
    for b in range(3):
        for c in range(3):
            one = clahe(imgs[b : b + 1, c : c + 1].contiguous())  # 1 channel: per-channel whatever luma_only
            assert torch.equal(out[b : b + 1, c : c + 1], one)
    assert not torch.equal(out, imgs)


def test_grayscale_and_single_sample():
    img = structured(64, 80, seed=7, channels=1)
    x = to_bchw(img)
    assert x.shape == (1, 1, 64, 80)
    out = clahe(x)
    assert out.shape == (1, 1, 64, 80) and out.dtype == torch.uint8
    assert torch.equal(out, clahe(x, luma_only=False))  # 1 channel: luma_only changes nothing
    np.testing.assert_array_equal(out[0, 0].numpy(), clahe_reference(img[:, :, 0], 2.0, 8, 8))
    # contrast goes up on a low-contrast image (measured: std 5.3 -> 8.7 with clip_limit 2)
    low = torch.from_numpy((100 + structured(64, 64, seed=3, channels=1) // 8)).permute(2, 0, 1)[None].contiguous()
    assert clahe(low).float().std() > 1.4 * low.float().std()


@pytest.mark.parametrize("luma_only", [False, True])
@pytest.mark.parametrize("value", [0, 1, 77, 128, 254, 255])
def test_constant_image_stays_constant(value, luma_only):
    x = torch.full((2, 3, 45, 61), value, dtype=torch.uint8)
    out = clahe(x, luma_only=luma_only)
    assert int(out.max()) - int(out.min()) <= 1
    assert torch.equal(out[0], out[1])


def test_clahe_where_only_touches_masked_samples():
    imgs = torch.from_numpy(np.stack([structured(40, 56, seed=10 + s) for s in range(5)])).permute(0, 3, 1, 2)
    imgs = imgs.contiguous()
    before = imgs.clone()
    mask = torch.tensor([True, False, True, False, False])
    out = clahe_where(imgs, mask, clip_limit=3.0, tiles=(4, 4))
    assert torch.equal(imgs, before)  # input untouched
    assert out.shape == imgs.shape and out.dtype == torch.uint8
    for b in range(5):
        if mask[b]:
            assert torch.equal(out[b : b + 1], clahe(imgs[b : b + 1], clip_limit=3.0, tiles=(4, 4)))
        else:
            assert torch.equal(out[b], imgs[b])  # bit-identical
    assert torch.equal(clahe_where(imgs, torch.zeros(5, dtype=torch.bool)), imgs)
    assert torch.equal(clahe_where(imgs, torch.ones(5, dtype=torch.bool)), clahe(imgs))


def test_rejects_bad_input():
    with pytest.raises(TypeError):
        clahe(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError):
        clahe(torch.zeros(8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError):
        clahe(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), bins=100)
    with pytest.raises(ValueError):
        clahe_where(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError):  # luminance mode is defined for grey or RGB only
        clahe(torch.zeros(1, 4, 8, 8, dtype=torch.uint8))
    assert clahe(torch.zeros(1, 4, 8, 8, dtype=torch.uint8), luma_only=False).shape == (1, 4, 8, 8)
