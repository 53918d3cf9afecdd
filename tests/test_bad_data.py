"""Bad data mid-stream (issue 20): a sample corrupted inside a shard, bad label tables, a manifest from a
newer spinestream, a checkpoint that is not one. Each is refused with one line naming the file (and the
sample), or -- for corrupt samples under ``loader.bad_samples: skip`` -- trained past, counted, and never
mixed into a real sample, with the exactly-once and padding invariants of engine/loader/base.py kept."""
from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from spinestream import InputError
from spinestream.engine import checkpoint as ck
from spinestream.engine.loader import DeviceLabels, LoaderConfig, build_loader, select
from spinestream.engine.loader.base import BadSampleWarning, exclude_from_mixup
from spinestream.engine.loader.config import AugmentConfig
from spinestream.engine.loader.params import MixParams
from spinestream.shards.layout import TARGETS, VERSION, Layout
from spinestream.shards.manifest import ManifestError, read_manifest
from spinestream.shards.tables import read_label_table
from spinestream.shards.verify import VerifyError, verify
from spinestream.shards.wds import SampleError, ShardError, index_records, read_sums, sums_path

BACKENDS = [pytest.param("dali", marks=pytest.mark.dali), "torch"]


def _need(backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")


def _one_line(msg: str) -> None:
    assert "\n" not in msg.strip(), msg


# ----------------------------------------------------------------------------- a corrupt sample in a shard


@pytest.fixture
def corrupt(shards, tmp_path):
    """A copy of the shared shard set with one boxed sample's JPEG bytes flipped in its entropy-coded data:
    the tar still parses, the shard's sha256 and the sample's CRC-32 differ. -> (root, tar, slice_id, study, n)"""
    root = tmp_path / "shards"
    shutil.copytree(shards, root)
    m = read_manifest(root)
    s = next(e for e in m.shards if e.cohort == "boxed")
    rec = index_records([root / s.index], [s.samples])
    k = len(rec["slice_id"]) // 2
    off, size, sid = int(rec["offset"][k]), int(rec["size"][k]), int(rec["slice_id"][k])
    tar = root / s.path
    data = bytearray(tar.read_bytes())
    for j in range(off + size // 2, off + size // 2 + 24):  # inside the scan, away from the headers
        data[j] ^= 0x5A
    tar.write_bytes(bytes(data))
    slices = pd.read_parquet(Layout(root).slices).set_index("slice_id")
    return root, tar, sid, slices.loc[sid, "StudyInstanceUID"], int(slices.loc[sid, "slice_number"])


def test_shards_carry_per_sample_sums(shards):
    m = read_manifest(shards)
    for s in m.shards:
        sums = read_sums(shards / s.path)
        assert sums is not None and len(sums) == s.samples


def test_verify_names_the_shard_and_the_corrupt_sample(corrupt):
    root, tar, sid, study, number = corrupt
    with pytest.raises(VerifyError) as e:
        verify(root, progress=False)
    # one problem, on one line: the shard, the sample, its study and slice (every slice_id still counted)
    (msg,) = str(e.value).splitlines()
    assert tar.name in msg and f"{sid:09d}" in msg and study in msg and f"slice {number}" in msg, msg
    assert "1 corrupt sample" in msg


def test_verify_without_sums_still_names_the_shard(corrupt):
    # a shard set written before the sums existed: the shard, and why no sample can be named
    root, tar, sid, _, _ = corrupt
    sums_path(tar).unlink()
    with pytest.raises(VerifyError, match=f"{tar.name}: sha256 does not match the manifest .*no per-sample sums"):
        verify(root, progress=False)


def test_verify_names_a_corrupt_sums_file(shards, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(shards, root)
    tar = root / read_manifest(root).shards[0].path
    raw = bytearray(sums_path(tar).read_bytes())
    raw[-1] ^= 0xFF  # the last sample's CRC
    sums_path(tar).write_bytes(bytes(raw))
    with pytest.raises(VerifyError, match=f"{tar.stem}.sums: does not match .*the sums file is corrupt"):
        verify(root, progress=False)


def _cfg(backend, **kw):
    threads = kw.pop("num_threads", 1 if backend == "dali" else 0)
    return LoaderConfig(backend=backend, batch_size=kw.pop("batch_size", 16), image_size=48, num_threads=threads,
                        channels_last=False, augment=kw.pop("augment", AugmentConfig().off()), **kw)


def _loader(root, backend, **kw):
    sel = select(root, cohorts=["boxed", "negative"])
    return sel, build_loader(sel, DeviceLabels.load(root), _cfg(backend, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_stops_naming_the_shard_and_the_sample(corrupt, backend):
    _need(backend)
    root, tar, sid, _, _ = corrupt
    _, loader = _loader(root, backend)
    with pytest.raises(SampleError) as e:
        for _ in loader:
            pass
    assert e.value.tar == str(tar) and e.value.slice_id == sid
    msg = str(e.value)
    _one_line(msg)
    assert tar.name in msg and f"{sid:09d}" in msg and "bad_samples=skip" in msg


def test_training_stops_from_a_dataloader_worker_too(corrupt):
    # the error crosses a worker process as itself (not torch's multi-line wrapper)
    root, tar, sid, _, _ = corrupt
    _, loader = _loader(root, "torch", num_threads=2)
    with pytest.raises(SampleError) as e:
        for _ in loader:
            pass
    assert (e.value.tar, e.value.slice_id) == (str(tar), sid)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_policy_counts_the_sample_and_keeps_exactly_once(corrupt, backend):
    _need(backend)
    root, tar, sid, _, _ = corrupt
    sel, loader = _loader(root, backend, bad_samples="skip", batch_size=7)
    with pytest.warns(BadSampleWarning, match=f"{tar.name}: slice_id {sid} "):
        ids, valid, n_valid = [], [], 0
        for b in loader:
            ids.append(b.slice_ids.cpu())
            valid.append(b.valid.cpu())
            assert b.n_valid == int(b.valid.sum())  # the host count agrees with the mask
            n_valid += b.n_valid
    ids, valid = torch.cat(ids).numpy(), torch.cat(valid).numpy()
    want = sel.slice_ids()
    # every position still yielded once; the corrupt sample's row is invalid, every other sample valid
    assert len(ids) == loader.samples + loader.padded and sorted(ids[: loader.samples]) == sorted(want)
    assert sorted(ids[valid].tolist()) == sorted(set(want.tolist()) - {sid})
    assert n_valid == loader.samples - 1 and loader.skipped == 1 and loader.skipped_samples == [(str(tar), sid)]
    # the next epoch meets it again (one more skip) and still yields everything else
    with pytest.warns(BadSampleWarning):
        ids2 = torch.cat([b.slice_ids[b.valid].cpu() for b in loader]).numpy()
    assert sorted(ids2.tolist()) == sorted(set(want.tolist()) - {sid}) and loader.skipped == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_policy_under_mixup_never_blends_the_blank(corrupt, backend):
    _need(backend)
    root, tar, sid, _, _ = corrupt
    sel, loader = _loader(root, backend, bad_samples="skip", batch_size=8,
                          augment=AugmentConfig(p_mixup=1.0, p_crop=0, p_hflip=0, p_vflip=0, p_rotate=0, p_shift=0,
                                                p_brightness_contrast=0, p_clahe=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        for b in loader:
            hit = (b.slice_ids == sid).nonzero().flatten().tolist()
            if hit:
                assert not b.valid[hit].any()
    assert loader.skipped == 1


def test_exclude_from_mixup_keeps_bad_rows_out():
    mix = MixParams(on=True, lam=0.3, partner=np.array([3, 2, 1, 0, 4]))  # rows 0..3 real, 4 padding
    out = exclude_from_mixup(mix, [2])
    # row 2 (bad) is its own partner; row 1 drew row 2, so it keeps itself; 0 <-> 3 still mix
    assert out.partner.tolist() == [3, 1, 2, 0, 4]
    assert exclude_from_mixup(mix, []) is mix


def test_torch_loader_names_a_sample_that_does_not_decode(shards, tmp_path):
    # no sums (a shard set written before them), and a sample whose JPEG lost its SOI marker: the decode
    # failure is named like a CRC failure
    root = tmp_path / "shards"
    shutil.copytree(shards, root)
    m = read_manifest(root)
    for e in m.shards:
        sums_path(root / e.path).unlink()
    s = next(e for e in m.shards if e.cohort == "boxed")
    rec = index_records([root / s.index], [s.samples])
    data = bytearray((root / s.path).read_bytes())
    data[int(rec["offset"][0]):int(rec["offset"][0]) + 4] = b"\0\0\0\0"
    (root / s.path).write_bytes(bytes(data))
    _, loader = _loader(root, "torch")
    with pytest.raises(SampleError, match=f"{Path(s.path).name}: sample {int(rec['slice_id'][0]):09d} .*does not "
                                          "decode as JPEG"):
        for _ in loader:
            pass


def test_batch_decode_names_the_image_that_fails_and_keeps_the_rest():
    # the nvJPEG path (torch_decode: gpu) decodes a batch at once; run here on the CPU through the same code
    from spinestream.engine.loader.torch_backend import _gpu_decode
    from spinestream.shards.sample import encode_jpeg

    good = encode_jpeg(np.full((16, 16, 3), 100, np.uint8))
    raw = [torch.frombuffer(bytearray(b), dtype=torch.uint8)
           for b in (good, b"\0\0" + good[2:], good, encode_jpeg(np.zeros((8, 8, 3), np.uint8)))]
    errors = [None] * 4
    out = _gpu_decode(raw, torch.device("cpu"), 16, errors, lambda k: ("a.tar", 10 + k))
    assert errors[0] is None and errors[2] is None
    assert "sample 000000011" in str(errors[1]) and "does not decode as JPEG" in str(errors[1])
    assert "decodes to (3, 8, 8)" in str(errors[3])
    for e in (errors[1], errors[3]):
        _one_line(str(e))
    assert out[0].float().mean() == 100 and out[1].float().abs().sum() == 0  # the bad rows stay blank


def test_a_forged_index_pointing_outside_the_tar_is_refused(shards, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(shards, root)
    s = read_manifest(root).shards[0]
    idx = root / s.index
    lines = idx.read_text().splitlines()
    tok = lines[1].split()
    tok[2] = str(2 ** 40)  # the first JPEG's size: a terabyte
    idx.write_text("\n".join([lines[0], " ".join(tok), *lines[2:]]) + "\n")
    from spinestream.shards.wds import RecordReader

    rec = index_records([idx], [s.samples])
    with pytest.raises(ShardError, match="outside the .*-byte tar"):
        RecordReader([str(root / s.path)], rec)
    tok[1] = "-5"
    idx.write_text("\n".join([lines[0], " ".join(tok), *lines[2:]]) + "\n")
    with pytest.raises(ShardError, match="malformed"):
        index_records([idx], [s.samples])


# ----------------------------------------------------------------------------- label tables


def _table(path: Path, ids, values) -> Path:
    df = pd.DataFrame(np.asarray(values, dtype=np.float64), columns=list(TARGETS))
    df.insert(0, "slice_id", ids)
    df.to_parquet(path)  # float64, as pandas writes it: a table made outside spinestream
    return path


@pytest.mark.parametrize("ids, values, needle", [
    ([0, 1, 2], [[0] * 8, [np.nan] + [0] * 7, [1] * 8], "1 row(s) have NaN targets (first slice_id: 1)"),
    ([0, 1, 2], [[0] * 8, [0] * 7 + [2.0], [1] * 8], "1 row(s) have targets outside [0, 1] (first slice_id 1"),
    ([0, 1, 2], [[0] * 8, [0] * 7 + [-0.5], [1] * 8], "outside [0, 1]"),
    ([0, 5, 5], [[0] * 8, [0] * 8, [1] * 8], "2 rows share 1 slice_id(s) (first: 5)"),
    ([0, -3, 2], [[0] * 8, [0] * 8, [1] * 8], "negative slice_id (first: -3)"),
    ([0.0, 1.5, 2.0], [[0] * 8, [0] * 8, [1] * 8], "not a whole number (first: 1.5)"),
])
def test_bad_label_tables_are_refused_in_one_line(tmp_path, shards, ids, values, needle):
    path = _table(tmp_path / "labels.parquet", ids, values)
    for read in (read_label_table, lambda p: DeviceLabels.load(shards, tables=[p])):
        with pytest.raises(InputError) as e:
            read(path)
        msg = str(e.value)
        _one_line(msg)
        assert str(path) in msg and needle in msg, msg


def test_a_good_foreign_table_still_reads(tmp_path, shards):
    path = _table(tmp_path / "labels.parquet", [0, 1, 2], [[0] * 8, [0.25] * 8, [1] * 8])
    assert len(read_label_table(path).frame) == 3
    assert DeviceLabels.load(shards, tables=[path]).targets[1, 0] == 0.25


# ----------------------------------------------------------------------------- manifest, checkpoint


def test_a_manifest_from_a_newer_version_is_refused(shards, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(shards, root)
    d = json.loads((root / "manifest.json").read_text())
    d["version"] = VERSION + 1
    (root / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError) as e:
        read_manifest(root)
    msg = str(e.value)
    _one_line(msg)
    assert "manifest.json" in msg and "newer spinestream" in msg and "upgrade spinestream" in msg
    d["version"] = "two"
    (root / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="version 'two' is not supported"):
        read_manifest(root)


class _Foreign:
    """Any class: pickled, it is code the loader would have to import to read the file."""

    def __init__(self):
        self.w = torch.zeros(2)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_is_refused_in_one_line_and_never_run(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"step": 1, "model": _Foreign()}, path)
    with pytest.raises(ck.RunError) as e:
        ck.load(path)
    msg = str(e.value)
    _one_line(msg)
    assert str(path) in msg and "a pickle from another program" in msg
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"step": 1, "model": _Foreign()}))
    with pytest.raises(ck.RunError) as e:
        ck.load(plain)
    _one_line(str(e.value))
    assert str(plain) in str(e.value)


def test_another_projects_checkpoint_is_refused_in_one_line(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"conv.weight": torch.zeros(1)}, "epoch": 3, "global_step": 10}, path)
    with pytest.raises(ck.RunError) as e:
        ck.load(path)
    msg = str(e.value)
    _one_line(msg)
    assert str(path) in msg and "not a spinestream checkpoint" in msg and "global_step" in msg
    bare = tmp_path / "bare.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), bare)
    with pytest.raises(ck.RunError, match="not a spinestream checkpoint"):
        ck.load(bare)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(ck.RunError) as e:
        ck.load(junk)
    _one_line(str(e.value))
