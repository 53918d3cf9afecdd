"""Segmentation NIfTIs: the affine describes the stored (sagittal-first) voxels, the reader checks it, and a
segmentation whose vertebrae run feet to head is left out with a warning."""
from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest

from spinestream.preprocess.errors import DataWarning
from spinestream.preprocess.segmentation import EXPECTED_AXCODES, axial_to_seg, read_segmentation, write_segmentation

SPACING = (0.8, 0.3, 0.3)  # dz, dy, dx
ORIGIN = (-20.0, 10.0, 35.5)  # LPS of the head-most slice's first pixel


def _spine(n_z: int = 21, rows: int = 10, cols: int = 8) -> np.ndarray:
    """(Z, rows, cols) labels: C1..C7 stacked head to feet, each in its own block of slices and an
    off-centre patch (so a flip of any axis changes the array)."""
    seg = np.zeros((n_z, rows, cols), dtype=np.uint8)
    for k in range(1, 8):
        seg[3 * (k - 1): 3 * k, 1:4, 2:7] = k
    seg[0, 0, 0] = 1  # asymmetric in every axis
    return seg


def _lps(affine: np.ndarray, stored_index: tuple[int, int, int]) -> np.ndarray:
    ras = affine @ np.array([*stored_index, 1.0])
    return np.array([-ras[0], -ras[1], ras[2]])


def test_affine_round_trip(tmp_path):
    seg = _spine()
    path = tmp_path / "s.nii"
    write_segmentation(path, seg, SPACING, ORIGIN)
    img = nib.load(str(path))
    assert nib.aff2axcodes(img.affine) == EXPECTED_AXCODES == ("L", "A", "S")
    assert np.array_equal(np.asanyarray(img.dataobj), axial_to_seg(seg))  # the competition's layout
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a good file reads without a warning
        back = read_segmentation(path)
    assert back.dtype == np.uint8 and np.array_equal(back, seg)


def test_affine_places_every_voxel_at_its_dicom_position(tmp_path):
    seg = _spine()
    write_segmentation(tmp_path / "s.nii", seg, SPACING, ORIGIN)
    affine = nib.load(str(tmp_path / "s.nii")).affine
    n_z, rows, _ = seg.shape
    dz, dy, dx = SPACING
    for z, r, c in [(0, 0, 0), (5, 2, 3), (n_z - 1, rows - 1, 7)]:
        stored = (c, rows - 1 - r, n_z - 1 - z)  # stored[i, j, k] = axial[Z-1-k, rows-1-j, i]
        assert axial_to_seg(seg)[stored] == seg[z, r, c]
        want = np.array([ORIGIN[0] + c * dx, ORIGIN[1] + r * dy, ORIGIN[2] - z * dz])
        np.testing.assert_allclose(_lps(affine, stored), want, atol=1e-9)


def test_synthetic_segmentation_lies_on_its_dicom_series(tmp_path):
    from spinestream.preprocess.synth import make_dataset, study_specs

    kw = dict(studies=4, seed=2, size=32, slices=(12, 14), test_studies=0, syntax="explicit")
    make_dataset(tmp_path, **kw)
    spec = next(s for s in study_specs(**kw) if s.has_segmentation)
    img = nib.load(str(tmp_path / "segmentations" / f"{spec.uid}.nii"))
    assert nib.aff2axcodes(img.affine) == EXPECTED_AXCODES
    n = spec.n_slices
    for number in (1, n // 2, n):
        ds = pydicom.dcmread(tmp_path / "train_images" / spec.uid / f"{number}.dcm")
        z = next(z for z in range(n) if spec.file_number(z) == number)  # head-to-feet index
        stored = (0, spec.size - 1, n - 1 - z)  # axial voxel (z, row 0, col 0)
        np.testing.assert_allclose(_lps(img.affine, stored), [float(v) for v in ds.ImagePositionPatient],
                                   atol=1e-3)


def test_reversed_segmentation_warns_and_is_left_out(tmp_path):
    path = tmp_path / "rev.nii"
    write_segmentation(path, _spine()[::-1], SPACING, ORIGIN)  # C7 at the head
    with pytest.warns(DataWarning, match=r"rev\.nii: label 1 .* not above label 7 .*left out"):
        assert read_segmentation(path) is None


def test_unexpected_orientation_warns_but_reads(tmp_path):
    seg = _spine()
    path = tmp_path / "diag.nii"
    # the old synthetic files: a diagonal affine (RAS) that does not describe the flipped voxels
    nib.save(nib.Nifti1Image(axial_to_seg(seg), np.diag([0.3, 0.3, 0.8, 1.0])), str(path))
    with pytest.warns(DataWarning, match=r"diag\.nii: segmentation affine orientation RAS, expected LAS"):
        back = read_segmentation(path)
    assert np.array_equal(back, seg)


def test_partial_or_single_label_segmentations_are_kept(tmp_path):
    seg = _spine()
    seg[seg >= 3] = 0  # only C1 and C2: still checked, still head first
    write_segmentation(tmp_path / "a.nii", seg, SPACING, ORIGIN)
    one = np.where(_spine() == 4, 4, 0).astype(np.uint8)  # one label: no order to check
    write_segmentation(tmp_path / "b.nii", one, SPACING, ORIGIN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(read_segmentation(tmp_path / "a.nii"), seg)
        assert np.array_equal(read_segmentation(tmp_path / "b.nii"), one)
