"""Per-transfer-syntax DICOM frame decoders: the fastest correct one first, then fallbacks.

``preprocess.dicom`` (``read_hu``/``read_series``, so the shard job, ``spinestream predict`` and the
benchmarks through ``preprocess.ingest``) gets each frame's *stored values* from :func:`decode`: for
the frame's transfer syntax it tries the decoders of :data:`CHAINS` in order and returns the first
result that passes :func:`check`. Everything after the stored values (rescale, padding, unused
high bits, multi-frame) stays in ``preprocess.dicom`` and does not depend on which decoder ran.

Decoders, fastest first per syntax (measured side by side on real 512x512 CT, ``spinestream bench
decode``; BENCHMARKS.md, "DICOM decode per transfer syntax (issue 21)"):

============================  ==============================================================
native (explicit/implicit LE, ``numpy`` (``np.frombuffer`` on PixelData), ``pydicom``
deflated)
JPEG Lossless 4.57 / SV1 4.70 ``imagecodecs.jpeg8`` (libjpeg-turbo >= 3: lossless process 14,
                              2-16 bits), ``imagecodecs.ljpeg`` (liblj92), ``pydicom.gdcm``,
                              ``pydicom.pylibjpeg``
JPEG-LS 4.80 / 4.81           ``imagecodecs.jpegls`` (CharLS), ``pydicom.gdcm``,
                              ``pydicom.pylibjpeg``, ``pydicom.pyjpegls``
JPEG 2000 4.90 / 4.91         ``imagecodecs.jpeg2k`` (OpenJPEG, 1 thread unless asked),
                              ``pydicom.pylibjpeg``, ``pydicom.gdcm``, ``pydicom.pillow``
HTJ2K lossless 4.201 / 4.202  ``imagecodecs.htj2k`` (OpenJPH), ``imagecodecs.jpeg2k``,
                              ``pydicom.pylibjpeg``
HTJ2K 4.203 (lossy)           ``imagecodecs.jpeg2k``, ``pydicom.pylibjpeg`` (OpenJPEG both;
                              OpenJPH rounds 0.02% of lossy pixels differently)
RLE Lossless 1.2.5            ``imagecodecs.dicomrle``, ``pydicom.pylibjpeg``,
                              ``pydicom.pydicom``, ``pydicom.gdcm``
anything else                 pydicom's plugins (lossy JPEG baseline/extended: GDCM,
                              pylibjpeg, Pillow, as before)
============================  ==============================================================

``pydicom.<plugin>`` is ``pydicom.pixels.pixel_array(ds, decoding_plugin=<plugin>)``. Plugins or
modules not installed are skipped.

**Stored values are defined by pydicom.** A codec's raw output is made to equal what
``pixel_array`` returns with the reader's options (``preprocess.dicom._DECODE_OPTIONS``):
reinterpreted in the container dtype (BitsAllocated, PixelRepresentation), then pydicom's rules --
JPEG 2000/HTJ2K whose codestream signedness differs from PixelRepresentation are shifted by the
codestream precision (``apply_j2k_sign_correction``), signed JPEG-LS is sign-extended from its
precision (``apply_jls_sign_correction``; JPEG-LS has no sign), and otherwise the unused high bits
are dropped/sign-extended when asked (``correct_unused_bits``). So signed CT compressed as unsigned
at precision == BitsStored (JPEG Lossless and JPEG-LS always are; -2000 at 14 bits comes back as
14384) is sign-extended, never returned as 14384.

**Every result is checked** (:func:`check`): ``None`` (nvImageCodec's CPU backends return it, with
only a warning, for signed JPEG 2000), a non-array, a float or bool dtype, a wider dtype than the
container, or a shape other than (Rows, Columns) is a failure of that decoder; the next one in the
chain is tried, and only when all fail does the reader raise ``DicomError`` listing each.

**Pinning** (debugging, before/after benchmarks): ``SPINESTREAM_DICOM_DECODER`` =

* unset, ``""`` or ``auto``: the chains above;
* a comma-separated list of backends (``imagecodecs``, ``pylibjpeg``, ``gdcm``, ``pydicom``,
  ``pillow``, ``pyjpegls``, ``numpy``): only those decoders, in that order of backends (``pydicom``
  here means pydicom's own pure-Python decoders: native data and RLE). Native data keeps its
  default chain when the list names no native decoder (``numpy`` or ``pydicom``), so
  ``SPINESTREAM_DICOM_DECODER=gdcm`` still reads uncompressed files;
* ``legacy``: the read path before issue 21 -- ``pydicom.dcmread`` (not the light parse of
  ``preprocess.lightparse``), then ``pixel_array`` for everything, GDCM first for JPEG
  Lossless/JPEG-LS, pylibjpeg first for JPEG 2000 and RLE.

A pin is an environment variable, not a ``ShardConfig`` field, on purpose: every decoder path gives
the same stored values (the correctness gate, tests/test_decoders.py), so the choice must not
change a shard job's config identity (re-sharding for it would be pointless); and it reaches the
decoding worker processes of the shard job and of ``predict`` unchanged.

**Threads**: decoders run on the caller's thread only (``numthreads=1`` for OpenJPEG), because the
shard job and predict already run one process per core. ``SPINESTREAM_DICOM_THREADS=N`` lets a
single-process caller with idle cores ask for N threads per JPEG 2000 frame. (GDCM's JPEG 2000
decoder starts threads on every core unasked; it is the third choice there, reached only when both
OpenJPEG builds fail, or when pinned.)
"""
from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from pydicom import uid
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import get_decoder, pixel_array
from pydicom.pixels.utils import get_j2k_parameters

from spinestream import InputError

from . import lightparse

__all__ = [
    "ENV_PIN", "ENV_THREADS", "BACKENDS", "CHAINS", "Decoder", "FrameInfo", "DecodeFailed",
    "decode", "chain_for", "check", "frame_info", "pinned", "available",
]

ENV_PIN = "SPINESTREAM_DICOM_DECODER"
ENV_THREADS = "SPINESTREAM_DICOM_THREADS"
BACKENDS = ("numpy", "imagecodecs", "pylibjpeg", "gdcm", "pydicom", "pillow", "pyjpegls")

# Never turned into a decoder failure: the user (or the OS) asked the process to stop.
_PASS_THROUGH = (KeyboardInterrupt, SystemExit)

_NATIVE_LE = (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian)
_JPEG_LOSSLESS = (uid.JPEGLossless, uid.JPEGLosslessSV1)
_JPEG_LS = tuple(uid.JPEGLSTransferSyntaxes)
_J2K = (uid.JPEG2000Lossless, uid.JPEG2000)
_HTJ2K = (uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K)
_J2K_FAMILY = tuple(uid.JPEG2000TransferSyntaxes)  # includes HTJ2K, as in pydicom's sign rule


_CONTAINERS = {(bits, signed): np.dtype(f"{'i' if signed else 'u'}{bits // 8}")
               for bits in (8, 16, 32) for signed in (False, True)}


@dataclass(frozen=True)
class FrameInfo:
    """What a decoder needs to know about the frame besides its bytes."""

    tsyntax: str
    rows: int
    cols: int
    samples: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str
    n_frames: int = 1

    @property
    def dtype(self) -> np.dtype:
        """The container: what pydicom's ``pixel_array`` returns (native byte order).

        Raises ValueError for BitsAllocated other than 8, 16, 32 (bit-packed data is left
        to pydicom, whose decoders then run unchecked for dtype)."""
        dtype = _CONTAINERS.get((self.bits_allocated, self.signed))
        if dtype is None:
            raise ValueError(f"BitsAllocated {self.bits_allocated} has no integer container here")
        return dtype

    @property
    def has_container(self) -> bool:
        return self.bits_allocated in (8, 16, 32)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, self.cols) if self.samples == 1 else (self.rows, self.cols, self.samples)

    @property
    def frame_size(self) -> int:
        """Bytes of one uncompressed frame."""
        return self.rows * self.cols * self.samples * self.dtype.itemsize


_US = struct.Struct("<H").unpack
_SS = struct.Struct("<h").unpack
_US_AT = struct.Struct("<H").unpack_from
_IS = re.compile(rb"[ ]*[+-]?[0-9]{1,12}[ ]*")  # IS holds 12 characters; pydicom reads longer ones through a float
_DS = re.compile(rb"[ ]*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[ ]*")
_TEXT_VRS = frozenset(("CS", "UI"))
NOT_SIMPLE = object()
"""What :func:`simple_value` returns for a raw value it leaves to pydicom."""


def _raw(ds: Dataset, tag: int, meta: bool = False):
    """Element ``tag`` before pydicom converted it: ``(VR, raw value)``, ``lightparse.ABSENT`` when
    ``ds`` has no such element, or None (converted already, implicit VR, big endian: ask pydicom).
    A :class:`~lightparse.LightDataset` pydicom has not touched is read without building it."""
    out = lightparse.raw(ds, tag, meta=meta)
    if out is not None:
        return out
    raw = (ds.file_meta if meta else ds)._dict.get(tag)  # noqa: SLF001 -- unconverted elements are kept there
    if raw is None:
        return lightparse.ABSENT
    if isinstance(raw, RawDataElement) and raw.VR is not None and raw.is_little_endian and raw.value is not None:
        return raw.VR, raw.value
    return None


def simple_value(vr: str, value: bytes | memoryview):
    """The value pydicom gives for a raw little-endian element of ``vr`` -- for the simple cases:
    one US or SS; one or more plain decimal DS (floats) or IS (ints); one ASCII CS or UI (stripped);
    an empty value (pydicom's empty value for the VR). :data:`NOT_SIMPLE` for anything else (pydicom
    then converts it, with its warnings and errors)."""
    if not value:  # b"", or None (pydicom's raw empty value for a binary VR)
        return "" if vr in _TEXT_VRS else None if vr in ("US", "SS", "DS", "IS") else NOT_SIMPLE
    if vr == "US":
        return _US(value)[0] if len(value) == 2 else NOT_SIMPLE
    if vr == "SS":
        return _SS(value)[0] if len(value) == 2 else NOT_SIMPLE
    if vr not in ("DS", "IS") and vr not in _TEXT_VRS:
        return NOT_SIMPLE
    value = bytes(value)
    if vr in _TEXT_VRS:
        if b"\\" in value or not value.isascii() or value[:1] in (b" ", b"\x00"):
            return NOT_SIMPLE  # pydicom keeps a CS's leading spaces, a UI's not: left to it
        return value.decode("ascii").rstrip(" \x00")
    value = value.rstrip(b" \x00")
    if not value:
        return ""  # pydicom: spaces only is an empty string (no bytes at all: None, above)
    parts = value.split(b"\\")
    pattern, kind = (_DS, float) if vr == "DS" else (_IS, int)
    if not all(pattern.fullmatch(v) for v in parts):
        return NOT_SIMPLE
    out = [kind(v) for v in parts]
    return out[0] if len(out) == 1 else out


def get(ds: Dataset, tag: int, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword, default)`` -- the same value, read from the raw bytes while pydicom has not
    converted the element (a conversion costs ~30 us; a :class:`~lightparse.LightDataset` is not even
    built). ``tag`` is ``keyword``'s tag. DS and IS values come as floats and ints (pydicom: DSfloat,
    IS), several as a list (pydicom: a MultiValue)."""
    light = ds.__dict__.get("_light")
    if light is not None:  # the hot path: a LightDataset (lightparse.raw, inlined)
        entry = light.table.get(tag)
        if entry is None:
            return default
        if entry[0] == "US" and entry[1] == 2:
            return _US_AT(light.data, entry[2])[0]
        out = simple_value(entry[0], lightparse.value(light.data, tag, entry))
        return ds.get(keyword, default) if out is NOT_SIMPLE else out
    raw = _raw(ds, tag)
    if raw is lightparse.ABSENT:
        return default
    if raw is not None:
        out = simple_value(*raw)
        if out is not NOT_SIMPLE:
            return out
    return ds.get(keyword, default)


def has(ds: Dataset, tag: int) -> bool:
    """``tag in ds``, without building a :class:`~lightparse.LightDataset`."""
    raw = lightparse.raw(ds, tag)
    return tag in ds if raw is None else raw is not lightparse.ABSENT


def transfer_syntax(ds: Dataset) -> str:
    """The file meta information's TransferSyntaxUID ('' when absent)."""
    raw = _raw(ds, 0x00020010, meta=True)
    if raw is lightparse.ABSENT:
        return ""
    if raw is not None:
        out = raw_text_value(*raw)
        if out is not None:
            return out
    return str(ds.file_meta.get("TransferSyntaxUID", "") or "")


def raw_text_value(vr: str, value: bytes | memoryview | None) -> str | None:
    """A single-valued ASCII string (CS, UI, IS) from its raw bytes, padding stripped on both sides (what the
    reader compares: a transfer syntax); None when it is not that simple."""
    if vr not in ("CS", "UI", "IS") or not value:
        return None
    value = bytes(value)
    if b"\\" in value or not value.isascii():
        return None
    return value.decode("ascii").strip(" \x00")


def _us(ds: Dataset, tag: int, keyword: str, default: int) -> int:
    value = get(ds, tag, keyword, default)
    return int(default if value in (None, "") else value)


def frame_info(ds: Dataset) -> FrameInfo:
    """The pixel module of ``ds`` as a FrameInfo (missing BitsStored = BitsAllocated). Kept with a
    :class:`~lightparse.LightDataset` pydicom has not built (nothing can have changed it since)."""
    cache = lightparse.raw_cache(ds)
    if cache is not None and "frame_info" in cache:
        return cache["frame_info"]
    info = _frame_info(ds)
    if cache is not None:
        cache["frame_info"] = info
    return info


def _frame_info(ds: Dataset) -> FrameInfo:
    allocated = _us(ds, 0x00280100, "BitsAllocated", 16) or 16
    stored = _us(ds, 0x00280101, "BitsStored", allocated) or allocated
    return FrameInfo(
        tsyntax=transfer_syntax(ds),
        rows=_us(ds, 0x00280010, "Rows", 0),
        cols=_us(ds, 0x00280011, "Columns", 0),
        samples=_us(ds, 0x00280002, "SamplesPerPixel", 1) or 1,
        bits_allocated=allocated,
        bits_stored=min(stored, allocated),
        signed=_us(ds, 0x00280103, "PixelRepresentation", 0) == 1,
        photometric=str(get(ds, 0x00280004, "PhotometricInterpretation", "") or ""),
        n_frames=_n_frames(ds),
    )


def _n_frames(ds: Dataset) -> int:
    try:
        return max(int(get(ds, 0x00280008, "NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


# ----------------------------------------------------------------------------- codecs on bytes


def _threads() -> int:
    try:
        return max(int(os.environ.get(ENV_THREADS, "1") or 1), 1)
    except ValueError:
        return 1


def _ic_jpeg8(data: bytes, info: FrameInfo) -> np.ndarray:
    import imagecodecs

    return imagecodecs.jpeg8_decode(data)


def _ic_ljpeg(data: bytes, info: FrameInfo) -> np.ndarray:
    import imagecodecs

    return imagecodecs.ljpeg_decode(data)


def _ic_jpegls(data: bytes, info: FrameInfo) -> np.ndarray:
    import imagecodecs

    return imagecodecs.jpegls_decode(data)


def _ic_jpeg2k(data: bytes, info: FrameInfo) -> np.ndarray:
    import imagecodecs

    return imagecodecs.jpeg2k_decode(data, numthreads=_threads())


def _ic_htj2k(data: bytes, info: FrameInfo) -> np.ndarray:
    import imagecodecs

    return imagecodecs.htj2k_decode(data)


def _ic_dicomrle(data: bytes, info: FrameInfo) -> np.ndarray:
    import imagecodecs

    # The segments are byte planes, most significant first (PS3.5 G.2); imagecodecs
    # reassembles them into the dtype given, here the little-endian container.
    if info.samples != 1:
        raise ValueError("multi-sample RLE is left to pydicom's plugins")
    out = imagecodecs.dicomrle_decode(data, info.dtype.newbyteorder("<").str)
    arr = np.frombuffer(out, dtype=info.dtype.newbyteorder("<"))
    if arr.size != info.rows * info.cols:
        raise ValueError(f"decoded {arr.size} pixels, expected {info.rows * info.cols}")
    return arr.reshape(info.rows, info.cols)


@dataclass(frozen=True)
class Decoder:
    """One way to get a frame's stored values.

    ``codec`` decoders run on the frame's encapsulated bytes and return the codec's raw output
    (made pydicom-equal by :func:`normalise`); ``plugin`` decoders are pydicom's ``pixel_array``
    with that ``decoding_plugin`` ("" for native data) and already apply pydicom's rules.
    ``native`` is the ``np.frombuffer`` path for uncompressed little-endian data.
    """

    name: str
    backend: str
    codec: Callable[[bytes, FrameInfo], Any] | None = None
    plugin: str | None = None
    module: str | None = None  # importable module the decoder needs (None: always there)

    def __str__(self) -> str:
        return self.name


def _codec(name: str, fn: Callable[[bytes, FrameInfo], Any]) -> Decoder:
    return Decoder(f"imagecodecs.{name}", "imagecodecs", codec=fn, module="imagecodecs")


def _plugin(plugin: str) -> Decoder:
    return Decoder(f"pydicom.{plugin or 'native'}", plugin or "pydicom", plugin=plugin)


NUMPY = Decoder("numpy.frombuffer", "numpy")
IC_JPEG8, IC_LJPEG = _codec("jpeg8", _ic_jpeg8), _codec("ljpeg", _ic_ljpeg)
IC_JPEGLS, IC_JPEG2K = _codec("jpegls", _ic_jpegls), _codec("jpeg2k", _ic_jpeg2k)
IC_HTJ2K, IC_DICOMRLE = _codec("htj2k", _ic_htj2k), _codec("dicomrle", _ic_dicomrle)
PD_NATIVE, PD_RLE = _plugin(""), _plugin("pydicom")
PD_GDCM, PD_PYLIBJPEG, PD_PILLOW, PD_PYJPEGLS = (_plugin(p) for p in ("gdcm", "pylibjpeg", "pillow", "pyjpegls"))


def _chains() -> dict[str, tuple[Decoder, ...]]:
    c: dict[str, tuple[Decoder, ...]] = {}
    for ts in _NATIVE_LE:
        c[ts] = (NUMPY, PD_NATIVE)
    c[uid.ExplicitVRBigEndian] = (PD_NATIVE,)
    for ts in _JPEG_LOSSLESS:
        c[ts] = (IC_JPEG8, IC_LJPEG, PD_GDCM, PD_PYLIBJPEG)
    for ts in _JPEG_LS:
        c[ts] = (IC_JPEGLS, PD_GDCM, PD_PYLIBJPEG, PD_PYJPEGLS)
    for ts in _J2K:
        c[ts] = (IC_JPEG2K, PD_PYLIBJPEG, PD_GDCM, PD_PILLOW)
    for ts in (uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL):
        c[ts] = (IC_HTJ2K, IC_JPEG2K, PD_PYLIBJPEG)
    # Lossy HTJ2K: OpenJPH's irreversible wavelet rounds 0.02% of pixels 1 away from OpenJPEG's
    # (pylibjpeg's, the decoder before issue 21); OpenJPEG only, so HU do not depend on the build.
    c[uid.HTJ2K] = (IC_JPEG2K, PD_PYLIBJPEG)
    c[uid.RLELossless] = (IC_DICOMRLE, PD_PYLIBJPEG, PD_RLE, PD_GDCM)
    for ts in (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit):  # lossy: left as before
        c[ts] = (PD_GDCM, PD_PYLIBJPEG, PD_PILLOW)
    return c


CHAINS: dict[str, tuple[Decoder, ...]] = _chains()
"""Transfer syntax UID -> decoders, fastest correct first (syntaxes not listed: pydicom's plugins)."""

# The choice before issue 21 (preprocess/dicom.py's _PLUGIN_PREFERENCE then): pydicom's
# pixel_array for everything, these plugins first, the other installed plugins after.
_LEGACY_PREFERENCE: dict[str, tuple[str, ...]] = {
    uid.JPEGLossless: ("gdcm", "pylibjpeg"),
    uid.JPEGLosslessSV1: ("gdcm", "pylibjpeg"),
    uid.JPEGLSLossless: ("gdcm", "pylibjpeg", "pyjpegls"),
    uid.JPEGLSNearLossless: ("gdcm", "pylibjpeg", "pyjpegls"),
    uid.JPEG2000Lossless: ("pylibjpeg", "gdcm", "pillow"),
    uid.JPEG2000: ("pylibjpeg", "gdcm", "pillow"),
    uid.JPEGBaseline8Bit: ("gdcm", "pylibjpeg", "pillow"),
    uid.JPEGExtended12Bit: ("gdcm", "pylibjpeg", "pillow"),
    uid.RLELossless: ("pylibjpeg", "pydicom", "gdcm"),
}


@cache
def _pydicom_plugins(tsyntax: str) -> tuple[str, ...]:
    """pydicom's installed plugins for ``tsyntax`` (("",) for native data, () when none)."""
    try:
        decoder = get_decoder(uid.UID(tsyntax))
    except NotImplementedError:
        return ()
    if decoder.is_native:
        return ("",)
    return tuple(decoder.available_plugins)


@cache
def available(module: str | None) -> bool:
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _usable(d: Decoder, tsyntax: str) -> bool:
    if d.plugin is not None:
        return d.plugin in _pydicom_plugins(tsyntax)
    return available(d.module)


def _pin() -> str:
    return os.environ.get(ENV_PIN, "").strip().lower()


def light_parse() -> bool:
    """Whether the reader may use ``preprocess.lightparse`` (not under the ``legacy`` pin, which
    stands for the whole read path before issue 21: ``dcmread``, then ``pixel_array``)."""
    return _pin() != "legacy"


def chain_for(tsyntax: str, pin: str | None = None) -> tuple[Decoder, ...]:
    """Installed decoders for ``tsyntax`` in the order they are tried, under ``pin`` (default:
    the environment's :data:`ENV_PIN`); () when nothing here decodes it.

    Raises:
        InputError: the pin names no known backend.
    """
    return _chain(str(tsyntax), _pin() if pin is None else pin.strip().lower())


@cache
def _chain(tsyntax: str, pin: str) -> tuple[Decoder, ...]:
    native = tsyntax in _NATIVE_LE or tsyntax == uid.ExplicitVRBigEndian
    if pin == "legacy":
        pref = _LEGACY_PREFERENCE.get(tsyntax, ())
        plugins = _pydicom_plugins(tsyntax)
        order = [p for p in pref if p in plugins] + [p for p in plugins if p not in pref]
        return tuple(_plugin(p) for p in order)
    default = CHAINS.get(tsyntax)
    if default is None:  # pydicom's plugins, in its own order
        default = tuple(_plugin(p) for p in _pydicom_plugins(tsyntax))
    default = tuple(d for d in default if _usable(d, tsyntax))
    if pin in ("", "auto"):
        return default
    wanted = [b.strip() for b in pin.split(",") if b.strip()]
    unknown = [b for b in wanted if b not in BACKENDS]
    if unknown:
        raise InputError(
            f"{ENV_PIN}={os.environ.get(ENV_PIN, pin)!r}: unknown decoder backend(s) {', '.join(unknown)} "
            f"(known: auto, legacy, or a comma-separated list of {', '.join(BACKENDS)})"
        )
    if tsyntax in CHAINS:
        pool = CHAINS[tsyntax]
    else:
        pool = default
    # A pinned backend may have decoders outside the default chain (e.g. pydicom's own RLE).
    extra = tuple(_plugin(p) for p in _pydicom_plugins(tsyntax) if p and all(d.plugin != p for d in pool))
    pool = tuple(d for d in pool + extra if _usable(d, tsyntax))
    chosen = tuple(d for b in wanted for d in pool if d.backend == b)
    if native and not any(d.backend in ("numpy", "pydicom") for d in chosen):
        return default  # a codec pin does not stop uncompressed files being read
    return chosen


@contextmanager
def pinned(spec: str | None) -> Iterator[None]:
    """Temporarily set :data:`ENV_PIN` (None: unset it), e.g. for a before/after benchmark."""
    old = os.environ.get(ENV_PIN)
    try:
        if spec is None:
            os.environ.pop(ENV_PIN, None)
        else:
            os.environ[ENV_PIN] = spec
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_PIN, None)
        else:
            os.environ[ENV_PIN] = old


# ----------------------------------------------------------------------------- checks


class DecodeFailed(Exception):
    """Every decoder of the chain failed; ``failures`` holds 'decoder: reason' for each."""

    def __init__(self, tsyntax: str, failures: list[str]) -> None:
        self.tsyntax = tsyntax
        self.failures = failures
        super().__init__("; ".join(failures))


def check(arr: Any, info: FrameInfo) -> np.ndarray:
    """``arr`` if it can be a frame of ``info`` (raw codec output), else ValueError saying why.

    Accepted: an integer ndarray of shape (rows, cols) (or (rows, cols, 1) for one sample),
    no wider than the container. ``None`` or anything else is a failure, never pixels.
    """
    if arr is None:
        raise ValueError("returned None")
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"returned {type(arr).__name__}, not an ndarray")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"returned dtype {arr.dtype}, not an integer type")
    if info.has_container and arr.dtype.itemsize > info.dtype.itemsize:
        raise ValueError(f"returned dtype {arr.dtype}, wider than the {info.dtype} container")
    if arr.ndim == 3 and info.samples == 1 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.shape != info.shape:
        raise ValueError(f"returned shape {arr.shape}, expected {info.shape}")
    return arr


def _shift(arr: np.ndarray, bits: int) -> np.ndarray:
    """Keep the low ``bits`` bits; sign-extend them for a signed dtype (PS3.5 8.1.1).

    ``arr`` itself (maybe read-only) when every value already fits in ``bits`` -- the shift is
    then the identity, and two reductions cost a third of the copy and two shifts."""
    shift = 8 * arr.dtype.itemsize - bits
    if shift <= 0:
        return arr
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if arr.dtype.kind == "i" else (0, (1 << bits) - 1)
    if arr.size and lo <= arr.min() and arr.max() <= hi:
        return arr
    if not arr.flags.writeable:
        arr = arr.copy()
    np.left_shift(arr, shift, out=arr)
    np.right_shift(arr, shift, out=arr)
    return arr


def jpeg_sof(data: bytes) -> bytes | None:
    """The frame header (SOF) segment of a JPEG / JPEG-LS codestream, after its length: precision, rows,
    columns, components, ...; None when the stream has none where the standard puts it (not starting with
    SOI, a byte that is no marker, scan data or a broken length before any SOF). The reader's frame check
    (``preprocess.dicom``) and the sign correction below read it."""
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        # SOF0..SOF15 (not DHT C4, JPG C8, DAC CC) or JPEG-LS SOF55 (F7)
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
            return data[pos + 4:pos + 2 + length]
        if marker == 0xDA or length < 2:  # scan data before any SOF, or a broken length
            return None
        pos += 2 + length
    return None


def _jpeg_precision(data: bytes) -> int | None:
    """Sample precision from a JPEG/JPEG-LS codestream's SOF marker (None if not found)."""
    sof = jpeg_sof(data)
    return sof[0] if sof else None


def normalise(arr: np.ndarray, data: bytes, info: FrameInfo, *, correct_unused_bits: bool) -> np.ndarray:
    """A codec's checked output -> what ``pixel_array`` returns for the frame (see module doc).

    Same bit pattern in the container dtype, then pydicom 3's rules: J2K/HTJ2K sign correction
    (monochrome), JPEG-LS sign correction (signed), else the unused-bits correction when asked.
    """
    dtype = info.dtype
    if arr.dtype.itemsize == dtype.itemsize:
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        arr = arr.view(dtype)
    else:  # a narrower decode (e.g. 8-bit precision in a 16-bit container): same values
        arr = arr.astype(dtype)
    ts = info.tsyntax
    if ts in _J2K_FAMILY and info.photometric in ("MONOCHROME1", "MONOCHROME2"):
        params = get_j2k_parameters(data)
        signed = params.get("is_signed", info.signed)
        precision = params.get("precision", info.bits_stored)
        if signed != info.signed:
            arr = _shift(arr, precision)
        return arr
    if ts in _JPEG_LS and info.signed:
        precision = _jpeg_precision(data) or info.bits_stored
        return _shift(arr, precision)
    if correct_unused_bits and info.bits_allocated > info.bits_stored:
        return _shift(arr, info.bits_stored)
    return arr


# ----------------------------------------------------------------------------- the chain


_ITEM = struct.Struct("<LL").unpack_from
_ITEM_TAG, _SEQ_END = 0xE000FFFE, 0xE0DDFFFE  # (FFFE,E000), (FFFE,E0DD) read as one little-endian uint32


def pixel_bytes(ds: Dataset) -> bytes | memoryview:
    """PixelData's value, from the raw element while pydicom has not converted it (no copy, no
    ~30 us conversion), else as pydicom gives it."""
    raw = _raw(ds, 0x7FE00010)
    if raw is not None and raw is not lightparse.ABSENT and raw[1] is not None:
        return raw[1]
    return ds.PixelData


def _single_frame(buf: bytes) -> bytes:
    """The one frame of encapsulated Pixel Data: every fragment after the Basic Offset Table, joined
    (what pydicom's ``get_frame`` gives for one frame, in a few microseconds instead of ~50)."""
    n = len(buf)
    tag, length = _ITEM(buf, 0)
    if tag != _ITEM_TAG:
        raise ValueError("encapsulated Pixel Data does not start with an item")
    pos = 8 + length
    fragments = []
    while pos + 8 <= n:
        tag, length = _ITEM(buf, pos)
        if tag == _SEQ_END:
            break
        if tag != _ITEM_TAG or pos + 8 + length > n:
            raise ValueError("malformed encapsulated Pixel Data item")
        fragments.append(buf[pos + 8:pos + 8 + length])
        pos += 8 + length
    if not fragments:
        raise ValueError("no fragment in the encapsulated Pixel Data")
    return fragments[0] if len(fragments) == 1 else b"".join(fragments)


def frame_bytes(ds: Dataset, info: FrameInfo, index: int) -> bytes:
    """The encoded bytes of frame ``index`` (encapsulated syntaxes)."""
    buf = pixel_bytes(ds)
    if info.n_frames == 1 and index == 0 and not has(ds, 0x7FE00001):  # no ExtendedOffsetTable
        return _single_frame(buf)
    kw: dict[str, Any] = {"number_of_frames": info.n_frames}
    if "ExtendedOffsetTable" in ds:
        kw["extended_offsets"] = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    return get_frame(bytes(buf), index, **kw)


def _native(ds: Dataset, info: FrameInfo, index: int, correct_unused_bits: bool) -> np.ndarray:
    """Frame ``index`` of uncompressed little-endian data: a view on PixelData."""
    if info.samples != 1:
        raise ValueError("multi-sample data is left to pydicom")
    size = info.frame_size
    buf = pixel_bytes(ds)
    start = index * size
    if len(buf) < start + size:
        raise ValueError(f"PixelData has {len(buf)} bytes, frame {index} needs {start + size}")
    arr = np.frombuffer(buf, dtype=info.dtype.newbyteorder("<"), count=info.rows * info.cols, offset=start)
    arr = arr.reshape(info.rows, info.cols)
    if correct_unused_bits and info.bits_allocated > info.bits_stored:
        arr = _shift(arr, info.bits_stored)
    return arr


def run(d: Decoder, ds: Dataset, info: FrameInfo, index: int, options: dict[str, Any]) -> np.ndarray:
    """Stored values of frame ``index`` by decoder ``d``, checked; raises on any failure."""
    correct = bool(options.get("correct_unused_bits", True))
    if d.codec is not None or d is NUMPY:
        info.dtype  # noqa: B018 -- ValueError (a failure of this decoder) for bit-packed data
    if d is NUMPY:
        return check(_native(ds, info, index, correct), info)
    if d.codec is not None:
        data = frame_bytes(ds, info, index)
        arr = check(d.codec(data, info), info)
        return normalise(arr, data, info, correct_unused_bits=correct)
    arr = pixel_array(ds, index=index, decoding_plugin=d.plugin or "", **options)
    arr = check(arr, info)
    if info.has_container and arr.dtype.newbyteorder("=") != info.dtype:  # big endian stays so
        raise ValueError(f"returned dtype {arr.dtype}, expected {info.dtype}")
    return arr


def decode(
    ds: Dataset, index: int, options: dict[str, Any], *, info: FrameInfo | None = None
) -> tuple[np.ndarray, Decoder]:
    """Stored values of frame ``index`` as ``pixel_array(ds, index=index, **options)`` gives
    them, from the first decoder of the chain that succeeds -> (array, that decoder).

    Raises:
        NotImplementedError: nothing installed decodes the transfer syntax (or the pin left none).
        DecodeFailed: every decoder failed (each reason in ``failures``).
        InputError: the pin is malformed.
    """
    info = frame_info(ds) if info is None else info
    tsyntax = info.tsyntax
    chain = chain_for(tsyntax, _pin())
    if not chain:
        raise NotImplementedError(tsyntax)
    failures = []
    for d in chain:
        try:
            return run(d, ds, info, index, options), d
        except _PASS_THROUGH:
            raise
        except BaseException as e:
            # Codecs raise anything from ValueError to RuntimeError, and pylibjpeg-rle
            # pyo3's PanicException (a BaseException) on a malformed frame.
            msg = str(e).splitlines()[0] if str(e) else ""
            failures.append(f"{d.name}: {type(e).__name__}: {msg}")
    raise DecodeFailed(tsyntax, failures)
