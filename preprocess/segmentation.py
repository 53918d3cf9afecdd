"""Vertebra segmentations (``segmentations/<StudyInstanceUID>.nii``) in the axial DICOM frame.

The competition's NIfTIs are sagittal. Read naively (``nib.load(p).get_fdata()``) the
array comes out transposed, flipped in z and mirrored: the public fix is
``seg[:, ::-1, ::-1].transpose(2, 1, 0)``, which gives ``(Z, rows, cols)`` in the
DICOM pixel grid with Z running head to feet (descending ImagePositionPatient z) —
the same order as spinestream's volumes, whatever order the study's file numbers
run in. (Notebooks that stack slices by file number add a z flip for reversed
studies; ordering by z makes that unnecessary.)

Labels: 1..7 = C1..C7, 8..19 = T1..T12, 0 = background.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


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


def read_segmentation(path: str | Path) -> np.ndarray:
    """Read a competition segmentation NIfTI as ``(Z, rows, cols)`` uint8, head to feet."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for broken files
        raise ValueError(f"{path}: cannot read segmentation NIfTI ({e})") from e
    if not np.issubdtype(data.dtype, np.integer):  # some writers store labels as float
        data = np.rint(data)
    return seg_to_axial(data)


def write_segmentation(path: str | Path, axial: np.ndarray, spacing: tuple[float, float, float]) -> None:
    """Write ``(Z, rows, cols)`` labels as the competition stores them (sagittal-first axes).

    ``spacing`` is (dz, dy, dx) in mm; the affine is diagonal with it, in the stored axis
    order — readers here do not rely on the affine (neither do the public notebooks).
    """
    import nibabel as nib

    stored = axial_to_seg(np.asarray(axial, dtype=np.uint8))
    dz, dy, dx = spacing
    affine = np.diag([dx, dy, dz, 1.0])
    img = nib.Nifti1Image(stored, affine)
    img.header.set_data_dtype(np.uint8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.nii")
    nib.save(img, str(tmp))
    tmp.replace(path)
