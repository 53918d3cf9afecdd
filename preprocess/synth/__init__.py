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

The package, by concern: :mod:`.config` (:class:`SynthConfig`, the parameters, defined once),
:mod:`.spec` (spec sampling), :mod:`.render` (the phantom's pixels), :mod:`.dicom_io` (DICOM,
codecs, the segmentation NIfTI), :mod:`.dataset` (:func:`make_dataset`), :mod:`.cli`
(``spinestream synth``).
"""
from __future__ import annotations

from .cli import build_parser, main
from .config import CRACK_WIDTH_MM, MIN_SLICES, SYNTAXES, SynthConfig
from .dataset import COMPLETE_MARKER, LAYOUT, make_dataset
from .dicom_io import CT_IMAGE_STORAGE, to_stored, write_study
from .render import RenderedSlice, crack_box, render_study
from .spec import (
    COHORT_SHARES,
    MIXED_SHARES,
    PREDICTION_TYPES,
    UID_ROOT,
    VERTEBRA_WEIGHTS,
    VERTEBRAE,
    Anatomy,
    Crack,
    StudySpec,
    cohort_shares,
    study_specs,
)

__all__ = [
    "COHORT_SHARES", "COMPLETE_MARKER", "CRACK_WIDTH_MM", "CT_IMAGE_STORAGE", "LAYOUT", "MIN_SLICES",
    "MIXED_SHARES", "PREDICTION_TYPES", "SYNTAXES", "UID_ROOT", "VERTEBRAE", "VERTEBRA_WEIGHTS", "Anatomy",
    "Crack", "RenderedSlice", "StudySpec", "SynthConfig", "build_parser", "cohort_shares", "crack_box", "main",
    "make_dataset", "render_study", "study_specs", "to_stored", "write_study",
]
