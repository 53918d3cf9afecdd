"""DICOM -> HU: transfer syntaxes, rescale, padding, J2K signedness, multi-frame, series order.

Fixtures are pydicom's bundled test files (never downloaded) and CT_small.dcm rewritten
into ``tmp_path`` (other syntaxes, signedness, positions, functional groups).
"""
from __future__ import annotations

import copy
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

import spinestream.preprocess.dicom as dicom
from spinestream.benchmarks.decode import gdcm_transcode
from spinestream.preprocess.dicom import AIR_HU, DicomError, SeriesMeta, read_hu, read_series


def _testfile(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not installed")
    return str(path)


# 128x128 int16 CT: slope 1, intercept -1024, stored 128..2191, PixelPaddingValue -2000.
CT = _testfile("CT_small.dcm")


def _ct() -> Dataset:
    return pydicom.dcmread(CT)


def _hand_hu(ds: Dataset) -> np.ndarray:
    """HU the textbook way, from pydicom's own decode of the same dataset."""
    slope = float(ds.get("RescaleSlope", 1))
    intercept = float(ds.get("RescaleIntercept", 0))
    return ds.pixel_array.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _set_stored(ds: Dataset, stored: np.ndarray, signed: bool) -> Dataset:
    ds.PixelRepresentation = int(signed)
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    return ds


def _gdcm_convert(src: Path, dst: Path, ts_name: str) -> Path:
    """Re-encode with GDCM (the only installed encoder for JPEG Lossless / JPEG-LS)."""
    pytest.importorskip("gdcm")
    assert gdcm_transcode(src, dst, ts_name)
    return dst


# ---------------------------------------------------------------------------------------
# One slice: HU in every transfer syntax
# ---------------------------------------------------------------------------------------


def test_ct_small_hu_by_hand():
    hu = read_hu(CT)
    ds = _ct()
    assert hu.dtype == np.float32 and hu.shape == (128, 128)
    assert float(ds.RescaleIntercept) == -1024  # the test below relies on a real rescale
    np.testing.assert_array_equal(hu, _hand_hu(ds))


def _encode_pydicom(ts: str, **kwargs):
    def encode(src: Path, dst: Path) -> Path:
        ds = pydicom.dcmread(src)
        ds.compress(ts, **kwargs)
        return _save(ds, dst)

    return encode


def _encode_native(ts: str):
    def encode(src: Path, dst: Path) -> Path:
        ds = pydicom.dcmread(src)
        ds.file_meta.TransferSyntaxUID = ts
        ds.save_as(dst, implicit_vr=ts == uid.ImplicitVRLittleEndian, little_endian=True)
        return dst

    return encode


def _encode_gdcm(ts_name: str):
    return lambda src, dst: _gdcm_convert(src, dst, ts_name)


LOSSLESS = {
    "implicit_le": _encode_native(uid.ImplicitVRLittleEndian),
    "deflated": _encode_native(uid.DeflatedExplicitVRLittleEndian),
    "big_endian": _encode_gdcm("ExplicitVRBigEndian"),
    "rle": _encode_pydicom(uid.RLELossless),
    "j2k_lossless": _encode_pydicom(uid.JPEG2000Lossless),
    "j2k_lossless_gdcm": _encode_gdcm("JPEG2000Lossless"),
    "jpeg_lossless_sv1": _encode_gdcm("JPEGLosslessProcess14_1"),
    "jpeg_lossless_457": _encode_gdcm("JPEGLosslessProcess14"),
    "jpeg_ls_lossless": _encode_gdcm("JPEGLSLossless"),
}


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_lossless_syntaxes_give_identical_hu(tmp_path, name):
    dst = LOSSLESS[name](Path(CT), tmp_path / f"{name}.dcm")
    ds = pydicom.dcmread(dst)
    assert ds.file_meta.TransferSyntaxUID != uid.ExplicitVRLittleEndian
    np.testing.assert_array_equal(read_hu(dst), read_hu(CT))


def test_j2k_lossy_close_to_original(tmp_path):
    dst = _encode_pydicom(uid.JPEG2000, j2k_cr=[4])(Path(CT), tmp_path / "lossy.dcm")
    hu = read_hu(dst)
    np.testing.assert_array_equal(hu, _hand_hu(pydicom.dcmread(dst)))
    err = np.abs(hu - read_hu(CT))
    assert 0 < err.max() and err.mean() < 10  # lossy, but HU intact


def test_j2k_pixelrep_mismatch_is_sign_corrected():
    path = _testfile("J2K_pixelrep_mismatch.dcm")
    ds = pydicom.dcmread(path)
    hu = read_hu(path)
    assert hu.shape == (512, 512)
    # Signed 13-bit CT inside an unsigned J2K codestream: uncorrected, -2000 reads 6192.
    raw = pixel_array(ds, apply_j2k_sign_correction=False)
    assert raw.min() >= 0 and raw.max() > 4000
    corrected = pixel_array(ds, apply_j2k_sign_correction=True).astype(np.float32)
    expected = corrected * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(hu, expected)
    assert hu.min() >= -2048 and hu.max() < 3100  # a CT range (-2000 = outside the FOV)
    assert -1100 < np.median(hu) < 100  # air and soft tissue, not 6000s


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_mr_siblings_decode_like_uncompressed(name):
    np.testing.assert_array_equal(read_hu(_testfile(name)), read_hu(_testfile("MR_small.dcm")))


def test_decoder_order_prefers_fastest(monkeypatch):
    from spinestream.preprocess import decoders

    monkeypatch.delenv(decoders.ENV_PIN, raising=False)
    names = [d.name for d in decoders.chain_for(uid.JPEGLosslessSV1)]
    assert names[0] == "imagecodecs.jpeg8" and {"pydicom.gdcm", "pydicom.pylibjpeg"} <= set(names)
    assert decoders.chain_for(uid.RLELossless)[0].name == "imagecodecs.dicomrle"
    assert decoders.chain_for(uid.JPEG2000Lossless)[0].name == "imagecodecs.jpeg2k"
    assert decoders.chain_for(uid.ExplicitVRLittleEndian)[0].name == "numpy.frombuffer"
    # the choice before issue 21, kept for before/after benchmarks
    assert [d.name for d in decoders.chain_for(uid.JPEGLosslessSV1, "legacy")][:2] == ["pydicom.gdcm", "pydicom.pylibjpeg"]
    assert [d.name for d in decoders.chain_for(uid.ExplicitVRLittleEndian, "legacy")] == ["pydicom.native"]


def test_decoder_fallback_and_all_fail(tmp_path, monkeypatch):
    from spinestream.preprocess import decoders

    monkeypatch.delenv(decoders.ENV_PIN, raising=False)
    dst = _encode_gdcm("JPEGLosslessProcess14_1")(Path(CT), tmp_path / "sv1.dcm")
    real, used = decoders.run, []
    chain = [d.name for d in decoders.chain_for(uid.JPEGLosslessSV1)]

    def flaky(d, *args, **kw):
        used.append(d.name)
        if d.name == chain[0]:
            raise RuntimeError("first says no")
        return real(d, *args, **kw)

    monkeypatch.setattr(decoders, "run", flaky)
    np.testing.assert_array_equal(read_hu(dst), read_hu(CT))
    assert used[:2] == chain[:2]

    def broken(d, *args, **kw):
        raise RuntimeError(f"{d.name} broken")

    monkeypatch.setattr(decoders, "run", broken)
    with pytest.raises(DicomError, match=r"sv1\.dcm.*" + r".*".join(n.replace(".", r"\.") for n in chain)):
        read_hu(dst)


# ---------------------------------------------------------------------------------------
# Rescale, padding, odd tags
# ---------------------------------------------------------------------------------------


def test_unsigned_minus_1024_equals_signed_zero_and_slope(tmp_path):
    ds = _ct()
    stored = ds.pixel_array.astype(np.int32)  # 128..2191, intercept -1024
    expected = read_hu(CT)

    unsigned = _set_stored(_ct(), stored, signed=False)
    unsigned.RescaleIntercept = -1024
    signed = _set_stored(_ct(), stored - 1024, signed=True)
    signed.RescaleIntercept = 0
    halved = _set_stored(_ct(), (stored - 1024) * 2, signed=True)  # slope 0.5
    halved.RescaleSlope, halved.RescaleIntercept = 0.5, 0
    bare = _set_stored(_ct(), stored - 1024, signed=True)  # no rescale tags at all
    del bare.RescaleSlope, bare.RescaleIntercept
    for name, d in {"u": unsigned, "s": signed, "h": halved, "b": bare}.items():
        np.testing.assert_array_equal(read_hu(_save(d, tmp_path / f"{name}.dcm")), expected)


def test_padding_value_becomes_air(tmp_path):
    stored = _ct().pixel_array.astype(np.int32) - 1024  # signed, intercept 0
    stored[:10, :] = -2000  # padded rows
    stored[-5:, :] = -3000  # outside-FOV values that are NOT the padding value
    ds = _set_stored(_ct(), stored, signed=True)
    ds.RescaleIntercept = 0
    ds.PixelPaddingValue = -2000
    hu = read_hu(_save(ds, tmp_path / "pad.dcm"))
    assert (hu[:10] == AIR_HU).all()
    assert (hu[-5:] == -3000).all()  # left alone; windowing clips them
    np.testing.assert_array_equal(hu[10:-5], stored[10:-5])

    # Without the tag, -2000 stays -2000.
    del ds.PixelPaddingValue
    assert (read_hu(_save(ds, tmp_path / "nopad.dcm"))[:10] == -2000).all()


def test_padding_range_limit_and_unsigned(tmp_path):
    stored = _ct().pixel_array.astype(np.int32)  # unsigned, intercept -1024
    stored[:4, :] = 0
    stored[4:8, :] = 3
    stored[8:12, :] = 5  # just outside the range
    ds = _set_stored(_ct(), stored, signed=False)
    ds.PixelPaddingValue = 0
    ds.add_new("PixelPaddingRangeLimit", "US", 4)  # ambiguous VR: name it
    hu = read_hu(_save(ds, tmp_path / "range.dcm"))
    assert (hu[:8] == AIR_HU).all()
    assert (hu[8:12] == 5 - 1024).all()


def test_padding_value_read_with_wrong_signedness(tmp_path):
    # PixelPaddingValue is US or SS by PixelRepresentation; files in the wild carry
    # -2000 as US 63536 in a signed image. It must still match the -2000 pixels.
    stored = _ct().pixel_array.astype(np.int32) - 1024
    stored[:3] = -2000
    ds = _set_stored(_ct(), stored, signed=True)
    ds.RescaleIntercept = 0
    ds.add_new("PixelPaddingValue", "US", 63536)
    hu = read_hu(_save(ds, tmp_path / "us.dcm"))
    assert (hu[:3] == AIR_HU).all() and (hu[3:] == stored[3:]).all()


def test_padding_outside_bits_stored_does_not_alias_bone(tmp_path):
    # Unsigned 12-bit image whose padding (63536 = 0xF830) lives in the unused high bits.
    # Dropping the high bits maps it to 2096 -- a real bone value that must stay bone.
    stored = _ct().pixel_array.astype(np.int64)
    stored[:3] = 63536
    stored[3:6] = 2096
    ds = _set_stored(_ct(), stored, signed=False)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.add_new("PixelPaddingValue", "US", 63536)
    hu = read_hu(_save(ds, tmp_path / "hi.dcm"))
    assert (hu[:3] == AIR_HU).all()
    assert (hu[3:6] == 2096 - 1024).all()
    np.testing.assert_array_equal(hu[6:], read_hu(CT)[6:])

    # Conformant signed 12-bit data: -2000 in range, matched after sign extension.
    stored = _ct().pixel_array.astype(np.int32) - 1024
    stored[:3] = -2000
    ds = _set_stored(_ct(), stored, signed=True)
    ds.BitsStored, ds.HighBit, ds.RescaleIntercept = 12, 11, 0
    ds.PixelPaddingValue = -2000
    hu = read_hu(_save(ds, tmp_path / "s12.dcm"))
    assert (hu[:3] == AIR_HU).all() and (hu[3:] == stored[3:]).all()


def test_unused_high_bits_are_ignored(tmp_path):
    # PS3.5: bits above BitsStored carry no meaning. Unsigned 12-bit with junk above bit 11,
    # and signed 12-bit written without sign extension (-2000 as 0x0830).
    stored = _ct().pixel_array.astype(np.int64)
    junk = stored.copy()
    junk[:5] |= 0xF000
    ds = _set_stored(_ct(), junk, signed=False)
    ds.BitsStored, ds.HighBit = 12, 11
    np.testing.assert_array_equal(read_hu(_save(ds, tmp_path / "u12.dcm")), read_hu(CT))

    raw = stored - 1024
    raw[:5] = 0x0830
    ds = _set_stored(_ct(), raw, signed=True)
    ds.BitsStored, ds.HighBit, ds.RescaleIntercept = 12, 11, 0
    del ds.PixelPaddingValue  # CT_small pads with -2000; here -2000 must stay -2000
    hu = read_hu(_save(ds, tmp_path / "s12.dcm"))
    assert (hu[:5] == -2000).all() and (hu[5:] == raw[5:]).all()


def test_multivalued_and_odd_tags_do_not_break(tmp_path):
    ds = _ct()
    ds.WindowCenter = [40, 400]
    ds.WindowWidth = [400, 1800]
    ds.add_new("WindowCenterWidthExplanation", "LO", ["SOFT", "BONE"])
    hu = read_hu(_save(ds, tmp_path / "wc.dcm"))
    np.testing.assert_array_equal(hu, read_hu(CT))

    ds.RescaleIntercept = [-1024, -1000]  # non-conformant VM 2: first value is used
    np.testing.assert_array_equal(read_hu(_save(ds, tmp_path / "ri.dcm")), read_hu(CT))


def test_malformed_rescale_is_an_error_not_a_default(tmp_path):
    # pydicom keeps a non-numeric DS as a string with only a warning; defaulting the
    # intercept to 0 would shift every HU by 1024.
    data = Path(CT).read_bytes()
    i = data.index(b"DS\x06\x00-1024 ") + 4  # the RescaleIntercept value
    (tmp_path / "bad_ri.dcm").write_bytes(data[:i] + b"abcdef" + data[i + 6 :])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own "invalid DS" warning
        with pytest.raises(DicomError, match="bad_ri.dcm.*RescaleIntercept.*abcdef"):
            read_hu(tmp_path / "bad_ri.dcm")
        # In a series it is one bad file, not a crash.
        study = tmp_path / "s"
        _series(study, [3.0, 2.0])
        (study / "3.dcm").write_bytes((tmp_path / "bad_ri.dcm").read_bytes())
        _, meta = read_series(study)
    assert [n for n, _ in meta.bad_files] == ["3.dcm"] and list(meta.slice_numbers) == [1, 2]


def test_monochrome1_is_not_inverted(tmp_path):
    ds = _ct()
    ds.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_array_equal(read_hu(_save(ds, tmp_path / "m1.dcm")), read_hu(CT))


# ---------------------------------------------------------------------------------------
# Unreadable files
# ---------------------------------------------------------------------------------------


def _corrupt_files(tmp_path: Path) -> dict[str, Path]:
    data = Path(CT).read_bytes()
    files = {
        "random.dcm": os.urandom(4000),
        "empty.dcm": b"",
        "half.dcm": data[: len(data) // 2],
        "header_only.dcm": data[:1000],
        "preamble_then_junk.dcm": b"\0" * 128 + b"DICM" + os.urandom(3000),
    }
    out = {}
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
        out[name] = tmp_path / name
    no_pixels = _ct()
    del no_pixels.PixelData
    out["no_pixels.dcm"] = _save(no_pixels, tmp_path / "no_pixels.dcm")
    return out


def test_unreadable_files_raise_dicom_error_naming_the_file(tmp_path):
    for name, path in _corrupt_files(tmp_path).items():
        with pytest.raises(DicomError) as info:
            read_hu(path)
        assert name in str(info.value) and info.value.reason, name
        assert isinstance(info.value, ValueError)
    with pytest.raises(DicomError, match="half.dcm.*(bytes|decode)"):
        read_hu(tmp_path / "half.dcm")
    with pytest.raises(DicomError, match="no_pixels.dcm.*PixelData"):
        read_hu(tmp_path / "no_pixels.dcm")
    with pytest.raises(DicomError, match="random.dcm.*not a DICOM"):
        read_hu(tmp_path / "random.dcm")
    with pytest.raises(DicomError, match="MR_truncated.dcm"):
        read_hu(_testfile("MR_truncated.dcm"))
    with pytest.raises(DicomError, match="missing.dcm.*cannot read"):
        read_hu(tmp_path / "missing.dcm")
    err = pickle.loads(pickle.dumps(DicomError(tmp_path / "x.dcm", "why")))  # from workers
    x = tmp_path / "x.dcm"
    assert (err.path, err.reason, str(err)) == (str(x), "why", f"{x}: why")
    # Colour (here: big-endian RGB ultrasound) is not CT.
    with pytest.raises(DicomError, match="ExplVR_BigEnd.dcm.*SamplesPerPixel=3"):
        read_hu(_testfile("ExplVR_BigEnd.dcm"))


# ---------------------------------------------------------------------------------------
# Enhanced multi-frame CT
# ---------------------------------------------------------------------------------------


def _item(**attrs) -> Dataset:
    d = Dataset()
    for k, v in attrs.items():
        setattr(d, k, v)
    return d


def _enhanced(path: Path, zs: list[float], per_frame_intercept: dict[int, float]) -> np.ndarray:
    """CT_small's pixels as an Enhanced CT with len(zs) frames; returns stored (F, R, C)."""
    ds = _ct()
    stored = np.stack([ds.pixel_array.astype(np.int16) + 10 * k for k in range(len(zs))])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = uid.EnhancedCTImageStorage
    ds.NumberOfFrames = len(zs)
    ds.PixelData = stored.tobytes()
    for kw in ("RescaleSlope", "RescaleIntercept", "ImagePositionPatient",
               "ImageOrientationPatient", "PixelSpacing", "SliceThickness"):
        delattr(ds, kw)
    ds.SharedFunctionalGroupsSequence = [
        _item(
            PixelValueTransformationSequence=[
                _item(RescaleSlope=1, RescaleIntercept=-1024, RescaleType="HU")
            ],
            PixelMeasuresSequence=[_item(PixelSpacing=[0.5, 0.625], SliceThickness=1.0)],
            PlaneOrientationSequence=[_item(ImageOrientationPatient=[1, 0, 0, 0, -1, 0])],
        )
    ]
    frames = []
    for k, z in enumerate(zs):
        f = _item(PlanePositionSequence=[_item(ImagePositionPatient=[-10.0, 20.0, z])])
        if k in per_frame_intercept:
            f.PixelValueTransformationSequence = [
                _item(RescaleSlope=1, RescaleIntercept=per_frame_intercept[k], RescaleType="HU")
            ]
        frames.append(f)
    ds.PerFrameFunctionalGroupsSequence = frames
    _save(ds, path)
    return stored


@pytest.mark.parametrize("syntax", [uid.ExplicitVRLittleEndian, uid.RLELossless])
def test_enhanced_multiframe_series(tmp_path, syntax):
    study = tmp_path / "study"
    study.mkdir()
    zs = [10.0, 30.0, 20.0, 0.0]
    stored = _enhanced(study / "1.dcm", zs, per_frame_intercept={1: -1000})
    if syntax != uid.ExplicitVRLittleEndian:  # encapsulated: one fragment per frame
        ds = pydicom.dcmread(study / "1.dcm")
        ds.compress(syntax)
        _save(ds, study / "1.dcm")
    vol, meta = read_series(study)
    assert meta.transfer_syntaxes == [syntax]

    order = [1, 2, 0, 3]  # frames by z descending
    intercepts = np.array([-1024, -1000, -1024, -1024], np.float32)
    expected = stored[order].astype(np.float32) + intercepts[order][:, None, None]
    np.testing.assert_array_equal(vol, expected)
    np.testing.assert_array_equal(meta.z, [30.0, 20.0, 10.0, 0.0])
    np.testing.assert_array_equal(meta.slice_numbers, [2, 3, 1, 4])
    assert meta.spacing == (10.0, 0.5, 0.625)
    assert meta.direction == (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
    assert meta.bad_files == [] and meta.shape == (128, 128)

    with pytest.raises(DicomError, match="1.dcm.*4 frames.*read_series"):
        read_hu(study / "1.dcm")


def test_enhanced_single_frame_read_hu(tmp_path):
    stored = _enhanced(tmp_path / "one.dcm", [5.0], per_frame_intercept={})
    expected = stored[0].astype(np.float32) - 1024  # shared-group intercept
    np.testing.assert_array_equal(read_hu(tmp_path / "one.dcm"), expected)


# ---------------------------------------------------------------------------------------
# Series: order, metadata, bad files
# ---------------------------------------------------------------------------------------


def _series(directory: Path, zs: list[float | None], **per_slice) -> np.ndarray:
    """Files 1.dcm..N.dcm from CT_small, file i at z = zs[i-1]; pixel offset 10*i marks
    each slice. Returns the expected HU per file number (index 0 = 1.dcm)."""
    directory.mkdir(exist_ok=True)
    base = _ct()
    stored = base.pixel_array.astype(np.int16)
    hus = []
    for i, z in enumerate(zs, start=1):
        ds = copy.deepcopy(base)
        ds.PixelData = (stored + 10 * i).tobytes()
        ds.InstanceNumber = i
        if z is None:
            del ds.ImagePositionPatient
        else:
            ds.ImagePositionPatient = [-158.1, -179.0, z]
        for kw, fn in per_slice.items():
            fn(ds, i)
        _save(ds, directory / f"{i}.dcm")
        hus.append((stored + 10 * i).astype(np.float32) - 1024)
    return np.stack(hus)


N = 12  # > 10, so a lexical listing (1, 10, 11, 12, 2, ...) would show


@pytest.mark.parametrize("reversed_", [False, True])
def test_series_order_and_meta(tmp_path, reversed_):
    zs = [100.0 - 2.5 * i for i in range(N)]  # file 1 at the head
    if reversed_:
        zs = zs[::-1]  # file 1 at the feet
    hus = _series(tmp_path / "s", zs)
    vol, meta = read_series(tmp_path / "s")

    numbers = np.arange(1, N + 1)[::-1] if reversed_ else np.arange(1, N + 1)
    assert isinstance(meta, SeriesMeta)
    assert vol.shape == (N, 128, 128) and vol.dtype == np.float32
    np.testing.assert_array_equal(meta.slice_numbers, numbers)
    np.testing.assert_array_equal(vol, hus[numbers - 1])
    assert meta.z.dtype == np.float64 and (np.diff(meta.z) < 0).all()
    assert meta.z[0] == 100.0
    assert meta.z_reversed is reversed_
    ps = [float(v) for v in _ct().PixelSpacing]
    assert meta.spacing == pytest.approx((2.5, ps[0], ps[1]))
    assert meta.direction == tuple(float(v) for v in _ct().ImageOrientationPatient)
    assert meta.transfer_syntaxes == [uid.ExplicitVRLittleEndian]
    assert meta.bad_files == [] and meta.shape == (128, 128)


def test_series_sorts_by_z_not_file_number_with_stable_ties(tmp_path):
    zs = [5.0, 20.0, 10.0, 10.0, 15.0]
    hus = _series(tmp_path / "s", zs)
    vol, meta = read_series(tmp_path / "s")
    np.testing.assert_array_equal(meta.slice_numbers, [2, 5, 3, 4, 1])  # 3, 4 tie: file order
    np.testing.assert_array_equal(meta.z, [20, 15, 10, 10, 5])
    np.testing.assert_array_equal(vol, hus[[1, 4, 2, 3, 0]])
    assert meta.spacing[0] == 5.0  # median of |diff| = (5, 5, 0, 5)


def test_series_bad_files_are_reported_and_skipped(tmp_path):
    study = tmp_path / "s"
    zs = [float(50 - 2 * i) for i in range(8)]
    hus = _series(study, zs)
    (study / "3.dcm").write_bytes(os.urandom(2000))  # corrupt
    small = _ct()  # 64x64: minority shape
    small.PixelData = small.pixel_array[:64, :64].tobytes()
    small.Rows = small.Columns = 64
    small.ImagePositionPatient = [0, 0, 41.0]
    _save(small, study / "5.dcm")
    nopos = _ct()  # no position while the others have one
    del nopos.ImagePositionPatient
    _save(nopos, study / "7.dcm")
    (study / "notes.txt").write_text("not a slice")  # ignored: not .dcm

    vol, meta = read_series(study)
    bad = dict(meta.bad_files)
    assert set(bad) == {"3.dcm", "5.dcm", "7.dcm"}
    assert "not a DICOM" in bad["3.dcm"]
    assert "(64, 64)" in bad["5.dcm"] and "(128, 128)" in bad["5.dcm"]
    assert "ImagePositionPatient" in bad["7.dcm"]
    keep = [1, 2, 4, 6, 8]
    np.testing.assert_array_equal(meta.slice_numbers, keep)
    np.testing.assert_array_equal(vol, hus[np.array(keep) - 1])


def test_series_reads_each_file_once_and_applies_slice_fn(tmp_path, monkeypatch):
    zs = [float(i) for i in range(6)]  # reversed study
    hus = _series(tmp_path / "s", zs)
    reads: list[str] = []
    real = dicom._read_file
    monkeypatch.setattr(dicom, "_read_file", lambda p: reads.append(p.name) or real(p))

    def window(hu: np.ndarray) -> np.ndarray:  # (128, 128) float32 -> (64, 64) uint8
        lo, hi = 400 - 900, 400 + 900
        return (np.clip((hu[::2, ::2] - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)

    vol, meta = read_series(tmp_path / "s", slice_fn=window)
    assert sorted(reads) == sorted(f"{i}.dcm" for i in range(1, 7))
    assert vol.shape == (6, 64, 64) and vol.dtype == np.uint8
    np.testing.assert_array_equal(vol, np.stack([window(h) for h in hus[::-1]]))
    assert meta.z_reversed and meta.shape == (128, 128)


def test_series_without_positions_falls_back_with_warning(tmp_path):
    def against_files(ds: Dataset, i: int) -> None:  # InstanceNumber, not file number, decides
        ds.InstanceNumber = 5 - i

    hus = _series(tmp_path / "a", [None] * 4, inst=against_files)
    with pytest.warns(UserWarning, match="InstanceNumber"):
        vol, meta = read_series(tmp_path / "a")
    np.testing.assert_array_equal(meta.slice_numbers, [4, 3, 2, 1])
    np.testing.assert_array_equal(vol, hus[::-1])
    assert np.isnan(meta.z).all()
    assert meta.spacing[0] == float(_ct().SliceThickness)

    _series(tmp_path / "b", [None] * N, inst=lambda ds, i: delattr(ds, "InstanceNumber"))
    with pytest.warns(UserWarning, match="file number"):
        _, meta = read_series(tmp_path / "b")
    np.testing.assert_array_equal(meta.slice_numbers, np.arange(1, N + 1))  # numeric, not lexical


def test_series_single_slice_and_mixed_syntaxes(tmp_path):
    study = tmp_path / "s"
    hus = _series(study, [7.0])
    vol, meta = read_series(study)
    assert vol.shape == (1, 128, 128) and meta.spacing[0] == float(_ct().SliceThickness)
    assert meta.z_reversed is False

    _series(study, [7.0, 5.0])
    ds = pydicom.dcmread(study / "2.dcm")
    ds.compress(uid.RLELossless)
    _save(ds, study / "2.dcm")
    vol, meta = read_series(study)
    assert meta.transfer_syntaxes == sorted([uid.ExplicitVRLittleEndian, uid.RLELossless])
    np.testing.assert_array_equal(vol[0], hus[0])


def test_listing_is_numeric(tmp_path):
    for name in ["10.dcm", "2.dcm", "1.dcm", "notes.txt", "9.DCM"]:
        (tmp_path / name).write_bytes(b"")
    assert [(p.name, n) for p, n in dicom._listing(tmp_path)] == [
        ("1.dcm", 1), ("2.dcm", 2), ("9.DCM", 9), ("10.dcm", 10)
    ]
    (tmp_path / "scout.dcm").write_bytes(b"")  # a non-number: positions instead
    assert [n for _, n in dicom._listing(tmp_path)] == [1, 2, 3, 4, 5]
    assert dicom._listing(tmp_path)[-1][0].name == "scout.dcm"


def test_series_nothing_readable(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomError, match="empty.*no .dcm"):
        read_series(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "1.dcm").write_bytes(b"junk")
    with pytest.raises(DicomError, match=r"bad.*no readable slice.*1\.dcm"):
        read_series(bad)
    with pytest.raises(DicomError, match="not a directory"):
        read_series(tmp_path / "nope")


# ---------------------------------------------------------------------------------------
# Orientation: the slice normal orders the series (issue 8)
# ---------------------------------------------------------------------------------------


def _oriented_series(directory: Path, orientation: list[float], step: float, order: list[int]) -> np.ndarray:
    """Slices k = 0..n-1 at origin + k*step*normal, written as file ``order[k]``.dcm; returns the
    HU of slice k (k = 0 is the most positive along the signed normal, i.e. volume index 0)."""
    directory.mkdir(exist_ok=True)
    base = _ct()
    stored = base.pixel_array.astype(np.int16)
    normal = np.cross(orientation[:3], orientation[3:])
    normal = normal * np.sign(normal[np.argmax(np.abs(normal))])  # largest component positive
    origin = np.array([-100.0, -120.0, 40.0])
    hus = []
    n = len(order)
    for k, number in enumerate(order):
        ds = copy.deepcopy(base)
        ds.PixelData = (stored + 10 * k).tobytes()
        ds.InstanceNumber = number
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + (n - 1 - k) * step * normal]
        _save(ds, directory / f"{number}.dcm")
        hus.append((stored + 10 * k).astype(np.float32) - 1024)
    return np.stack(hus)


def test_tilted_series_is_ordered_and_spaced_along_its_normal(tmp_path):
    t = np.deg2rad(25.0)
    orientation = [1, 0, 0, 0, float(np.cos(t)), float(-np.sin(t))]  # gantry tilt about x
    order = [3, 1, 6, 2, 5, 4]
    hus = _oriented_series(tmp_path / "s", orientation, 1.25, order)
    vol, meta = read_series(tmp_path / "s")
    np.testing.assert_array_equal(meta.slice_numbers, order)
    np.testing.assert_array_equal(vol, hus)
    assert meta.spacing[0] == pytest.approx(1.25, abs=1e-3)  # raw z steps are 1.25 * cos(25°) = 1.13
    assert meta.normal == pytest.approx((0.0, np.sin(t), np.cos(t)), abs=1e-5)
    assert meta.direction == pytest.approx(orientation, abs=1e-6)
    assert (np.diff(meta.z) < 0).all()


def test_sagittal_series_is_ordered_along_x_not_scrambled(tmp_path):
    orientation = [0, 1, 0, 0, 0, -1]  # rows run posterior, columns down: normal = -x, signed +x
    order = [4, 2, 7, 1, 6, 3, 5]  # file numbers unrelated to position; every raw z is equal
    hus = _oriented_series(tmp_path / "s", orientation, 0.8, order)
    vol, meta = read_series(tmp_path / "s")
    np.testing.assert_array_equal(meta.slice_numbers, order)
    np.testing.assert_array_equal(vol, hus)
    assert meta.spacing[0] == pytest.approx(0.8, abs=1e-3)
    assert meta.normal == pytest.approx((1.0, 0.0, 0.0))
    assert meta.origin[0] == pytest.approx(-100.0 + 6 * 0.8, abs=1e-3)  # volume index 0: largest x


def test_stray_series_and_orientation_files_are_bad_files(tmp_path):
    study = tmp_path / "s"
    zs = [float(50 - 2 * i) for i in range(6)]
    hus = _series(study, zs)
    stray = pydicom.dcmread(study / "2.dcm")
    stray.SeriesInstanceUID = "1.2.3.999"  # a localizer of another series in the same directory
    _save(stray, study / "2.dcm")
    tilted = pydicom.dcmread(study / "5.dcm")
    tilted.ImageOrientationPatient = [1, 0, 0, 0, 0.9, -0.43589]
    _save(tilted, study / "5.dcm")
    vol, meta = read_series(study)
    bad = dict(meta.bad_files)
    assert set(bad) == {"2.dcm", "5.dcm"}
    assert "SeriesInstanceUID" in bad["2.dcm"] and "1.2.3.999" in bad["2.dcm"]
    assert "ImageOrientationPatient" in bad["5.dcm"]
    np.testing.assert_array_equal(meta.slice_numbers, [1, 3, 4, 6])
    np.testing.assert_array_equal(vol, hus[[0, 2, 3, 5]])


def test_ragged_slice_is_resized_on_request(tmp_path):
    study = tmp_path / "s"
    _series(study, [float(50 - 2 * i) for i in range(4)])
    small = pydicom.dcmread(study / "3.dcm")
    small.PixelData = small.pixel_array[::2, ::2].tobytes()
    small.Rows = small.Columns = 64
    _save(small, study / "3.dcm")
    with pytest.warns(dicom.DataWarning, match=r"resized 1 slice.*3\.dcm"):
        vol, meta = read_series(study, ragged="resize")
    assert vol.shape == (4, 128, 128) and meta.bad_files == []
    _, meta = read_series(study)  # the default still reports it
    assert [n for n, _ in meta.bad_files] == ["3.dcm"]


# ---------------------------------------------------------------------------------------
# Decoders that fail with a BaseException (issue 8)
# ---------------------------------------------------------------------------------------


class _Panic(BaseException):
    """Stands in for pyo3's PanicException: a BaseException, not an Exception."""


def test_decoder_base_exception_becomes_dicom_error(tmp_path, monkeypatch):
    study = tmp_path / "s"
    _series(study, [float(10 - i) for i in range(4)])
    from spinestream.preprocess import decoders

    real = decoders.run

    def panics_on_two(d, ds, *args, **kw):
        if int(ds.InstanceNumber) == 2:
            raise _Panic("index out of bounds")
        return real(d, ds, *args, **kw)

    monkeypatch.setattr(decoders, "run", panics_on_two)
    with pytest.raises(DicomError, match=r"2\.dcm.*_Panic"):
        read_hu(study / "2.dcm")
    vol, meta = read_series(study)
    assert [n for n, _ in meta.bad_files] == ["2.dcm"] and "_Panic" in meta.bad_files[0][1]
    assert vol.shape[0] == 3

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(decoders, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):  # never swallowed
        read_hu(study / "1.dcm")


def _malformed_rle(src: Path, dst: Path) -> Path:
    """An RLE Lossless file whose frame header says 0 segments with a second offset of 65:
    pylibjpeg-rle 2.x panics on it (index out of bounds) instead of raising."""
    import struct

    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(src)
    ds.compress(uid.RLELossless)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    header = list(struct.unpack("<16I", frame[:64]))
    header[0], header[2] = 0, 65
    ds.PixelData = encapsulate([struct.pack("<16I", *header) + frame[64:]])
    return _save(ds, dst)


def test_real_malformed_rle_frame_is_a_dicom_error(tmp_path, monkeypatch):
    pytest.importorskip("rle")
    study = tmp_path / "s"
    _series(study, [float(10 - i) for i in range(3)])
    bad = _malformed_rle(study / "2.dcm", study / "2.dcm")
    # only pylibjpeg, which panics on this frame; since the fuzzing (tests/test_fuzz_dicom.py) the frame's
    # segment table is checked first, so no decoder sees it (the panic path: test_decoder_base_exception_becomes_dicom_error)
    monkeypatch.setenv("SPINESTREAM_DICOM_DECODER", "pylibjpeg")
    with pytest.raises(DicomError, match=r"2\.dcm.*corrupt RLE header \(0 segment"):
        read_hu(bad)
    _, meta = read_series(study)
    assert [n for n, _ in meta.bad_files] == ["2.dcm"]
