"""The DICOM decoders' correctness gate (issue 21) and the decoder chain's behaviour.

Every decoder of every chain (``preprocess.decoders.chain_for``) must give, pixel for pixel and
dtype for dtype, what pydicom's ``pixel_array`` gives with the reader's options, and for lossless
syntaxes the original stored values, on real CT (pydicom's CT_small.dcm; pydicom-data's
693_UNCR.dcm -- signed, 14 bits stored -- and eCT_Supplemental.dcm -- unsigned 16-bit, two
frames) re-encoded in each syntax by more than one encoder where there is one (imagecodecs,
GDCM, pydicom/pylibjpeg): signed 12/14/16-bit data at precision == BitsStored and at 16,
unsigned data, an odd size (511x509), multi-frame. A decoder that returns wrong pixels fails the
gate; one that returns None, a non-integer dtype or a wrong shape is rejected at run time and
the next decoder is used.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array

import spinestream.preprocess.dicom as dicom
from spinestream.benchmarks.decode import gdcm_transcode
from spinestream import InputError
from spinestream.preprocess import decoders
from spinestream.preprocess.decoders import Decoder
from spinestream.preprocess.dicom import DicomError, read_hu, read_series

imagecodecs = pytest.importorskip("imagecodecs")


def _testfile(name: str) -> str | None:
    return get_testdata_file(name, download=False)  # None when pydicom-data is not installed


@pytest.fixture(autouse=True)
def _no_pin(monkeypatch):
    monkeypatch.delenv(decoders.ENV_PIN, raising=False)
    monkeypatch.delenv(decoders.ENV_THREADS, raising=False)


# ---------------------------------------------------------------------------------------
# Fixtures: real CT re-encoded
# ---------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    path: Path
    tsyntax: str
    source: np.ndarray | None  # (frames, rows, cols) stored values for lossless cases, else None

    def __repr__(self) -> str:
        return self.name


@dataclass
class Source:
    name: str
    stored: np.ndarray  # (frames, rows, cols) int16/uint16 stored values
    bits_stored: int
    template: Dataset

    @property
    def signed(self) -> bool:
        return self.stored.dtype.kind == "i"


def _dataset(src: Source) -> Dataset:
    """``src`` as an explicit VR little endian dataset built on its real CT header."""
    ds = copy.deepcopy(src.template)
    for tag in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        if tag in ds:
            del ds[tag]
    frames, rows, cols = src.stored.shape
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8 * src.stored.dtype.itemsize, src.bits_stored, src.bits_stored - 1
    ds.PixelRepresentation = int(src.signed)
    if frames > 1:
        ds.NumberOfFrames = frames
    elif "NumberOfFrames" in ds:
        del ds.NumberOfFrames
    ds.PixelData = np.ascontiguousarray(src.stored).tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def _bits(stored: np.ndarray, precision: int) -> np.ndarray:
    """Stored values as the unsigned ``precision``-bit samples a JPEG/JPEG-LS encoder is given
    (two's complement in ``precision`` bits for signed data)."""
    return (stored.astype(np.int64) & ((1 << precision) - 1)).astype(np.uint8 if precision <= 8 else np.uint16)


def _encapsulated(src: Source, ts: str, encode) -> Dataset:
    ds = _dataset(src)
    ds.PixelData = encapsulate([encode(f) for f in src.stored], has_bot=src.stored.shape[0] > 1)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = ts
    return ds


def _gdcm(src_path: Path, dst: Path, ts_name: str) -> Path | None:
    try:
        ok = gdcm_transcode(src_path, dst, ts_name)
    except ImportError:
        return None
    assert ok, (src_path, ts_name)
    return dst


def _sources() -> list[Source]:
    ct_small = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    out = [Source("ct_small_s16", ct_small.pixel_array[None].astype(np.int16), 16, ct_small)]
    p693 = _testfile("693_UNCR.dcm")
    if p693 is not None:  # pydicom-data: a real 512x512 CT slice, signed, 14 bits stored
        ds = pydicom.dcmread(p693)
        a = ds.pixel_array.astype(np.int16)  # -2000 (outside the FOV) .. 2492
        out += [
            Source("ct693_s14", a[None], 14, ds),
            Source("ct693_s12_odd", np.clip(a[:511, :509], -2048, 2047)[None], 12, ds),
            Source("ct693_s16", a[128:384, 128:384][None], 16, ds),
            Source("ct693_u12", np.clip(a[:256, 256:] + 2000, 0, 4095).astype(np.uint16)[None], 12, ds),
            Source("ct693_s14_3frames", np.stack([a[:128, :128], a[200:328, 200:328], a[384:, 384:]]), 14, ds),
            # 8 bits allocated: a bone window of the same slice, as some exports store it
            Source("ct693_u8", (np.clip(a[256:, :256] + 200, 0, 2000) * 255 // 2000).astype(np.uint8)[None], 8, ds),
        ]
    pect = _testfile("eCT_Supplemental.dcm")
    if pect is not None:  # enhanced CT, unsigned 16-bit, 2 frames
        ds = pydicom.dcmread(pect)
        out.append(Source("ect_u16_2frames", ds.pixel_array[:, ::2, ::2].astype(np.uint16), 16, ds))
    return out


def _build(tmp: Path) -> list[Case]:
    cases: list[Case] = []

    def add(name: str, ds_or_path, ts: str, source: np.ndarray | None) -> None:
        if ds_or_path is None:
            return
        path = tmp / f"{name}.dcm"
        if isinstance(ds_or_path, Dataset):
            ds_or_path.save_as(path, enforce_file_format=True)
        else:
            path = Path(ds_or_path)
        assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == ts, name
        cases.append(Case(name, path, ts, source))

    for src in _sources():
        n, bs, s = src.name, src.bits_stored, src.stored
        plain = tmp / f"{n}.dcm"
        _dataset(src).save_as(plain, enforce_file_format=True)
        add(f"{n}-explicit", plain, uid.ExplicitVRLittleEndian, s)
        for ts, tag in ((uid.ImplicitVRLittleEndian, "implicit"), (uid.DeflatedExplicitVRLittleEndian, "deflated")):
            ds = _dataset(src)
            ds.file_meta.TransferSyntaxUID = ts
            ds.save_as(tmp / f"{n}-{tag}.dcm", implicit_vr=ts == uid.ImplicitVRLittleEndian, little_endian=True)
            add(f"{n}-{tag}", tmp / f"{n}-{tag}.dcm", ts, s)
        # JPEG Lossless SV1: libjpeg-turbo at precision == BitsStored and at 16; GDCM
        for p in sorted({bs, 8 * s.dtype.itemsize}):
            add(f"{n}-sv1-jpeg8-p{p}", _encapsulated(src, uid.JPEGLosslessSV1, lambda f, p=p: imagecodecs.jpeg8_encode(
                _bits(f, p), lossless=True, predictor=1, bitspersample=p)), uid.JPEGLosslessSV1, s)
        add(f"{n}-sv1-gdcm", _gdcm(plain, tmp / f"{n}-sv1-gdcm.dcm", "JPEGLosslessProcess14_1"), uid.JPEGLosslessSV1, s)
        # JPEG Lossless 4.57 (any predictor): liblj92 (predictor 6), libjpeg-turbo predictor 7, GDCM
        add(f"{n}-457-ljpeg-p{bs}", _encapsulated(src, uid.JPEGLossless, lambda f: imagecodecs.ljpeg_encode(
            _bits(f, bs), bitspersample=bs)), uid.JPEGLossless, s)
        top = 8 * s.dtype.itemsize
        add(f"{n}-457-jpeg8-p{top}", _encapsulated(src, uid.JPEGLossless, lambda f: imagecodecs.jpeg8_encode(
            _bits(f, top), lossless=True, predictor=7, bitspersample=top)), uid.JPEGLossless, s)
        add(f"{n}-457-gdcm", _gdcm(plain, tmp / f"{n}-457-gdcm.dcm", "JPEGLosslessProcess14"), uid.JPEGLossless, s)
        # JPEG-LS lossless: CharLS via imagecodecs (writes precision 16), GDCM (precision BitsStored)
        add(f"{n}-jls-charls-p{top}", _encapsulated(src, uid.JPEGLSLossless, lambda f: imagecodecs.jpegls_encode(
            _bits(f, top))), uid.JPEGLSLossless, s)
        add(f"{n}-jls-gdcm", _gdcm(plain, tmp / f"{n}-jls-gdcm.dcm", "JPEGLSLossless"), uid.JPEGLSLossless, s)
        # JPEG 2000 lossless: pylibjpeg-openjpeg (pydicom), GDCM, imagecodecs signed at 16 bits, and
        # unsigned at BitsStored for signed data (the codestream/PixelRepresentation mismatch)
        ds = _dataset(src)
        ds.compress(uid.JPEG2000Lossless, encoding_plugin="pylibjpeg")
        add(f"{n}-j2k-pylibjpeg", ds, uid.JPEG2000Lossless, s)
        add(f"{n}-j2k-gdcm", _gdcm(plain, tmp / f"{n}-j2k-gdcm.dcm", "JPEG2000Lossless"), uid.JPEG2000Lossless, s)
        add(f"{n}-j2k-openjpeg", _encapsulated(src, uid.JPEG2000Lossless, lambda f: imagecodecs.jpeg2k_encode(
            f, level=0, reversible=True, codecformat="J2K", numthreads=1)), uid.JPEG2000Lossless, s)
        if src.signed:
            add(f"{n}-j2k-unsigned-p{bs}", _encapsulated(src, uid.JPEG2000Lossless, lambda f: imagecodecs.jpeg2k_encode(
                _bits(f, bs), level=0, reversible=True, codecformat="J2K", bitspersample=bs, numthreads=1)),
                uid.JPEG2000Lossless, s)
        # HTJ2K lossless (OpenJPH), both RPCL and plain UIDs
        for ts in (uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL):
            add(f"{n}-htj2k-{ts.split('.')[-1]}", _encapsulated(src, ts, lambda f: imagecodecs.htj2k_encode(
                f, reversible=True)), ts, s)
        # RLE: pydicom's encoder, pylibjpeg-rle's, GDCM's
        for plugin in ("pydicom", "pylibjpeg", "gdcm"):
            ds = _dataset(src)
            try:
                ds.compress(uid.RLELossless, encoding_plugin=plugin)
            except (RuntimeError, ValueError):
                continue  # plugin not installed
            add(f"{n}-rle-{plugin}", ds, uid.RLELossless, s)

    # lossy syntaxes: every decoder must equal the reference decode (there is no source to match)
    lossy = next((s for s in _sources() if s.name == "ct693_s14"), _sources()[0])
    ds = _dataset(lossy)
    ds.compress(uid.JPEG2000, j2k_cr=[10], encoding_plugin="pylibjpeg")
    add("lossy-j2k", ds, uid.JPEG2000, None)
    add("lossy-jls-near2", _encapsulated(lossy, uid.JPEGLSNearLossless, lambda f: imagecodecs.jpegls_encode(
        _bits(f, 16), level=2)), uid.JPEGLSNearLossless, None)
    add("lossy-htj2k", _encapsulated(lossy, uid.HTJ2K, lambda f: imagecodecs.htj2k_encode(
        f, level=90, reversible=False)), uid.HTJ2K, None)

    # real compressed files as they were written by other software
    for name, ts in (("693_J2KR.dcm", uid.JPEG2000Lossless), ("J2K_pixelrep_mismatch.dcm", uid.JPEG2000Lossless),
                     ("JPEG-LL.dcm", uid.JPEGLosslessSV1), ("emri_small_RLE.dcm", uid.RLELossless),
                     ("emri_small_jpeg_ls_lossless.dcm", uid.JPEGLSLossless),
                     ("MR_small_jp2klossless.dcm", uid.JPEG2000Lossless), ("MR_small_RLE.dcm", uid.RLELossless),
                     ("MR_small_jpeg_ls_lossless.dcm", uid.JPEGLSLossless)):
        path = _testfile(name)
        if path is not None:
            add(f"file-{name}", path, ts, None)
    return cases


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> list[Case]:
    return _build(tmp_path_factory.mktemp("gate"))


# ---------------------------------------------------------------------------------------
# The gate
# ---------------------------------------------------------------------------------------

_REFERENCE = ("pylibjpeg", "gdcm", "pydicom", "")  # pydicom's plugins, for the reference decode


def _reference_plugin(ts: str) -> str:
    plugins = decoders._pydicom_plugins(ts)
    return next(p for p in _REFERENCE if p in plugins)


def gate(case: Case, *chain: Decoder) -> list[str]:
    """Where each decoder of ``chain`` differs from the reference decode (and from the source
    values) on ``case``; [] when all equal it."""
    ds = pydicom.dcmread(case.path)
    info = decoders.frame_info(ds)
    ref_plugin = _reference_plugin(case.tsyntax)
    problems = []
    # correct_unused_bits only matters where BitsStored < BitsAllocated
    corrections = (True, False) if info.bits_stored < info.bits_allocated else (True,)
    for k in range(info.n_frames):
        for correct in corrections:
            opts = dict(dicom._DECODE_OPTIONS, correct_unused_bits=correct)
            ref = pixel_array(ds, index=k, decoding_plugin=ref_plugin, **opts)
            for decoder in chain:
                where = f"{case.name} frame {k} correct_unused_bits={correct}: {decoder.name}"
                try:
                    out = decoders.run(decoder, ds, info, k, opts)
                except Exception as e:  # noqa: BLE001 -- a decoder of the chain must decode every valid file
                    problems.append(f"{where} raised {type(e).__name__}: {e}")
                    continue
                if out.dtype.newbyteorder("=") != ref.dtype.newbyteorder("=") or out.shape != ref.shape:
                    problems.append(f"{where} gave {out.dtype}{out.shape}, reference {ref.dtype}{ref.shape}")
                elif not np.array_equal(*_comparable(out, ref, info, correct, case, ds, k)):
                    bad = np.flatnonzero(out.ravel() != ref.ravel())
                    i = bad[0]
                    problems.append(f"{where}: {bad.size} pixels differ from {ref_plugin or 'numpy'} "
                                    f"(e.g. {out.ravel()[i]} vs {ref.ravel()[i]})")
                if correct and case.source is not None and not np.array_equal(out, case.source[k]):
                    problems.append(f"{where}: differs from the original stored values")
    return problems


def _comparable(out, ref, info, correct, case, ds, k):
    """``(out, ref)`` as the gate compares them. Raw values (``correct_unused_bits=False``) of a
    JPEG Lossless frame whose precision equals BitsStored have no bits above BitsStored in the
    codestream: pylibjpeg and libjpeg-turbo zero-extend them, GDCM sign-extends them; only the
    BitsStored low bits are compared there (the reader drops the rest before using them)."""
    if correct or info.bits_stored >= info.bits_allocated or case.tsyntax not in (uid.JPEGLossless, uid.JPEGLosslessSV1):
        return out, ref
    if decoders._jpeg_precision(decoders.frame_bytes(ds, info, k)) != info.bits_stored:
        return out, ref
    return decoders._shift(out.copy(), info.bits_stored), decoders._shift(ref.copy(), info.bits_stored)


GATED = (
    uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
    uid.JPEGLosslessSV1, uid.JPEGLossless, uid.JPEGLSLossless, uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless, uid.JPEG2000, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K, uid.RLELossless,
)


@pytest.mark.parametrize("ts", GATED, ids=lambda t: uid.UID(t).keyword or t)
def test_every_decoder_equals_the_reference_on_real_ct(cases, ts):
    mine = [c for c in cases if c.tsyntax == ts]
    assert mine, f"no gate fixture for {uid.UID(ts).name}"
    chain = decoders.chain_for(ts)
    assert chain, f"nothing installed decodes {uid.UID(ts).name}"
    problems = [p for c in mine for p in gate(c, *chain)]
    assert not problems, "\n".join(problems[:20])
    # every decoder of the chain checked against original stored values on signed and unsigned
    # data, where the syntax is lossless
    if any(c.source is not None for c in mine):
        kinds = {c.source.dtype.kind for c in mine if c.source is not None}
        assert kinds >= {"i", "u"} or _testfile("693_UNCR.dcm") is None, kinds


def test_gate_fixtures_cover_precisions_sizes_and_frames(cases):
    if _testfile("693_UNCR.dcm") is None:
        pytest.skip("pydicom-data not installed")
    names = {c.name for c in cases}
    for must in ("ct693_s14-sv1-jpeg8-p14", "ct693_s14-sv1-jpeg8-p16", "ct693_s12_odd-sv1-jpeg8-p12",
                 "ct693_s16-sv1-jpeg8-p16", "ct693_s14-jls-charls-p16", "ct693_s14_3frames-htj2k-201",
                 "ct693_u12-rle-pydicom", "ect_u16_2frames-j2k-openjpeg", "ct693_s14-j2k-unsigned-p14"):
        assert must in names
    odd = next(c for c in cases if c.name == "ct693_s12_odd-explicit")
    assert odd.source.shape == (1, 511, 509) and odd.source.min() == -2000
    # the trap: -2000 at 14-bit precision is 14384 as the codec stores it
    s14 = next(c for c in cases if c.name == "ct693_s14-sv1-jpeg8-p14")
    ds = pydicom.dcmread(s14.path)
    raw = imagecodecs.jpeg8_decode(decoders.frame_bytes(ds, decoders.frame_info(ds), 0))
    assert raw.dtype == np.uint16 and 14384 in raw and -2000 in s14.source


@pytest.mark.filterwarnings("ignore::spinestream.preprocess.errors.DataWarning")  # multi-frame: no positions
def test_read_hu_equals_the_legacy_decoders_on_every_fixture(cases, monkeypatch):
    """End to end: HU (and multi-frame volumes) through the new chains equal those through the
    decoder choice before issue 21, on every fixture."""
    for c in cases:
        ds = pydicom.dcmread(c.path, stop_before_pixels=True)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            study = c.path.parent / f"study-{c.name}"
            study.mkdir(exist_ok=True)
            (study / "1.dcm").write_bytes(c.path.read_bytes())
            new, _ = read_series(study)
            with decoders.pinned("legacy"):
                old, _ = read_series(study)
        else:
            new = read_hu(c.path)
            with decoders.pinned("legacy"):
                old = read_hu(c.path)
        np.testing.assert_array_equal(new, old, err_msg=c.name)


# ---------------------------------------------------------------------------------------
# Wrong decoders are caught: by the gate (wrong pixels) or at run time (fall back)
# ---------------------------------------------------------------------------------------


def _case(cases, name: str) -> Case:
    c = next((c for c in cases if c.name == name), None)
    if c is None:
        pytest.skip(f"fixture {name} not built here")
    return c


def test_gate_fails_a_decoder_that_returns_wrong_pixels(cases):
    c = _case(cases, "ct_small_s16-sv1-jpeg8-p16")
    good = decoders.IC_JPEG8
    assert gate(c, good) == []
    swapped = Decoder("broken.byteswap", "imagecodecs",
                      codec=lambda data, info: imagecodecs.jpeg8_decode(data).byteswap())
    assert any("pixels differ" in p for p in gate(c, swapped))
    # dicomsdl's trap: signed data at precision == BitsStored handed back zero-extended
    # (-2000 read as 14384), i.e. no sign extension after decoding
    c14 = _case(cases, "ct693_s14-sv1-jpeg8-p14")
    zero_extended = Decoder("broken.no-sign", "pydicom", plugin="pylibjpeg")

    def run_without_sign(d, ds, info, index, options):
        return decoders.run(decoders.PD_PYLIBJPEG, ds, info, index, dict(options, correct_unused_bits=False))

    real_run = decoders.run
    try:
        decoders.run = lambda d, *a, **k: run_without_sign(d, *a, **k) if d is zero_extended else real_run(d, *a, **k)
        problems = gate(c14, zero_extended)
    finally:
        decoders.run = real_run
    assert any("14384" in p or "differs from the original" in p for p in problems), problems


@pytest.mark.parametrize("bad_output", [
    None,
    "not an array",
    np.zeros((128, 128), np.float32),  # float: not stored values
    np.zeros((128, 128), np.int32),  # wider than the int16 container
    np.zeros((128, 127), np.int16),  # wrong shape
    np.zeros((128, 128, 3), np.uint16),  # colour for a grayscale frame
], ids=["none", "str", "float32", "int32", "shape", "rgb"])
def test_a_decoder_returning_garbage_is_rejected_and_the_next_one_used(cases, monkeypatch, bad_output):
    c = _case(cases, "ct_small_s16-sv1-jpeg8-p16")
    calls = []
    bad = Decoder("nvimgcodec-like", "imagecodecs", codec=lambda data, info: calls.append(1) or bad_output)
    chain = decoders.chain_for(uid.JPEGLosslessSV1)
    monkeypatch.setitem(decoders.CHAINS, uid.JPEGLosslessSV1, (bad,) + chain)
    decoders._chain.cache_clear()
    try:
        ds = pydicom.dcmread(c.path)
        arr, used = decoders.decode(ds, 0, dict(dicom._DECODE_OPTIONS, correct_unused_bits=True))
        assert calls and used is chain[0]
        np.testing.assert_array_equal(arr, c.source[0])
        np.testing.assert_array_equal(read_hu(c.path), read_hu(_case(cases, "ct_small_s16-explicit").path))
        # the only decoder: the file is a DicomError naming it and the decoder's reason
        monkeypatch.setitem(decoders.CHAINS, uid.JPEGLosslessSV1, (bad,))
        decoders._chain.cache_clear()
        with pytest.raises(DicomError, match=r"ct_small_s16-sv1-jpeg8-p16\.dcm.*nvimgcodec-like: ValueError: returned"):
            read_hu(c.path)
    finally:
        decoders._chain.cache_clear()


def test_pydicom_plugin_output_is_checked_too(cases, monkeypatch):
    c = _case(cases, "ct_small_s16-rle-pydicom")
    ds = pydicom.dcmread(c.path)
    monkeypatch.setattr(decoders, "pixel_array", lambda *a, **k: None)
    with pytest.raises(ValueError, match="None"):
        decoders.run(decoders.PD_RLE, ds, decoders.frame_info(ds), 0, dict(dicom._DECODE_OPTIONS))


# ---------------------------------------------------------------------------------------
# Pinning and threads
# ---------------------------------------------------------------------------------------


def _record_runs(monkeypatch) -> list[str]:
    used: list[str] = []
    real = decoders.run

    def spy(d, *a, **k):
        used.append(d.name)
        return real(d, *a, **k)

    monkeypatch.setattr(decoders, "run", spy)
    return used


def test_pin_selects_the_backend(cases, monkeypatch):
    c = _case(cases, "ct_small_s16-sv1-gdcm")
    expected = read_hu(c.path)
    used = _record_runs(monkeypatch)
    for pin, first in (("gdcm", "pydicom.gdcm"), ("pylibjpeg", "pydicom.pylibjpeg"), ("imagecodecs", "imagecodecs.jpeg8"),
                       ("legacy", "pydicom.gdcm"), ("auto", "imagecodecs.jpeg8"), ("pylibjpeg,gdcm", "pydicom.pylibjpeg")):
        used.clear()
        monkeypatch.setenv(decoders.ENV_PIN, pin)
        np.testing.assert_array_equal(read_hu(c.path), expected)
        assert used == [first], pin
    # a codec pin still reads uncompressed files; legacy reads them through pydicom
    plain = _case(cases, "ct_small_s16-explicit")
    for pin, first in (("gdcm", "numpy.frombuffer"), ("legacy", "pydicom.native"), ("pydicom", "pydicom.native")):
        used.clear()
        monkeypatch.setenv(decoders.ENV_PIN, pin)
        read_hu(plain.path)
        assert used == [first], pin


def test_pin_errors(cases, monkeypatch):
    c = _case(cases, "ct_small_s16-sv1-gdcm")
    monkeypatch.setenv(decoders.ENV_PIN, "nvjpeg")
    with pytest.raises(InputError, match="SPINESTREAM_DICOM_DECODER.*nvjpeg"):
        read_hu(c.path)
    monkeypatch.setenv(decoders.ENV_PIN, "pillow")  # Pillow has no JPEG Lossless decoder
    with pytest.raises(DicomError, match=r"sv1-gdcm\.dcm.*no installed decoder.*SPINESTREAM_DICOM_DECODER=pillow"):
        read_hu(c.path)


def test_jpeg2000_decodes_on_one_thread_unless_asked(cases, monkeypatch):
    c = _case(cases, "ct_small_s16-j2k-openjpeg")
    seen = []
    real = imagecodecs.jpeg2k_decode
    monkeypatch.setattr(imagecodecs, "jpeg2k_decode", lambda data, **kw: seen.append(kw.get("numthreads")) or real(data, **kw))
    expected = read_hu(c.path)
    monkeypatch.setenv(decoders.ENV_THREADS, "2")
    np.testing.assert_array_equal(read_hu(c.path), expected)
    assert seen == [1, 2]


def test_frame_info_and_jpeg_precision(cases):
    c = _case(cases, "ct_small_s16-jls-gdcm")
    ds = pydicom.dcmread(c.path)
    info = decoders.frame_info(ds)
    assert (info.rows, info.cols, info.bits_stored, info.signed, info.dtype) == (128, 128, 16, True, np.dtype("int16"))
    assert decoders._jpeg_precision(decoders.frame_bytes(ds, info, 0)) == 16
    assert decoders._jpeg_precision(b"not a jpeg") is None


# ---------------------------------------------------------------------------------------
# The light parse gives dcmread's dataset, or None
# ---------------------------------------------------------------------------------------

from spinestream.preprocess import lightparse  # noqa: E402

_PYDICOM_FILES = sorted(p.name for p in Path(pydicom.data.__file__).parent.joinpath("test_files").glob("*.dcm"))


def _same_as_dcmread(ds: Dataset, ref: Dataset, name: str) -> None:
    assert str(ds.file_meta.TransferSyntaxUID) == str(ref.file_meta.TransferSyntaxUID)
    assert list(ds.file_meta.keys()) == list(ref.file_meta.keys())
    for tag in ref.keys():
        if tag not in ds:  # only sequences are left out
            assert ref[tag].VR == "SQ", (name, tag)
            continue
        mine, theirs = ds[tag], ref[tag]
        assert mine.VR == theirs.VR and mine.value == theirs.value, (name, theirs)
    assert set(ds.keys()) <= set(ref.keys())


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", _PYDICOM_FILES)
def test_light_parse_equals_dcmread_or_declines(name):
    path = get_testdata_file(name, download=False)
    ds = lightparse.parse(Path(path).read_bytes())
    try:
        ref = pydicom.dcmread(path)
    except Exception:  # noqa: BLE001 -- a file dcmread refuses must not be read by the light parse
        assert ds is None
        return
    if ds is None:  # declining is always safe: dcmread reads it
        assert name not in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm",
                            "MR_small_jpeg_ls_lossless.dcm", "J2K_pixelrep_mismatch.dcm")
        return
    assert str(ref.file_meta.TransferSyntaxUID) in lightparse._SYNTAXES
    _same_as_dcmread(ds, ref, name)
    try:
        expected = pixel_array(ref, index=0)
    except Exception:  # noqa: BLE001 -- pydicom cannot decode it either (JPGExtended 12-bit, ...)
        return
    np.testing.assert_array_equal(pixel_array(ds, index=0), expected)


def test_light_parse_declines_what_it_does_not_handle(cases):
    by = {c.name: c for c in cases}
    for name in ("ct_small_s16-implicit", "ct_small_s16-deflated"):
        assert lightparse.parse(by[name].path.read_bytes()) is None, name
    assert lightparse.parse(by["ct_small_s16-explicit"].path.read_bytes()) is not None
    assert lightparse.parse(by["ct_small_s16-rle-pydicom"].path.read_bytes()) is not None
    assert lightparse.parse(b"") is None and lightparse.parse(b"\0" * 200) is None
    ect = _testfile("eCT_Supplemental.dcm")
    if ect is not None:  # functional groups: dcmread reads the sequences
        assert lightparse.parse(Path(ect).read_bytes()) is None


def test_light_parse_never_raises_on_damaged_files(cases):
    """Truncations and flipped bytes: a Dataset or None, never an exception (dcmread then decides)."""
    rng = np.random.default_rng(21)
    for name in ("ct_small_s16-explicit", "ct_small_s16-rle-pydicom", "ct_small_s16-j2k-gdcm"):
        c = next((c for c in cases if c.name == name), None)
        if c is None:
            continue
        data = c.path.read_bytes()
        header_end = data.find(b"\xe0\x7f\x10\x00") + 16
        for cut in list(range(128, header_end, 7)) + [len(data) - 1, len(data) - 100]:
            out = lightparse.parse(data[:cut])
            assert out is None or isinstance(out, Dataset)
        for _ in range(300):
            b = bytearray(data)
            for i in rng.integers(132, header_end, 3):
                b[i] = int(rng.integers(0, 256))
            out = lightparse.parse(bytes(b))
            assert out is None or isinstance(out, Dataset)


def test_legacy_pin_reads_with_dcmread(cases, monkeypatch):
    c = _case(cases, "ct_small_s16-explicit")
    calls = []
    real = lightparse.parse
    monkeypatch.setattr(lightparse, "parse", lambda data: calls.append(1) or real(data))
    read_hu(c.path)
    assert calls == [1]
    monkeypatch.setenv(decoders.ENV_PIN, "legacy")
    read_hu(c.path)
    assert calls == [1]


# The values the reader reads raw (decoders.get) are pydicom's, and a plain slice never builds pydicom's dataset
_READER_KEYWORDS = (
    "Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation",
    "PhotometricInterpretation", "NumberOfFrames", "PixelPaddingValue", "PixelPaddingRangeLimit", "RescaleSlope",
    "RescaleIntercept", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
    "InstanceNumber", "SeriesInstanceUID",
)


def _plain(value):
    """pydicom's value in comparable form: a MultiValue as a list, DSfloat/IS as float/int."""
    from pydicom.multival import MultiValue

    if isinstance(value, (MultiValue, list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, str):  # a UID is a str
        return str(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, int):
        return int(value)
    return value


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", _PYDICOM_FILES)
def test_raw_reads_of_a_light_dataset_equal_pydicoms_values(name):
    from pydicom.datadict import tag_for_keyword

    path = get_testdata_file(name, download=False)
    data = Path(path).read_bytes()
    if lightparse.parse(data) is None:
        return
    ref = pydicom.dcmread(path)
    for keyword in _READER_KEYWORDS:
        ds = lightparse.parse(data)
        try:
            expected = _plain(ref.get(keyword))
        except Exception as e:  # noqa: BLE001 -- pydicom cannot convert it: neither may the raw read
            with pytest.raises(type(e)):
                decoders.get(ds, tag_for_keyword(keyword), keyword)
            continue
        got = decoders.get(ds, tag_for_keyword(keyword), keyword)
        assert _plain(got) == expected and type(_plain(got)) is type(expected), (name, keyword, got, expected)
    ds = lightparse.parse(data)
    assert decoders.transfer_syntax(ds) == str(ref.file_meta.TransferSyntaxUID)
    assert decoders.frame_info(ds) == decoders.frame_info(ref), name
    assert bytes(decoders.pixel_bytes(ds)) == bytes(ref.PixelData)


def test_a_plain_slice_is_read_without_building_pydicoms_dataset(cases, monkeypatch, tmp_path):
    """The point of the light parse: read_hu and read_series of explicit VR and compressed slices never
    build pydicom's dataset (its ~80 RawDataElements and file meta: 60% of the parse); values equal the
    built dataset's (the legacy path's HU)."""
    built = []
    real = lightparse._materialize
    monkeypatch.setattr(lightparse, "_materialize", lambda ds, light: built.append(1) or real(ds, light))
    n = 0
    for name in ("ct_small_s16-explicit", "ct_small_s16-rle-pydicom", "ct_small_s16-j2k-openjpeg",
                 "ct_small_s16-sv1-jpeg8-p16", "ct_small_s16-jls-gdcm"):
        c = next((c for c in cases if c.name == name), None)
        if c is None:
            continue
        hu = read_hu(c.path)
        series = tmp_path / name
        series.mkdir()
        (series / "1.dcm").write_bytes(c.path.read_bytes())
        vol, meta = read_series(series)
        assert built == [], name
        with decoders.pinned("legacy"):
            np.testing.assert_array_equal(read_hu(c.path), hu)
            legacy_vol, legacy_meta = read_series(series)
            np.testing.assert_array_equal(legacy_vol, vol)
            assert legacy_meta == meta
        n += 1
    assert n >= 4
    ds = lightparse.parse(_case(cases, "ct_small_s16-explicit").path.read_bytes())
    assert ds.Rows == 128 and built == [1]  # any pydicom access builds it, and it is then a Dataset
    assert "_light" not in ds.__dict__ and ds.file_meta.TransferSyntaxUID == uid.ExplicitVRLittleEndian


_RAW_VRS = ("DS", "IS", "US", "SS", "CS", "UI")


def test_simple_raw_values_equal_pydicoms_conversion():
    """decoders.simple_value gives pydicom's value for every raw value it does not leave to pydicom
    (random and hand-picked values of each VR the reader reads raw)."""
    import warnings

    from pydicom.dataelem import RawDataElement, convert_raw_data_element
    from pydicom.tag import BaseTag

    rng = np.random.default_rng(21)
    alphabet = list(b"0123456789.+-eE \\\x00") + [ord("a"), 0xC3]
    values = [b"", b" ", b"  ", b"1", b"-0", b"1.5 ", b" 1.5", b"1.", b".5", b"+.5", b"1e3", b"1E-3", b"1\\2\\3",
              b"1\\", b"\\1", b"1.5\x00", b"\x00", b"nan", b"inf", b"1_0", b"12 ", b"1.2.840.10008.1.2.1\x00",
              b"MONOCHROME2 ", b"\x00\x08", b"\xff\xff", b"\x01\x02\x03\x04", b"1e999", b"-1e400", b"1\\1e999",
              b"999999999999", b"9999999999999999", b"99999999999999999999", b"-99999999999"]
    values += [bytes(rng.choice(alphabet, size=int(rng.integers(1, 12)))) for _ in range(3000)]
    values += [bytes(rng.choice(list(b"0123456789"), size=int(rng.integers(10, 24)))) for _ in range(300)]
    simple = 0
    for vr in _RAW_VRS:
        for v in values:
            got = decoders.simple_value(vr, v)
            if got is decoders.NOT_SIMPLE:
                continue
            raw = RawDataElement(BaseTag(0x00281053), vr, len(v), v, 0, False, True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = _plain(convert_raw_data_element(raw).value)
            assert _plain(got) == expected and type(_plain(got)) is type(expected), (vr, v, got, expected)
            simple += 1
    assert simple > 1000  # the common values are read raw


def test_single_frame_extraction_equals_pydicom(cases):
    from pydicom.encaps import get_frame

    n = 0
    for c in cases:
        ds = pydicom.dcmread(c.path)
        info = decoders.frame_info(ds)
        if c.tsyntax in decoders._NATIVE_LE or info.n_frames != 1:
            continue
        assert decoders.frame_bytes(ds, info, 0) == get_frame(ds.PixelData, 0, number_of_frames=1), c.name
        n += 1
    assert n > 20
    # several fragments for one frame are joined, as pydicom does
    item = b"\xfe\xff\x00\xe0"
    two = item + bytes(4) + item + b"\x04\x00\x00\x00abcd" + item + b"\x04\x00\x00\x00efgh"
    assert decoders._single_frame(two) == b"abcdefgh"
    assert decoders._single_frame(encapsulate([b"abcdefgh"])) == b"abcdefgh"
    with pytest.raises(ValueError):
        decoders._single_frame(b"\x00" * 16)
