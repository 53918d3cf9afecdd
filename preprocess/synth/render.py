"""Phantom rendering: a study's HU slices, vertebra labels and crack masks, head to feet.

:func:`render_study` draws what :mod:`spinestream.preprocess.synth.spec` describes (the neck, seven
vertebrae, discs, cracks, noise); :func:`crack_box` turns a crack mask into the hand-drawn-like
bounding box the boxed cohort gets.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .spec import ARCH_MM, C1_RING, CANAL_AXES, Crack, StudySpec, _body_axes, _hu_range, _pixel_seed


@dataclass(slots=True)
class RenderedSlice:
    z: int  # head-to-feet index
    hu: np.ndarray  # (rows, cols) int16, exactly what the DICOM decodes to (slope 1)
    labels: np.ndarray  # (rows, cols) uint8 vertebra number of bone pixels, 0 elsewhere
    crack: np.ndarray | None  # (rows, cols) bool crack pixels, None when the slice has none


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    if ax <= 0 or ay <= 0:
        return np.zeros(np.broadcast_shapes(x.shape, y.shape), dtype=bool)
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


class _Bone:
    """Accumulates a vertebra's bone as (outer, inner) masks; cortical = outer minus inner."""

    def __init__(self, x: np.ndarray, y: np.ndarray, rim: float) -> None:
        self.x, self.y, self.rim = x, y, rim
        self.outer = np.zeros(x.shape, dtype=bool)
        self.inner = np.zeros(x.shape, dtype=bool)

    def add(self, cx: float, cy: float, ax: float, ay: float) -> None:
        self.outer |= _ellipse(self.x, self.y, cx, cy, ax, ay)
        self.inner |= _ellipse(self.x, self.y, cx, cy, ax - self.rim, ay - self.rim)

    def add_ring(
        self, cx: float, cy: float, ax: float, ay: float, thick: float, posterior_of: float | None
    ) -> None:
        """An elliptical annulus (the arch around the canal), optionally only behind a y."""
        outer = _ellipse(self.x, self.y, cx, cy, ax + thick, ay + thick)
        outer &= ~_ellipse(self.x, self.y, cx, cy, ax, ay)
        inner = _ellipse(self.x, self.y, cx, cy, ax + thick - self.rim, ay + thick - self.rim) & ~_ellipse(
            self.x, self.y, cx, cy, ax + self.rim, ay + self.rim
        )
        if posterior_of is not None:
            keep = self.y >= posterior_of
            outer &= keep
            inner &= keep
        self.outer |= outer
        self.inner |= inner

    def hole(self, cx: float, cy: float, r: float) -> None:
        """A foramen: no bone inside, a cortical rim around it."""
        self.outer &= ~_ellipse(self.x, self.y, cx, cy, r, r)
        self.inner &= ~_ellipse(self.x, self.y, cx, cy, r + self.rim, r + self.rim)



def _draw_vertebra(bone: _Bone, k: int, t: float, s: float, end_plate: bool) -> None:
    """Vertebra ``k`` at fraction ``t`` (0 = top, 1 = bottom) of its height, in its local
    frame (origin at the body centre, y posterior), sizes scaled by ``s``."""
    bx, by = _body_axes(k, s)
    if k == 1:  # atlas: ring + lateral masses + transverse processes, no body
        cy, rx, ry, th = (v * s for v in C1_RING)
        if 0.2 <= t <= 0.8:
            th = max(th, 1.5 * bone.rim)  # a continuous ring even at a few mm per pixel
            bone.add_ring(0.0, cy, rx - th, ry - th, th, None)
            for side in (-1, 1):
                bone.add(side * 21.5 * s, cy - 3.0 * s, 5.0 * s, 3.0 * s)
        for side in (-1, 1):
            bone.add(side * 11.0 * s, cy - 3.5 * s, 5.0 * s, 7.0 * s)
        if 0.2 <= t <= 0.8:
            for side in (-1, 1):
                bone.hole(side * 21.0 * s, cy - 3.0 * s, 1.8 * s)
        return
    if k == 2 and t < 0.35:  # the dens rises from C2's body
        bone.add(0.0, -0.5 * s, 5.0 * s, 5.0 * s)
    else:
        bone.add(0.0, 0.0, bx, by)
        if end_plate:  # the end plates are solid cortical bone
            bone.inner[:] = False
    arch_from, arch_to = (0.3, 0.9) if k == 2 else (0.15, 0.85)
    if arch_from <= t <= arch_to:
        rcx, rcy = CANAL_AXES[0] * s, CANAL_AXES[1] * s
        canal_y = by + rcy * 0.85
        bone.add_ring(0.0, canal_y, rcx, rcy, max(ARCH_MM * s, 1.5 * bone.rim), posterior_of=by * 0.3)
        spin = (8.0 + 1.4 * (k - 2)) * s  # C7 is the vertebra prominens
        bone.add(0.0, canal_y + rcy + 1.5 * s + spin / 2, 2.0 * s, spin / 2)
        tx, ty = bx + 4.0 * s, by * 0.4
        for side in (-1, 1):
            bone.add(side * tx, ty, 4.5 * s, 3.0 * s)
        if k <= 6:  # C7's transverse foramen is small or absent
            for side in (-1, 1):
                bone.hole(side * tx, ty, 1.7 * s)


@dataclass(slots=True)
class _Frame:
    """A study's fixed pixel grid: full-image coordinates and the bone ROI (all bone lies inside it)."""

    xs: np.ndarray  # (1, W) pixel-centre x in mm
    ys: np.ndarray  # (H, 1)
    rx: np.ndarray  # (h, w) ROI coordinates
    ry: np.ndarray
    roi: tuple[slice, slice]  # (rows, cols) of the ROI in the image
    outside_fov: np.ndarray | None  # pixels outside the reconstruction circle, if padded
    rim: float  # cortex thickness, at least one pixel


def _frame(spec: StudySpec) -> _Frame:
    a, size, ps = spec.anatomy, spec.size, spec.pixel_spacing
    coords = (np.arange(size, dtype=np.float32) + 0.5 - size / 2) * ps  # pixel centres, mm
    xs, ys = coords[None, :], coords[:, None]  # (1, W), (H, 1): broadcasting keeps it cheap
    half = size * ps / 2
    # ROI that holds all bone on every slice: computing bone only there is ~6x cheaper at 512
    s = a.scale
    margin = 12.0 * s + abs(a.lordosis) + abs(a.sway) + 3.0
    x_lo, x_hi = a.spine_x - 27.0 * s - margin, a.spine_x + 27.0 * s + margin
    y_lo, y_hi = a.body_y - 12.0 * s - margin, a.body_y + 45.0 * s + margin
    c0, c1 = np.searchsorted(coords, [x_lo, x_hi])
    r0, r1 = np.searchsorted(coords, [y_lo, y_hi])
    c0, r0 = max(int(c0), 0), max(int(r0), 0)
    c1, r1 = min(int(c1), size), min(int(r1), size)
    rx, ry = np.meshgrid(coords[c0:c1], coords[r0:r1])  # (h, w) ROI coordinates
    return _Frame(xs=xs, ys=ys, rx=rx, ry=ry, roi=(slice(r0, r1), slice(c0, c1)),
                  outside_fov=(xs**2 + ys**2 > half**2) if a.fov_padding else None,
                  rim=max(1.0, ps * 1.05))


def render_study(spec: StudySpec, *, cracks: bool = True) -> Iterator[RenderedSlice]:
    """Yield the study's slices head to feet. ``cracks=False`` renders the same study
    unbroken (identical noise), which is how the tests isolate the crack pixels."""
    a, n, size = spec.anatomy, spec.n_slices, spec.size
    rng = np.random.default_rng([_pixel_seed(spec), 2])
    f = _frame(spec)
    spine_top, spine_bottom = spec.vertebra_z[0][0], spec.vertebra_z[6][1]  # C1 top .. C7 bottom
    lo_clip, hi_clip = _hu_range(spec)
    crack_of = {z: c for c in spec.cracks for z in c.z_indices} if cracks else {}
    for z in range(n):
        noise = rng.standard_normal((size, size), dtype=np.float32)  # drawn even without cracks
        # spine centre on this slice: a lordotic/scoliotic curve over C1..C7
        u = min(max((z - spine_top) / max(spine_bottom - spine_top, 1), 0.0), 1.0)
        bx0 = a.spine_x + a.sway * math.sin(math.pi * u)
        by0 = a.body_y + a.lordosis * math.sin(math.pi * u)
        hu = _soft_tissue(spec, f, z, bx0, by0)
        sigma = np.full((size, size), a.noise, dtype=np.float32)
        labels = np.zeros((size, size), dtype=np.uint8)
        crack_mask = None
        k, t = _vertebra_at(spec, z)
        if k:
            crack_mask = _draw_bone(spec, f, z, k, t, (bx0, by0), crack_of.get(z), hu, sigma, labels)
        elif (kd := _disc_at(spec, z)) is not None:
            dx, dy = a.vertebra_shift[kd - 1]
            bxd, byd = _body_axes(kd, a.scale)
            hu[f.roi][_ellipse(f.rx, f.ry, bx0 + dx, by0 + dy, bxd, byd)] = a.disc_hu
        hu += noise * sigma
        if f.outside_fov is not None:
            hu[f.outside_fov] = -2000.0
        out = np.clip(np.rint(hu), lo_clip, hi_clip).astype(np.int16)
        yield RenderedSlice(z=z, hu=out, labels=labels, crack=crack_mask)


def _soft_tissue(spec: StudySpec, f: _Frame, z: int, bx0: float, by0: float) -> np.ndarray:
    """Air, the neck (fat rim, soft tissue) and the trachea of slice z, in HU (float32, no noise)."""
    a, size, n = spec.anatomy, spec.size, spec.n_slices
    s, half = a.scale, size * spec.pixel_spacing / 2
    ncx, ncy = a.neck_center
    na0, nb = a.neck_axes
    # the neck widens towards the shoulders in the lowest quarter
    widen = 1.0 + 0.25 * max(0.0, (z / n - 0.75) / 0.25)
    na = min(na0 * widen, 0.95 * half - abs(ncx))
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    neck = _ellipse(f.xs, f.ys, ncx, ncy, na, nb)
    hu[neck] = a.fat_hu
    hu[_ellipse(f.xs, f.ys, ncx, ncy, na - a.fat_mm, nb - a.fat_mm)] = a.soft_hu
    ta, tb = a.trachea_axes
    hu[_ellipse(f.xs, f.ys, bx0, by0 - 9.0 * s - tb - 5.0 * s, ta, tb)] = -1000.0
    return hu


def _draw_bone(spec: StudySpec, f: _Frame, z: int, k: int, t: float, centre: tuple[float, float],
               c: Crack | None, hu: np.ndarray, sigma: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
    """Vertebra k (and its crack, if c cuts slice z) into hu, sigma and labels; returns the crack mask."""
    a, s = spec.anatomy, spec.anatomy.scale
    dx, dy = a.vertebra_shift[k - 1]
    rot = a.vertebra_rotation[k - 1]
    cx, cy = centre[0] + dx, centre[1] + dy
    cos, sin = math.cos(rot), math.sin(rot)
    lx = cos * (f.rx - cx) + sin * (f.ry - cy)  # vertebra-local frame
    ly = -sin * (f.rx - cx) + cos * (f.ry - cy)
    zs, ze = spec.vertebra_z[k - 1]
    bone = _Bone(lx, ly, f.rim)
    _draw_vertebra(bone, k, t, s, end_plate=(ze - zs >= 4 and z in (zs, ze - 1)))
    assert bone.outer.any(), f"{spec.uid}: C{k} has no bone on z={z}"
    roi_hu = hu[f.roi]
    roi_hu[bone.outer] = a.cortical_hu
    roi_hu[bone.inner] = a.cancellous_hu
    sigma[f.roi][bone.outer] *= 2.5
    labels[f.roi][bone.outer] = k
    if c is None:
        return None
    roi_crack = _crack_pixels(c, z, lx, ly, bone.outer, spec.pixel_spacing)
    roi_hu[roi_crack] = c.hu
    sigma[f.roi][roi_crack] = a.noise
    crack_mask = np.zeros(hu.shape, dtype=bool)
    crack_mask[f.roi] = roi_crack
    return crack_mask


def _crack_pixels(c: Crack, z: int, lx: np.ndarray, ly: np.ndarray, outer: np.ndarray, ps: float) -> np.ndarray:
    """The ROI pixels crack c cuts on slice z: bone within half its width of the (drifting) line."""
    step = z - c.z_indices[0]
    px, py = c.center[0] + c.drift[0] * step, c.center[1] + c.drift[1] * step
    ux, uy = math.cos(c.angle), math.sin(c.angle)
    along = (lx - px) * ux + (ly - py) * uy
    across = -(lx - px) * uy + (ly - py) * ux
    w = max(c.width, ps) / 2  # at least one pixel: thinner would vanish
    roi_crack = outer & (np.abs(across) <= w) & (np.abs(along) <= c.half_length)
    if not roi_crack.any():
        # only at a few mm per pixel can a thin lamina fall between pixel
        # centres; the crack then takes the bone pixel nearest its centre
        d2 = np.where(outer, (lx - px) ** 2 + (ly - py) ** 2, np.inf)
        roi_crack = np.zeros_like(outer)
        roi_crack.flat[int(np.argmin(d2))] = True
    return roi_crack


def _vertebra_at(spec: StudySpec, z: int) -> tuple[int, float]:
    for k, (a, b) in enumerate(spec.vertebra_z, start=1):
        if a <= z < b:
            return k, (z - a + 0.5) / (b - a)
    return 0, 0.0


def _disc_at(spec: StudySpec, z: int) -> int | None:
    """The vertebra whose disc (below it) fills gap slice z, if any."""
    for k in range(1, len(spec.vertebra_z)):
        if spec.vertebra_z[k - 1][1] <= z < spec.vertebra_z[k][0]:
            return k + 1 if k >= 2 else None  # no disc between C1 and C2 (a joint)
    return None


def crack_box(
    mask: np.ndarray, spec: StudySpec, rng: np.random.Generator
) -> tuple[float, float, float, float]:
    """(x, y, width, height) of a crack in pixels, padded by 0.5-2 mm like a hand-drawn box."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    pad = rng.uniform(0.5, 2.0, size=4) / spec.pixel_spacing
    x0 = max(0.0, cols[0] - pad[0])
    y0 = max(0.0, rows[0] - pad[1])
    x1 = min(float(spec.size), cols[-1] + 1 + pad[2])
    y1 = min(float(spec.size), rows[-1] + 1 + pad[3])
    return round(x0, 5), round(y0, 5), round(x1 - x0, 5), round(y1 - y0, 5)


