"""DICOM and codec writing: one study's ``<n>.dcm`` files (and its segmentation NIfTI).

Headers are built from the spec with constant dates, so reruns are byte-identical; pixels
are stored uncompressed, or encapsulated by pydicom's RLE / JPEG 2000 encoders or GDCM's
JPEG Lossless SV1 (see :class:`_Encoder`).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import SYNTAXES
from .render import crack_box, render_study
from .spec import StudySpec, _pixel_seed

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def to_stored(hu: np.ndarray, spec: StudySpec) -> np.ndarray:
    """HU (already in range) -> the stored pixel values: int16, or uint16 = HU + 1024."""
    if spec.signed:
        return hu.astype(np.int16)
    return (hu.astype(np.int32) - spec.intercept).astype(np.uint16)




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

    from spinestream.preprocess.segmentation import write_segmentation

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
        # the DICOM position of the head-most slice's first pixel: the affine then places the labels on
        # the bone they label
        first = (float(origin[0]), float(origin[1]), spec.z_position(spec.file_number(0)))
        write_segmentation(out / "segmentations" / f"{spec.uid}.nii", seg, spacing, first)
    boxes.sort(key=lambda b: b[-1])
    return _StudyResult(uid=spec.uid, boxes=boxes, files=spec.n_slices, nbytes=nbytes)


