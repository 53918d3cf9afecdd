"""Vertebra segmentations (``segmentations/<StudyInstanceUID>.nii``) in the axial DICOM frame.

The competition's NIfTIs are sagittal. Read naively (``nib.load(p).get_fdata()``) the
array comes out transposed, flipped in z and mirrored: the public fix is
``seg[:, ::-1, ::-1].transpose(2, 1, 0)``, which gives ``(Z, rows, cols)`` in the
DICOM pixel grid with Z running head to feet (descending ImagePositionPatient z) —
the same order as spinestream's volumes, whatever order the study's file numbers
run in. (Notebooks that stack slices by file number add a z flip for reversed
studies; ordering by z makes that unnecessary.)

The stored array's axes are therefore: 0 = DICOM columns (towards the patient's left),
1 = DICOM rows reversed (towards anterior), 2 = slices from feet to head (superior). The
affine that describes those voxels (axial slices with ImageOrientationPatient 1,0,0,0,1,0)
has ``nibabel.aff2axcodes`` ``EXPECTED_AXCODES`` = ('L', 'A', 'S'); :func:`write_segmentation`
writes it, so viewers (Slicer, MONAI's ``Orientationd``) show the labels where the bone is.
:func:`read_segmentation` warns (:class:`spinestream.preprocess.errors.DataWarning`) when a file's affine
says otherwise, and leaves a segmentation out whose vertebrae run feet to head.

Labels: 1..7 = C1..C7, 8..19 = T1..T12, 0 = background.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .errors import DataWarning

#: nibabel.aff2axcodes of the affine that describes the competition's stored voxel layout
EXPECTED_AXCODES = ("L", "A", "S")


def seg_to_axial(seg: np.ndarray) -> np.ndarray:
    """Raw NIfTI data array -> ``(Z, rows, cols)`` uint8, head to feet."""
    if seg.ndim != 3:
        raise ValueError(f"segmentation must be 3-D, got shape {seg.shape}")
    return np.ascontiguousarray(seg[:, ::-1, ::-1].transpose(2, 1, 0)).astype(np.uint8)


def axial_to_seg(axial: np.ndarray) -> np.ndarray:
    """Inverse of :func:`seg_to_axial`: ``(Z, rows, cols)`` -> the array as stored in the NIfTI."""
    if axial.ndim != 3:
        raise ValueError(f"axial label volume must be 3-D, got shape {axial.shape}")
    return np.ascontiguousarray(axial.transpose(2, 1, 0)[:, ::-1, ::-1])


def stored_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float],
                  origin: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """The NIfTI (RAS) affine of the stored array of an axial ``(Z, rows, cols)`` volume of ``shape``.

    ``spacing`` is (dz, dy, dx) in mm; ``origin`` the DICOM (LPS) position of axial voxel [0, 0, 0]
    (first pixel of the head-most slice; ImageOrientationPatient 1,0,0,0,1,0). Stored voxel (i, j, k)
    is axial voxel (Z-1-k, rows-1-j, i): LPS x = x0 + i*dx, y = y0 + (rows-1-j)*dy,
    z = z0 - (Z-1-k)*dz; RAS negates x and y."""
    n_z, rows, _ = shape
    dz, dy, dx = spacing
    x0, y0, z0 = origin
    return np.array([
        [-dx, 0.0, 0.0, -x0],
        [0.0, dy, 0.0, -(y0 + (rows - 1) * dy)],
        [0.0, 0.0, dz, z0 - (n_z - 1) * dz],
        [0.0, 0.0, 0.0, 1.0],
    ])


def read_segmentation(path: str | Path) -> np.ndarray | None:
    """Read a competition segmentation NIfTI as ``(Z, rows, cols)`` uint8, head to feet.

    Raises ``ValueError`` for a file nibabel cannot read. Warns (``DataWarning``) when the affine's
    orientation is not :data:`EXPECTED_AXCODES` (the voxels are still read with the public fix, as every
    public solution does), and returns None, with a warning, when the result runs feet to head (the
    most cranial vertebra label lies below the most caudal one): such a segmentation is left out."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        codes = tuple(nib.aff2axcodes(img.affine))
    except Exception as e:  # nibabel raises many types for broken files
        raise ValueError(f"{path}: cannot read segmentation NIfTI ({e})") from e
    if codes != EXPECTED_AXCODES:
        warnings.warn(f"{Path(path).name}: segmentation affine orientation {''.join(map(str, codes))}, expected "
                      f"{''.join(EXPECTED_AXCODES)} (the competition's sagittal layout); read with the public "
                      f"reorientation anyway", DataWarning, stacklevel=2)
    if not np.issubdtype(data.dtype, np.integer):  # some writers store labels as float
        data = np.rint(data)
    axial = seg_to_axial(data)
    problem = _order_problem(axial)
    if problem:
        warnings.warn(f"{Path(path).name}: {problem}; segmentation left out", DataWarning, stacklevel=2)
        return None
    return axial


def _order_problem(axial: np.ndarray) -> str:
    """'' when the vertebrae run head to feet along Z (index 0 = head), else what is wrong. Compares the
    mean slice index of the most cranial and the most caudal label present (C1 and C7 when both are)."""
    present = [k for k in range(1, 20) if (axial == k).any()]
    if len(present) < 2:
        return ""
    z = np.arange(axial.shape[0])
    top, bottom = present[0], present[-1]
    z_top = float(np.average(z, weights=(axial == top).sum(axis=(1, 2))))
    z_bottom = float(np.average(z, weights=(axial == bottom).sum(axis=(1, 2))))
    if z_top < z_bottom:
        return ""
    return (f"label {top} lies at mean slice {z_top:.1f}, not above label {bottom} at {z_bottom:.1f} "
            f"(reversed in z: the vertebrae must run head to feet)")


def write_segmentation(path: str | Path, axial: np.ndarray, spacing: tuple[float, float, float],
                       origin: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
    """Write ``(Z, rows, cols)`` labels as the competition stores them (sagittal-first axes), with the
    affine that describes those voxels (:func:`stored_affine`; ``spacing`` (dz, dy, dx) in mm, ``origin``
    the DICOM position of the first pixel of the head-most slice)."""
    import nibabel as nib

    axial = np.asarray(axial, dtype=np.uint8)
    stored = axial_to_seg(axial)
    img = nib.Nifti1Image(stored, stored_affine(axial.shape, spacing, origin))
    img.header.set_data_dtype(np.uint8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.nii")
    nib.save(img, str(tmp))
    tmp.replace(path)
