"""A synthetic stand-in for the RSNA 2022 Cervical Spine Fracture Detection dataset.

The real data (343 GB of DICOM) cannot ship with the project, so ``spinestream synth``
writes a small dataset in exactly Kaggle's layout, which every other verb (shard, train,
predict, the benchmarks, the tests) reads as if it were the real thing::

    spinestream synth --out demo-data/dataset --studies 24 --seed 0 --size 256

    OUT/train.csv                   StudyInstanceUID, patient_overall, C1..C7
    OUT/train_bounding_boxes.csv    StudyInstanceUID, x, y, width, height, slice_number
    OUT/train_images/<uid>/<n>.dcm  n = 1..N, the file name is the slice number
    OUT/segmentations/<uid>.nii     a few studies, sagittal NIfTI like the competition's
    OUT/test_images/<uid>/<n>.dcm   unlabeled studies
    OUT/test.csv                    row_id, StudyInstanceUID, prediction_type
    OUT/sample_submission.csv       row_id, fractured (0.5)
    OUT/SYNTH_COMPLETE              written last (JSON: parameters and counts)

``SYNTH_COMPLETE`` is the only file that is not part of Kaggle's layout. It is written
after everything else, so a directory without it is a killed or failing run: delete it
(or rerun with ``--force``). ``--force`` removes only the entries listed above, never
anything else in the directory.

The phantom
-----------
Each study is an axial CT stack of a neck, in Hounsfield units: air (-1000) around an
elliptical neck of soft tissue (~45 HU) with a subcutaneous fat rim (~-90 HU) and an air
trachea in front of the spine. Seven cervical vertebrae are stacked along z, C1 at the
head: C1 is a ring (anterior arch, lateral masses, posterior arch); C2 a body with the
dens above it; C3-C7 an elliptical body (cortical rim 1000-1500 HU, cancellous interior
330-420 HU, dense end plates) with a posterior arch (pedicles/laminae around the spinal
canal), a spinous process and transverse processes pierced by the transverse foramina.
Intervertebral discs (~85 HU) fill the gaps; about half the studies show T1 below C7.
The spine follows a lordotic curve and each vertebra is slightly shifted and rotated,
so the bone outline changes from slice to slice.

A fractured vertebra has a crack: a thin dark line (-150-0 HU, 1.2-2.0 mm wide, i.e.
3-9 px at 512, 1-2 px at 128, at least one pixel) cut through its bone
over a contiguous run of its slices, through the body (or dens) or through the posterior
arch, at a random angle, across the whole bone or part of it, and drifting slightly from
slice to slice (an oblique fracture plane). In the bone window (WL 400 / WW 1800) it is
plainly visible but small; the transverse foramina and the canal are dark holes in bone
on every study, so "a dark spot near bone" alone does not mean a fracture.

What varies, as in the real data
--------------------------------
Per study, deterministically from ``seed``: slice count (``slices`` range); slice
spacing 0.5-1 mm (sometimes thinner than the slice thickness, i.e. overlapping
reconstruction); pixel spacing from a 120-190 mm field of view (0.23-0.37 mm at 512 px;
the neck always fills the image, so the spacing scales with ``size``); storage
(``RescaleIntercept`` -1024 with unsigned ``uint16``, stored = HU + 1024 clipped at 0,
or intercept 0 with signed ``int16``); ``BitsStored`` 16 or 12; a circular
reconstruction field of view padded with -2000 HU (signed) or stored 0 in some studies;
single- or multi-valued ``WindowCenter``/``WindowWidth``; the z direction (file 1 is the
head in most studies, the feet in ~20%); the transfer syntax (Explicit VR Little Endian,
JPEG Lossless SV1, JPEG 2000 Lossless, RLE Lossless); anatomy size, position, curve,
bone density and noise.

Cohorts follow the real training set: ~12% ``boxed`` (fractures with bounding boxes on
every cracked slice), ~52% ``negative``, ~36% ``positive-unboxed`` (cracks, no boxes);
positives have 1-3 fractured vertebrae, weighted like the real per-vertebra prevalence.
When ``studies >= 8`` one boxed study has two fractured vertebrae and a segmentation.

Determinism: the same arguments give byte-identical files, whatever ``workers`` is.
UIDs derive from the seed (``1.2.826.0.1.3680043.<n>``, series ``<study>.1``, instance
``<study>.1.<file number>``), dates are constants, and every random draw comes from a
generator seeded by ``(seed, purpose, study index)`` or, for pixel noise and box padding,
by the study's UID number (itself drawn from the seed). GDCM, which encodes JPEG
Lossless, stamps fresh UIDs and times into files it writes, so only its codestream is
kept (see :class:`_Encoder`). Pixel content does not depend on the transfer syntax, so
per-syntax datasets made with the same seed hold the same images.

Ground truth for tests and tools lives in :func:`study_specs` (cheap, no pixels) and
:func:`render_study` (the HU slices, vertebra labels and crack masks); nothing beyond
Kaggle's layout and the marker is written to the dataset directory.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

COMPLETE_MARKER = "SYNTH_COMPLETE"
UID_ROOT = "1.2.826.0.1.3680043."  # the competition's UID prefix
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VERTEBRAE = tuple(f"C{k}" for k in range(1, 8))
PREDICTION_TYPES = (*VERTEBRAE, "patient_overall")

#: --syntax name -> transfer syntax UID
SYNTAXES: dict[str, str] = {
    "explicit": "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "jpeg-lossless": "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Non-Hierarchical, First-Order (SV1)
    "j2k": "1.2.840.10008.1.2.4.90",  # JPEG 2000 Image Compression (Lossless Only)
    "rle": "1.2.840.10008.1.2.5",  # RLE Lossless
}
#: share of studies per syntax in a "mixed" dataset (the real shares are unpublished;
#: most real files are uncompressed, a minority JPEG Lossless / JPEG 2000)
MIXED_SHARES: dict[str, float] = {"explicit": 0.55, "jpeg-lossless": 0.20, "j2k": 0.15, "rle": 0.10}
#: cohort shares of the real training set: 235 boxed / ~1,050 negative / ~730 unboxed positives
CRACK_WIDTH_MM: tuple[float, float] = (1.2, 2.0)  # drawn uniformly per crack
COHORT_SHARES: dict[str, float] = {"boxed": 0.12, "positive-unboxed": 0.36, "negative": 0.52}
#: relative fracture prevalence C1..C7 in the real training labels (C2 and C7 most common)
VERTEBRA_WEIGHTS = np.array([0.07, 0.14, 0.04, 0.05, 0.08, 0.13, 0.19])
REVERSED_SHARE = 0.2
SIGNED_SHARE = 0.3
SEGMENTATION_SHARE = 0.1
# (spacing, thickness) pairs seen on CT scanners; (0.5, 1.0) is an overlapping reconstruction
Z_SAMPLING = ((0.5, 0.5), (0.625, 0.625), (0.8, 0.8), (1.0, 1.0), (0.5, 1.0), (0.625, 1.25))
MIN_SLICES = 12  # room for C1..C7 (+T1) of at least one slice each; tests use ~16, real CT 200+


# --------------------------------------------------------------------------- specs


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
        row.update({f"C{k}": int(k in self.fractured) for k in range(1, 8)})
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


def study_specs(
    studies: int = 24,
    seed: int = 0,
    *,
    size: int = 512,
    test_studies: int = 2,
    slices: tuple[int, int] = (48, 96),
    syntax: str = "mixed",
    boxed_share: float | None = None,
    crack_width: tuple[float, float] = CRACK_WIDTH_MM,
) -> list[StudySpec]:
    """The dataset's ground truth without rendering a pixel: train studies first (index
    order = row order of train.csv), then test studies. Same arguments, same specs.
    ``boxed_share``: see :func:`cohort_shares` (None: the real mix). ``crack_width``: the (lo, hi)
    range in mm each crack's width is drawn from (wider = easier to see at low resolution)."""
    _validate(studies, size, test_studies, slices, syntax, boxed_share, crack_width)
    total = studies + test_studies
    assign = np.random.default_rng([seed, 0])  # dataset-level assignments
    pool = max(32_000, 4 * total)  # real study numbers run up to ~32k
    numbers = assign.choice(pool, size=total, replace=False) + 1_000
    cohorts = list(assign.permutation(_cohorts(studies, boxed_share))) + ["test"] * test_studies
    reversed_ = list(assign.permutation(_flags(total, REVERSED_SHARE, at_least_one_from=3)))
    signed = list(assign.permutation(_flags(total, SIGNED_SHARE, at_least_one_from=2)))
    # drawn even when one syntax is forced, so the draws after it (and thus everything
    # but the syntax) stay the same: per-syntax datasets then hold identical studies
    mixed = list(assign.permutation(_quota(total, MIXED_SHARES, at_least_one=True)))
    syntaxes = mixed if syntax == "mixed" else [syntax] * total
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

    specs = []
    for i in range(total):
        rng = np.random.default_rng([seed, 1, i])
        cohort = str(cohorts[i])
        n = int(rng.integers(slices[0], slices[1] + 1))
        spacing, thickness = Z_SAMPLING[int(rng.integers(len(Z_SAMPLING)))]
        fov = float(rng.uniform(120.0, 190.0))
        ps = float(f"{fov / size:.6f}")  # the value written to PixelSpacing
        fov = ps * size
        vertebra_z = _layout(n, rng)
        anatomy = _anatomy(fov, rng)
        if cohort in ("boxed", "positive-unboxed"):
            fractured = _fractured(rng, min_count=2 if i == multi else 1)
        elif cohort == "test":
            fractured = _fractured(rng) if rng.random() < 0.5 else ()
        else:
            fractured = ()
        cracks = tuple(_crack(k, vertebra_z[k - 1], anatomy.scale, rng, crack_width) for k in fractured)
        windows = ((400, 1800),) if rng.random() < 0.6 else ((400, 1800), (40, 400))
        specs.append(
            StudySpec(
                uid=f"{UID_ROOT}{int(numbers[i])}",
                index=i,
                split="train" if i < studies else "test",
                cohort=cohort,
                fractured=fractured,
                has_segmentation=i in seg,
                n_slices=n,
                slice_spacing=spacing,
                slice_thickness=thickness,
                size=size,
                pixel_spacing=ps,
                z_top=round(float(rng.uniform(-60.0, 40.0)), 2),
                reversed=bool(reversed_[i]),
                syntax=str(syntaxes[i]),
                signed=bool(signed[i]),
                bits_stored=12 if rng.random() < 0.3 else 16,
                windows=windows,
                vertebra_z=vertebra_z,
                cracks=cracks,
                anatomy=anatomy,
            )
        )
    return specs


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


def _validate(studies: int, size: int, test_studies: int, slices: tuple[int, int], syntax: str,
              boxed_share: float | None = None, crack_width: tuple[float, float] = CRACK_WIDTH_MM) -> None:
    if studies < 1:
        raise ValueError(f"studies must be >= 1, got {studies}")
    if test_studies < 0:
        raise ValueError(f"test_studies must be >= 0, got {test_studies}")
    if not 32 <= size <= 2048:
        raise ValueError(f"size must be in 32..2048 pixels, got {size}")
    lo, hi = slices
    if not MIN_SLICES <= lo <= hi:
        raise ValueError(f"slices must be a range lo:hi with {MIN_SLICES} <= lo <= hi, got {lo}:{hi}")
    if syntax != "mixed" and syntax not in SYNTAXES:
        raise ValueError(f"syntax must be 'mixed' or one of {sorted(SYNTAXES)}, got {syntax!r}")
    if boxed_share is not None and not 0.0 < boxed_share < 1.0:
        raise ValueError(f"boxed_share must be in (0, 1), got {boxed_share}")
    lo, hi = crack_width
    if not 0.0 < lo <= hi <= 10.0:
        raise ValueError(f"crack_width must be a range lo:hi in mm with 0 < lo <= hi <= 10, got {lo}:{hi}")


# --------------------------------------------------------------------------- rendering


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


def render_study(spec: StudySpec, *, cracks: bool = True) -> Iterator[RenderedSlice]:
    """Yield the study's slices head to feet. ``cracks=False`` renders the same study
    unbroken (identical noise), which is how the tests isolate the crack pixels."""
    a = spec.anatomy
    n, size, ps = spec.n_slices, spec.size, spec.pixel_spacing
    rng = np.random.default_rng([_pixel_seed(spec), 2])
    coords = (np.arange(size, dtype=np.float32) + 0.5 - size / 2) * ps  # pixel centres, mm
    xs, ys = coords[None, :], coords[:, None]  # (1, W), (H, 1): broadcasting keeps it cheap
    ncx, ncy = a.neck_center
    na0, nb = a.neck_axes
    half = size * ps / 2
    outside_fov = (xs**2 + ys**2 > half**2) if a.fov_padding else None
    rim = max(1.0, ps * 1.05)  # a cortex at least one pixel thick
    spine_top, spine_bottom = spec.vertebra_z[0][0], spec.vertebra_z[6][1]  # C1 top .. C7 bottom
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
    lo_clip, hi_clip = _hu_range(spec)
    crack_of = {z: c for c in spec.cracks for z in c.z_indices} if cracks else {}

    for z in range(n):
        noise = rng.standard_normal((size, size), dtype=np.float32)  # drawn even without cracks
        # --- soft tissue: the neck widens towards the shoulders in the lowest quarter
        widen = 1.0 + 0.25 * max(0.0, (z / n - 0.75) / 0.25)
        na = min(na0 * widen, 0.95 * half - abs(ncx))
        hu = np.full((size, size), -1000.0, dtype=np.float32)
        neck = _ellipse(xs, ys, ncx, ncy, na, nb)
        hu[neck] = a.fat_hu
        hu[_ellipse(xs, ys, ncx, ncy, na - a.fat_mm, nb - a.fat_mm)] = a.soft_hu
        # spine centre on this slice: a lordotic/scoliotic curve over C1..C7
        u = min(max((z - spine_top) / max(spine_bottom - spine_top, 1), 0.0), 1.0)
        bx0 = a.spine_x + a.sway * math.sin(math.pi * u)
        by0 = a.body_y + a.lordosis * math.sin(math.pi * u)
        ta, tb = a.trachea_axes
        hu[_ellipse(xs, ys, bx0, by0 - 9.0 * s - tb - 5.0 * s, ta, tb)] = -1000.0
        sigma = np.full((size, size), a.noise, dtype=np.float32)

        labels = np.zeros((size, size), dtype=np.uint8)
        crack_mask = None
        k, t = _vertebra_at(spec, z)
        roi_hu = hu[r0:r1, c0:c1]
        if k:
            dx, dy = a.vertebra_shift[k - 1]
            rot = a.vertebra_rotation[k - 1]
            cx, cy = bx0 + dx, by0 + dy
            cos, sin = math.cos(rot), math.sin(rot)
            lx = cos * (rx - cx) + sin * (ry - cy)  # vertebra-local frame
            ly = -sin * (rx - cx) + cos * (ry - cy)
            zs, ze = spec.vertebra_z[k - 1]
            bone = _Bone(lx, ly, rim)
            _draw_vertebra(bone, k, t, s, end_plate=(ze - zs >= 4 and z in (zs, ze - 1)))
            assert bone.outer.any(), f"{spec.uid}: C{k} has no bone on z={z}"
            roi_hu[bone.outer] = a.cortical_hu
            roi_hu[bone.inner] = a.cancellous_hu
            sigma[r0:r1, c0:c1][bone.outer] *= 2.5
            labels[r0:r1, c0:c1][bone.outer] = k
            c = crack_of.get(z)
            if c is not None:
                step = z - c.z_indices[0]
                px, py = c.center[0] + c.drift[0] * step, c.center[1] + c.drift[1] * step
                ux, uy = math.cos(c.angle), math.sin(c.angle)
                along = (lx - px) * ux + (ly - py) * uy
                across = -(lx - px) * uy + (ly - py) * ux
                w = max(c.width, ps) / 2  # at least one pixel: thinner would vanish
                roi_crack = bone.outer & (np.abs(across) <= w) & (np.abs(along) <= c.half_length)
                if not roi_crack.any():
                    # only at a few mm per pixel can a thin lamina fall between pixel
                    # centres; the crack then takes the bone pixel nearest its centre
                    d2 = np.where(bone.outer, (lx - px) ** 2 + (ly - py) ** 2, np.inf)
                    roi_crack = np.zeros_like(bone.outer)
                    roi_crack.flat[int(np.argmin(d2))] = True
                roi_hu[roi_crack] = c.hu
                sigma[r0:r1, c0:c1][roi_crack] = a.noise
                crack_mask = np.zeros((size, size), dtype=bool)
                crack_mask[r0:r1, c0:c1] = roi_crack
        elif (kd := _disc_at(spec, z)) is not None:
            dx, dy = a.vertebra_shift[kd - 1]
            bxd, byd = _body_axes(kd, s)
            roi_hu[_ellipse(rx, ry, bx0 + dx, by0 + dy, bxd, byd)] = a.disc_hu
        hu += noise * sigma
        if outside_fov is not None:
            hu[outside_fov] = -2000.0
        out = np.clip(np.rint(hu), lo_clip, hi_clip).astype(np.int16)
        yield RenderedSlice(z=z, hu=out, labels=labels, crack=crack_mask)


def _pixel_seed(spec: StudySpec) -> int:
    """The pixel-noise seed of a study: its UID number (itself drawn from the dataset seed)."""
    return int(spec.uid.rsplit(".", 1)[1])


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


def _hu_range(spec: StudySpec) -> tuple[int, int]:
    """HU values the stored representation can hold (slope 1)."""
    if spec.signed:
        lo, hi = -(2 ** (spec.bits_stored - 1)), 2 ** (spec.bits_stored - 1) - 1
    else:
        lo, hi = 0, 2**spec.bits_stored - 1
    return lo + spec.intercept, hi + spec.intercept


def to_stored(hu: np.ndarray, spec: StudySpec) -> np.ndarray:
    """HU (already in range) -> the stored pixel values: int16, or uint16 = HU + 1024."""
    if spec.signed:
        return hu.astype(np.int16)
    return (hu.astype(np.int32) - spec.intercept).astype(np.uint16)


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


# --------------------------------------------------------------------------- writing


def _dicom_header(spec: StudySpec) -> Any:
    from pydicom.dataset import Dataset, FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.TransferSyntaxUID = SYNTAXES[spec.syntax]
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.StudyInstanceUID = spec.uid
    ds.SeriesInstanceUID = f"{spec.uid}.1"
    ds.PatientID = spec.uid
    ds.PatientName = ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20220727"  # constant: byte-identical reruns
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ConvolutionKernel = "BONE"
    ds.KVP = "120"
    ds.SeriesNumber = 1
    ds.SliceThickness = f"{spec.slice_thickness:g}"
    ds.PixelSpacing = [f"{spec.pixel_spacing:.6f}"] * 2
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.Rows = ds.Columns = spec.size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = int(spec.signed)
    ds.RescaleIntercept = str(spec.intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    centers = [str(c) for c, _ in spec.windows]
    widths = [str(w) for _, w in spec.windows]
    ds.WindowCenter = centers if len(centers) > 1 else centers[0]
    ds.WindowWidth = widths if len(widths) > 1 else widths[0]
    return ds


class _Encoder:
    """Compresses one frame of stored pixels into the bytes of one encapsulated frame.

    pydicom encodes RLE and JPEG 2000 Lossless; it has no JPEG Lossless SV1 encoder, so
    GDCM converts an uncompressed temporary file and the frame is taken from its output.
    Only GDCM's codestream is kept (the header is ours): GDCM fills in missing attributes
    with fresh UIDs and the current time, which would break byte-identical reruns, while
    its codestream is deterministic.
    """

    def __init__(self, spec: StudySpec, tmpdir: str) -> None:
        self.spec, self.tmpdir = spec, tmpdir

    def __call__(self, stored: np.ndarray) -> bytes:
        spec = self.spec
        if spec.syntax == "jpeg-lossless":
            return self._gdcm_jpeg(stored)
        from pydicom.pixels import get_encoder

        return get_encoder(SYNTAXES[spec.syntax]).encode(
            stored,
            rows=spec.size,
            columns=spec.size,
            samples_per_pixel=1,
            bits_allocated=16,
            bits_stored=spec.bits_stored,
            pixel_representation=int(spec.signed),
            photometric_interpretation="MONOCHROME2",
            number_of_frames=1,
        )

    def _gdcm_jpeg(self, stored: np.ndarray) -> bytes:
        import gdcm
        import pydicom
        from pydicom.encaps import generate_frames

        src = os.path.join(self.tmpdir, "src.dcm")
        dst = os.path.join(self.tmpdir, "dst.dcm")
        ds = _dicom_header(self.spec)
        ds.file_meta.TransferSyntaxUID = SYNTAXES["explicit"]
        ds.SOPInstanceUID = f"{self.spec.uid}.1.0"
        ds.PixelData = stored.tobytes()
        ds.save_as(src, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(src)
        if not reader.Read():
            raise RuntimeError(f"GDCM could not read its temporary input {src}")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError("GDCM could not encode JPEG Lossless SV1")
        writer = gdcm.ImageWriter()
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        writer.SetFileName(dst)
        if not writer.Write():
            raise RuntimeError(f"GDCM could not write {dst}")
        return next(generate_frames(pydicom.dcmread(dst).PixelData, number_of_frames=1))


@dataclass(slots=True)
class _StudyResult:
    uid: str
    boxes: list[tuple[str, float, float, float, float, int]]
    files: int
    nbytes: int


def write_study(spec: StudySpec, out: str | Path) -> _StudyResult:
    """Write one study's DICOM files (and segmentation); return its boxes and sizes."""
    from pydicom.encaps import encapsulate

    from preprocess.segmentation import write_segmentation

    out = Path(out)
    folder = out / ("train_images" if spec.split == "train" else "test_images") / spec.uid
    folder.mkdir(parents=True, exist_ok=True)
    ds = _dicom_header(spec)
    # centre of the first pixel: the image centre sits at x = 0 and, as on a CT table,
    # some way off y = 0
    x0 = -spec.size * spec.pixel_spacing / 2 + spec.pixel_spacing / 2
    origin = (f"{x0:.4f}", f"{x0 + 30.0:.4f}")
    box_rng = np.random.default_rng([_pixel_seed(spec), 3])
    seg = np.zeros((spec.n_slices, spec.size, spec.size), dtype=np.uint8) if spec.has_segmentation else None
    boxes: list[tuple[str, float, float, float, float, int]] = []
    nbytes = 0
    with tempfile.TemporaryDirectory(prefix="synth-") as tmp:
        encode = _Encoder(spec, tmp)
        for sl in render_study(spec):
            number = spec.file_number(sl.z)
            zpos = spec.z_position(number)
            stored = to_stored(sl.hu, spec)
            ds.SOPInstanceUID = f"{spec.uid}.1.{number}"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = number
            ds.ImagePositionPatient = [origin[0], origin[1], f"{zpos:.4f}"]
            ds.SliceLocation = f"{zpos:.4f}"
            if spec.syntax == "explicit":
                ds.PixelData = stored.tobytes()
            else:
                ds.PixelData = encapsulate([encode(stored)])
            ds["PixelData"].VR = "OW" if spec.syntax == "explicit" else "OB"
            path = folder / f"{number}.dcm"
            ds.save_as(path, enforce_file_format=True)
            nbytes += path.stat().st_size
            if seg is not None:
                seg[sl.z] = sl.labels
            if spec.boxed and sl.crack is not None:
                boxes.append((spec.uid, *crack_box(sl.crack, spec, box_rng), number))
    if seg is not None:
        (out / "segmentations").mkdir(exist_ok=True)
        spacing = (spec.slice_spacing, spec.pixel_spacing, spec.pixel_spacing)
        write_segmentation(out / "segmentations" / f"{spec.uid}.nii", seg, spacing)
    boxes.sort(key=lambda b: b[-1])
    return _StudyResult(uid=spec.uid, boxes=boxes, files=spec.n_slices, nbytes=nbytes)


LAYOUT = (
    "train.csv",
    "train_bounding_boxes.csv",
    "train_images",
    "segmentations",
    "test_images",
    "test.csv",
    "sample_submission.csv",
    COMPLETE_MARKER,
)


def _prepare(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            state = "a complete synthetic dataset" if (out / COMPLETE_MARKER).exists() else "files"
            raise FileExistsError(
                f"{out} is not empty (it holds {state}); choose an empty or new directory, "
                "or pass --force to replace the dataset there"
            )
        # remove only what this tool writes: --force on the wrong directory must not wipe it
        for name in LAYOUT:
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def make_dataset(
    out: str | Path,
    *,
    studies: int = 24,
    seed: int = 0,
    size: int = 512,
    test_studies: int = 2,
    slices: tuple[int, int] = (48, 96),
    syntax: str = "mixed",
    boxed_share: float | None = None,
    crack_width: tuple[float, float] = CRACK_WIDTH_MM,
    workers: int = 1,
    force: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Write a synthetic dataset in Kaggle's layout under ``out`` (see the module doc).

    ``syntax``: "mixed" or one key of :data:`SYNTAXES` for every study. ``workers``
    processes render studies in parallel (the output does not depend on it). Raises
    ``FileExistsError`` if ``out`` is not empty, unless ``force``. Returns a summary:
    studies per cohort, file counts and bytes per syntax, box rows, segmentations.
    """
    import pandas as pd

    t0 = time.perf_counter()
    specs = study_specs(studies, seed, size=size, test_studies=test_studies, slices=slices, syntax=syntax,
                        boxed_share=boxed_share, crack_width=crack_width)
    out = Path(out)
    _prepare(out, force)
    (out / "train_images").mkdir()
    (out / "test_images").mkdir()
    (out / "segmentations").mkdir()

    results: dict[str, _StudyResult] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), unit="study", desc="synth", file=sys.stderr)
    try:
        if workers <= 1:
            for spec in specs:
                results[spec.uid] = write_study(spec, out)
                if bar is not None:
                    bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(write_study, spec, out) for spec in specs]
                for fut in as_completed(futures):
                    r = fut.result()
                    results[r.uid] = r
                    if bar is not None:
                        bar.update()
    finally:
        if bar is not None:
            bar.close()

    train = [s for s in specs if s.split == "train"]
    test = [s for s in specs if s.split == "test"]
    pd.DataFrame(
        [{"StudyInstanceUID": s.uid, **s.labels} for s in train],
        columns=["StudyInstanceUID", "patient_overall", *VERTEBRAE],
    ).to_csv(out / "train.csv", index=False)
    boxes = [b for s in train for b in results[s.uid].boxes]
    box_df = pd.DataFrame(boxes, columns=["StudyInstanceUID", "x", "y", "width", "height", "slice_number"])
    box_df = box_df.astype({"x": float, "y": float, "width": float, "height": float, "slice_number": int})
    box_df.to_csv(out / "train_bounding_boxes.csv", index=False)
    rows = [(f"{s.uid}_{p}", s.uid, p) for s in test for p in PREDICTION_TYPES]
    test_df = pd.DataFrame(rows, columns=["row_id", "StudyInstanceUID", "prediction_type"])
    test_df.to_csv(out / "test.csv", index=False)
    pd.DataFrame({"row_id": [r[0] for r in rows], "fractured": [0.5] * len(rows)}).to_csv(
        out / "sample_submission.csv", index=False
    )

    files_per_syntax = Counter()
    bytes_per_syntax = Counter()
    for s in specs:
        files_per_syntax[s.syntax] += results[s.uid].files
        bytes_per_syntax[s.syntax] += results[s.uid].nbytes
    summary: dict[str, Any] = {
        "params": {
            "studies": studies,
            "seed": seed,
            "size": size,
            "test_studies": test_studies,
            "slices": list(slices),
            "syntax": syntax,
            "boxed_share": boxed_share,
            "crack_width": list(crack_width),
        },
        "cohorts": dict(sorted(Counter(s.cohort for s in train).items())),
        "test_studies": len(test),
        "files": sum(r.files for r in results.values()),
        "files_per_syntax": dict(sorted(files_per_syntax.items())),
        "bytes_per_syntax": dict(sorted(bytes_per_syntax.items())),
        "box_rows": len(boxes),
        "segmentations": sum(s.has_segmentation for s in specs),
        "reversed": sum(s.reversed for s in specs),
    }
    # the marker goes last: its presence is what "this dataset is complete" means
    marker = out / COMPLETE_MARKER
    tmp = out / (COMPLETE_MARKER + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    tmp.replace(marker)
    return {"out": str(out), **summary, "seconds": round(time.perf_counter() - t0, 2)}


# --------------------------------------------------------------------------- CLI


def _range_arg(cast: type, what: str):
    """An argparse type for ``LO:HI`` (or a single ``N``, meaning N:N) of ``cast`` values."""

    def parse(text: str) -> tuple:
        try:
            lo, _, hi = text.partition(":")
            return cast(lo), cast(hi or lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    return parse


_slices_arg = _range_arg(int, "LO:HI slice counts (e.g. 48:96)")
_mm_range_arg = _range_arg(float, "a LO:HI range in mm (e.g. 1.2:2.0)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spinestream synth",
        description=(
            "Write a synthetic CT dataset in the RSNA 2022 cervical-spine Kaggle layout "
            "(train.csv, train_bounding_boxes.csv, train_images/<uid>/<n>.dcm, segmentations/, "
            "test_images/, test.csv, sample_submission.csv). Neck phantoms with seven vertebrae; "
            "fractures are thin dark cracks. Deterministic: the same arguments give "
            "byte-identical files. A SYNTH_COMPLETE file is written last; without it the "
            "directory is an interrupted run."
        ),
        epilog="example: spinestream synth --out demo-data/dataset --studies 24 --seed 0 --size 256",
    )
    p.add_argument("--out", required=True, type=Path, help="dataset directory (must be empty or new)")
    p.add_argument("--studies", type=int, default=24, help="training studies (default: 24)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--size", type=int, default=512, help="rows = columns of every slice (default: 512)")
    p.add_argument(
        "--slices",
        type=_slices_arg,
        default=(48, 96),
        metavar="LO:HI",
        help=f"slices per study, LO >= {MIN_SLICES} (default: 48:96)",
    )
    p.add_argument(
        "--test-studies", type=int, default=2, help="unlabeled studies in test_images/ (default: 2)"
    )
    p.add_argument(
        "--syntax",
        choices=["mixed", *SYNTAXES],
        default="mixed",
        help="transfer syntax of every study, or a realistic mix (default: mixed)",
    )
    p.add_argument(
        "--boxed-share",
        type=float,
        default=None,
        metavar="F",
        help="fraction of studies in the boxed cohort, the rest split between negative and positive-unboxed "
        "in the real ratio (default: the real mix, 12%% boxed); the demo enriches it so a CPU run sees "
        "enough fractured slices",
    )
    p.add_argument(
        "--crack-width",
        type=_mm_range_arg,
        default=CRACK_WIDTH_MM,
        metavar="LO:HI",
        help="crack widths in mm, drawn uniformly (default: 1.2:2.0, 3-9 px at 512 but 1-2 px at 128); the "
        "demo widens them so a tiny network at 128 px learns them in minutes",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="parallel processes; the output does not depend on it (default: min(4, CPUs))",
    )
    p.add_argument("--force", action="store_true", help="replace the dataset files in a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = make_dataset(
            args.out,
            studies=args.studies,
            seed=args.seed,
            size=args.size,
            test_studies=args.test_studies,
            slices=args.slices,
            syntax=args.syntax,
            boxed_share=args.boxed_share,
            crack_width=args.crack_width,
            workers=args.workers,
            force=args.force,
            progress=not args.quiet,
        )
    except (ValueError, FileExistsError) as e:
        print(f"spinestream synth: error: {e}", file=sys.stderr)
        return 2
    cohorts = ", ".join(f"{v} {k}" for k, v in summary["cohorts"].items())
    syntaxes = ", ".join(f"{k} {v}" for k, v in summary["files_per_syntax"].items())
    mb = sum(summary["bytes_per_syntax"].values()) / 1e6
    print(
        f"synth: {args.studies} train studies ({cohorts}) + {summary['test_studies']} test, "
        f"{summary['files']} files ({syntaxes}), {mb:.1f} MB, {summary['box_rows']} boxes, "
        f"{summary['segmentations']} segmentations -> {summary['out']} in {summary['seconds']:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
