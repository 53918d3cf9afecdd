"""Spec sampling: every study's ground truth (cohort, fractures, geometry, storage) without a pixel.

:func:`study_specs` draws the whole dataset from a :class:`SynthConfig`; the phantom's shared
geometry (vertebra bodies, arches, the C1 ring) lives here too, since crack placement and the
renderer (:mod:`spinestream.preprocess.synth.render`) both use it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spinestream.shards.layout import ROW_TYPES, VERTEBRAE

from .config import CRACK_WIDTH_MM, SynthConfig

UID_ROOT = "1.2.826.0.1.3680043."  # the competition's UID prefix
PREDICTION_TYPES = ROW_TYPES
#: share of studies per syntax in a "mixed" dataset (the real shares are unpublished;
#: most real files are uncompressed, a minority JPEG Lossless / JPEG 2000)
MIXED_SHARES: dict[str, float] = {"explicit": 0.55, "jpeg-lossless": 0.20, "j2k": 0.15, "rle": 0.10}
#: cohort shares of the real training set: 235 boxed / ~1,050 negative / ~730 unboxed positives
COHORT_SHARES: dict[str, float] = {"boxed": 0.12, "positive-unboxed": 0.36, "negative": 0.52}
#: relative fracture prevalence C1..C7 in the real training labels (C2 and C7 most common)
VERTEBRA_WEIGHTS = np.array([0.07, 0.14, 0.04, 0.05, 0.08, 0.13, 0.19])
REVERSED_SHARE = 0.2
SIGNED_SHARE = 0.3
SEGMENTATION_SHARE = 0.1
# (spacing, thickness) pairs seen on CT scanners; (0.5, 1.0) is an overlapping reconstruction
Z_SAMPLING = ((0.5, 0.5), (0.625, 0.625), (0.8, 0.8), (1.0, 1.0), (0.5, 1.0), (0.625, 1.25))


@dataclass(frozen=True, slots=True)
class Crack:
    """One fracture line, in the vertebra's local frame (mm, x right, y posterior)."""

    vertebra: int  # 1..7
    z_indices: tuple[int, ...]  # head-to-feet slice indices it cuts (contiguous)
    part: str  # "body" (or dens) | "arch" | "ring" (C1)
    center: tuple[float, float]  # a point on the line, on the first slice
    drift: tuple[float, float]  # mm per slice: the fracture plane is oblique
    angle: float  # radians
    half_length: float  # mm; past the bone it cuts nothing
    width: float  # mm (drawn at least one pixel wide)
    hu: float


@dataclass(frozen=True, slots=True)
class Anatomy:
    """The per-study phantom geometry (mm, relative to the image centre) and densities (HU)."""

    neck_center: tuple[float, float]
    neck_axes: tuple[float, float]
    fat_mm: float
    trachea_axes: tuple[float, float]
    spine_x: float
    body_y: float  # body centre at the top of the spine; the lordosis moves it
    lordosis: float  # mm (negative = anterior bulge mid-spine)
    sway: float  # mm lateral curve
    scale: float  # overall bone size factor
    vertebra_shift: tuple[tuple[float, float], ...]  # per vertebra 1..8
    vertebra_rotation: tuple[float, ...]  # radians, per vertebra 1..8
    cortical_hu: float
    cancellous_hu: float
    disc_hu: float
    soft_hu: float
    fat_hu: float
    noise: float  # HU sd in soft tissue (bone gets 2.5x: trabecular texture)
    fov_padding: bool  # outside the reconstruction circle: -2000 HU / stored 0


@dataclass(frozen=True, slots=True)
class StudySpec:
    """Everything about one synthetic study, without its pixels.

    Indices called ``z`` run head to feet (descending ImagePositionPatient z, the order
    of spinestream's volumes); file numbers are the ``<n>.dcm`` names.
    """

    uid: str
    index: int
    split: str  # "train" | "test"
    cohort: str  # "boxed" | "negative" | "positive-unboxed" | "test"
    fractured: tuple[int, ...]  # vertebra numbers 1..7
    has_segmentation: bool
    n_slices: int
    slice_spacing: float  # mm between ImagePositionPatient z values
    slice_thickness: float
    size: int
    pixel_spacing: float  # mm, rows and columns
    z_top: float  # z of the most superior slice
    reversed: bool  # True: file 1 is the feet (lowest z)
    syntax: str  # key of SYNTAXES
    signed: bool  # PixelRepresentation 1 (int16, intercept 0) or 0 (uint16, intercept -1024)
    bits_stored: int
    windows: tuple[tuple[int, int], ...]  # (center, width) pairs
    vertebra_z: tuple[tuple[int, int], ...]  # [start, stop) z indices of C1..C7 (and T1)
    cracks: tuple[Crack, ...]
    anatomy: Anatomy = field(repr=False)

    @property
    def boxed(self) -> bool:
        return self.cohort == "boxed"

    @property
    def intercept(self) -> int:
        return 0 if self.signed else -1024

    @property
    def labels(self) -> dict[str, int]:
        """train.csv's row: patient_overall and C1..C7 (0/1)."""
        row = {"patient_overall": int(bool(self.fractured))}
        row.update({v: int(k in self.fractured) for k, v in enumerate(VERTEBRAE, start=1)})
        return row

    def file_number(self, z: int) -> int:
        """File number (1-based ``<n>.dcm``) of head-to-feet index ``z``."""
        return self.n_slices - z if self.reversed else z + 1

    def z_position(self, file_number: int) -> float:
        """ImagePositionPatient z of a file, exactly as written (4 decimals)."""
        z = file_number - 1 if not self.reversed else self.n_slices - file_number
        return round(self.z_top - z * self.slice_spacing, 4)

    @property
    def vertebra_files(self) -> dict[int, tuple[int, int]]:
        """Vertebra number -> (first, last) file number it appears on, inclusive."""
        out = {}
        for k, (a, b) in enumerate(self.vertebra_z, start=1):
            n1, n2 = self.file_number(a), self.file_number(b - 1)
            out[k] = (min(n1, n2), max(n1, n2))
        return out

    @property
    def cracked_files(self) -> dict[int, tuple[int, ...]]:
        """Fractured vertebra -> the sorted file numbers its crack is drawn on."""
        return {c.vertebra: tuple(sorted(self.file_number(z) for z in c.z_indices)) for c in self.cracks}


def _round_half_up(x: float) -> int:
    # Python's round() is banker's rounding; counts must not depend on that subtlety
    return int(math.floor(x + 0.5))


def _quota(n: int, shares: dict[str, float], *, at_least_one: bool) -> list[str]:
    """``n`` labels in proportion to ``shares``: each count is round-half-up of its share
    (the last key takes the remainder); with ``at_least_one`` and n >= len(shares), every
    key gets at least one, taken from the largest count."""
    keys = list(shares)
    counts = {k: _round_half_up(n * shares[k]) for k in keys[:-1]}
    counts[keys[-1]] = n - sum(counts.values())
    if at_least_one and n >= len(keys):
        for k in keys:
            while counts[k] < 1:
                donor = max(keys, key=lambda j: (counts[j], -keys.index(j)))
                counts[donor] -= 1
                counts[k] += 1
    if counts[keys[-1]] < 0:  # shares summing past 1 for tiny n: trim from the front
        for k in keys[:-1]:
            take = min(counts[k], -counts[keys[-1]])
            counts[k] -= take
            counts[keys[-1]] += take
    return [k for k in keys for _ in range(counts[k])]


def cohort_shares(boxed_share: float | None = None) -> dict[str, float]:
    """The cohort mix: the real training set's, or with ``boxed_share`` of the studies boxed and
    the rest split between the other two cohorts in the real ratio (an enriched set, where a
    small run should see more fractured slices per second of CPU)."""
    if boxed_share is None:
        return dict(COHORT_SHARES)
    rest = 1.0 - COHORT_SHARES["boxed"]
    return {"boxed": boxed_share, **{k: v / rest * (1.0 - boxed_share) for k, v in COHORT_SHARES.items()
                                     if k != "boxed"}}


def _cohorts(studies: int, boxed_share: float | None = None) -> list[str]:
    if studies == 1:
        return ["boxed"]  # the one study should exercise fractures and boxes
    if studies == 2:
        return ["boxed", "negative"]
    return _quota(studies, cohort_shares(boxed_share), at_least_one=True)


def _flags(n: int, share: float, at_least_one_from: int) -> list[bool]:
    k = _round_half_up(n * share)
    if n >= at_least_one_from:
        k = max(k, 1)
    return [True] * k + [False] * (n - k)


def _layout(n: int, rng: np.random.Generator) -> tuple[tuple[int, int], ...]:
    """Head-to-feet [start, stop) slice ranges of C1..C7 (+T1): vertebra heights and
    disc gaps in relative units, scaled so the cervical spine fills the stack."""
    has_t1 = bool(rng.random() < 0.5)
    heights = [0.75, 1.5] + [1.0 + 0.04 * (k - 3) for k in range(3, 8)]
    heights = [h * rng.uniform(0.9, 1.1) for h in heights]
    disc = rng.uniform(0.22, 0.32)
    parts: list[tuple[str, float]] = [("gap", rng.uniform(0.3, 0.8))]
    for k, h in enumerate(heights, start=1):
        parts.append((f"v{k}", h))
        if k < 7:
            parts.append(("gap", disc))
    if has_t1:
        parts += [("gap", disc), ("v8", 1.1 * rng.uniform(0.9, 1.1)), ("gap", rng.uniform(0.05, 0.2))]
    else:
        parts.append(("gap", rng.uniform(0.3, 0.8)))
    # whole slices per part, closest to the ideal shares; every vertebra gets at least 2
    # slices (1 in the very short stacks that tests use)
    ideal = np.array([w for _, w in parts]) * n / sum(w for _, w in parts)
    least = 2 if n >= 32 else 1
    floor = np.array([least if name.startswith("v") else 0 for name, _ in parts])
    counts = np.maximum(np.floor(ideal).astype(int), floor)
    while counts.sum() < n:
        counts[int(np.argmax(ideal - counts))] += 1
    while counts.sum() > n:
        counts[int(np.argmax(np.where(counts > floor, counts - ideal, -np.inf)))] -= 1
    edges = np.concatenate([[0], np.cumsum(counts)])
    ranges = tuple(
        (int(a), int(b)) for (name, _), a, b in zip(parts, edges[:-1], edges[1:]) if name.startswith("v")
    )
    return ranges


def _crack(vertebra: int, zr: tuple[int, int], scale: float, rng: np.random.Generator,
           width_mm: tuple[float, float] = CRACK_WIDTH_MM) -> Crack:
    a, b = zr
    length = b - a
    # arch and C1 ring elements exist only in the middle of a vertebra's z range
    if vertebra == 1:
        part = str(rng.choice(["ring", "arch"], p=[0.6, 0.4]))
    else:
        part = str(rng.choice(["body", "arch"], p=[0.7, 0.3]))
    if part == "arch" or vertebra == 1:
        lo, hi = a + int(math.ceil(0.3 * length)), b - int(math.ceil(0.3 * length))
        if hi <= lo:
            lo, hi = a + length // 2, a + length // 2 + 1
    else:
        lo, hi = a, b
    span = hi - lo
    run = max(1, min(span, _round_half_up(length * rng.uniform(0.3, 0.7))))
    start = int(rng.integers(lo, hi - run + 1))
    side = float(rng.choice([-1.0, 1.0]))
    if part == "body":  # through the body (or the dens), at any angle
        center = (rng.uniform(-2.5, 2.5) * scale, rng.uniform(-2.0, 2.0) * scale)
        angle = rng.uniform(0, math.pi)
        half = rng.uniform(6.0, 12.0) * scale
    elif part == "ring":  # through a lateral mass of the atlas
        center = (side * 11.0 * scale + rng.uniform(-1.0, 1.0) * scale, rng.uniform(2.5, 4.5) * scale)
        angle = rng.uniform(0, math.pi)
        half = rng.uniform(5.0, 9.0) * scale
    else:  # across a lamina: a point mid-way through the arch, the line roughly radial
        canal_x, canal_y, ax, ay = _arch_ring(vertebra, scale)
        px = side * 0.45 * ax
        py = canal_y + ay * math.sqrt(1 - 0.45**2)
        center = (px, py)
        angle = math.atan2(py - canal_y, px - canal_x) + rng.uniform(-0.5, 0.5)
        half = rng.uniform(3.0, 6.0) * scale
    return Crack(
        vertebra=vertebra,
        z_indices=tuple(range(start, start + run)),
        part=part,
        center=(float(center[0]), float(center[1])),
        # small enough that the line stays on the bone over the whole run
        drift=(float(rng.uniform(-0.15, 0.15) * scale), float(rng.uniform(-0.15, 0.15) * scale)),
        angle=float(angle),
        half_length=float(half),
        width=float(rng.uniform(*width_mm)),
        hu=float(rng.uniform(-150, 0)),
    )


def _fractured(rng: np.random.Generator, min_count: int = 1) -> tuple[int, ...]:
    count = max(min_count, int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15])))
    picked = rng.choice(7, size=count, replace=False, p=VERTEBRA_WEIGHTS / VERTEBRA_WEIGHTS.sum())
    return tuple(sorted(int(k) + 1 for k in picked))


@dataclass(frozen=True, slots=True)
class _Assignments:
    """The dataset-level draws: one list entry per study (train first, then test)."""

    numbers: list[int]  # UID numbers
    cohorts: list[str]
    reversed: list[bool]
    signed: list[bool]
    syntaxes: list[str]
    multi: int | None  # the segmented multi-fracture boxed study
    segmented: set[int]


def _assign(cfg: SynthConfig) -> _Assignments:
    studies, total = cfg.studies, cfg.studies + cfg.test_studies
    assign = np.random.default_rng([cfg.seed, 0])  # dataset-level assignments
    pool = max(32_000, 4 * total)  # real study numbers run up to ~32k
    numbers = assign.choice(pool, size=total, replace=False) + 1_000
    cohorts = list(assign.permutation(_cohorts(studies, cfg.boxed_share))) + ["test"] * cfg.test_studies
    reversed_ = list(assign.permutation(_flags(total, REVERSED_SHARE, at_least_one_from=3)))
    signed = list(assign.permutation(_flags(total, SIGNED_SHARE, at_least_one_from=2)))
    # drawn even when one syntax is forced, so the draws after it (and thus everything
    # but the syntax) stay the same: per-syntax datasets then hold identical studies
    mixed = list(assign.permutation(_quota(total, MIXED_SHARES, at_least_one=True)))
    syntaxes = mixed if cfg.syntax == "mixed" else [cfg.syntax] * total
    # the label rule for several fractured vertebrae needs a segmented multi-fracture
    # boxed study; the rest of the segmentations go to random training studies
    boxed_idx = [i for i, c in enumerate(cohorts) if c == "boxed"]
    multi = boxed_idx[0] if studies >= 8 and boxed_idx else None
    n_seg = max(1 if studies >= 4 else 0, _round_half_up(studies * SEGMENTATION_SHARE))
    seg = {multi} if multi is not None else set()
    for i in assign.permutation(studies):
        if len(seg) >= n_seg:
            break
        seg.add(int(i))
    return _Assignments(numbers=[int(x) for x in numbers], cohorts=[str(c) for c in cohorts],
                        reversed=[bool(x) for x in reversed_], signed=[bool(x) for x in signed],
                        syntaxes=[str(x) for x in syntaxes], multi=multi, segmented=seg)


def _study_spec(cfg: SynthConfig, i: int, a: _Assignments) -> StudySpec:
    """Study ``i``'s spec; its draws come from its own generator ``(seed, 1, i)``."""
    rng = np.random.default_rng([cfg.seed, 1, i])
    cohort, size = a.cohorts[i], cfg.size
    n = int(rng.integers(cfg.slices[0], cfg.slices[1] + 1))
    spacing, thickness = Z_SAMPLING[int(rng.integers(len(Z_SAMPLING)))]
    fov = float(rng.uniform(120.0, 190.0))
    ps = float(f"{fov / size:.6f}")  # the value written to PixelSpacing
    fov = ps * size
    vertebra_z = _layout(n, rng)
    anatomy = _anatomy(fov, rng)
    if cohort in ("boxed", "positive-unboxed"):
        fractured = _fractured(rng, min_count=2 if i == a.multi else 1)
    elif cohort == "test":
        fractured = _fractured(rng) if rng.random() < 0.5 else ()
    else:
        fractured = ()
    cracks = tuple(_crack(k, vertebra_z[k - 1], anatomy.scale, rng, cfg.crack_width) for k in fractured)
    windows = ((400, 1800),) if rng.random() < 0.6 else ((400, 1800), (40, 400))
    z_top = round(float(rng.uniform(-60.0, 40.0)), 2)  # drawn in this order: byte-identical datasets
    bits_stored = 12 if rng.random() < 0.3 else 16
    return StudySpec(
        uid=f"{UID_ROOT}{a.numbers[i]}",
        index=i,
        split="train" if i < cfg.studies else "test",
        cohort=cohort,
        fractured=fractured,
        has_segmentation=i in a.segmented,
        n_slices=n,
        slice_spacing=spacing,
        slice_thickness=thickness,
        size=size,
        pixel_spacing=ps,
        z_top=z_top,
        reversed=a.reversed[i],
        syntax=a.syntaxes[i],
        signed=a.signed[i],
        bits_stored=bits_stored,
        windows=windows,
        vertebra_z=vertebra_z,
        cracks=cracks,
        anatomy=anatomy,
    )


def study_specs(config: SynthConfig | int | None = None, seed: int | None = None, **fields: Any) -> list[StudySpec]:
    """The dataset's ground truth without rendering a pixel: train studies first (index
    order = row order of train.csv), then test studies. Same config, same specs.

    Takes a :class:`SynthConfig`, or its fields: ``study_specs(studies, seed, size=..., ...)``.
    ``boxed_share``: see :func:`cohort_shares` (None: the real mix). ``crack_width``: the (lo, hi)
    range in mm each crack's width is drawn from (wider = easier to see at low resolution)."""
    cfg = SynthConfig.of(config, seed, **fields)
    a = _assign(cfg)
    return [_study_spec(cfg, i, a) for i in range(cfg.studies + cfg.test_studies)]


def _anatomy(fov: float, rng: np.random.Generator) -> Anatomy:
    half = fov / 2
    na = half * rng.uniform(0.74, 0.84)  # the neck fills the image, with room for the shoulders
    nb = na * rng.uniform(0.8, 0.92)
    # the bone size is tied to the neck so the picture looks the same at every FOV
    scale = na / 50.0 * rng.uniform(0.95, 1.05)
    return Anatomy(
        neck_center=(float(rng.uniform(-2, 2)), float(rng.uniform(-2, 2))),
        neck_axes=(float(na), float(nb)),
        fat_mm=float(rng.uniform(2.5, 6.0) * scale),
        trachea_axes=(float(rng.uniform(6.5, 8.5) * scale), float(rng.uniform(5.5, 7.5) * scale)),
        spine_x=float(rng.uniform(-3, 3)),
        body_y=float(rng.uniform(-9, -4) * scale),  # the spinous processes must stay inside the neck
        lordosis=float(rng.uniform(-7, -2) * scale),
        sway=float(rng.uniform(-2, 2)),
        scale=float(scale),
        vertebra_shift=tuple((float(rng.normal(0, 0.6)), float(rng.normal(0, 0.6))) for _ in range(8)),
        vertebra_rotation=tuple(float(rng.normal(0, math.radians(4))) for _ in range(8)),
        cortical_hu=float(rng.uniform(1000, 1500)),
        cancellous_hu=float(rng.uniform(330, 420)),
        disc_hu=float(rng.uniform(70, 100)),
        soft_hu=float(rng.uniform(35, 55)),
        fat_hu=float(rng.uniform(-110, -70)),
        noise=float(rng.uniform(8, 20)),
        fov_padding=bool(rng.random() < 0.3),
    )



# --------------------------------------------------------------------------- geometry
# shared by crack placement (above) and the renderer


def _body_axes(k: int, s: float) -> tuple[float, float]:
    """Semi-axes (LR, AP) of vertebra k's body in mm; lower vertebrae are larger."""
    return (8.0 + 0.4 * max(k - 3, 0)) * s, (7.0 + 0.3 * max(k - 3, 0)) * s


# the posterior arch: an elliptical annulus of this thickness around the spinal canal
CANAL_AXES = (8.5, 6.0)
ARCH_MM = 2.6
C1_RING = (7.0, 17.0, 15.0, 2.8)  # centre y, outer semi-axes, thickness


def _arch_ring(k: int, s: float) -> tuple[float, float, float, float]:
    """(cx, cy, ax, ay) of the mid-line of vertebra k's arch (C1: its ring), local frame."""
    if k == 1:
        cy, rx, ry, th = C1_RING
        return 0.0, cy * s, (rx - th / 2) * s, (ry - th / 2) * s
    _, by = _body_axes(k, s)
    rcx, rcy = CANAL_AXES[0] * s, CANAL_AXES[1] * s
    return 0.0, by + rcy * 0.85, rcx + ARCH_MM * s / 2, rcy + ARCH_MM * s / 2



def _pixel_seed(spec: StudySpec) -> int:
    """The pixel-noise seed of a study: its UID number (itself drawn from the dataset seed)."""
    return int(spec.uid.rsplit(".", 1)[1])



def _hu_range(spec: StudySpec) -> tuple[int, int]:
    """HU values the stored representation can hold (slope 1)."""
    if spec.signed:
        lo, hi = -(2 ** (spec.bits_stored - 1)), 2 ** (spec.bits_stored - 1) - 1
    else:
        lo, hi = 0, 2**spec.bits_stored - 1
    return lo + spec.intercept, hi + spec.intercept


