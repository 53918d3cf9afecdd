"""Hostile archives and paths (issue 20): nothing the project reads may make it write, read or loop
outside what it was given.

* **Tars.** The project reads tars in one place, :func:`spinestream.shards.wds.scan_tar` (``verify``,
  ``iter_samples``), and by ``.idx`` offset (:class:`~spinestream.shards.wds.RecordReader`, both
  loaders); nothing is ever extracted. Members with ``..`` or absolute paths, symlinks, hardlinks,
  devices, FIFOs, directories, pax and GNU long-name headers, sparse members, huge declared sizes and
  negative (base-256) sizes are refused with a ShardError naming the shard and the byte; ``verify``
  lists the shard; an ``.idx`` naming another path or pointing outside its tar is refused.
* **Manifests.** Shard paths, index paths and table paths must stay inside the shard directory, and
  shard names must be plain (the loaders write ``<name>.pos.idx`` under a run directory).
* **Study UIDs.** ``train.csv`` names directories with its StudyInstanceUIDs (``train_images/<uid>``,
  ``volumes.zarr/<uid>``, ``_work/studies/<uid>``): a UID with ``/`` or ``..`` is refused before the job
  writes anything. ``spinestream predict`` takes UIDs only from directory names and never builds a path
  from the sample submission's, whose hostile rows are predicted the training prevalence like any
  missing study.
"""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spinestream.preprocess.errors import LabelError
from spinestream.shards.manifest import ManifestError, read_manifest
from spinestream.shards.verify import VerifyError, verify
from spinestream.shards.wds import (ShardError, ShardWriter, _header, index_records, iter_samples, scan_tar)

# ----------------------------------------------------------------------------- tar members


def _tar(path: Path, *members: tarfile.TarInfo, fmt=tarfile.USTAR_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as tf:
        for ti in members:
            tf.addfile(ti, io.BytesIO(b"x" * ti.size) if ti.isreg() else None)
    return path


def _member(name: str, kind=tarfile.REGTYPE, size: int = 0, **kw) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size = kind, size
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def _with_size(size_field: bytes, name: str = "000000001.jpg") -> bytes:
    """One USTAR header with a raw 12-byte size field (checksum fixed), then end-of-archive blocks."""
    h = bytearray(_header(name, 0))
    h[124:136] = size_field
    h[148:156] = b" " * 8
    h[148:156] = f"{sum(h):06o}".encode() + b"\0 "
    return bytes(h) + b"\0" * 1536


HOSTILE = {
    "dotdot": (lambda p: _tar(p, _member("../../000000001.jpg", size=1)), "unexpected member name"),
    "absolute": (lambda p: _tar(p, _member("/tmp/000000001.jpg", size=1)), "unexpected member name"),
    "nested": (lambda p: _tar(p, _member("wds/000000001.jpg", size=1)), "unexpected member name"),
    "symlink": (lambda p: _tar(p, _member("000000001.jpg", tarfile.SYMTYPE, linkname="/etc/passwd")),
                "not a regular file"),
    "hardlink": (lambda p: _tar(p, _member("000000001.jpg", tarfile.LNKTYPE, linkname="/etc/passwd")),
                 "not a regular file"),
    "char_device": (lambda p: _tar(p, _member("000000001.jpg", tarfile.CHRTYPE, devmajor=1, devminor=3)),
                    "not a regular file"),
    "block_device": (lambda p: _tar(p, _member("000000001.jpg", tarfile.BLKTYPE, devmajor=8, devminor=0)),
                     "not a regular file"),
    "fifo": (lambda p: _tar(p, _member("000000001.jpg", tarfile.FIFOTYPE)), "not a regular file"),
    "directory": (lambda p: _tar(p, _member("000000001.jpg", tarfile.DIRTYPE)), "not a regular file"),
    "pax_header": (lambda p: _tar(p, _member("000000001.jpg", size=1, pax_headers={"path": "../../evil"}),
                                  fmt=tarfile.PAX_FORMAT), "not a regular file"),
    "gnu_longname": (lambda p: _tar(p, _member("0" * 120 + ".jpg", size=1), fmt=tarfile.GNU_FORMAT),
                     "not a regular file"),
    "sparse": (lambda p: _write(p, _sparse()), "not a regular file"),
    "huge_size": (lambda p: _write(p, _with_size(b"%011o\0" % (8 ** 11 - 1))), "truncated inside member"),
    "huge_base256": (lambda p: _write(p, _with_size(b"\x80" + (2 ** 80).to_bytes(11, "big"))),
                     "truncated inside member"),
    # base-256 sizes may be negative: scan_tar stepped back to the same header for ever (a hang)
    "negative_size": (lambda p: _write(p, _with_size(b"\xff" + (256 ** 11 - 512).to_bytes(11, "big"))),
                      "has size -512"),
}


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def _sparse() -> bytes:
    h = bytearray(_header("000000001.jpg", 1))
    h[156:157] = tarfile.GNUTYPE_SPARSE
    h[148:156] = b" " * 8
    h[148:156] = f"{sum(h):06o}".encode() + b"\0 "
    return bytes(h) + b"x" + b"\0" * 511 + b"\0" * 1024


@pytest.mark.timeout(30)  # the negative size looped for ever before the fix
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tar_members_are_refused(tmp_path, case):
    make, needle = HOSTILE[case]
    tar = make(tmp_path / "evil.tar")
    before = sorted(p.name for p in tmp_path.iterdir())
    for read in (scan_tar, lambda p: list(iter_samples(p))):
        with pytest.raises(ShardError) as e:
            read(tar)
        assert str(tar) in str(e.value) and needle in str(e.value), str(e.value)
        assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing extracted, nothing written


def test_a_shard_replaced_by_a_hostile_tar_fails_verify_naming_it(shards, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(shards, root)
    s = read_manifest(root).shards[0]
    tar = root / s.path
    evil = HOSTILE["symlink"][0](tmp_path / "evil.tar").read_bytes()
    tar.write_bytes(evil + b"\0" * (s.bytes - len(evil)))  # same size: only the content check can tell
    with pytest.raises(VerifyError, match=f"{tar.name}: sha256 does not match the manifest; .*not a regular file"):
        verify(root, progress=False)


@pytest.mark.timeout(30)
def test_a_shard_with_a_negative_member_size_fails_verify_instead_of_hanging(shards, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(shards, root)
    s = read_manifest(root).shards[0]
    tar = root / s.path
    evil = _with_size(b"\xff" + (256 ** 11 - 512).to_bytes(11, "big"))
    tar.write_bytes(evil + b"\0" * (s.bytes - len(evil)))
    with pytest.raises(VerifyError, match="has size -512"):
        verify(root, progress=False)


def _good_shard(tmp_path: Path) -> Path:
    with ShardWriter(tmp_path / "a.tar") as w:
        for i in (1, 2):
            w.add(i, bytes([i]) * 100)
        w.close()
    return tmp_path / "a.idx"


@pytest.mark.parametrize("line, needle", [
    ("jpg 512 100 ../../000000001.jpg id 1024 8 000000001.id", "no <slice_id:09d>.jpg component"),
    ("jpg 512 100 /etc/passwd id 1024 8 000000001.id", "no <slice_id:09d>.jpg component"),
    ("jpg -512 100 000000001.jpg id 1024 8 000000001.id", "malformed"),
    ("jpg 512 1e99 000000001.jpg id 1024 8 000000001.id", "malformed"),
])
def test_a_hostile_index_line_is_refused(tmp_path, line, needle):
    idx = _good_shard(tmp_path)
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join([lines[0], line, lines[2]]) + "\n")
    with pytest.raises(ShardError, match=needle):
        index_records([idx], [2])


def test_an_index_pointing_past_its_tar_is_refused_before_reading(tmp_path):
    from spinestream.shards.wds import RecordReader

    idx = _good_shard(tmp_path)
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join([lines[0], f"jpg {2 ** 50} {2 ** 40} 000000001.jpg id 1024 8 000000001.id",
                              lines[2]]) + "\n")
    rec = index_records([idx], [2])
    with pytest.raises(ShardError, match="outside the 10240-byte tar"):
        RecordReader([str(tmp_path / "a.tar")], rec)


# ----------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("field, value", [
    ("path", "../../../etc/passwd"),
    ("path", "/etc/passwd"),
    ("index", "wds/../../outside.idx"),
    ("name", "../escape"),
    ("name", "a/b"),
])
def test_a_manifest_pointing_outside_the_shard_directory_is_refused(shards, tmp_path, field, value):
    root = tmp_path / "shards"
    root.mkdir()
    d = json.loads((shards / "manifest.json").read_text())
    d["shards"][0][field] = value
    (root / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError) as e:
        read_manifest(root)
    assert "manifest.json" in str(e.value) and repr(value) in str(e.value) and "\n" not in str(e.value)


def test_manifest_table_paths_stay_inside(shards, tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    d = json.loads((shards / "manifest.json").read_text())
    d["tables"]["truth"] = "../../labels.parquet"
    (root / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="tables.truth"):
        read_manifest(root)


# ----------------------------------------------------------------------------- study UIDs


@pytest.mark.parametrize("uid", ["../../escaped", "a/b", "/abs", "..", ".hidden", "1.2..3", "x\\y"])
def test_shard_refuses_a_study_uid_that_is_not_a_plain_name(raw, tmp_path, uid):
    from spinestream.preprocess.convert import shard_dataset
    from spinestream.shards.shard_config import ShardConfig

    data = tmp_path / "a" / "b" / "raw"
    shutil.copytree(raw, data)
    train = pd.read_csv(data / "train.csv")
    train.loc[0, "StudyInstanceUID"] = uid
    train.to_csv(data / "train.csv", index=False)
    out = tmp_path / "a" / "b" / "out"
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(LabelError) as e:
        shard_dataset(data, out, ShardConfig(image_size=32, folds=2), workers=1)
    msg = str(e.value)
    assert "train.csv" in msg and "not a UID" in msg and "\n" not in msg, msg
    assert repr(uid) in msg
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # not even --out was created


def test_predict_never_builds_a_path_from_the_sample_submission(shards, tmp_path):
    """Hostile row_ids (their UID part) get the training prevalence like any missing study; a study
    directory with odd characters is predicted; only the submission is written."""
    import warnings

    import torch

    from spinestream.engine.metrics import ROW_TYPES
    from spinestream.predict import load_runs, predict
    from spinestream.preprocess.errors import DataWarning
    from spinestream.preprocess.synth import make_dataset

    from tests.test_predict import write_run

    d = tmp_path / "data"
    make_dataset(d, studies=1, seed=5, size=48, slices=(14, 16), test_studies=1, syntax="explicit")
    images = d / "test_images"
    (study,) = list(images.iterdir())
    odd = images / "odd name;$(touch pwned)"
    study.rename(odd)
    rows = [f"{u}_{t}" for u in (odd.name, "../../escaped", "/etc/passwd") for t in ROW_TYPES]
    pd.DataFrame({"row_id": rows, "fractured": 0.5}).to_csv(tmp_path / "sample.csv", index=False)
    runs = load_runs([write_run(tmp_path / "run", shards, seed=0)], torch.device("cpu"))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        frame, stats = predict(runs, images, sample=tmp_path / "sample.csv", workers=0)
    assert frame.row_id.tolist() == rows and np.isfinite(frame.fractured).all()
    assert sorted(stats["missing_studies"]) == sorted(["../../escaped", "/etc/passwd"])
    assert any("escaped" in str(w.message) for w in caught)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # predict itself wrote nothing
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
