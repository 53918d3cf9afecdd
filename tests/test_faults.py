"""Faults injected into every stage (issue 20, "Reliability as figures").

The default suite holds the fixed, fast cases of each defect the injected faults found (in this process: a full
disk is :func:`spinestream.faultinject.injected`, a kill's leftovers are the files a killed writer leaves). The
``slow`` suite kills the verbs for real -- SIGKILL to their process group at random and at named points of their
write sequence, torn writes, a full disk at sampled writes -- through ``benchmarks/reliability.py``, whose
``spinestream bench reliability`` runs the same trials at scale for RELIABILITY.md's figures. Trial counts:
``SPINESTREAM_FAULT_TRIALS`` (default 1 per stage; 2 for shard).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CFG

from spinestream import SpinestreamError
from spinestream.faultinject import injected
from spinestream.shards.fsutil import WriteError, atomic_write_bytes, atomic_write_json, atomic_write_parquet

NO_SPACE = "No space left on device"


def _tmp_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if ".tmp" in p.name)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- the shard job


def _shard(raw, out, **kw):
    from spinestream.preprocess.convert import shard_dataset
    from spinestream.shards.shard_config import ShardConfig

    return shard_dataset(raw, out, ShardConfig(**CFG), workers=kw.pop("workers", 1), limit=3, **kw)


@pytest.fixture(scope="module")
def clean3(raw, tmp_path_factory) -> Path:
    """The first 3 studies sharded cleanly (the reference of the shard cases below)."""
    out = tmp_path_factory.mktemp("clean3") / "out"
    _shard(raw, out)
    return out


def test_a_rerun_clears_the_temporary_files_a_killed_group_phase_left(raw, clean3, tmp_path):
    """Found by the kill trials: a shard job killed while writing a shard, a table, the manifest or a volume's
    attributes left ``<name>.tmp-<pid>`` beside them, and the rerun (another pid) never removed it."""
    out = tmp_path / "out"
    _shard(raw, out, keep_work=True)
    (out / "manifest.json").unlink()  # killed in the group phase, before its last write
    shard = sorted((out / "wds").glob("*.tar"))[0]
    uid = sorted(p.name for p in (out / "volumes.zarr").iterdir() if p.is_dir())[0]
    left = [shard.with_name(shard.name + ".tmp-4242"), shard.with_name(shard.stem + ".idx.tmp-4242"),
            out / "labels" / "truth.parquet.tmp-4242", out / "studies.parquet.tmp-4243",
            out / "manifest.json.tmp-4243", out / "volumes.zarr" / uid / "zarr.json.tmp-4244",
            out / "volumes.zarr" / "zarr.json.tmp-4244"]
    for p in left:
        p.write_bytes(b"half a file")
    _shard(raw, out)
    assert _tmp_files(out) == []
    assert _tree(out) == _tree(clean3)


def test_a_complete_job_rerun_finishes_the_clean_up_a_kill_interrupted(raw, clean3, tmp_path):
    """Found by the kill trials: killed while removing ``_work`` after the manifest, the job's rerun said "already
    complete" and left the half-deleted ``_work`` for good."""
    out = tmp_path / "out"
    _shard(raw, out, keep_work=True)  # the manifest written, _work not (yet) removed
    assert (out / "_work").is_dir()
    _shard(raw, out)
    assert not (out / "_work").exists()
    assert _tree(out) == _tree(clean3)


@pytest.mark.parametrize("where", ["samples.bin", "volume", "shard"])
def test_a_full_disk_stops_the_shard_job_and_the_rerun_loses_no_study(raw, clean3, tmp_path, capsys, where):
    """Found by the full-disk suite: ENOSPC while a study was converted was taken for bad input -- the study was
    recorded as failed, the job went on and finished without it, and its rerun said "already complete": a study
    lost. Now the job stops with one line naming the path; the rerun converts every study."""
    from spinestream.cli import main

    out = tmp_path / "out"
    at = {"samples.bin": "write:samples.bin:3", "volume": "write:/c/1/0/0:2", "shard": "write:wds/:40"}[where]
    argv = ["shard", "--data", str(raw), "--out", str(out), "--limit", "3", "--workers", "1", "--no-progress",
            *[a for k, v in CFG.items() for a in ("--set", f"{k}={v}")]]
    with injected("enospc", at, only=out) as inj:
        rc = main(argv)
    err = capsys.readouterr().err
    assert inj.fired
    lines = [ln for ln in err.splitlines() if ln.startswith("spinestream shard:")]
    assert rc == 2 and lines, err
    assert NO_SPACE in lines[-1] and str(out) in lines[-1] and "Traceback" not in err
    assert not (out / "manifest.json").exists() and not list((out / "_work" / "failed").glob("*.json"))
    assert main(argv) == 0  # space is back
    assert _tree(out) == _tree(clean3)


# --------------------------------------------------------------------------- atomic writes on a full disk


def _writers(tmp_path):
    from spinestream.engine import checkpoint as ck

    df = pd.DataFrame({"a": np.arange(3)})
    return {
        "bytes": lambda p, v: atomic_write_bytes(p, v.encode()),
        "json": lambda p, v: atomic_write_json(p, {"v": v}),
        "parquet": lambda p, v: atomic_write_parquet(p, df.assign(v=v)),
        "checkpoint": lambda p, v: p.parent.mkdir(exist_ok=True) or ck.save(p, {"step": 1, "v": v,
                                                                                "w": torch.arange(1000)}),
    }


ATOMIC = [(k, at) for k in ("bytes", "json", "parquet", "checkpoint")
          for at in ("write:.tmp", "op:fsync:.tmp", "op:replace:target") if (k, at) != ("parquet", "write:.tmp")]
ATOMIC.append(("checkpoint", "write:.tmp:4"))  # a later write: torch.save's writer masks the ENOSPC (found by the
# full-disk suite: a RuntimeError "unexpected pos" and a traceback)
"""(pyarrow writes a table's bytes itself, out of the injector's sight)"""


@pytest.mark.parametrize("kind,at", ATOMIC)
def test_an_atomic_write_on_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path, kind, at):
    """A failed atomic write left its ``.tmp-<pid>`` file (holding the space the rerun needs) and raised the bare
    OSError of ``write`` (no path: a traceback from the console script); a parquet table was renamed into place
    without an fsync."""
    write = _writers(tmp_path)[kind]
    d = tmp_path / "d"
    target = d / "target"
    write(target, "old")
    before = target.read_bytes()
    with injected("enospc", at, only=d) as inj:
        with pytest.raises(WriteError) as e:
            write(target, "new")
    assert inj.fired
    assert isinstance(e.value, SpinestreamError) and e.value.errno == errno.ENOSPC
    assert str(target) in str(e.value) and NO_SPACE in str(e.value)
    assert target.read_bytes() == before and sorted(p.name for p in d.iterdir()) == ["target"]
    write(target, "new")  # space is back
    assert target.read_bytes() != before


def test_a_full_disk_while_writing_a_shard_names_it_and_leaves_nothing(tmp_path):
    from spinestream.shards.wds import ShardWriter

    d = tmp_path / "wds"
    with injected("enospc", "write:.tar.tmp:5", only=d), pytest.raises(WriteError, match="x-0000.tar"):
        with ShardWriter(d / "x-0000.tar") as w:
            for i in range(10):
                w.add(i, b"jpeg" * 100)
            w.close()
    assert list(d.iterdir()) == []


def test_a_write_error_crosses_a_process_pool():
    import pickle

    e = pickle.loads(pickle.dumps(WriteError(errno.ENOSPC, NO_SPACE, "/x/y")))
    assert isinstance(e, WriteError) and e.filename == "/x/y" and e.errno == errno.ENOSPC


def test_the_console_script_reports_an_unnamed_full_disk_on_one_line(capsys):
    from spinestream.cli import run_verb

    def full(argv):
        raise OSError(errno.ENOSPC, NO_SPACE, "/data/out/x.bin")

    assert run_verb("shard", full, []) == 2
    assert capsys.readouterr().err.strip() == ("spinestream shard: cannot write /data/out/x.bin: No space left on "
                                               "device; free space (or make the file system writable) and rerun "
                                               "the same command")

    def other(argv):
        raise OSError(errno.EACCES, "Permission denied", "/x")

    with pytest.raises(PermissionError):  # not a full disk: the traceback stays
        run_verb("shard", other, [])


# --------------------------------------------------------------------------- evaluate, predict, the pipeline


def _eval_inputs(shards: Path, seed: int):
    from spinestream.engine.infer import score_studies
    from spinestream.shards.layout import Layout
    from spinestream.shards.tables import read_study_table

    studies = read_study_table(Layout(shards).studies)
    rng = np.random.default_rng(seed)
    probs = {u: rng.random((int(n), 8)).astype(np.float32)
             for u, n in zip(studies.StudyInstanceUID[:3], studies.n_slices[:3])}
    return probs, studies, score_studies(probs, studies, "max"), Layout(shards)


@pytest.mark.parametrize("at", ["write:report.csv", "write:slice_probs", "write:submission.csv",
                                "op:replace:submission.csv"])
def test_an_evaluation_on_a_full_disk_keeps_the_previous_files_whole(shards, tmp_path, monkeypatch, at):
    """Found by the full-disk suite (and the torn-write kills): evaluate wrote report.csv, slice_probs.parquet and
    submission.csv in place, so a full disk or a kill left a truncated file where the previous evaluation's
    was, with no error naming it."""
    from spinestream.engine import evaluate
    from spinestream.engine.evaluate import write_outputs
    from spinestream.engine.rundir import EvalLayout

    monkeypatch.setattr(evaluate, "heatmaps", lambda probs, studies, path, truth: atomic_write_bytes(path, b"png"))
    out, other = EvalLayout(tmp_path / "eval"), EvalLayout(tmp_path / "other")
    probs, studies, result, lay = _eval_inputs(shards, 0)
    write_outputs(out, probs, studies, result, "max", lay)
    old = _tree(out.root)
    (out.root / "report.csv.tmp-4242").write_text("a killed evaluation's")
    probs2, _, result2, _ = _eval_inputs(shards, 1)
    write_outputs(other, probs2, studies, result2, "max", lay)
    new = _tree(other.root)
    with injected("enospc", at, only=out.root), pytest.raises(WriteError, match=NO_SPACE):
        write_outputs(out, probs2, studies, result2, "max", lay)
    after = _tree(out.root)
    for name in old:  # each file the previous evaluation's or the new one, whole: never a torn one
        assert after.get(name) in (old[name], new[name]), name
    assert after["report.csv"] == old["report.csv"] or at != "write:report.csv"
    write_outputs(out, probs2, studies, result2, "max", lay)
    assert _tree(out.root) == new


def test_predict_leaves_no_temporary_of_a_killed_predict(tmp_path):
    from spinestream.predict import write_submission

    out = tmp_path / "submission.csv"
    (tmp_path / "submission.csv.tmp-4242").write_text("row_id,fractured\nx_C1,0.")  # a killed predict's
    (tmp_path / "other.csv.tmp-4242").write_text("not ours")
    write_submission(pd.DataFrame({"row_id": ["x_C1"], "fractured": [0.5]}), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.csv.tmp-4242", "submission.csv"]


def test_a_trainer_clears_the_oversampling_indexes_a_kill_cut_short(tmp_path):
    from spinestream.engine import checkpoint as ck

    (tmp_path / "oversample").mkdir()
    (tmp_path / "oversample" / "boxed-f0-0000.pos.idx.tmp-4242").write_text("v1.2 3\n")
    (tmp_path / "ckpt-000000002.pt.tmp-4242").write_bytes(b"PK")
    assert len(ck.clean_stale(tmp_path)) == 2 and _tmp_files(tmp_path) == []


def test_the_pipeline_clears_the_records_a_kill_cut_short(tmp_path):
    from spinestream.stages import Stage, run_stages

    state = tmp_path / "stages"
    state.mkdir()
    (state / "a.json.tmp-4242").write_text('{"format": "spinestream-st')
    run_stages([Stage("a", lambda: None, lambda: {})], state, tmp_path, log=lambda line: None)
    assert sorted(p.name for p in state.iterdir()) == ["a.json"]


# --------------------------------------------------------------------------- training


def _train_cfg(shards, out, **more):
    from test_train import _cfg

    return _cfg(shards, out, **{"model.name": "test_resnet", "loader.image_size": 32, "train.checkpoint_every_steps": 2,
                                "train.max_steps": 4, "log.every_steps": 1, "data.val_cohorts": "[negative]", **more})


def _metric_keys(run_dir: Path) -> list[tuple]:
    """(step, kind) of each metrics.jsonl record, the clocks' warnings left out (they depend on the machine)."""
    from spinestream.engine.rundir import read_metrics

    keys = [(r["step"], next(k for k in r if k not in ("step", "epoch"))) for r in read_metrics(run_dir)]
    return [k for k in keys if k[1] not in ("warning", "projection")]


@pytest.mark.slow  # a few training runs: ~10-30 s on 2 cores
def test_a_fresh_start_after_a_kill_before_the_first_checkpoint_logs_each_step_once(shards, tmp_path):
    """Found by the kill trials: killed before its first checkpoint, a run is started again (``spinestream train``
    with the same command: nothing to resume); the fresh run appended to the killed attempt's metrics.jsonl, so
    steps 0 and 1 were there twice."""
    from test_train import _trainer

    cfg = _train_cfg(shards, tmp_path, **{"train.max_steps": 2})
    run = Path(cfg.out_dir) / cfg.name
    run.mkdir(parents=True)
    killed = [{"step": 0, "epoch": 0, "hardware": "h", "precision": "fp32"}, {"step": 1, "epoch": 0, "loss": 0.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in killed) + '{"step": 2, "lo')
    _trainer(cfg).fit()
    assert _metric_keys(run) == [(0, "hardware"), (1, "loss"), (2, "loss"), (2, "val")]


@pytest.mark.slow  # a few training runs: ~10-30 s on 2 cores
def test_a_second_resume_from_the_same_checkpoint_logs_its_headline_once(shards, tmp_path, monkeypatch):
    """Found by the double-kill trials: resumed from ckpt-2 and killed again before ckpt-4, the next resume from
    ckpt-2 kept the first resume's headline (logged at step 2, after the checkpoint) and logged its own."""
    from test_train import _trainer

    from spinestream.engine import checkpoint as ck

    cfg = _train_cfg(shards, tmp_path)
    first = _trainer(cfg)
    real = ck.save_step

    class Killed(BaseException):
        pass

    def save_step(run_dir, step, state, keep_last):
        if step == 4:
            raise Killed
        return real(run_dir, step, state, keep_last)

    monkeypatch.setattr(ck, "save_step", save_step)
    with pytest.raises(Killed):
        first.fit()
    with pytest.raises(Killed):
        _trainer(cfg, resume=ck.latest(first.run_dir)).fit()  # resumed at step 2, killed again
    monkeypatch.setattr(ck, "save_step", real)
    _trainer(cfg, resume=ck.latest(first.run_dir)).fit()
    keys = _metric_keys(first.run_dir)
    assert len(keys) == len(set(keys)), keys
    assert [s for s, k in keys if k == "hardware"] == [0, 2]


@pytest.mark.slow  # a few training runs: ~10-30 s on 2 cores
def test_a_run_killed_after_its_last_checkpoint_draws_its_curves_when_resumed(shards, tmp_path):
    """Found by the kill trials: killed between the last checkpoint and the plot, a run resumed as "already
    complete" returned before plotting: curves.png was never written."""
    from test_train import _trainer

    from spinestream.engine import checkpoint as ck

    cfg = _train_cfg(shards, tmp_path)
    t = _trainer(cfg)
    t.fit()
    png = t.run_dir / "curves.png"
    want = png.read_bytes()
    png.unlink()
    _trainer(cfg, resume=ck.latest(t.run_dir)).fit()
    assert png.read_bytes() == want


def test_a_resumed_run_checkpoints_the_rng_state_an_uninterrupted_one_does(tmp_path):
    """Found by the pipeline's kill trials: a resumed round 1 had the uninterrupted run's weights, but its best.pt
    held another python ``random`` state (never seeded, so every process's differed; checkpointed all the same),
    so best.pt's sha256 -- which the pipeline fingerprints -- changed with every run, killed or not."""
    import random

    from test_train import _cfg

    from spinestream.engine.build import build_device

    cfg = _cfg(tmp_path / "shards", tmp_path)
    random.seed(1)  # one process's state before the run starts
    np.random.seed(1)
    build_device(cfg)
    first = random.getstate(), np.random.get_state()[1].copy()
    random.seed(2)  # another process's
    np.random.seed(2)
    build_device(cfg)
    assert random.getstate() == first[0]
    assert np.array_equal(np.random.get_state()[1], first[1])  # numpy's too (found once the harness's forks no
    # longer shared it)


@pytest.mark.slow  # two trainers and a short run: ~12 s on 2 cores
def test_a_resumed_scheduler_counts_its_steps_as_the_uninterrupted_one(shards, tmp_path):
    """Found by the pipeline's kill trials (with the whole checkpoint compared): the scheduler rebuilt on resume
    restarted its count of step() calls, so every checkpoint after a resume differed from the uninterrupted
    run's (scheduler._step_count 3 where it had 5) and best.pt's hash changed, the weights being equal."""
    from test_train import _trainer

    from spinestream.engine import checkpoint as ck

    t = _trainer(_train_cfg(shards, tmp_path, **{"train.max_steps": 2}))
    t.fit()
    resumed = _trainer(_train_cfg(shards, tmp_path, **{"train.max_steps": 2}), resume=ck.latest(t.run_dir))
    assert resumed.sched.state_dict() == t.sched.state_dict()


@pytest.mark.slow  # a short run and its resume: ~15 s on 2 cores
def test_a_resumed_run_writes_the_uninterrupted_runs_checkpoints_byte_for_byte(shards, tmp_path):
    """Found by the pipeline's kill trials: every entry equal, a resumed run's ckpt-4 and best.pt still had other
    bytes (and best.pt, which the pipeline fingerprints, another sha256): pickle shares a string by identity, and
    the keys read back from ckpt-2 (the optimizer's ``lr`` and ``weight_decay`` ...) were copies where the
    uninterrupted run had the interned literals; resumed by ``spinestream train --resume`` (the config read from
    config.yaml), so were the config's values (the DALI trials)."""
    from test_train import _trainer

    from spinestream.engine import checkpoint as ck

    cfg = _train_cfg(shards, tmp_path)
    t = _trainer(cfg)
    t.fit()
    last, best = t.run_dir / "ckpt-000000004.pt", t.run_dir / ck.BEST
    want = last.read_bytes(), best.read_bytes()
    last.unlink()  # killed right after ckpt-2 was written
    best.unlink()
    from spinestream.engine.rundir import read_config

    _trainer(read_config(t.run_dir), resume=ck.latest(t.run_dir)).fit()  # as `spinestream train --resume` reads it
    assert (last.read_bytes(), best.read_bytes()) == want


# --------------------------------------------------------------------------- slow: real kills, every stage


TRIALS = int(os.environ.get("SPINESTREAM_FAULT_TRIALS", "1"))


@pytest.fixture(scope="module")
def ws(raw, tmp_path_factory):
    from spinestream.benchmarks.reliability import Workspace, Zygote

    with Zygote() as z:
        yield Workspace(tmp_path_factory.mktemp("reliability"), z, log=print, raw=raw)


def _stage_param(name):
    marks = [pytest.mark.slow] + ([pytest.mark.dali] if "dali" in name else [])
    return pytest.param(name, marks=marks, id=name)


STAGES = ["shard", "train-torch", "train-torch-accum", "train-dali", "train-dali-accum", "pseudo-label", "evaluate",
          "predict", "run"]


def _need(stage: str) -> None:
    if "dali" in stage:
        pytest.importorskip("nvidia.dali")


def _ok(trials) -> None:
    bad = [t for t in trials if t.problems]
    assert not bad, "\n".join(f"{t.stage} #{t.index} {t.faults}: " + " / ".join(map(str, t.problems)) for t in bad)


@pytest.mark.parametrize("stage", [_stage_param(s) for s in STAGES])
def test_killed_at_random_points_the_rerun_gives_the_clean_result(ws, stage):
    """SIGKILL before a random op, in a random write or after a random delay (sometimes in the rerun too), then
    the rerun: the clean run's outputs, nothing torn, repeated or left over, within the timeout."""
    import random

    from spinestream.benchmarks.reliability import kill_trial

    _need(stage)
    rng = random.Random(f"test-{stage}")
    n = TRIALS * (2 if stage == "shard" else 1)
    trials = [kill_trial(ws, stage, i, rng) for i in range(n)]
    assert sum(t.injected for t in trials) >= 1  # at least one fault landed (a run may end before its point)
    _ok(trials)


NAMED = [
    # (stage, fault, where): each defect the random trials found, at its point, for good
    ("shard", "kill", "op:replace:labels/truth.parquet"),  # temporaries left beside the final files
    ("shard", "kill", "op:unlink:samples.bin:3"),  # a half-deleted _work after the manifest
    ("train-torch", "kill", "op:open:ckpt-000000002.pt.tmp"),  # before the first checkpoint: metrics twice
    ("train-torch", "kill", "op:open:curves.png.tmp"),  # after the last checkpoint: no curves.png
    ("train-torch", "kill", "op:open:ckpt-000000004.pt.tmp"),  # killed twice there (below): the headline twice
    ("pseudo-label", "kill", "op:replace:pseudo-t.parquet"),  # the table's temporary left
    ("evaluate", "tear", "write:report.csv"),  # a torn report.csv where the previous one was
    ("predict", "kill", "op:replace:submission.csv"),  # the submission's temporary left
]


@pytest.mark.slow
@pytest.mark.parametrize("stage,mode,at", NAMED, ids=[f"{s}-{a.split(':', 1)[1]}" for s, _, a in NAMED])
def test_killed_at_a_named_point_the_rerun_gives_the_clean_result(ws, stage, mode, at):
    from spinestream.benchmarks.reliability import Problem, _remove, strays

    st, ref = ws.stage(stage), ws.reference(stage)
    _remove(st.out)
    if st.overwrite:
        shutil.copytree(ref["copy"], st.out)
    twice = at.endswith("ckpt-000000004.pt.tmp")
    argv, problems = st.argv, []
    for k in range(2 if twice else 1):
        res = ws.z.run(argv, log=ws.logfile(f"named-{stage}-{k}"), mode=mode, at=at, seed=k)
        assert res["rc"] == -9, res["log"][-2000:]
        problems += st.finals(ref["copy"], st.out) if st.finals else []
        argv = st.rerun() if st.rerun else st.argv
    res = ws.z.run(argv, log=ws.logfile(f"named-{stage}-rerun"), timeout=300)
    assert res["rc"] == 0, res["log"][-3000:]
    problems += st.check(ref["copy"], st.out) + strays(st.out if st.out.is_dir() else st.out.parent)
    assert not problems, " / ".join(map(str, problems))
    assert all(isinstance(p, Problem) for p in problems)


FULL_DISK = ["shard", "train-torch", "pseudo-label", "evaluate", "predict"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", FULL_DISK)
def test_a_full_disk_at_sampled_writes_is_reported_and_the_rerun_loses_nothing(ws, stage):
    import random

    from spinestream.benchmarks.reliability import diskfull_points, diskfull_trial

    rng = random.Random(f"test-diskfull-{stage}")
    points = diskfull_points(ws.reference(stage), 2 * TRIALS, rng)
    trials = [diskfull_trial(ws, stage, at) for at in points]
    _ok(trials)
