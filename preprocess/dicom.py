"""DICOM CT slices and series -> Hounsfield units.

``read_hu`` turns one file into a float32 ``(rows, cols)`` HU image; ``read_series``
turns a study directory (``<n>.dcm`` files) into a ``(Z, rows, cols)`` volume ordered
head to feet, plus :class:`SeriesMeta`. Every unreadable file raises :class:`DicomError`
(``read_hu``) or is listed in ``SeriesMeta.bad_files`` (``read_series``); nothing else
escapes for a bad file.

Traps handled (real CT files break naive code on each of these):

- **Rescale.** HU = stored * RescaleSlope + RescaleIntercept, in float32 (slope 1 and
  intercept 0 when absent). Unsigned storage with intercept -1024 and signed storage with
  intercept 0 give the same HU. For Enhanced CT the pair lives in the functional groups
  (per-frame first, then shared, then the top-level tags).
- **Padding.** Pixels equal to PixelPaddingValue (or inside the closed range to
  PixelPaddingRangeLimit) are compared on *stored* values, before rescale, and become
  air: -1024 HU. Out-of-FOV values with no padding tag (e.g. -2000 stored) are left as
  they are; windowing clips them. The tag is US or SS by PixelRepresentation (implicit
  VR can deliver -2000 as 63536): it is wrapped to the pixel container's signedness.
- **Unused high bits.** When BitsStored < BitsAllocated the high bits are dropped
  (sign-extended for signed data), as PS3.5 says (pydicom's ``correct_unused_bits``).
  A padding value outside the BitsStored range (non-conformant, e.g. 63536 in an
  unsigned 12-bit image) is matched on the raw values *before* that, since after it
  it would alias real bone (63536 & 0xFFF = 2096 -> 1072 HU).
- **JPEG 2000 signedness.** Some encoders write a J2K codestream whose signedness
  disagrees with PixelRepresentation (e.g. signed 13-bit CT stored as unsigned J2K:
  -2000 decodes as 6192). pydicom's ``apply_j2k_sign_correction`` re-interprets the
  decoded values from the codestream header; it is passed explicitly, so a changed
  default cannot silently break HU.
- **Compressed transfer syntaxes.** JPEG Lossless (4.57, 4.70), JPEG-LS, JPEG 2000 and HTJ2K
  (lossless and lossy), RLE, JPEG baseline/extended, deflated and big-endian explicit VR. The
  stored values of a frame come from ``preprocess.decoders``: per transfer syntax the fastest
  decoder that is correct for it (imagecodecs' libjpeg-turbo, CharLS, OpenJPH, OpenJPEG, RLE;
  ``np.frombuffer`` for uncompressed data), pydicom's plugins as fallbacks, every result checked
  (``None``, a wrong dtype or shape is a failure, never pixels) and made equal to what
  ``pydicom.pixels.pixel_array`` returns with the options below (so the traps above hold
  whichever decoder ran). ``SPINESTREAM_DICOM_DECODER`` pins a decoder (see that module).
- **Multi-valued tags.** WindowCenter/WindowWidth are never read. A multi-valued
  RescaleSlope/Intercept (non-conformant) uses its first value.
- **MONOCHROME1.** Not inverted: for CT the Modality LUT (rescale) applies to the stored
  values whatever the photometric interpretation, and gives HU; MONOCHROME1 only says
  how to *display* them.
- **Enhanced multi-frame CT** (one file, NumberOfFrames > 1): frames become slices, each
  with its own position/rescale from the functional groups. ``read_hu`` refuses such
  files (a file is not a slice there) and points to ``read_series``.
- **Slice order.** By the position projected on the slice normal (the cross product of
  ImageOrientationPatient's row and column cosines, as GDCM sorts), descending, never by
  file name or InstanceNumber; ties keep file-number order (stable sort) and both slices
  are kept. The normal is signed so that its largest component is positive: for axial
  series (tilted or not) that is +z, so volumes run head to feet (descending z, C1 first)
  and the projected position of a plain axial slice is exactly its ImagePositionPatient
  z; a sagittal series runs along +x (patient left, LPS) downwards. Spacing is measured
  along the normal too (a tilted series' z steps are shorter than its slice spacing).
  ``z_reversed`` records studies whose file numbers run against the volume order.
- **Mixed series.** A file whose SeriesInstanceUID or ImageOrientationPatient differs
  from the series' (the majority; e.g. a localizer in the study directory) is a bad file.
- **Ragged series.** Slices whose (rows, cols) differ from the majority are reported as
  bad files, or with ``ragged="resize"`` resized to it (with a :class:`DataWarning`);
  slices that lack ImagePositionPatient while others have it are bad files.
- **Codecs that panic.** A decoder failure of any type -- pylibjpeg-rle raises pyo3's
  ``PanicException``, a ``BaseException``, on a malformed RLE frame -- is a DicomError
  naming the file (KeyboardInterrupt and SystemExit pass through).

- **Headers that lie** (found by fuzzing, tests/test_fuzz_dicom.py). Before any decoder sees a
  file: PhotometricInterpretation must be MONOCHROME1/2, BitsAllocated 1/8/16/32 (8/16 for JPEG
  syntaxes), 1 <= BitsStored <= BitsAllocated, PixelRepresentation 0/1, Rows x Columns at most
  8192^2; NumberOfFrames must match the pixel data (native: the bytes hold exactly that many
  frames; encapsulated: at least one fragment per frame, RLE exactly one); and a JPEG / JPEG-LS /
  JPEG 2000 frame's own SOF/SIZ header must give the DICOM header's rows, columns, one component
  and a precision within BitsAllocated. Each broke a decoder: GDCM aborts the process (SIGABRT) on
  such mismatches, OpenJPEG decodes the gigapixel image a flipped SIZ byte claims, a NumberOfFrames
  of 2**31 - 1 made the series loop for ever, a missing one dropped frames silently. An RLE frame's
  segment table must list BitsAllocated / 8 segments, the first at byte 64, rising, inside the frame
  (imagecodecs' RLE decoder read out of bounds -- SIGSEGV -- on one flipped offset byte). A rescale
  that overflows float32 (RescaleIntercept 1e308) is refused rather than returned as inf HU.

Files without the 128-byte preamble + ``DICM`` prefix are rejected as not DICOM (the
competition's files all have it; accepting them would let random bytes "parse").
"""
from __future__ import annotations

import io
import math
import os
import struct
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.datadict import tag_for_keyword
from pydicom.pixels import get_decoder

from spinestream import SpinestreamError

from . import decoders, lightparse
from .errors import DataWarning

__all__ = ["DicomError", "SeriesMeta", "read_hu", "read_series", "AIR_HU"]

AIR_HU = -1024.0
"""HU given to padded pixels (PixelPaddingValue)."""

# Decode options pinned rather than left to pydicom's defaults: HU depend on them.
_DECODE_OPTIONS: dict[str, Any] = {
    "apply_j2k_sign_correction": True,  # J2K codestream signedness != PixelRepresentation
    "apply_jls_sign_correction": True,  # JPEG-LS cannot store signedness at all
    "as_rgb": False,  # grayscale only; never colour-convert
}
_OPTIONS = {c: dict(_DECODE_OPTIONS, correct_unused_bits=c) for c in (False, True)}  # per call, read-only

# Functional-group macro holding each attribute in an enhanced multi-frame file.
_FG_SEQUENCE = {
    "RescaleSlope": "PixelValueTransformationSequence",
    "RescaleIntercept": "PixelValueTransformationSequence",
    "ImagePositionPatient": "PlanePositionSequence",
    "ImageOrientationPatient": "PlaneOrientationSequence",
    "PixelSpacing": "PixelMeasuresSequence",
    "SliceThickness": "PixelMeasuresSequence",
}

_PER_FRAME_GROUPS, _SHARED_GROUPS = 0x52009230, 0x52009229


@cache
def _uid(value: str) -> uid.UID:
    """``uid.UID(value)``, made once per value (its construction and properties cost ~14 us a slice)."""
    return uid.UID(value)


@cache
def _tag(keyword: str) -> int:
    return int(tag_for_keyword(keyword))


def _get(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword, default)``, read raw while pydicom has not converted the element
    (``decoders.get``: a plain CT slice is read without building pydicom's dataset)."""
    return decoders.get(ds, _tag(keyword), keyword, default)


_DEFAULT_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_ORIENTATION_TOLERANCE = 1e-3  # max |difference| of direction cosines still "the same orientation"
# |HU| below which float32 arithmetic cannot overflow (float32's largest finite value is ~3.4e38).
_F32_SAFE = 1e38
# Never turned into a DicomError: the user (or the OS) asked the process to stop.
_PASS_THROUGH = (KeyboardInterrupt, SystemExit)


class DicomError(SpinestreamError, ValueError):
    """A DICOM file (or series) cannot be read; the message names the file and the reason.

    ``path`` and ``reason`` are also kept as attributes (``read_series`` files the reason
    under the file name in ``SeriesMeta.bad_files``).
    """

    def __init__(self, path: str | Path, reason: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}" if reason else str(path))

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Keep path/reason across process boundaries (the convert job runs in workers).
        return (type(self), (self.path, self.reason))


@dataclass
class SeriesMeta:
    """What ``read_series`` learnt about a study besides its pixels.

    Attributes:
        z: float64 (Z,), each slice's ImagePositionPatient projected on ``normal``, in
            volume order (descending: head -> feet for axial series, where it equals the
            ImagePositionPatient z); NaN when the series had no positions at all.
        slice_numbers: int64 (Z,), the file-name number of each slice (17 for "17.dcm") in
            volume order; for a multi-frame file the frame index + 1; when the file names
            are not all numbers, the 1-based position in the (numeric-aware) listing.
        spacing: (dz, dy, dx) mm. dz = median |diff(z)| along the normal (SliceThickness
            when there is one slice, or no positions); dy, dx = PixelSpacing (row, column
            spacing).
        direction: the series' ImageOrientationPatient (6 floats: row then column
            direction cosines, LPS), or (1, 0, 0, 0, 1, 0) when absent.
        normal: unit slice normal (3 floats), row x column signed as described in the
            module docstring; the volume runs along -normal.
        origin: ImagePositionPatient (x, y, z) of volume index 0 (its first pixel's
            centre), or None when the series has no positions.
        z_reversed: True when increasing file number means increasing z (feet -> head);
            normal studies have file 1 at the head. Without positions: relative to the
            fallback order (assumed head first).
        bad_files: (file name, reason) for each slice left out; the series goes on without
            it. Frames of a multi-frame file are named "<file> frame <k>" (k from 1).
        transfer_syntaxes: sorted unique TransferSyntaxUIDs of every file that parsed as
            a grayscale image (bad files included, so an undecodable syntax shows up).
        shape: (rows, cols) of the slices kept.
    """

    z: np.ndarray
    slice_numbers: np.ndarray
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]
    z_reversed: bool
    bad_files: list[tuple[str, str]] = field(default_factory=list)
    transfer_syntaxes: list[str] = field(default_factory=list)
    shape: tuple[int, int] = (0, 0)
    normal: tuple[float, float, float] = (0.0, 0.0, 1.0)
    origin: tuple[float, float, float] | None = None


# ----------------------------------------------------------------------------- reading


def _read_file(path: Path) -> bytes:
    """The file's bytes in one read (one syscall, friendly to network file systems)."""
    return path.read_bytes()


class _header_errors:  # noqa: N801 -- used as ``with _header_errors(path):``, like the function it was
    """Turn any other exception met while reading header values into a DicomError.

    pydicom converts elements lazily, so a malformed value (a DS that is not a number,
    a truncated sequence) only raises when it is first read, with any exception type.
    (A class, not a @contextmanager generator: it is entered several times per slice.)
    """

    __slots__ = ("path",)

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, e, tb) -> bool:
        if e is None or isinstance(e, (DicomError, *_PASS_THROUGH)):
            return False
        raise DicomError(self.path, f"bad header value ({type(e).__name__}: {e})") from e


def _read_dataset(path: Path) -> Dataset:
    """Parse a whole DICOM file (pixel data included) or raise DicomError."""
    try:
        data = _read_file(path)
    except OSError as e:
        raise DicomError(path, f"cannot read file ({e.strerror or e})") from e
    if not data:
        raise DicomError(path, "empty file")
    # The light parse (explicit VR little endian and encapsulated files, no functional groups:
    # nearly every CT slice) gives the Dataset dcmread would, ~3x faster; anything else is
    # dcmread's, as before (preprocess/lightparse.py).
    ds = lightparse.parse(data) if decoders.light_parse() else None
    if ds is not None:
        with _header_errors(path):
            _check_image(ds, path)
        return ds
    try:
        # force=False: files without the DICM preamble are rejected here, so random bytes
        # never half-parse into a dataset.
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError as e:
        raise DicomError(path, "not a DICOM file (no 'DICM' preamble)") from e
    except _PASS_THROUGH:
        raise
    except BaseException as e:  # pydicom raises many types for broken headers
        raise DicomError(path, f"cannot parse DICOM header ({type(e).__name__}: {e})") from e
    with _header_errors(path):
        _check_image(ds, path)
    return ds


def _check_image(ds: Dataset, path: Path) -> None:
    # Raw values where pydicom has not converted the element yet (decoders.get: the same values,
    # without ~30 us of conversion each, nor building a light-parsed dataset); pydicom's get otherwise.
    if not decoders.has(ds, 0x7FE00010):
        raise DicomError(path, "no PixelData element (not an image, or truncated)")
    if not decoders.transfer_syntax(ds):
        raise DicomError(path, "no TransferSyntaxUID in the file meta information")
    info = decoders.frame_info(ds)  # its rows, columns and samples are the values read here before
    for keyword, value in (("Rows", info.rows), ("Columns", info.cols)):
        if not value:
            raise DicomError(path, f"missing or zero {keyword}")
    spp = info.samples
    if spp != 1:
        raise DicomError(
            path,
            f"SamplesPerPixel={spp} ({ds.get('PhotometricInterpretation', '?')}): "
            "not a grayscale CT image",
        )
    _check_pixel_module(ds, path, info)


# Transfer syntaxes whose frames are JPEG (ISO 10918) or JPEG-LS codestreams: a SOF segment gives
# the frame's size, components and precision.
_JPEG_SYNTAXES = frozenset({uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1,
                            uid.JPEGLSLossless, uid.JPEGLSNearLossless})
_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
# Largest frame accepted, in pixels (8192 x 8192; CT slices are 512 x 512, rarely 1024 x 1024): a
# Rows/Columns pair past it is a corrupt header, and decoders would allocate it before failing.
_MAX_FRAME_PIXELS = 1 << 26


def _check_pixel_module(ds: Dataset, path: Path, info: decoders.FrameInfo) -> None:
    """Header facts the decoders trust without checking, checked here (a fuzzed file broke each).

    GDCM aborts the whole process (a C++ exception through its C API: SIGABRT) when BitsAllocated
    is not 8 or 16 for a JPEG syntax, or when the photometric interpretation promises colour
    components the codestream lacks; BitsStored past BitsAllocated and a PixelRepresentation
    other than 0/1 give HU from a guess. Every such file is refused, naming the tag. Values come
    raw where pydicom has not converted them (``decoders.get``/``frame_info``: a few
    microseconds for the lot). ``info`` is ``decoders.frame_info(ds)``, read once by the caller.
    """
    photometric = info.photometric.strip().upper()
    if photometric and photometric not in _GRAYSCALE:
        raise DicomError(path, f"PhotometricInterpretation {photometric!r} with one sample per pixel: "
                               "not a grayscale CT image")
    allocated = _int_tag(ds, 0x00280100, "BitsAllocated", path)
    if allocated not in (1, 8, 16, 32):
        raise DicomError(path, f"BitsAllocated={allocated}: not 1, 8, 16 or 32 (corrupt header)")
    stored = _int_tag(ds, 0x00280101, "BitsStored", path, default=allocated)
    if not 1 <= stored <= allocated:
        raise DicomError(path, f"BitsStored={stored} with BitsAllocated={allocated} (corrupt header)")
    representation = _int_tag(ds, 0x00280103, "PixelRepresentation", path, default=0)
    if representation not in (0, 1):
        raise DicomError(path, f"PixelRepresentation={representation}: neither unsigned (0) nor signed (1)")
    rows, cols = info.rows, info.cols
    if rows * cols > _MAX_FRAME_PIXELS:
        raise DicomError(path, f"Rows x Columns = {rows} x {cols}: larger than any CT slice (corrupt header)")
    tsyntax = _uid(info.tsyntax)
    if tsyntax in _JPEG_SYNTAXES and allocated not in (8, 16):
        raise DicomError(path, f"BitsAllocated={allocated} in a {tsyntax.name} file: JPEG frames "
                               "hold 8 or 16 bits (corrupt header)")
    if not tsyntax.is_transfer_syntax:  # refused here: its NumberOfFrames cannot be checked against the data
        raise DicomError(path, f"unsupported transfer syntax {tsyntax} (not a DICOM transfer syntax UID)")
    _check_frame_count(ds, path, info, encapsulated=tsyntax.is_encapsulated)


def _check_frame_count(ds: Dataset, path: Path, info: decoders.FrameInfo, *, encapsulated: bool) -> None:
    """NumberOfFrames (1 when absent) agrees with the pixel data the file holds.

    A count larger than the data made the series reader try every promised frame (2**31 - 1 of
    them: a hang); a smaller one, or none, for native data holding several frames silently kept the
    first and dropped the rest. Both are refused: which of the two is right cannot be told.
    Encapsulated data holds at least one fragment per frame (a frame may span several), RLE exactly one.
    """
    n = info.n_frames
    data = decoders.pixel_bytes(ds)
    if encapsulated:
        if bytes(data[:4]) != b"\xfe\xff\x00\xe0":
            raise DicomError(path, "bad encapsulated pixel data (no Basic Offset Table item)")
        bot = int.from_bytes(bytes(data[4:8]), "little")
        if bot and bot != 4 * n:  # when present, the Basic Offset Table has one offset per frame
            raise DicomError(path, f"NumberOfFrames={n}, but the Basic Offset Table lists {bot // 4} frame(s): "
                                   "the header lies (reading it would lose frames)")
        if n == 1 and info.tsyntax != uid.RLELossless:
            return  # one frame: any fragment count is right (decoders.frame_bytes joins them)
        from pydicom.encaps import parse_fragments

        try:
            buf = io.BytesIO(data)
            buf.seek(8 + bot)  # past the Basic Offset Table
            fragments, _ = parse_fragments(buf)
        except _PASS_THROUGH:
            raise
        except BaseException as e:
            raise DicomError(path, f"bad encapsulated pixel data ({type(e).__name__}: {e})") from e
        if n > fragments:
            raise DicomError(path, f"NumberOfFrames={n}, but the pixel data holds {fragments} fragment(s) "
                                   "(at least one per frame): the header lies")
        if info.tsyntax == uid.RLELossless and fragments != n:  # PS3.5 A.4.2: one fragment per frame
            raise DicomError(path, f"NumberOfFrames={n}, but the RLE pixel data holds {fragments} frame(s) "
                                   "(one fragment each): the header lies (reading it would lose frames)")
        return
    frame_bits = info.rows * info.cols * info.bits_allocated
    held = (len(data) * 8) // frame_bits
    if held < n:
        raise DicomError(path, f"NumberOfFrames={n}, but the {len(data)} bytes of pixel data hold {held} "
                               f"frame(s) of {info.rows} x {info.cols} x {info.bits_allocated} bits: truncated, "
                               "or the header lies")
    if held > n:
        raise DicomError(path, f"the pixel data holds {held} frames of {info.rows} x {info.cols}, NumberOfFrames "
                               f"says {n}: the header lies (reading it would lose frames)")


def _int_tag(ds: Dataset, tag: int, keyword: str, path: Path, default: int | None = None) -> int:
    """An integer tag's value, raw when pydicom has not converted it (first value of a multi-valued
    one); DicomError when absent (and no ``default``) or not a number."""
    value = decoders.get(ds, tag, keyword)
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    if value is None or value == "":
        if default is None:
            raise DicomError(path, f"no {keyword}")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DicomError(path, f"{keyword} is not a number: {value!r}") from None


# JPEG 2000 and HTJ2K: the frame is a J2K codestream (SOC, then SIZ with the image size).
_J2K_SYNTAXES = frozenset(uid.JPEG2000TransferSyntaxes) | {uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K}


def _codestream_geometry(tsyntax: str, frame: bytes) -> tuple[int, int, int, int] | None:
    """(rows, columns, components, precision) a JPEG / JPEG-LS / JPEG 2000 frame declares, from its
    SOF or SIZ segment; None when the frame has no such header where the standard puts it."""
    if tsyntax in _JPEG_SYNTAXES:
        seg = decoders.jpeg_sof(frame)
        if seg is None or len(seg) < 6:
            return None
        return (int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big"), seg[5], seg[0])
    if tsyntax in _J2K_SYNTAXES:
        start = 0
        if frame[:8] == b"\x00\x00\x00\x0cjP  ":  # a JP2 file: find the contiguous codestream box
            pos = 12
            while pos + 8 <= len(frame):
                length = int.from_bytes(frame[pos:pos + 4], "big")
                if frame[pos + 4:pos + 8] == b"jp2c":
                    start = pos + 8
                    break
                if length < 8:
                    return None
                pos += length
            else:
                return None
        siz = frame[start:start + 43]
        if len(siz) < 43 or siz[:4] != b"\xff\x4f\xff\x51":
            return None
        xsiz, ysiz, x0, y0 = (int.from_bytes(siz[k:k + 4], "big") for k in (8, 12, 16, 20))
        csiz = int.from_bytes(siz[40:42], "big")
        return (ysiz - y0, xsiz - x0, csiz, (siz[42] & 0x7F) + 1)
    return None


def _check_rle_header(frame: bytes, info: decoders.FrameInfo, path: Path, index: int) -> None:
    """An RLE frame's 64-byte header (PS3.5 G.3): BitsAllocated / 8 segments for one sample per pixel, the
    first at byte 64, offsets rising and inside the frame. imagecodecs' RLE decoder (the first in the
    chain) trusts the offsets: one flipped byte of an offset made it read out of bounds (SIGSEGV)."""
    want = max(1, info.bits_allocated // 8)
    if len(frame) < 64:
        raise DicomError(path, f"frame {index + 1}: {len(frame)} bytes, shorter than the RLE header")
    header = struct.unpack_from("<16L", frame)
    n, offsets = header[0], header[1:1 + header[0]] if header[0] <= 15 else ()
    if n != want or not offsets or offsets[0] != 64 or offsets[-1] >= len(frame) \
            or any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise DicomError(path, f"frame {index + 1}: corrupt RLE header ({n} segment(s) at {list(offsets)[:15]} in "
                               f"{len(frame)} bytes; BitsAllocated {info.bits_allocated} needs {want}, the first "
                               "at byte 64, rising)")


def _check_frame(ds: Dataset, path: Path, index: int) -> None:
    """A compressed frame's own header (size, components, precision) agrees with the DICOM header.

    When they disagree the decoders go wrong in the worst ways: GDCM aborts the process (a C++
    exception through its C API), OpenJPEG decodes the size its codestream claims (flipped bytes in
    a SIZ segment asked for 3.5 gigapixels: minutes and gigabytes before failing). Such a file is
    refused here, before any decoder sees it. RLE frames have their segment table checked instead
    (:func:`_check_rle_header`); native data has no header.
    """
    info = decoders.frame_info(ds)
    tsyntax = info.tsyntax
    if tsyntax not in _JPEG_SYNTAXES and tsyntax not in _J2K_SYNTAXES and tsyntax != uid.RLELossless:
        return
    try:
        frame = decoders.frame_bytes(ds, info, index)
    except _PASS_THROUGH:
        raise
    except BaseException as e:
        raise DicomError(path, f"frame {index + 1}: bad encapsulated pixel data ({type(e).__name__}: {e})") from e
    if tsyntax == uid.RLELossless:
        _check_rle_header(frame, info, path, index)
        return
    geometry = _codestream_geometry(tsyntax, frame)
    name = uid.UID(tsyntax).name
    if geometry is None:
        raise DicomError(path, f"frame {index + 1}: not a {name} codestream (no SOF/SIZ header)")
    rows, cols, components, precision = geometry
    if (rows, cols, components) != (info.rows, info.cols, 1):
        raise DicomError(path, f"frame {index + 1}: the {name} codestream is {rows} x {cols} with {components} "
                               f"component(s), the header says {info.rows} x {info.cols} grayscale")
    if not 1 <= precision <= info.bits_allocated:
        raise DicomError(path, f"frame {index + 1}: {precision}-bit codestream in {info.bits_allocated}-bit pixels")


def _n_frames(ds: Dataset) -> int:
    return decoders._n_frames(ds)


def _decode_frame(
    ds: Dataset, path: Path, index: int, *, correct_unused_bits: bool = True
) -> np.ndarray:
    """Stored values of frame ``index`` as (rows, cols), from ``preprocess.decoders``' chain.

    ``correct_unused_bits`` (BitsStored < BitsAllocated: drop the high bits, PS3.5) is on
    unless the caller needs the raw container values first (see ``_padding``).
    """
    options = _OPTIONS[correct_unused_bits]
    with _header_errors(path):
        info = decoders.frame_info(ds)
    tsyntax = info.tsyntax
    try:
        arr, _ = decoders.decode(ds, index, options, info=info)
    except NotImplementedError as e:
        try:
            get_decoder(uid.UID(tsyntax))
        except NotImplementedError:
            raise DicomError(path, f"unsupported transfer syntax {tsyntax}") from e
        pin = os.environ.get(decoders.ENV_PIN)
        raise DicomError(
            path,
            f"no installed decoder decodes {uid.UID(tsyntax).name} ({tsyntax})"
            + (f" with {decoders.ENV_PIN}={pin}" if pin else ""),
        ) from e
    except decoders.DecodeFailed as e:
        name = uid.UID(tsyntax).name
        raise DicomError(path, f"cannot decode {name} pixel data ({'; '.join(e.failures)})") from e
    if arr.ndim != 2:
        raise DicomError(path, f"decoded frame has shape {arr.shape}, expected 2-D")
    return arr


def _lookup(ds: Dataset, frame: int, keyword: str) -> Any:
    """An attribute of ``frame``: per-frame functional group, shared group, then top level.

    Classic single-frame files have no functional groups and fall through to the top
    level; Enhanced CT keeps rescale, position, orientation and spacing in the groups.
    """
    seq = _FG_SEQUENCE.get(keyword)
    if seq is not None and (decoders.has(ds, _PER_FRAME_GROUPS) or decoders.has(ds, _SHARED_GROUPS)):
        groups = []
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame is not None and frame < len(per_frame):
            groups.append(per_frame[frame])
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared:
            groups.append(shared[0])
        for group in groups:
            items = group.get(seq)
            if items and keyword in items[0]:
                value = items[0].get(keyword)
                if value not in (None, ""):
                    return value
    value = _get(ds, keyword)
    return None if value in (None, "") else value


def _number(value: Any, default: float, *, name: str = "value", strict: bool = True) -> float:
    """First value of a (possibly multi-valued) numeric tag as float; ``default`` if absent.

    A present but malformed value (pydicom keeps e.g. DS "abcd" as a string, with only a
    warning) raises ValueError when ``strict`` -- silently using the default would give
    wrong HU -- and gives ``default`` otherwise.
    """
    if value is None or value == "":
        return default
    if isinstance(value, (list, tuple, MultiValue)):
        if len(value) == 0:
            return default
        value = value[0]
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = math.nan
    if math.isfinite(out):
        return out
    if strict:
        raise ValueError(f"{name} is not a finite number: {value!r}")
    return default


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    """``n`` finite floats from a multi-valued tag, or None when absent or malformed."""
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def _padding(ds: Dataset) -> tuple[int, int, bool] | None:
    """Padded stored-value range ``(lo, hi, on_raw)`` from PixelPaddingValue/RangeLimit.

    The tag is US or SS depending on PixelRepresentation, and implicit-VR files can
    deliver -2000 as 63536, so values are first wrapped to the BitsAllocated container's
    signedness. ``on_raw`` is True when the value lies outside the BitsStored range
    (non-conformant, e.g. 63536 in an unsigned 12-bit image): it can then only match the
    raw container values, before the unused high bits are dropped — after dropping, it
    would alias real tissue (63536 & 0xFFF = 2096 = 1072 HU of bone).
    """
    pad = _get(ds, "PixelPaddingValue")
    if pad is None or pad == "":
        return None
    allocated = int(_get(ds, "BitsAllocated", 16) or 16)
    stored = min(int(_get(ds, "BitsStored", allocated) or allocated), allocated)
    signed = int(_get(ds, "PixelRepresentation", 0) or 0) == 1

    def wrap(value: float) -> int:
        v = int(value) & ((1 << allocated) - 1)
        return v - (1 << allocated) if signed and v >= 1 << (allocated - 1) else v

    lo = wrap(_number(pad, 0, name="PixelPaddingValue"))
    limit = _get(ds, "PixelPaddingRangeLimit")
    if limit is None or limit == "":
        hi = lo
    else:
        hi = wrap(_number(limit, 0, name="PixelPaddingRangeLimit"))
    lo, hi = min(lo, hi), max(lo, hi)
    if signed:
        smin, smax = -(1 << (stored - 1)), (1 << (stored - 1)) - 1
    else:
        smin, smax = 0, (1 << stored) - 1
    return lo, hi, not (smin <= lo and hi <= smax)


def _drop_unused_bits(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """What pydicom's ``correct_unused_bits`` does, for arrays decoded without it.

    Same rule as pydicom: BitsStored < BitsAllocated, and not JPEG 2000 / JPEG-LS (their
    sign correction already yields values at the codestream's precision).
    """
    tsyntax = decoders.transfer_syntax(ds)
    if tsyntax in uid.JPEG2000TransferSyntaxes or tsyntax in uid.JPEGLSTransferSyntaxes:
        return arr
    shift = 8 * arr.dtype.itemsize - int(_get(ds, "BitsStored", 8 * arr.dtype.itemsize))
    if shift <= 0 or not np.issubdtype(arr.dtype, np.integer):
        return arr
    arr = arr if arr.flags.writeable else arr.copy()
    np.left_shift(arr, shift, out=arr)
    np.right_shift(arr, shift, out=arr)  # arithmetic shift: sign-extends signed dtypes
    return arr


def _frame_hu(ds: Dataset, path: Path, frame: int) -> np.ndarray:
    """Decode frame ``frame`` -> float32 (rows, cols) HU; padded pixels -> AIR_HU."""
    with _header_errors(path):
        padding = _padding(ds)
        slope = _number(_lookup(ds, frame, "RescaleSlope"), 1.0, name="RescaleSlope")
        intercept = _number(
            _lookup(ds, frame, "RescaleIntercept"), 0.0, name="RescaleIntercept"
        )
        _check_frame(ds, path, frame)
    on_raw = padding is not None and padding[2]
    stored = _decode_frame(ds, path, frame, correct_unused_bits=not on_raw)
    mask = None
    if padding is not None and np.issubdtype(stored.dtype, np.integer):
        lo, hi = padding[0], padding[1]
        # Padding is a stored value: compare before rescale.
        mask = (stored == lo) if lo == hi else (stored >= lo) & (stored <= hi)
        if on_raw:
            stored = _drop_unused_bits(stored, ds)
    hu = stored.astype(np.float32)  # (rows, cols)
    with np.errstate(over="ignore", invalid="ignore"):
        if slope != 1.0:
            hu *= np.float32(slope)
        if intercept != 0.0:
            hu += np.float32(intercept)
    # An absurd rescale (|slope| or |intercept| near float32's limit) overflows to inf: refused, never
    # passed on as HU. Checked only when the bound says it can happen (no pass over the pixels otherwise).
    if abs(slope) * 2.0 ** (8 * stored.dtype.itemsize) + abs(intercept) >= _F32_SAFE and not np.isfinite(hu).all():
        raise DicomError(path, f"RescaleSlope {slope:g} / RescaleIntercept {intercept:g} give HU beyond "
                               "float32 (not a CT rescale)")
    if mask is not None:
        hu[mask] = AIR_HU
    return hu


def read_hu(path: str | Path) -> np.ndarray:
    """One slice -> float32 ``(rows, cols)`` in Hounsfield units.

    Raises:
        DicomError: the file is not readable DICOM, has no or undecodable pixel data, is
            not grayscale, or is a multi-frame file with more than one frame (use
            :func:`read_series`, which makes each frame a slice). The message contains
            the path and the reason.
    """
    path = Path(path)
    ds = _read_dataset(path)
    with _header_errors(path):
        n = _n_frames(ds)
    if n > 1:
        raise DicomError(path, f"multi-frame file ({n} frames): use read_series to read it")
    return _frame_hu(ds, path, 0)


# ----------------------------------------------------------------------------- series


@dataclass
class _Slice:
    """One readable slice (a file, or a frame of a multi-frame file) before sorting."""

    name: str
    number: int
    listing: int  # position in the numeric-aware file listing, for stable ties
    position: tuple[float, ...] | None  # ImagePositionPatient (x, y, z)
    instance: int | None
    orientation: tuple[float, ...] | None
    series_uid: str | None
    pixel_spacing: tuple[float, ...] | None
    thickness: float | None
    shape: tuple[int, int]
    image: np.ndarray | None  # slice_fn output (or HU); set to None once copied out


def _listing(directory: Path) -> list[tuple[Path, int]]:
    """``*.dcm`` files sorted numerically by stem, with their slice numbers.

    Numbers come from the file name ("17.dcm" -> 17); when any name is not a number,
    every file gets its 1-based position in the listing instead (numbers first, then
    names in lexical order), so slice numbers stay unique.
    """
    files = [p for p in directory.iterdir() if p.suffix.lower() == ".dcm" and p.is_file()]
    files.sort(key=lambda p: (0, int(p.stem), p.name) if p.stem.isdigit() else (1, 0, p.name))
    if all(p.stem.isdigit() for p in files):
        return [(p, int(p.stem)) for p in files]
    return [(p, k + 1) for k, p in enumerate(files)]


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _read_file_slices(
    path: Path,
    number: int,
    listing: int,
    slice_fn: Callable[[np.ndarray], np.ndarray] | None,
    bad: list[tuple[str, str]],
    syntaxes: set[str],
) -> list[_Slice]:
    """Every readable frame of one file as _Slice; failures go to ``bad``."""
    try:
        ds = _read_dataset(path)
        syntaxes.add(decoders.transfer_syntax(ds))
        with _header_errors(path):
            n = _n_frames(ds)
            instance = _int_or_none(_get(ds, "InstanceNumber"))
            series_uid = str(_get(ds, "SeriesInstanceUID", "") or "").strip() or None
    except DicomError as e:
        bad.append((path.name, e.reason))
        return []
    out = []
    for k in range(n):
        name = path.name if n == 1 else f"{path.name} frame {k + 1}"
        try:
            hu = _frame_hu(ds, path, k)
            with _header_errors(path):
                pos = _floats(_lookup(ds, k, "ImagePositionPatient"), 3)
                orientation = _floats(_lookup(ds, k, "ImageOrientationPatient"), 6)
                pixel_spacing = _floats(_lookup(ds, k, "PixelSpacing"), 2)
                thickness = _number(_lookup(ds, k, "SliceThickness"), math.nan, strict=False)
        except DicomError as e:
            bad.append((name, e.reason))
            continue
        out.append(
            _Slice(
                name=name,
                number=number if n == 1 else k + 1,
                listing=listing,
                position=pos,
                instance=instance if n == 1 else k + 1,
                orientation=orientation,
                series_uid=series_uid,
                pixel_spacing=pixel_spacing,
                thickness=None if math.isnan(thickness) or thickness <= 0 else thickness,
                shape=(int(hu.shape[0]), int(hu.shape[1])),
                # slice_fn runs now, one slice at a time, so only its (small) outputs
                # are held for the whole study. Outside the try: its errors are bugs.
                image=hu if slice_fn is None else np.asarray(slice_fn(hu)),
            )
        )
    return out


def _majority(values: list[Any]) -> Any:
    """The most common value; ties go to the one seen first (file order)."""
    return Counter(values).most_common(1)[0][0]


def _same_series(slices: list[_Slice], bad: list[tuple[str, str]]) -> tuple[list[_Slice], tuple[float, ...]]:
    """Drop slices of another series or orientation than the majority's -> (kept, orientation).

    Slices without SeriesInstanceUID or ImageOrientationPatient are taken to belong.
    """
    uids = [s.series_uid for s in slices if s.series_uid]
    if len(set(uids)) > 1:
        major = _majority(uids)
        for s in slices:
            if s.series_uid and s.series_uid != major:
                bad.append((s.name, f"SeriesInstanceUID {s.series_uid} differs from the series' {major} "
                                    "(another series in the study directory)"))
        slices = [s for s in slices if not s.series_uid or s.series_uid == major]
    orients = [s.orientation for s in slices if s.orientation is not None]
    if not orients:
        return slices, _DEFAULT_DIRECTION
    key = _majority([tuple(round(v, 3) for v in o) for o in orients])
    ref = next(o for o in orients if tuple(round(v, 3) for v in o) == key)

    def differs(o: tuple[float, ...] | None) -> bool:
        return o is not None and max(abs(a - b) for a, b in zip(o, ref)) > _ORIENTATION_TOLERANCE

    for s in slices:
        if differs(s.orientation):
            bad.append((s.name, f"ImageOrientationPatient {list(s.orientation or ())} differs from the "
                                f"series' {list(ref)}"))
    return [s for s in slices if not differs(s.orientation)], ref


def slice_normal(direction: tuple[float, ...]) -> tuple[float, float, float]:
    """Unit normal of ImageOrientationPatient (row x column cosines), largest component positive.

    That sign makes axial series (tilted or not) run head to feet when sorted by descending
    projected position, whichever way their rows and columns point.
    """
    row, col = np.asarray(direction[:3], dtype=np.float64), np.asarray(direction[3:6], dtype=np.float64)
    n = np.cross(row, col)
    norm = float(np.linalg.norm(n))
    if not norm > 1e-6:  # degenerate (parallel cosines): the axial default
        return (0.0, 0.0, 1.0)
    n = n / norm
    if n[int(np.argmax(np.abs(n)))] < 0:
        n = -n
    return (float(n[0]), float(n[1]), float(n[2]))


def _projected(s: _Slice, normal: tuple[float, float, float]) -> float | None:
    if s.position is None:
        return None
    if normal == (0.0, 0.0, 1.0):
        return float(s.position[2])  # exact, not a sum of products
    return float(np.dot(np.asarray(s.position, dtype=np.float64), normal))


def _order(
    slices: list[_Slice], normal: tuple[float, float, float], directory: Path, bad: list[tuple[str, str]]
) -> tuple[list[_Slice], list[float | None]]:
    """Volume order: projected position descending (stable: ties keep listing order); fallbacks warn.

    Returns the ordered slices and their projected positions (None without positions).
    """
    depth = {id(s): _projected(s, normal) for s in slices}
    with_z = [s for s in slices if depth[id(s)] is not None]
    if with_z:
        for s in slices:
            if depth[id(s)] is None:
                bad.append((s.name, "no ImagePositionPatient (needed to place the slice)"))
        # Equal positions keep file-number (listing) order; duplicates are kept.
        out = sorted(with_z, key=lambda s: (-depth[id(s)], s.listing))  # type: ignore[operator]
    elif all(s.instance is not None for s in slices):
        warnings.warn(
            f"{directory}: no ImagePositionPatient in any slice; ordered by InstanceNumber "
            "(assumed head first), z unknown",
            DataWarning,
            stacklevel=3,
        )
        out = sorted(slices, key=lambda s: (s.instance, s.listing))
    else:
        warnings.warn(
            f"{directory}: no ImagePositionPatient or InstanceNumber in every slice; "
            "ordered by file number (assumed head first), z unknown",
            DataWarning,
            stacklevel=3,
        )
        out = sorted(slices, key=lambda s: (s.listing, s.number))
    return out, [depth[id(s)] for s in out]


def _resize_hu(hu: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float32 HU slice to (rows, cols)."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(hu, dtype=np.float32), mode="F")
    return np.asarray(img.resize((shape[1], shape[0]), Image.BILINEAR), dtype=np.float32)


def _same_shape(
    slices: list[_Slice], directory: Path, bad: list[tuple[str, str]], ragged: str, resized_by_fn: bool
) -> tuple[list[_Slice], tuple[int, int]]:
    """Slices whose (rows, cols) differ from the majority: bad files, or resized (``ragged``)."""
    # Majority (rows, cols); ties go to the shape seen first in file order.
    shape = _majority([s.shape for s in slices])
    odd = [s for s in slices if s.shape != shape]
    if not odd:
        return slices, shape
    if ragged == "drop":
        for s in odd:
            bad.append((s.name, f"shape {s.shape} differs from the series' {shape}"))
        return [s for s in slices if s.shape == shape], shape
    ref = next(s for s in slices if s.shape == shape).image
    assert ref is not None
    for s in odd:
        assert s.image is not None
        if not resized_by_fn:
            s.image = _resize_hu(s.image, shape)
        elif s.image.shape != ref.shape:  # slice_fn kept the input size: cannot stack it
            bad.append((s.name, f"shape {s.shape} differs from the series' {shape}"))
    kept = [s for s in slices if s.shape == shape or s.image.shape == ref.shape]  # type: ignore[union-attr]
    kept_ids = {id(s) for s in kept}
    resized = [s for s in odd if id(s) in kept_ids]
    if resized:
        warnings.warn(
            f"{directory}: resized {len(resized)} slice(s) whose (rows, cols) differ from the series' "
            f"{shape} to it: {_preview_names(resized)}",
            DataWarning,
            stacklevel=3,
        )
    return kept, shape


def _preview_names(slices: list[_Slice], limit: int = 5) -> str:
    names = [f"{s.name} {s.shape}" for s in slices]
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def read_series(
    directory: str | Path,
    *,
    slice_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    ragged: str = "drop",
) -> tuple[np.ndarray, SeriesMeta]:
    """All ``*.dcm`` in a study directory -> ``(volume, SeriesMeta)``.

    The volume is ``(Z, rows, cols)`` float32 HU, sorted by the position on the slice
    normal, descending (head first for axial series); slices with equal positions keep
    file-number order and are both kept. Each file is read exactly once. A multi-frame
    file contributes its frames as slices (slice number = frame index + 1).

    If ``slice_fn`` is given, each slice's float32 HU image goes through it right after
    decoding, and the volume is the stack of its outputs (whatever shape/dtype it
    returns); only those outputs are held, which keeps memory small for 800-slice
    studies. ``slice_fn`` also sees slices that are later dropped; its exceptions
    propagate (they are bugs, not bad files).

    Unreadable slices (see :class:`DicomError`, any decoder failure included), slices
    of another SeriesInstanceUID or ImageOrientationPatient than the majority's, and
    slices without ImagePositionPatient when others have it go to ``meta.bad_files``
    and the series goes on. Slices whose (rows, cols) differ from the majority go there
    too with ``ragged="drop"``; with ``ragged="resize"`` they are resized to it (HU
    bilinear, or by ``slice_fn`` when it gives every slice the same output shape) and a
    :class:`DataWarning` names them. If no slice has a position, the order falls back
    to InstanceNumber, then file number, with a DataWarning.

    Raises:
        DicomError: ``directory`` is not a directory, has no ``.dcm`` files, or none of
            its slices is readable (the message names the directory and the first
            reasons).
    """
    if ragged not in ("drop", "resize"):
        raise ValueError(f"ragged must be 'drop' or 'resize', got {ragged!r}")
    directory = Path(directory)
    if not directory.is_dir():
        raise DicomError(directory, "not a directory")
    files = _listing(directory)
    if not files:
        raise DicomError(directory, "no .dcm files")

    bad: list[tuple[str, str]] = []
    syntaxes: set[str] = set()
    slices: list[_Slice] = []
    for listing, (path, number) in enumerate(files):
        slices.extend(_read_file_slices(path, number, listing, slice_fn, bad, syntaxes))

    direction: tuple[float, ...] = _DEFAULT_DIRECTION
    shape = (0, 0)
    depth: list[float | None] = []
    if slices:
        slices, direction = _same_series(slices, bad)
        slices, shape = _same_shape(slices, directory, bad, ragged, slice_fn is not None)
        slices, depth = _order(slices, slice_normal(direction), directory, bad)
    if not slices:
        reasons = "; ".join(f"{n}: {r}" for n, r in bad[:3])
        raise DicomError(directory, f"no readable slice in {len(files)} .dcm files ({reasons})")

    # Copy into one array in volume order, dropping each slice as it is copied so the
    # peak is about one volume, not two (np.stack would hold both).
    first = slices[0].image
    assert first is not None
    volume = np.empty((len(slices),) + first.shape, dtype=first.dtype)
    for i, s in enumerate(slices):
        volume[i] = s.image  # ValueError here = slice_fn returned ragged outputs
        s.image = None

    z = np.array([math.nan if d is None else d for d in depth], dtype=np.float64)
    numbers = np.array([s.number for s in slices], dtype=np.int64)
    pos0 = slices[0].position
    meta = SeriesMeta(
        z=z,
        slice_numbers=numbers,
        spacing=_spacing(slices, z, directory),
        direction=direction,
        # Volume order is head first; file numbers falling along it mean they rise feet->head.
        z_reversed=bool(len(numbers) > 1 and numbers[-1] < numbers[0]),
        bad_files=bad,
        transfer_syntaxes=sorted(syntaxes),
        shape=shape,
        normal=slice_normal(direction),
        origin=None if pos0 is None else (float(pos0[0]), float(pos0[1]), float(pos0[2])),
    )
    return volume, meta


def _spacing(slices: list[_Slice], z: np.ndarray, directory: Path) -> tuple[float, float, float]:
    """(dz, dy, dx) in mm (dz along the slice normal); missing values fall back to 1.0 with a DataWarning."""
    dz = math.nan
    if len(z) > 1 and np.all(np.isfinite(z)):
        dz = float(np.median(np.abs(np.diff(z))))
    if not dz > 0:  # one slice, no positions, or all positions equal
        dz = slices[0].thickness or math.nan
    if not dz > 0:
        warnings.warn(f"{directory}: slice spacing unknown; using dz = 1.0 mm", DataWarning, stacklevel=3)
        dz = 1.0
    pixel = slices[0].pixel_spacing
    if pixel is None or not all(v > 0 for v in pixel):
        warnings.warn(f"{directory}: no PixelSpacing; using 1.0 mm", DataWarning, stacklevel=3)
        pixel = (1.0, 1.0)
    return (dz, float(pixel[0]), float(pixel[1]))
