"""Fuzzed DICOM: the reader's contract under broken input (issue 20, "Reliability as figures").

Contract (preprocess/dicom.py): ``read_hu`` either returns finite float32 HU of the header's
``(Rows, Columns)`` or raises :class:`DicomError` naming the file; ``read_series`` returns a finite
volume with every unreadable file in ``bad_files``, or raises DicomError naming the directory. Never
another exception, never a crash of the process, never a hang.

The cases are real files from pydicom's bundled test data (never downloaded) in several transfer
syntaxes -- explicit/implicit little endian, big endian, deflated, RLE, JPEG 2000, JPEG-LS, JPEG
extended, and JPEG Lossless made by GDCM from CT_small -- broken by hypothesis: truncated at random
points, bytes flipped in the header and in the pixel data, key tags deleted or given absurd values,
and the transfer syntax swapped for one that does not match the data.

The readers end in C and Rust decoders, so every case runs in a child process
(tests/dicom_fuzz_worker.py) with a timeout: a crash or a hang is a test failure that names the
mutations, and the input is kept (``SPINESTREAM_FUZZ_KEEP``, default the test's temporary directory)
to reproduce it.

Budget: the default profile runs a few dozen examples per test (the file in well under 30 s on a
2-core machine, derandomized so a CI failure reproduces); the ``slow`` test
(``-m slow``, or ``SPINESTREAM_FUZZ_EXAMPLES=N`` for N examples in every test) is the at-scale run
RELIABILITY.md reports. Each defect the fuzzing found is an explicit regression test at the end.
"""
from __future__ import annotations

import io
import os
import shutil
import struct
import time
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom import uid
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from tests.dicom_fuzz_worker import Crash, FuzzWorker  # noqa: E402

from spinestream.benchmarks.decode import gdcm_transcode  # noqa: E402
from spinestream.preprocess.dicom import DicomError, read_hu, read_series  # noqa: E402

# ----------------------------------------------------------------------------- budgets

_ENV_EXAMPLES = int(os.environ.get("SPINESTREAM_FUZZ_EXAMPLES", "0") or 0)
_COMMON = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)
settings.register_profile("spinestream-default", max_examples=_ENV_EXAMPLES or 200, derandomize=not _ENV_EXAMPLES,
                          **_COMMON)
settings.register_profile("spinestream-large", max_examples=_ENV_EXAMPLES or 1500, derandomize=False, **_COMMON)
DEFAULT = settings.get_profile("spinestream-default")
LARGE = settings.get_profile("spinestream-large")

# seconds one case may take in the child before it counts as a hang (a normal case takes < 1 s)
CASE_TIMEOUT = float(os.environ.get("SPINESTREAM_FUZZ_TIMEOUT", "30"))

# ----------------------------------------------------------------------------- seed files

# Grayscale images the reader accepts today, one or more per transfer syntax (pydicom's test data).
SEED_NAMES = (
    "CT_small.dcm",  # explicit VR LE, CT, signed 16-bit, intercept -1024, padding value
    "MR_small_implicit.dcm",  # implicit VR LE
    "MR_small_bigendian.dcm",  # explicit VR big endian
    "MR_small_padded.dcm",  # explicit LE with trailing padding
    "image_dfl.dcm",  # deflated explicit VR LE, 8-bit 512x512
    "MR_small_RLE.dcm",  # RLE lossless
    "rtdose_rle_1frame.dcm",  # RLE, 32-bit
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "693_J2KI.dcm",  # JPEG 2000, CT 512x512
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "JPEGLSNearLossless_16.dcm",  # JPEG-LS near-lossless
    "JPGExtended.dcm",  # JPEG extended 12-bit
)


# Multi-frame files (frames become slices in read_series): native LE, big endian, RLE.
MULTIFRAME_NAMES = ("rtdose.dcm", "rtdose_expb.dcm", "rtdose_rle.dcm")


def _seed_paths(extra_dir: Path, names: tuple[str, ...] = SEED_NAMES) -> dict[str, Path]:
    out = {}
    for name in names:
        p = get_testdata_file(name, download=False)  # a name, never a pattern: a pattern may download
        if p is not None:
            out[name] = Path(p)
    ct = out.get("CT_small.dcm")
    if ct is not None and names is SEED_NAMES:
        try:  # JPEG Lossless SV1 (the competition's most common syntax) and JPEG-LS: only GDCM encodes them
            out["CT_small_jpeg_lossless_sv1.dcm"] = _gdcm_convert(ct, extra_dir / "sv1.dcm", "JPEGLosslessProcess14_1")
        except Exception:  # noqa: BLE001 - no GDCM: the other seeds still run
            pass
    return out


def _gdcm_convert(src: Path, dst: Path, ts_name: str) -> Path:
    assert gdcm_transcode(src, dst, ts_name)  # ImportError without GDCM
    return dst


# ----------------------------------------------------------------------------- mutations

# (keyword, VR, absurd values): each value as the text or number the tag would hold; None deletes the tag.
TAG_EDITS: tuple[tuple[str, str, object], ...] = tuple(
    (kw, vr, v)
    for kw, vr, values in (
        ("Rows", "US", (None, 0, 1, 3, 65535)),
        ("Columns", "US", (None, 0, 1, 7, 65535)),
        ("BitsAllocated", "US", (None, 0, 1, 7, 12, 24, 32, 64, 65535)),
        ("BitsStored", "US", (None, 0, 1, 17, 40, 65535)),
        ("HighBit", "US", (None, 0, 99)),
        ("PixelRepresentation", "US", (None, 2, 65535)),
        ("SamplesPerPixel", "US", (None, 0, 2, 3, 65535)),
        ("PlanarConfiguration", "US", (1, 7)),
        ("PhotometricInterpretation", "CS", (None, "", "RGB", "PALETTE COLOR", "YBR_FULL", "MONOCHROME1", "??")),
        ("RescaleSlope", "DS", (None, "", "abc", "nan", "inf", "-inf", "0", "1e308", "-1e39", "1e38", "1\\2")),
        ("RescaleIntercept", "DS", (None, "", "x", "nan", "inf", "1e308", "-3.5e38", "1e39")),
        ("NumberOfFrames", "IS", (None, "", "0", "-1", "2", "7", "1000000", "2147483647", "x", "1.5")),
        ("PixelPaddingValue", "US", (0, 65535)),
        ("PixelPaddingRangeLimit", "US", (0, 65535)),
        ("ImagePositionPatient", "DS", ("nan\\0\\0", "x", "1\\2", "1e400\\0\\0")),
        ("ImageOrientationPatient", "DS", ("0\\0\\0\\0\\0\\0", "1\\0\\0", "nan\\0\\0\\0\\1\\0")),
        ("PixelSpacing", "DS", ("0\\0", "-1\\-1", "x", "1e400\\1")),
    )
    for v in values
)

SYNTAXES = (
    uid.ImplicitVRLittleEndian, uid.ExplicitVRLittleEndian, uid.ExplicitVRBigEndian,
    uid.DeflatedExplicitVRLittleEndian, uid.RLELossless, uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit,
    uid.JPEGLossless, uid.JPEGLosslessSV1, uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.JPEG2000Lossless,
    uid.JPEG2000, "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.3.4.5",  # not a transfer syntax
)


def _is_big_endian(ds) -> bool:
    return ds.file_meta.TransferSyntaxUID == uid.ExplicitVRBigEndian


def _set_tag(ds, keyword: str, vr: str, value) -> None:
    """Give ``keyword`` an absurd ``value`` as raw bytes (pydicom would refuse it as a value), or delete it."""
    tag = Tag(keyword)
    if value is None:
        if tag in ds:
            del ds[tag]
        return
    if vr in ("US", "SS"):
        raw = struct.pack((">" if _is_big_endian(ds) else "<") + "H", int(value))
    else:
        raw = str(value).encode("ascii")
        if len(raw) % 2:
            raw += b" "
    implicit = ds.file_meta.TransferSyntaxUID == uid.ImplicitVRLittleEndian
    ds._dict[tag] = RawDataElement(tag, None if implicit else vr, len(raw), raw, 0, implicit,
                                   not _is_big_endian(ds))


def _meta_end(data: bytes) -> int:
    """Byte offset where the dataset starts (after the preamble, DICM and the group-2 meta)."""
    (length,) = struct.unpack("<I", data[140:144])  # (0002,0000) UL, explicit VR LE
    return 144 + length


def _swap_syntax(data: bytes, syntax: str) -> bytes:
    """The same dataset bytes under file meta that names another transfer syntax (data and header disagree)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.filebase import DicomBytesIO

    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    meta = FileMetaDataset(ds.file_meta)
    meta.TransferSyntaxUID = syntax
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    return data[:132] + buf.getvalue() + data[_meta_end(data):]


def _pixel_start(data: bytes) -> int:
    """Offset of the (last) PixelData tag, or the end of the file when it has none (deflated, truncated)."""
    pos = max(data.rfind(b"\xe0\x7f\x10\x00"), data.rfind(b"\x7f\xe0\x00\x10"))
    return pos if pos > 0 else len(data)


@st.composite
def _dataset_edits(draw):
    """Dataset-level edits: absurd tag values, a deleted tag, a swapped transfer syntax (0-3 of them)."""
    edits = draw(st.lists(st.one_of(st.tuples(st.just("tag"), st.sampled_from(TAG_EDITS)),
                                    st.tuples(st.just("syntax"), st.sampled_from(SYNTAXES))), max_size=3))
    return edits


_FRACTION = st.floats(0.0, 1.0, allow_nan=False)
_BYTE_OPS = st.one_of(
    st.tuples(st.just("truncate"), _FRACTION),
    st.tuples(st.just("flip_header"), st.lists(st.tuples(_FRACTION, st.integers(1, 255)), min_size=1, max_size=6)),
    st.tuples(st.just("flip_pixels"), st.lists(st.tuples(_FRACTION, st.integers(1, 255)), min_size=1, max_size=12)),
    st.tuples(st.just("zero_pixels"), _FRACTION, _FRACTION),
)


@st.composite
def cases(draw, seeds: tuple[str, ...]):
    """A seed file name and the mutations to apply to it (at least one)."""
    seed = draw(st.sampled_from(seeds))
    edits = draw(_dataset_edits())
    ops = draw(st.lists(_BYTE_OPS, min_size=0 if edits else 1, max_size=3))
    return seed, edits, ops


def mutate(data: bytes, edits, ops) -> bytes:
    """Apply dataset edits (through pydicom, raw values) then byte operations, in order."""
    if edits:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
            swap = None
            for kind, what in edits:
                if kind == "tag":
                    _set_tag(ds, *what)
                else:
                    swap = what
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=False)
            data = buf.getvalue()
            if swap is not None:
                data = _swap_syntax(data, swap)
    for op in ops:
        if op[0] == "truncate":
            data = data[: int(op[1] * len(data))]
        elif op[0] in ("flip_header", "flip_pixels"):
            start = _pixel_start(data)
            lo, hi = (128, start) if op[0] == "flip_header" else (start, len(data))
            if hi <= lo:
                continue
            b = bytearray(data)
            for frac, xor in op[1]:
                b[min(hi - 1, lo + int(frac * (hi - lo)))] ^= xor
            data = bytes(b)
        elif op[0] == "zero_pixels":  # a run of zeros inside the pixel data (a lost disk block)
            start = _pixel_start(data)
            a = start + int(op[1] * (len(data) - start))
            n = int(op[2] * 4096)
            data = data[:a] + b"\0" * min(n, len(data) - a) + data[a + n:]
    return data


# ----------------------------------------------------------------------------- the check


def _header_shape(path: Path) -> tuple[int, int] | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return int(ds.Rows), int(ds.Columns)
        except Exception:  # noqa: BLE001 - the reader said OK where pydicom cannot tell: flagged below
            return None


def _keep(path: Path, why: str) -> Path:
    """Copy a failing input where it survives the test run (SPINESTREAM_FUZZ_KEEP, else next to it)."""
    keep = Path(os.environ.get("SPINESTREAM_FUZZ_KEEP", str(path.parent / "failures")))
    keep.mkdir(parents=True, exist_ok=True)
    dst = keep / f"{why}-{path.name}"
    if path.is_dir():
        shutil.copytree(path, dst, dirs_exist_ok=True)
    else:
        shutil.copyfile(path, dst)
    return dst


def check_contract(worker: FuzzWorker, fn: str, path: Path, what: str) -> dict:
    """Run ``fn`` on ``path`` in the child; fail (keeping the input) unless the contract holds."""
    try:
        out = worker.run(fn, path, timeout=CASE_TIMEOUT)
    except Crash as e:
        kept = _keep(path, "crash")
        pytest.fail(f"{fn} crashed or hung on {what}: {e}; input kept at {kept}")
    if out["kind"] == "other":
        kept = _keep(path, "other")
        pytest.fail(f"{fn} raised {out['type']} (not DicomError) on {what}: {out['message']}\n"
                    f"input kept at {kept}\n{out['traceback']}")
    if out["kind"] == "dicom_error":
        assert str(path) in out["message"] and out["path"] == str(path), (what, out)
        return out
    assert out["dtype"] == "float32" and out["finite"], (what, out)
    if fn == "read_hu":
        assert tuple(out["shape"]) == _header_shape(path), (what, out, _header_shape(path))
    else:
        assert len(out["shape"]) == 3 and out["shape"][0] >= 1, (what, out)
    return out


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def seeds(fuzz_dir) -> dict[str, Path]:
    found = _seed_paths(fuzz_dir)
    if len(found) < 4:
        pytest.skip("pydicom's test files are not installed")
    return found


@pytest.fixture(scope="module")
def worker():
    w = FuzzWorker()
    yield w
    w.stop()


class Counter:
    """Outcomes per test, for the figures (printed with -s; RELIABILITY.md quotes the at-scale run). A
    crash, hang or other exception fails the test before ``report``: what it prints are the outcomes of
    cases that kept the contract, and how many reader processes the run needed (1: none died)."""

    def __init__(self, name: str, worker: FuzzWorker):
        self.name, self.worker, self.n, self.kinds, self.bad_files = name, worker, 0, {}, 0
        self.t0 = time.perf_counter()

    def add(self, out: dict) -> None:
        self.n += 1
        self.kinds[out["kind"]] = self.kinds.get(out["kind"], 0) + 1
        self.bad_files += len(out.get("bad_files", []))

    def report(self) -> None:
        print(f"\n[fuzz] {self.name}: {self.n} cases in {time.perf_counter() - self.t0:.0f} s, outcomes "
              f"{dict(sorted(self.kinds.items()))}, bad files listed {self.bad_files}, reader processes started "
              f"{self.worker.started}")


def _write_case(dirpath: Path, seeds: dict[str, Path], case, name: str = "case.dcm") -> Path:
    seed, edits, ops = case
    data = mutate(seeds[seed].read_bytes(), edits, ops)
    path = dirpath / name
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- properties


def _fuzz_read_hu(worker, seeds, fuzz_dir, profile, label):
    names = tuple(sorted(seeds))
    stats = Counter(label, worker)
    case_dir = fuzz_dir / label
    case_dir.mkdir(exist_ok=True)

    @profile
    @given(case=cases(names))
    def prop(case):
        path = _write_case(case_dir, seeds, case)
        stats.add(check_contract(worker, "read_hu", path, f"{case}"))

    prop()
    stats.report()
    return stats


def test_read_hu_fuzzed(worker, seeds, fuzz_dir):
    stats = _fuzz_read_hu(worker, seeds, fuzz_dir, DEFAULT, "read_hu")
    assert stats.n >= 1


def _series_dir(case_dir: Path, seeds: dict[str, Path], case, good: int = 3) -> Path:
    """A study directory: ``good`` CT_small copies at z = 0, -1, ... and one fuzzed file as the last slice."""
    d = case_dir / "study"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ct = pydicom.dcmread(seeds["CT_small.dcm"])
    for k in range(good):
        ct.ImagePositionPatient = [0, 0, -float(k)]
        ct.InstanceNumber = k + 1
        ct.save_as(d / f"{k + 1}.dcm")
    _write_case(d, seeds, case, name=f"{good + 1}.dcm")
    return d


def _fuzz_series(worker, seeds, fuzz_dir, profile, label):
    names = tuple(sorted(seeds))  # CT_small-based ones join the series when they read; others are bad files
    stats = Counter(label, worker)
    case_dir = fuzz_dir / label

    @profile
    @given(case=cases(names))
    def prop(case):
        d = _series_dir(case_dir, seeds, case)
        out = check_contract(worker, "read_series", d, f"{case}")
        stats.add(out)
        # the three good slices always survive; the fuzzed one is kept or listed as a bad file, never lost
        ok = out["kind"] == "ok" and out["shape"][0] >= 3 and out["shape"][0] + len(out["bad_files"]) >= 4
        assert ok, (case, out, f"input kept at {_keep(d, 'lost')}")

    prop()
    stats.report()
    return stats


def test_read_series_fuzzed(worker, seeds, fuzz_dir):
    stats = _fuzz_series(worker, seeds, fuzz_dir, settings(DEFAULT, max_examples=max(10, DEFAULT.max_examples // 3)),
                         "read_series")
    assert stats.n >= 1


@pytest.fixture(scope="module")
def multiframe(fuzz_dir) -> dict[str, Path]:
    found = _seed_paths(fuzz_dir, MULTIFRAME_NAMES)
    if not found:
        pytest.skip("pydicom's multi-frame test files are not installed")
    return found


def _fuzz_multiframe(worker, multiframe, fuzz_dir, profile, label):
    """One fuzzed multi-frame file as the whole study: its frames are slices or bad files, none lost."""
    names = tuple(sorted(multiframe))
    stats = Counter(label, worker)
    case_dir = fuzz_dir / label

    @profile
    @given(case=cases(names))
    def prop(case):
        d = case_dir / "study"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        _write_case(d, multiframe, case, name="1.dcm")
        out = check_contract(worker, "read_series", d, f"{case}")
        stats.add(out)
        if out["kind"] == "ok":  # every frame the header promises is a slice or a bad file
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                frames = int(pydicom.dcmread(d / "1.dcm", stop_before_pixels=True).get("NumberOfFrames", 1) or 1)
            assert out["shape"][0] + len(out["bad_files"]) == frames, (case, out, frames,
                                                                     f"input kept at {_keep(d, 'frames')}")

    prop()
    stats.report()
    return stats


def test_multiframe_fuzzed(worker, multiframe, fuzz_dir):
    stats = _fuzz_multiframe(worker, multiframe, fuzz_dir,
                             settings(DEFAULT, max_examples=max(10, DEFAULT.max_examples // 3)), "multiframe")
    assert stats.n >= 1


@pytest.mark.slow
@pytest.mark.timeout(3600)  # thousands of cases; a hang found costs CASE_TIMEOUT per shrinking step
def test_fuzz_at_scale(worker, seeds, multiframe, fuzz_dir):
    """The run RELIABILITY.md reports: ``pytest -m slow tests/test_fuzz_dicom.py -s`` (the large profile)."""
    a = _fuzz_read_hu(worker, seeds, fuzz_dir, LARGE, "read_hu-large")
    b = _fuzz_series(worker, seeds, fuzz_dir, settings(LARGE, max_examples=max(20, LARGE.max_examples // 5)),
                     "read_series-large")
    c = _fuzz_multiframe(worker, multiframe, fuzz_dir, settings(LARGE, max_examples=max(20, LARGE.max_examples // 5)),
                         "multiframe-large")
    print(f"[fuzz] total: {a.n + b.n + c.n} cases, {worker.started} reader process(es) started (1 = no crash)")


# ----------------------------------------------------------------------------- defects found, kept as fixed cases
#
# Each was found by the fuzzing above (or by the exploratory run behind RELIABILITY.md) and fixed at
# its root in preprocess/dicom.py; each case failed (crash, hang, wrong result) before the fix. The
# ones that crashed or hung the process run in the child, so a regression fails the test instead of
# killing pytest.


def _fixed(seeds_or_path, name: str, edits=(), ops=(), dst: Path | None = None) -> Path:
    src = seeds_or_path if isinstance(seeds_or_path, Path) else Path(seeds_or_path[name])
    data = mutate(src.read_bytes(), list(edits), list(ops))
    assert dst is not None
    dst.write_bytes(data)
    return dst


def _must_refuse(worker: FuzzWorker, fn: str, path: Path, *needles: str, timeout: float = 20.0) -> str:
    """``fn`` on ``path`` raises DicomError naming it (and saying ``needles``), in time, without crashing."""
    try:
        out = worker.run(fn, path, timeout=timeout)
    except Crash as e:
        pytest.fail(f"{fn}({path.name}) crashed or hung: {e}")
    assert out["kind"] == "dicom_error", out
    assert str(path) in out["message"], out
    for needle in needles:
        assert needle in out["message"], (needle, out["message"])
    return out["message"]


def test_defect_rescale_overflowing_float32_is_refused(tmp_path, seeds):
    # 693_J2KI.dcm with RescaleIntercept 1e308: read_hu returned +inf "HU" (float32(1e308) = inf)
    for name, edit in (("693_J2KI.dcm", ("RescaleIntercept", "DS", "1e308")),
                       ("CT_small.dcm", ("RescaleSlope", "DS", "1e38"))):
        path = _fixed(seeds, name, [("tag", edit)], dst=tmp_path / name)
        with pytest.raises(DicomError, match="beyond float32") as e:
            read_hu(path)
        assert e.value.path == str(path)


def test_defect_gdcm_abort_on_jpeg_with_32_bit_pixels(worker, tmp_path, seeds):
    # A 32-bit RLE file relabelled JPEG Lossless SV1, and a JPEG Lossless file claiming 64-bit pixels:
    # GDCM (the first plugin for JPEG) threw a C++ exception through its C API -> SIGABRT, the process died.
    a = _fixed(seeds, "rtdose_rle_1frame.dcm", [("syntax", uid.JPEGLosslessSV1)], dst=tmp_path / "rle_as_jpeg.dcm")
    _must_refuse(worker, "read_hu", a, "BitsAllocated=32")
    b = _fixed(seeds, "MR_small_RLE.dcm", [("tag", ("BitsAllocated", "US", 64)), ("syntax", uid.JPEGLosslessSV1)],
               dst=tmp_path / "jpeg_64bit.dcm")
    _must_refuse(worker, "read_hu", b, "BitsAllocated=64")


def test_defect_gdcm_abort_when_codestream_disagrees_with_header(worker, tmp_path, seeds):
    # JPEG-LS whose header says 65535 rows (the codestream has 50): pylibjpeg failed, then GDCM aborted
    # (gdcmBitmap.cxx:737). J2K with Rows 65535 and a colour PhotometricInterpretation: GDCM aborted on
    # its component count (gdcmJPEG2000Codec.cxx:796).
    a = _fixed(seeds, "JPEGLSNearLossless_16.dcm", [("tag", ("Rows", "US", 65535))], dst=tmp_path / "jls_rows.dcm")
    _must_refuse(worker, "read_hu", a, "codestream is 50 x 10")
    b = _fixed(seeds, "MR_small_jp2klossless.dcm",
               [("tag", ("Rows", "US", 65535)), ("tag", ("PhotometricInterpretation", "CS", "YBR_FULL"))],
               dst=tmp_path / "j2k_ybr.dcm")
    _must_refuse(worker, "read_hu", b, "PhotometricInterpretation")
    c = _fixed(seeds, "MR_small_jp2klossless.dcm", [("tag", ("Rows", "US", 65535))], dst=tmp_path / "j2k_rows.dcm")
    _must_refuse(worker, "read_hu", c, "codestream is 64 x 64")


def _siz_bomb(src: Path, dst: Path, side: int = 59000) -> Path:
    """``src`` (a J2K file) with its codestream's SIZ claiming a ``side`` x ``side`` image."""
    data = bytearray(src.read_bytes())
    at = data.find(b"\xff\x4f\xff\x51")
    assert at > 0
    data[at + 8:at + 16] = side.to_bytes(4, "big") * 2  # Xsiz, Ysiz
    dst.write_bytes(bytes(data))
    return dst


def test_defect_openjpeg_hang_on_j2k_size_bomb(worker, tmp_path, seeds):
    # Flipped bytes in the SIZ segment of 693_J2KI.dcm made the codestream claim ~3.5 gigapixels:
    # OpenJPEG (pylibjpeg and GDCM both) decoded for minutes (the case timed out at 30 s).
    path = _siz_bomb(seeds["693_J2KI.dcm"], tmp_path / "bomb.dcm")
    _must_refuse(worker, "read_hu", path, "codestream is 59000 x 59000")


def test_defect_imagecodecs_segfault_on_a_corrupt_rle_offset(worker, tmp_path, seeds):
    # One flipped byte in rtdose_rle_1frame.dcm's RLE header (segment 2's offset -> 3276884, past the
    # 332-byte frame): imagecodecs.dicomrle_decode, first in main's RLE chain, read out of bounds and
    # died of SIGSEGV in most runs (not all: it reads whatever lies there). Several reads, so a
    # regression fails however the memory falls.
    path = _fixed(seeds, "rtdose_rle_1frame.dcm", ops=[("flip_pixels", [(0.10546875, 50)])], dst=tmp_path / "rle.dcm")
    for _ in range(5):
        _must_refuse(worker, "read_hu", path, "corrupt RLE header")


@pytest.mark.filterwarnings("ignore::spinestream.preprocess.errors.DataWarning")
def test_defect_number_of_frames_that_lies(worker, tmp_path, multiframe, seeds):
    # NumberOfFrames 2147483647 on a 15-frame file: read_series tried every promised frame (a hang).
    big = tmp_path / "big"
    big.mkdir()
    _fixed(multiframe, "rtdose.dcm", [("tag", ("NumberOfFrames", "IS", "2147483647"))], dst=big / "1.dcm")
    _must_refuse(worker, "read_series", big, "NumberOfFrames=2147483647")
    # ... and with a transfer syntax no decoder knows, where the count cannot be checked against the data
    # (a million frames, each "unsupported": the at-scale run's hang after the rebase on main)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    _fixed(seeds, "693_J2KI.dcm", [("tag", ("NumberOfFrames", "IS", "1000000")), ("syntax", "1.2.3.4.5")],
           dst=unknown / "1.dcm")
    _must_refuse(worker, "read_series", unknown, "unsupported transfer syntax 1.2.3.4.5")
    # NumberOfFrames deleted (native) or 1 (RLE) on a 15-frame file: one slice came back, 14 were lost silently.
    for name, edit in (("rtdose.dcm", None), ("rtdose_rle.dcm", "1"), ("rtdose_expb.dcm", "14")):
        d = tmp_path / name
        d.mkdir()
        _fixed(multiframe, name, [("tag", ("NumberOfFrames", "IS", edit))], dst=d / "1.dcm")
        with pytest.raises(DicomError, match="holds 15 frame"):
            read_series(d)
    # the untouched files still read, every frame a slice
    for name in multiframe:
        d = tmp_path / f"ok-{name}"
        d.mkdir()
        shutil.copyfile(multiframe[name], d / "1.dcm")
        vol, meta = read_series(d)
        assert vol.shape == (15, 10, 10) and not meta.bad_files


@pytest.mark.parametrize("edit, needle", [
    (("PixelRepresentation", "US", 2), "PixelRepresentation=2"),
    (("BitsStored", "US", 40), "BitsStored=40"),
    (("BitsAllocated", "US", 12), "BitsAllocated=12"),
    (("PhotometricInterpretation", "CS", "PALETTE COLOR"), "PALETTE COLOR"),
])
def test_absurd_pixel_module_values_are_refused(tmp_path, seeds, edit, needle):
    path = _fixed(seeds, "CT_small.dcm", [("tag", edit)], dst=tmp_path / "ct.dcm")
    with pytest.raises(DicomError, match=needle.replace("(", r"\(")) as e:
        read_hu(path)
    assert e.value.path == str(path)


# ----------------------------------------------------------------------------- the shard job given such files


@pytest.mark.timeout(240)
def test_shard_job_reports_broken_files_and_converts_the_rest(tmp_path):
    """Broken files of every class the fuzzing found, spread over a synthetic dataset (mixed transfer
    syntaxes): ``spinestream shard`` lists each in the manifest's bad_files (study, file, reason), fails
    the study none of whose files reads, converts every other slice, and the result verifies."""
    from spinestream.preprocess.convert import shard_dataset
    from spinestream.preprocess.synth import make_dataset
    from spinestream.shards.shard_config import ShardConfig
    from spinestream.shards.verify import verify

    data = tmp_path / "raw"
    make_dataset(data, studies=5, seed=11, size=32, slices=(12, 14), test_studies=0)
    studies = sorted(p for p in (data / "train_images").iterdir())
    files = {s.name: sorted(s.glob("*.dcm"), key=lambda p: int(p.stem)) for s in studies}
    total = sum(len(v) for v in files.values())

    def syntax(p: Path) -> str:
        return str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)

    breaks = [  # (what, how): each a DicomError for the reader, whatever the file's syntax
        ("truncated in the header", lambda b: b[:300]),
        ("not DICOM", lambda b: os.urandom(len(b))),
        ("RescaleSlope abc", lambda b: mutate(b, [("tag", ("RescaleSlope", "DS", "abc"))], [])),
        ("Rows 65535", lambda b: mutate(b, [("tag", ("Rows", "US", 65535))], [])),
        ("NumberOfFrames lies", lambda b: mutate(b, [("tag", ("NumberOfFrames", "IS", "2147483647"))], [])),
        ("BitsAllocated 64", lambda b: mutate(b, [("tag", ("BitsAllocated", "US", 64))], [])),
    ]
    broken: set[tuple[str, str]] = set()
    victims = studies[:3]
    for k, (what, how) in enumerate(breaks):
        study = victims[k % len(victims)]
        f = files[study.name][2 + k // len(victims)]
        f.write_bytes(how(f.read_bytes()))
        broken.add((study.name, f.name))
    # one more study has a J2K size bomb, if the mix gave it a J2K file, and a lost disk block otherwise
    f = files[studies[3].name][5]
    if syntax(f) in uid.JPEG2000TransferSyntaxes:
        _siz_bomb(f, f)
    else:
        f.write_bytes(f.read_bytes()[:132] + b"\0" * (f.stat().st_size - 132))
    broken.add((studies[3].name, f.name))
    for f in files[studies[4].name]:  # a study with no readable file at all
        f.write_bytes(f.read_bytes()[:200])

    out = tmp_path / "out"
    m = shard_dataset(data, out, ShardConfig(image_size=32, folds=2, shard_max_samples=20), workers=2)

    assert {(b.study, b.file) for b in m.bad_files} == broken
    assert all(b.reason for b in m.bad_files)
    assert [f.study for f in m.failed_studies] == [studies[4].name]
    assert m.counts.slices == total - len(broken) - len(files[studies[4].name])  # every other slice converted
    assert m.counts.bad_files == len(broken)
    verify(out, progress=False)
