"""Tar + DALI index writer/reader: byte layout, DALI's own indexer, and bad input."""
import shutil
import struct
import subprocess
import tarfile

import pickle

import pytest

from spinestream.shards.wds import (RecordReader, ShardError, ShardWriter, check_index, index_records, iter_samples,
                                    read_index, scan_tar)


def _write(path, ids):
    with ShardWriter(path) as w:
        for i in ids:
            w.add(i, bytes([i % 251]) * (100 + 37 * (i % 50)))
        return w.close()


def test_roundtrip_and_standard_tar(tmp_path):
    info = _write(tmp_path / "a.tar", [7, 3, 123456789])
    assert info.samples == 3 and (info.first_id, info.last_id) == (7, 123456789)
    got = list(iter_samples(tmp_path / "a.tar"))
    assert [s for s, _ in got] == [7, 3, 123456789]
    assert got[1][1] == bytes([3]) * (100 + 37 * 3)
    # any tar reader sees the same members, with fixed metadata
    with tarfile.open(tmp_path / "a.tar") as tf:
        ms = tf.getmembers()
        assert [m.name for m in ms] == ["000000007.jpg", "000000007.id", "000000003.jpg", "000000003.id",
                                        "123456789.jpg", "123456789.id"]
        assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in ms)
        assert struct.unpack("<q", tf.extractfile(ms[1]).read())[0] == 7
    assert check_index(tmp_path / "a.tar", tmp_path / "a.idx") == 3


def test_index_matches_dali_wds2idx(tmp_path):
    wds2idx = shutil.which("wds2idx") or str(__import__("pathlib").Path(__import__("sys").executable).parent / "wds2idx")
    if not __import__("os").path.exists(wds2idx):
        pytest.skip("DALI's wds2idx is not installed")
    _write(tmp_path / "a.tar", list(range(20)))
    subprocess.run([wds2idx, str(tmp_path / "a.tar"), str(tmp_path / "dali.idx")], check=True, capture_output=True)
    assert (tmp_path / "a.idx").read_bytes() == (tmp_path / "dali.idx").read_bytes()


def test_deterministic_bytes(tmp_path):
    a = _write(tmp_path / "a.tar", [1, 2, 3])
    b = _write(tmp_path / "b.tar", [1, 2, 3])
    assert a.sha256 == b.sha256
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "a.tar") as w:
            w.add(1, b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_truncated_tar_is_an_error(tmp_path):
    _write(tmp_path / "a.tar", [1, 2, 3])
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[:1500])
    with pytest.raises(ShardError, match="truncated"):
        list(iter_samples(tmp_path / "a.tar"))


def test_path_members_are_rejected(tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tf:
        ti = tarfile.TarInfo("../../etc/000000001.jpg")
        ti.size = 1
        tf.addfile(ti, __import__("io").BytesIO(b"x"))
    with pytest.raises(ShardError, match="unexpected member name"):
        scan_tar(evil)
    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as tf:
        ti = tarfile.TarInfo("000000001.jpg")
        ti.type = tarfile.SYMTYPE
        ti.linkname = "/etc/passwd"
        tf.addfile(ti)
    with pytest.raises(ShardError, match="not a regular file"):
        scan_tar(link)


def test_index_problems(tmp_path):
    _write(tmp_path / "a.tar", [1, 2])
    with pytest.raises(ShardError, match="missing"):
        read_index(tmp_path / "nope.idx")
    lines = (tmp_path / "a.idx").read_text().splitlines()
    (tmp_path / "b.idx").write_text("\n".join([lines[0], lines[2], lines[1]]) + "\n")
    with pytest.raises(ShardError, match="does not match"):
        check_index(tmp_path / "a.tar", tmp_path / "b.idx")
    (tmp_path / "c.idx").write_text("v1.2 5\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(ShardError, match="header says 5"):
        read_index(tmp_path / "c.idx")


def test_records_read_every_sample_by_its_index_offset(tmp_path):
    """The loaders' random access: the records of two shards name each sample's shard, JPEG offset, size and
    slice_id, and the reader returns the bytes the writer got, in any order, also after pickling (a worker)."""
    _write(tmp_path / "a.tar", [7, 3])
    _write(tmp_path / "b.tar", [123456789])
    rec = index_records([tmp_path / "a.idx", tmp_path / "b.idx"], [2, 1])
    assert rec["shard"].tolist() == [0, 0, 1] and rec["slice_id"].tolist() == [7, 3, 123456789]
    reader = RecordReader([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], rec)
    want = {sid: data for t in ("a.tar", "b.tar") for sid, data in iter_samples(tmp_path / t)}
    for r in (reader, pickle.loads(pickle.dumps(reader))):
        assert [r.read(i) for i in (2, 0, 1)] == [want[123456789], want[7], want[3]]
    reader.close()
    with pytest.raises(ShardError, match="2 samples, manifest says 3"):
        index_records([tmp_path / "a.idx"], [3])
    (tmp_path / "c.idx").write_text("v1.2 1\nid 512 8 000000007.id\n")
    with pytest.raises(ShardError, match="no <slice_id:09d>.jpg component"):
        index_records([tmp_path / "c.idx"], [1])
