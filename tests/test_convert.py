"""The shard job end to end on a tiny synthetic dataset: outputs, determinism, resume after
a kill, verify catching damage, and DALI's CPU reader consuming the shards via their .idx."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spinestream.preprocess.convert import shard_dataset
from spinestream.shards.config import to_dict
from spinestream.shards.layout import COHORTS, TARGETS
from spinestream.shards.manifest import read_manifest
from spinestream.shards.sample import decode_jpeg, neighbour_index, sample_image
from spinestream.shards.shard_config import ShardConfig
from spinestream.shards.spec import ShardSpec
from spinestream.shards.verify import VerifyError, verify
from spinestream.shards.volumes import open_volume
from spinestream.shards.wds import iter_samples

ROOT = Path(__file__).resolve().parents[1]
from conftest import CFG


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path (the job's scratch excluded)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and "_work" not in p.relative_to(root).parts:
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_outputs_are_consistent(raw, shards):
    m = read_manifest(shards).to_dict()
    studies = pd.read_parquet(shards / "studies.parquet")
    slices = pd.read_parquet(shards / "slices.parquet")
    truth = pd.read_parquet(shards / "labels" / "truth.parquet")
    train = pd.read_csv(raw / "train.csv")
    assert m["counts"]["studies"] == len(studies) == len(train)
    assert m["counts"]["slices"] == len(slices) == sum(s["samples"] for s in m["shards"])
    assert set(studies.cohort) == set(COHORTS)
    assert slices.slice_id.tolist() == list(range(len(slices)))
    # every shard belongs to one (cohort, fold) group and the slices it holds are from that group
    for s in m["shards"]:
        sub = slices[slices.shard == s["name"]]
        assert set(sub.cohort) == {s["cohort"]} and set(sub.fold) == {s["fold"]}
    # labels: boxed + negative studies only, slices of boxed studies with a box are positive
    labelled = set(slices.slice_id[slices.cohort.isin(["boxed", "negative"])])
    assert set(truth.slice_id) == labelled
    assert (truth[list(TARGETS[:7])].max(axis=1) == truth["any"]).all()
    neg = truth.merge(slices, on="slice_id").query("cohort == 'negative'")
    assert neg[list(TARGETS)].to_numpy().sum() == 0
    boxes = pd.read_csv(raw / "train_bounding_boxes.csv")
    boxed = slices.merge(boxes[["StudyInstanceUID", "slice_number"]].drop_duplicates(),
                         on=["StudyInstanceUID", "slice_number"])
    assert len(boxed) > 0
    assert (truth.set_index("slice_id").loc[boxed.slice_id, "any"] == 1).all()
    assert verify(shards, progress=False)["slices"] == len(slices)


def test_the_manifest_and_the_spec_hold_the_config_the_job_ran_with(shards, tmp_path):
    """Typed on both sides of the JSON: what the job ran with is what a reader gets, and the files keep the
    form they always had (a plain object, windows as lists), so those on disk read as before."""
    want = ShardConfig(**CFG)
    m = read_manifest(shards)
    assert isinstance(m.config, ShardConfig) and m.config == want
    on_disk = json.loads((shards / "manifest.json").read_text())["config"]
    assert on_disk == to_dict(want) and on_disk["windows"] == [[400.0, 1800.0]]
    spec = ShardSpec.from_shards(shards)
    path = spec.save(tmp_path)
    assert json.loads(path.read_text())["config"] == on_disk
    back = ShardSpec.load(path)
    assert isinstance(back.config, ShardConfig) and back.config == want
    d = json.loads(path.read_text())
    d["config"]["image_sise"] = 64
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"shard_spec\.json: config\.image_sise: unknown key"):
        ShardSpec.load(path)


def test_volume_rebuilds_the_shard_images(shards):
    """Inputs built from a Zarr volume equal the shard images up to JPEG error."""
    slices = pd.read_parquet(shards / "slices.parquet").set_index("slice_id")
    m = read_manifest(shards).to_dict()
    first = m["shards"][0]
    for sid, data in list(iter_samples(shards / first["path"]))[:10]:
        row = slices.loc[sid]
        vol = open_volume(shards / "volumes.zarr", row.StudyInstanceUID)
        assert vol.attrs["slice_id_offset"] + row["index"] == sid
        z = np.asarray(vol.attrs["z"])
        assert np.all(np.diff(z) < 0)  # head to feet
        img = sample_image(vol, int(row["index"]), neighbour_index(z, m["image"]["offset_mm"]), "neighbours")
        got = decode_jpeg(data)
        assert got.shape == (48, 48, 3)
        assert np.abs(got.astype(int) - img.astype(int)).mean() < 2.0


def test_groups_are_shuffled_across_studies(shards):
    slices = pd.read_parquet(shards / "slices.parquet").set_index("slice_id")
    m = read_manifest(shards).to_dict()
    big = max(m["shards"], key=lambda s: s["samples"])
    ids = [sid for sid, _ in iter_samples(shards / big["path"])]
    assert slices.loc[ids].StudyInstanceUID.nunique() > 1
    assert ids != sorted(ids)


def test_same_input_same_bytes_and_rerun_is_a_noop(raw, shards, tmp_path):
    out = tmp_path / "again"
    shard_dataset(raw, out, ShardConfig(**CFG), workers=1)
    assert tree_digest(out) == tree_digest(shards)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    shard_dataset(raw, out, ShardConfig(**CFG), workers=1)  # already complete: touches nothing
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    with pytest.raises(ValueError, match="another config"):
        shard_dataset(raw, out, ShardConfig(**{**CFG, "jpeg_quality": 80}), workers=1)


def test_kill_during_shard_then_rerun_gives_the_clean_output(raw, shards, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "spinestream.preprocess.convert", "--data", str(raw), "--out", str(out), "--workers", "1",
           *[a for k, v in CFG.items() for a in ("--set", f"{k}={v}")]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    done = out / "_work" / "studies"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if done.exists() and sum(1 for p in done.iterdir() if not p.name.endswith(".tmp")) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the job finished before it could be killed; make the dataset bigger"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    rc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    assert tree_digest(out) == tree_digest(shards)


def test_crash_in_the_group_phase_then_rerun(raw, shards, tmp_path):
    """State of a crash after some groups were committed and a shard was half written."""
    out = tmp_path / "crashed"
    shard_dataset(raw, out, ShardConfig(**CFG), workers=1, keep_work=True)
    (out / "manifest.json").unlink()
    groups = sorted((out / "_work" / "groups").glob("*.json"))
    victim = json.loads(groups[-1].read_text())
    groups[-1].unlink()
    tar = out / victim[0]["path"]
    tar.write_bytes(tar.read_bytes()[:1000])  # a torn shard under its final name
    (out / "wds" / "boxed-f0-0000.tar.tmp-999").write_bytes(b"junk")
    shard_dataset(raw, out, ShardConfig(**CFG), workers=1)
    assert not (out / "wds" / "boxed-f0-0000.tar.tmp-999").exists()  # a killed writer's temporary is cleared
    assert tree_digest(out) == tree_digest(shards)


def test_verify_names_the_damaged_file(shards, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(shards, out)
    m = read_manifest(out).to_dict()
    tar = out / m["shards"][1]["path"]
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match=tar.name):
        verify(out, progress=False)
    rc = subprocess.run([sys.executable, "-m", "spinestream.shards.verify", str(out)], capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert rc.returncode == 1 and tar.name in rc.stderr
    shutil.copy(shards / m["shards"][1]["path"], tar)
    idx = out / m["shards"][2]["index"]
    idx.unlink()
    with pytest.raises(VerifyError, match="missing"):
        verify(out, progress=False)


def test_bad_slices_are_reported_and_the_job_goes_on(raw, tmp_path):
    data = tmp_path / "raw"
    shutil.copytree(raw, data)
    uids = sorted(p.name for p in (data / "train_images").iterdir())
    victim = sorted((data / "train_images" / uids[0]).glob("*.dcm"))[3]
    victim.write_bytes(victim.read_bytes()[:300])  # truncated
    for f in (data / "train_images" / uids[1]).glob("*.dcm"):
        f.write_bytes(b"not a dicom file")
    out = tmp_path / "out"
    m = shard_dataset(data, out, ShardConfig(**CFG), workers=1).to_dict()
    assert [b["file"] for b in m["bad_files"]] == [victim.name] and m["bad_files"][0]["study"] == uids[0]
    assert [f["study"] for f in m["failed_studies"]] == [uids[1]]
    assert m["counts"]["studies"] == len(uids) - 1
    verify(out, progress=False)


@pytest.mark.dali
def test_dali_cpu_reads_every_sample_through_the_index(shards):
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    m = read_manifest(shards).to_dict()
    tars = [str(shards / s["path"]) for s in m["shards"]]
    idxs = [str(shards / s["index"]) for s in m["shards"]]
    bs = 16

    @pipeline_def(batch_size=bs, num_threads=1, device_id=None)
    def pipe():
        jpg, sid = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["jpg", "id"],
                                         dtypes=[types.UINT8, types.INT64], missing_component_behavior="error",
                                         pad_last_batch=True, name="Reader")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), sid

    p = pipe()
    p.build()
    n = p.epoch_size("Reader")
    assert n == m["counts"]["slices"]
    ids, images = [], {}
    for _ in range(-(-n // bs)):
        img, sid = p.run()
        for k in range(len(sid)):
            ids.append(int(np.asarray(sid[k])[0]))
            images[ids[-1]] = np.asarray(img[k])
    ids = ids[:n]  # the rest is padding (the last sample repeated)
    assert sorted(ids) == list(range(n))
    ref = dict(iter_samples(shards / m["shards"][0]["path"]))
    for sid, data in list(ref.items())[:5]:
        assert np.abs(images[sid].astype(int) - decode_jpeg(data).astype(int)).max() <= 2
    assert dali.__version__


# --------------------------------------------------------------------------- the job's identity and error policy


def subset(raw: Path, dst: Path, uids: list[str]) -> Path:
    """A copy of ``raw`` holding only ``uids`` (train.csv, boxes, images, segmentations)."""
    dst.mkdir(parents=True)
    train = pd.read_csv(raw / "train.csv")
    train[train.StudyInstanceUID.isin(uids)].to_csv(dst / "train.csv", index=False)
    boxes = pd.read_csv(raw / "train_bounding_boxes.csv")
    boxes[boxes.StudyInstanceUID.isin(uids)].to_csv(dst / "train_bounding_boxes.csv", index=False)
    for u in uids:
        shutil.copytree(raw / "train_images" / u, dst / "train_images" / u)
        seg = raw / "segmentations" / f"{u}.nii"
        if seg.exists():
            (dst / "segmentations").mkdir(exist_ok=True)
            shutil.copy(seg, dst / "segmentations" / seg.name)
    return dst


def test_a_limited_run_is_another_job(raw, tmp_path):
    out = tmp_path / "out"
    m = shard_dataset(raw, out, ShardConfig(**CFG), workers=1, limit=2)
    assert m.counts.studies == 2
    with pytest.raises(ValueError, match=r"--limit 2.*another --out"):  # a JobError
        shard_dataset(raw, out, ShardConfig(**CFG), workers=1)  # the full job: refused, not "already complete"
    assert shard_dataset(raw, out, ShardConfig(**CFG), workers=1, limit=2).counts.studies == 2  # same job: a no-op
    # the same for an interrupted limited job
    out2 = tmp_path / "interrupted"
    shard_dataset(raw, out2, ShardConfig(**CFG), workers=1, limit=2, keep_work=True)
    (out2 / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"interrupted job over 2 studies \(--limit 2\)"):
        shard_dataset(raw, out2, ShardConfig(**CFG), workers=1, limit=3)


def test_a_bug_in_the_worker_stops_the_job_with_its_traceback(raw, tmp_path, monkeypatch):
    import spinestream.preprocess.convert as convert

    def buggy(*a, **k):
        raise ValueError("an index bug in the label code")

    monkeypatch.setattr(convert, "study_labels", buggy)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="an index bug") as err:
        shard_dataset(raw, out, ShardConfig(**CFG), workers=1, limit=2)
    assert any("not bad input" in n for n in getattr(err.value, "__notes__", []))
    assert not (out / "manifest.json").exists() and not list((out / "_work").glob("failed/*.json"))
    with pytest.raises(ValueError, match="an index bug"):  # the CLI does not turn it into a one-line error
        convert.main(["--data", str(raw), "--out", str(tmp_path / "cli"), "--workers", "1", "--limit", "1",
                      *[a for k, v in CFG.items() for a in ("--set", f"{k}={v}")]])


def test_bad_boxes_are_bad_input_for_that_study(raw, tmp_path):
    studies = pd.read_csv(raw / "train.csv")
    boxes = pd.read_csv(raw / "train_bounding_boxes.csv")
    boxed = sorted(boxes.StudyInstanceUID.unique())[0]
    other = sorted(set(studies.StudyInstanceUID) - set(boxes.StudyInstanceUID))[0]
    data = subset(raw, tmp_path / "raw", [boxed, other])
    b = pd.read_csv(data / "train_bounding_boxes.csv")
    b.loc[b.index[0], "width"] = np.nan  # a box without a width: a LabelError, the study fails
    b.to_csv(data / "train_bounding_boxes.csv", index=False)
    m = shard_dataset(data, tmp_path / "out", ShardConfig(**CFG), workers=1)
    assert [f.study for f in m.failed_studies] == [boxed]
    assert "non-numeric coordinate" in m.failed_studies[0].reason
    assert m.counts.studies == 1


def test_a_decoder_panic_is_a_bad_file_in_the_shard_job(raw, tmp_path, monkeypatch):
    import spinestream.preprocess.decoders as decoders

    class Panic(BaseException):  # pyo3's PanicException is a BaseException
        pass

    uid = sorted(p.name for p in (raw / "train_images").iterdir())[0]
    data = subset(raw, tmp_path / "raw", [uid])
    victim = sorted((data / "train_images" / uid).glob("*.dcm"))[2]
    real = decoders.run

    def panics(d, ds, *args, **kw):  # every decoder of the chain panics on the victim
        if int(ds.InstanceNumber) == int(victim.stem):
            raise Panic("index out of bounds: the len is 32768 but the index is 32768")
        return real(d, ds, *args, **kw)

    monkeypatch.setattr(decoders, "run", panics)
    m = shard_dataset(data, tmp_path / "out", ShardConfig(**CFG), workers=1)
    assert [(b.study, b.file) for b in m.bad_files] == [(uid, victim.name)]
    assert "Panic" in m.bad_files[0].reason
