"""``spinestream shard`` as a job array: N workers (``--worker-index I --num-workers N``) convert their
share of the studies into one OUT, at the same time or not, then ``--merge`` writes the shards. The
result must be the single run's bytes; a missing worker must be named; a worker must never touch
another's files."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

from spinestream.preprocess import convert
from spinestream.preprocess.convert import merge_job, shard_dataset, shard_worker, worker_of
from spinestream.preprocess.errors import JobError
from spinestream.shards.config import to_dict
from spinestream.shards.layout import Layout
from spinestream.shards.shard_config import ShardConfig

from conftest import CFG, ROOT
from test_convert import subset

SET = [a for k, v in CFG.items() for a in ("--set", f"{k}={v}")]


def file_bytes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (all of them, ``_work`` included), by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_files(got: Path, want: Path) -> None:
    a, b = file_bytes(got), file_bytes(want)
    differ = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
    only_got, only_want = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    assert not (differ or only_got or only_want), (
        f"differ: {differ}; only in {got.name}: {only_got}; only in {want.name}: {only_want}")
    assert any(k.endswith(".idx") for k in a) and "slices.parquet" in a and "manifest.json" in a


def uids(raw: Path) -> list[str]:
    return sorted(pd.read_csv(raw / "train.csv").StudyInstanceUID)


def committed(out: Path) -> set[str]:
    return {p.parent.name for p in (out / "_work" / "studies").glob("*/study.json")}


def test_workers_one_after_the_other_then_merge_give_the_single_runs_bytes(raw, shards, tmp_path):
    out, cfg = tmp_path / "out", ShardConfig(**CFG)
    r0 = shard_worker(raw, out, cfg, worker_index=0, num_workers=2, workers=1)
    mine = {u for u in uids(raw) if worker_of(u, 2) == 0}
    assert 0 < len(mine) < len(uids(raw))  # both workers have work: the test means something
    assert committed(out) == mine and (r0.studies, r0.converted, r0.failed) == (len(mine), len(mine), 0)
    assert not (out / "manifest.json").exists() and not list(out.glob("wds/*.tar"))  # a worker writes no shards
    r1 = shard_worker(raw, out, cfg, worker_index=1, num_workers=2, workers=1)
    assert r1.converted == len(uids(raw)) - len(mine) and committed(out) == set(uids(raw))
    m = merge_job(raw, out, cfg, workers=2)  # the group phase in a pool, as a plain run's
    assert not (out / "_work").exists() and m.counts.studies == len(uids(raw))
    assert_same_files(out, shards)
    # a rerun of a worker or of the merge on the finished job does nothing
    assert shard_worker(raw, out, cfg, worker_index=1, num_workers=2).complete
    assert merge_job(raw, out, cfg, workers=1) == m
    assert_same_files(out, shards)


def test_two_workers_at_the_same_time_then_merge(raw, shards, tmp_path):
    """Two worker processes of the console script, started together on one OUT: no collision."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "spinestream", "shard", "--no-progress", "--data", str(raw), "--out", str(out),
           "--workers", "1", *SET, "--num-workers", "2", "--worker-index"]
    procs = [subprocess.Popen([*cmd, str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    for i, (p, (_, err)) in enumerate(zip(procs, results)):
        assert p.returncode == 0, err
        assert f"worker {i} of 2 done" in err and "--merge" in err
    assert committed(out) == set(uids(raw))
    rc = subprocess.run([sys.executable, "-m", "spinestream", "shard", "--no-progress", "--data", str(raw), "--out",
                         str(out), "--workers", "2", *SET, "--merge"], env=env, capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    assert_same_files(out, shards)


def test_merge_with_a_worker_missing_names_its_studies_and_writes_nothing(raw, tmp_path):
    out, cfg = tmp_path / "out", ShardConfig(**CFG)
    shard_worker(raw, out, cfg, worker_index=1, num_workers=2, workers=1)
    missing = [u for u in uids(raw) if worker_of(u, 2) == 0]
    with pytest.raises(JobError) as err:
        merge_job(raw, out, cfg, workers=1)
    msg = str(err.value)
    assert "\n" not in msg and f"{len(missing)} of {len(uids(raw))} studies" in msg
    assert "--worker-index 0 (never started) of --num-workers 2" in msg
    assert all(f"{u} (worker 0/2)" in msg for u in missing)
    assert not any(u in msg for u in uids(raw) if u not in missing)
    assert not (out / "manifest.json").exists() and not list(out.glob("wds/*")) and (out / "_work").is_dir()
    # worker 0 started but was killed: the message says so (its record, with the host it ran on)
    convert.atomic_write_json(convert.worker_record(Layout(out), 0, 2),
                              {"worker_index": 0, "num_workers": 2, "host": "node17", "finished": False})
    with pytest.raises(JobError, match=r"--worker-index 0 \(started on node17, not finished\)"):
        merge_job(raw, out, cfg, workers=1)
    # many missing studies: the first few and the count of the rest
    msg = convert._missing_message(Layout(out), missing, len(uids(raw)), show=2)
    assert f"{missing[1]} (worker 0/2) and {len(missing) - 2} more" in msg and missing[2] not in msg


def test_a_study_that_failed_is_present_not_missing(raw, shards, tmp_path):
    """A study a worker could not read is bad input recorded as failed: the merge lists it in the
    manifest as a plain run does, byte for byte."""
    pick = uids(raw)[:4]
    data = subset(raw, tmp_path / "raw", pick)
    bad = next(u for u in pick if worker_of(u, 2) == 1)
    for f in (data / "train_images" / bad).glob("*.dcm"):
        f.write_bytes(b"not a dicom file")
    cfg = ShardConfig(**CFG)
    single = shard_dataset(data, tmp_path / "single", cfg, workers=1)
    assert [f.study for f in single.failed_studies] == [bad]
    out = tmp_path / "array"
    assert shard_worker(data, out, cfg, worker_index=1, num_workers=2).failed == 1
    shard_worker(data, out, cfg, worker_index=0, num_workers=2)
    assert merge_job(data, out, cfg, workers=1).failed_studies == single.failed_studies
    assert_same_files(out, tmp_path / "single")


def test_a_killed_worker_resumes_without_touching_the_others(raw, shards, tmp_path):
    out, cfg = tmp_path / "out", ShardConfig(**CFG)
    lay = Layout(out)
    for i in range(2):
        shard_worker(raw, out, cfg, worker_index=i, num_workers=2, workers=1)
    # worker 0 killed while converting a study: its staging dir torn, the study not committed
    victim = sorted(u for u in uids(raw) if worker_of(u, 2) == 0)[-1]
    os.replace(lay.work / "studies" / victim, lay.work / "studies" / f"{victim}.tmp")
    shutil.rmtree(lay.volumes / victim)
    torn = lay.work / "tmp" / "w0-of-2" / f"{victim}.zarr" / "zarr.json"
    torn.parent.mkdir(parents=True)
    torn.write_text("{")
    # ... while another worker (say of a rerun) is writing in its own staging dir
    busy = lay.work / "tmp" / "w1-of-2" / "other.zarr" / "zarr.json"
    busy.parent.mkdir(parents=True)
    busy.write_text("being written")
    with pytest.raises(JobError, match=rf"1 of {len(uids(raw))} studies.*{victim} \(worker 0/2\)"):
        merge_job(raw, out, cfg, workers=1)
    r = shard_worker(raw, out, cfg, worker_index=0, num_workers=2, workers=1)
    assert (r.converted, r.already_done) == (1, r.studies - 1)  # only the victim was redone
    assert busy.read_text() == "being written"  # worker 0 cleaned only its own staging dir
    assert not torn.exists() and not (lay.work / "studies" / f"{victim}.tmp").exists()
    shutil.rmtree(busy.parent.parent)
    merge_job(raw, out, cfg, workers=1)
    assert_same_files(out, shards)


def test_a_plain_run_finishes_what_workers_started(raw, shards, tmp_path, capsys):
    out, cfg = tmp_path / "out", ShardConfig(**CFG)
    r = shard_worker(raw, out, cfg, worker_index=0, num_workers=3, workers=1)
    shard_dataset(raw, out, cfg, workers=1)
    assert f"({r.converted} already done)" in capsys.readouterr().err
    assert_same_files(out, shards)


def test_the_partition_is_sha1_of_the_uid_modulo_n(raw):
    for n in (1, 2, 3, 7):
        owner = {u: worker_of(u, n) for u in uids(raw)}
        assert all(0 <= i < n for i in owner.values())  # every study in exactly one worker
        assert owner == {u: int.from_bytes(hashlib.sha1(u.encode("ascii")).digest(), "big") % n for u in uids(raw)}
    assert set(worker_of(u, 2) for u in uids(raw)) == {0, 1}


def test_workers_racing_to_start_agree_on_one_job(tmp_path):
    """Workers of two different jobs started at the same instant on one empty OUT: every round, all of one
    job's workers go on and all of the other's are refused (a check-then-write lets both through)."""
    configs = [to_dict(ShardConfig(**CFG)), to_dict(ShardConfig(**{**CFG, "jpeg_quality": 80}))]
    sel = {"limit": None, "studies": 10, "sha256": "x"}
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show
    try:
        for k in range(20):
            lay = Layout(tmp_path / f"out{k}")
            barrier = threading.Barrier(8)
            outcome: dict[int, str] = {}

            def start(i: int) -> None:
                barrier.wait()
                try:
                    convert.check_job(lay, configs[i % 2], sel)
                    outcome[i] = "ran"
                except JobError as e:
                    outcome[i] = "refused" if "another config" in str(e) else str(e)

            threads = [threading.Thread(target=start, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            won = json.loads((lay.work / "config.json").read_text())
            w = configs.index(won)
            assert outcome == {i: "ran" if i % 2 == w else "refused" for i in range(8)}, k
            assert not list(lay.work.glob("*.tmp-*"))  # no temporary file left behind
    finally:
        sys.setswitchinterval(old)


@pytest.mark.parametrize("flags, match", [
    (["--worker-index", "0"], r"--worker-index needs --num-workers"),
    (["--num-workers", "4"], r"--num-workers needs --worker-index"),
    (["--worker-index", "4", "--num-workers", "4"], r"--worker-index must be 0\.\.3 for --num-workers 4, got 4"),
    (["--worker-index", "-1", "--num-workers", "4"], r"must be 0\.\.3"),
    (["--worker-index", "0", "--num-workers", "0"], r"--num-workers must be >= 1"),
    (["--merge", "--worker-index", "0", "--num-workers", "2"], r"--merge runs once.*not --worker-index"),
    (["--merge", "--num-workers", "2"], r"--merge runs once"),
])
def test_flag_misuse_is_a_one_line_error(raw, tmp_path, flags, match):
    out = tmp_path / "out"
    with pytest.raises(JobError, match=match):
        convert.main(["--data", str(raw), "--out", str(out), *SET, *flags])
    assert not out.exists()  # refused before anything was written


def test_flag_misuse_from_the_console_script(raw, tmp_path):
    rc = subprocess.run([sys.executable, "-m", "spinestream", "shard", "--data", str(raw), "--out", str(tmp_path / "o"),
                         "--worker-index", "2"], env={**os.environ, "PYTHONPATH": str(ROOT)},
                        capture_output=True, text=True)
    assert rc.returncode == 2 and rc.stderr.strip().splitlines() == [
        "spinestream shard: --worker-index needs --num-workers: a job-array worker is --worker-index I "
        "--num-workers N (0 <= I < N, N the same for every worker)"]


def test_a_volume_is_the_same_bytes_every_time_it_is_written(tmp_path, monkeypatch):
    """At 512 px a chunk is several Blosc blocks, which threaded c-blosc wrote in the order they finished:
    reruns, and so a job array and a single run, differed in their volumes' bytes (not their values)."""
    import numpy as np
    from numcodecs import blosc

    from spinestream.shards.volumes import write_volume

    # as in a shard job's process: importing zarr (these tests do) turns numcodecs' threads off, the job never does
    monkeypatch.setattr(blosc, "use_threads", None)

    rng = np.random.default_rng(0)
    vol = (rng.integers(0, 40, (16, 512, 512)) + np.linspace(0, 200, 512)[None, None, :]).astype(np.uint8)
    for k in range(6):
        write_volume(tmp_path / "tmp", tmp_path / f"v{k}", vol, {"study": "x"})
    digests = {json.dumps(file_bytes(tmp_path / f"v{k}")) for k in range(6)}
    assert len(file_bytes(tmp_path / "v0")) == 3 and len(digests) == 1
