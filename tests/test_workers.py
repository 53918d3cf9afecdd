"""A worker process that dies -- a decoder's segfault, an abort, SIGKILL -- fails only its task, never hangs.

``multiprocessing.Pool`` replaced a dead worker and waited for ever for the task it held: the shard job and
``spinestream predict`` hung on a file that crashes a C decoder (issue 20's known gap, issue 21's decoders).
These tests kill workers with real signals (fork, as the shard job's pool): before ``preprocess.workers``
each of them hung until pytest's timeout.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from spinestream.preprocess.workers import Died, Workers, run_alone

pytestmark = pytest.mark.timeout(120)


def start_method() -> str:
    """fork, as the shard job's first pool: after other tests pytest has threads, and the shard job's own
    rule would then pick forkserver, ~1 s per process started (the tests below start dozens)."""
    return "fork"


def _work(task):
    """task = (value, how, marker): crash the process per ``how`` ('segv', 'abort', 'kill', 'raise', 'once':
    segfault only while ``marker`` exists, which it removes first), else return value * 2."""
    value, how, marker = task
    if how == "once" and marker and os.path.exists(marker):
        os.unlink(marker)
        os.kill(os.getpid(), signal.SIGSEGV)
    if how == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if how == "abort":
        os.abort()
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "raise":
        raise ValueError(f"bad input {value}")
    return value * 2


def _died(task, how: Died):
    return ("died", task[0], how.exitcode)


def _tasks(n, bad: dict):
    return [(i, bad.get(i, ""), None) for i in range(n)]


@pytest.mark.parametrize("how, sig", [("segv", signal.SIGSEGV), ("abort", signal.SIGABRT), ("kill", signal.SIGKILL)])
def test_a_dead_worker_fails_only_its_own_task_unordered(how, sig):
    pool = Workers(2, start_method)
    try:
        out = list(pool.imap_unordered(_work, _tasks(12, {5: how}), died=_died))
    finally:
        pool.terminate()
    assert sorted(o for o in out if not isinstance(o, tuple)) == [2 * i for i in range(12) if i != 5]
    assert [o for o in out if isinstance(o, tuple)] == [("died", 5, -sig)]
    assert pool.deaths >= 1


def test_the_ordered_map_keeps_its_order_across_two_deaths():
    pool = Workers(2, start_method)
    try:
        out = list(pool.imap(_work, _tasks(10, {2: "segv", 7: "abort"}), died=_died, ahead=3))
    finally:
        pool.terminate()
    expected = [2 * i for i in range(10)]
    expected[2], expected[7] = ("died", 2, -signal.SIGSEGV), ("died", 7, -signal.SIGABRT)
    assert out == expected


def test_a_task_that_only_died_in_the_pool_gives_its_result_when_run_alone(tmp_path):
    marker = tmp_path / "crash-once"
    marker.touch()
    pool = Workers(2, start_method)
    try:
        out = list(pool.imap(_work, [(i, "once" if i == 3 else "", str(marker) if i == 3 else None)
                                     for i in range(6)], died=_died, ahead=2))
    finally:
        pool.terminate()
    assert out == [0, 2, 4, 6, 8, 10] and pool.deaths == 1


def test_an_exception_is_the_callers_not_a_death():
    pool = Workers(2, start_method)
    try:
        with pytest.raises(ValueError, match="bad input 4"):
            list(pool.imap(_work, _tasks(8, {4: "raise"}), died=_died, ahead=2))
    finally:
        pool.terminate()
    assert pool.deaths == 0
    with pytest.raises(ValueError, match="bad input 1"):
        run_alone(_work, (1, "raise", None), start_method())


def test_died_names_the_signal():
    assert str(Died(-signal.SIGSEGV)) == "killed by SIGSEGV" and not Died(-signal.SIGSEGV).killed
    assert str(Died(3)) == "exited with code 3" and Died(-signal.SIGKILL).killed


# ---------------------------------------------------------------------------------------- the shard job, predict


def _crash_on(uid_part: str, real):
    def convert(task, *a, **k):
        if uid_part in task.uid:
            os.kill(os.getpid(), signal.SIGSEGV)  # what a decoder's segfault does to its worker
        return real(task, *a, **k)
    return convert


def test_a_study_that_crashes_its_decoder_is_recorded_failed_and_the_job_completes(tmp_path, monkeypatch):
    from spinestream.preprocess import convert
    from spinestream.preprocess.synth import make_dataset
    from spinestream.shards.manifest import read_manifest
    from spinestream.shards.shard_config import ShardConfig

    data = tmp_path / "data"
    make_dataset(data, studies=6, test_studies=0, seed=3, size=64, slices=(12, 14))
    uids = sorted(p.name for p in (data / "train_images").iterdir())
    victim = uids[2]
    monkeypatch.setattr(convert, "_convert_study", _crash_on(victim, convert._convert_study))
    monkeypatch.setattr(convert, "start_method", lambda: "fork")  # the workers see the patch (a thread may be left)
    out = tmp_path / "shards"
    manifest = convert.shard_dataset(data, out, ShardConfig(image_size=64, folds=2, exclude_studies=[]), workers=2)
    failed = {f.study: f.reason for f in manifest.failed_studies}
    assert list(failed) == [victim] and "killed by SIGSEGV" in failed[victim]
    assert manifest.counts.studies == len(uids) - 1
    assert read_manifest(out).counts.failed_studies == 1


def test_predict_lists_a_study_that_crashes_its_decoder_and_decodes_the_rest(tmp_path, monkeypatch):
    from spinestream import predict
    from spinestream.preprocess import convert
    from spinestream.preprocess.synth import make_dataset
    from spinestream.shards.shard_config import ShardConfig

    data = tmp_path / "data"
    make_dataset(data, studies=1, test_studies=4, seed=4, size=64, slices=(12, 14))
    studies = sorted((p.name, p) for p in (data / "test_images").iterdir())
    victim = studies[1][0]
    real = predict.decode_study

    def decode(uid, path, cfg):
        if uid == victim:
            os.kill(os.getpid(), signal.SIGSEGV)
        return real(uid, path, cfg)

    monkeypatch.setattr(predict, "decode_study", decode)
    monkeypatch.setattr(convert, "start_method", lambda: "fork")  # the workers see the patch
    with predict.decoding_pool(2) as pool:
        out = list(predict.decoded_studies(studies, ShardConfig(image_size=64), pool, ahead=3))
    assert [d.uid for d in out] == [u for u, _ in studies]
    bad = [d for d in out if d.error]
    assert [d.uid for d in bad] == [victim] and "killed by SIGSEGV" in bad[0].error
    assert all(isinstance(d.volume, np.ndarray) for d in out if not d.error)
