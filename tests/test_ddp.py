"""Data-parallel training under torchrun (engine/dist.py, the trainer), on the CPU with gloo and 2 ranks.

One instrumented 2-rank run (tests/ddp_worker.py: the real ``spinestream train`` CLI, 2 epochs, gradient
accumulation 2, one NaN loss injected on rank 1) is shared by the checks of what each rank trained on, the
weights, the writes and validation; a second one resumes a copy of its mid-epoch checkpoint under the real
``torchrun`` and must end with the uninterrupted run's weights.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ranks import ROOT, free_port, run_ranks

from spinestream import InputError
from spinestream.engine import checkpoint as ck
from spinestream.engine.config import RunConfig
from spinestream.shards.config import load_config

WORKER = str(Path(__file__).with_name("ddp_worker.py"))


def _sets(shards: Path, out: Path, **extra) -> list[str]:
    sets = {"data.root": shards, "out_dir": out, "name": "t", "model.name": "test_efficientnet",
            "model.pretrained": "false", "loader.image_size": 48, "loader.batch_size": 8, "loader.num_threads": 1,
            "loader.augment.p_clahe": 0, "train.batch_size": 8, "train.epochs": 2,
            "train.checkpoint_every_steps": 3, "train.keep_last": 10, "log.wandb": "disabled", "log.every_steps": 2,
            "optim.warmup_steps": 2, "data.val_fold": 1, "optim.grad_accum": 2, **extra}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def two_ranks(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    ranks = run_ranks([WORKER, *_sets(shards, out)], env={"DDP_OUT": str(out / "report"), "NAN_AT": "1:3"})
    reports = [json.loads((out / "report" / f"rank{r}.json").read_text()) for r in range(2)]
    return out, ranks, reports


def test_each_epoch_is_split_between_the_ranks_without_overlap(two_ranks):
    _, _, (a, b) = two_ranks
    assert a["world"] == b["world"] == 2
    for epoch in ("0", "1"):
        mine, theirs = a["seen"][epoch], b["seen"][epoch]
        assert not set(mine) & set(theirs)
        assert len(mine) + len(theirs) == a["samples"]  # every selected sample once in the epoch
        assert len(set(mine) | set(theirs)) == a["samples"]
    assert a["seen"]["0"] != a["seen"]["1"] and set(a["seen"]["0"]) != set(a["seen"]["1"])  # a new split


def test_ranks_hold_the_same_weights_and_skip_a_step_together(two_ranks):
    _, _, (a, b) = two_ranks
    assert a["params"] == b["params"]
    # rank 1's NaN loss skipped the step on both ranks (else their weights and step counts would differ)
    assert a["nan_total"] == b["nan_total"] == 1
    assert a["step"] == b["step"]


def test_only_rank_zero_writes_and_speaks(two_ranks):
    out, ranks, _ = two_ranks
    run = out / "t"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], tuple(sorted(k for k in r if k not in ("step", "epoch")))) for r in rows]
    assert len(keys) == len(set(keys)), "a metrics record written twice"
    losses = [r for r in rows if "loss" in r]
    assert losses and all(r["ranks"] == 2 and r["images_per_s_rank"] * 2 == pytest.approx(r["images_per_s"])
                          for r in losses)
    assert "2 ranks" in rows[0]["hardware"]
    assert "done:" in ranks[0].stdout and "done:" not in ranks[1].stdout
    assert "spinestream train:" in ranks[0].stderr and "spinestream train:" not in ranks[1].stderr
    assert ck.load(ck.latest(run))["world"] == 2


def test_validation_on_two_ranks_equals_one_process(two_ranks):
    _, _, (a, b) = two_ranks
    # the trainer's validation (each rank its part of the studies, gathered) == one process over all of them
    assert a["val_split"] == b["val_split"] == a["val_alone"] == b["val_alone"]


def test_a_killed_two_rank_run_resumed_on_two_ranks_ends_with_the_uninterrupted_weights(two_ranks, shards, tmp_path):
    out, _, _ = two_ranks
    a = out / "t"
    mid = next(p for p in ck.checkpoints(a) if ck.load(p)["loader"]["position"] != 0)  # killed mid-epoch
    b = tmp_path / "t"
    b.mkdir()
    for f in ("config.yaml", "run.json", "shard_spec.json"):
        shutil.copy(a / f, b / f)
    shutil.copy(mid, b / mid.name)
    env = {**os.environ, "DDP_OUT": str(tmp_path / "report"), "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port())]
    p = subprocess.run([*torchrun, WORKER, "--resume", str(b)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "resuming at step" in p.stderr
    want, got = ck.load(ck.latest(a)), ck.load(ck.latest(b))
    assert got["step"] == want["step"]
    for k, v in want["model"].items():
        if v.dtype.is_floating_point:
            assert (v - got["model"][k]).abs().max().item() <= 1e-7, k
    for k, v in (want["ema"] or {}).items():
        if v.dtype.is_floating_point:
            assert (v - got["ema"][k]).abs().max().item() <= 1e-7, k


# --------------------------------------------------------------------------- no processes needed


def _loader(shards, world: int):
    from spinestream.engine.loader import DeviceLabels, LoaderConfig, build_loader, select

    sel = select(shards, cohorts=["boxed", "negative"], exclude_folds=[1])
    return build_loader(sel, DeviceLabels.load(shards, n_total=sel.n_total), LoaderConfig(
        backend="torch", image_size=48, batch_size=8, num_threads=1), world=world, train=True)


def test_another_world_size_resumes_at_an_epoch_start_and_refuses_mid_epoch(shards):
    two = _loader(shards, 2)
    state = two.state_dict()
    one = _loader(shards, 1)
    one.load_state_dict({**state, "epoch": 3, "position": 0})  # an epoch's start: split the new way
    assert (one.epoch, one.position) == (3, 0)
    one.load_state_dict({**state, "epoch": 3, "position": two.positions})  # an old checkpoint's end of epoch
    assert (one.epoch, one.position) == (4, 0)
    with pytest.raises(InputError, match=r"resume with 2 rank\(s\).*or from a checkpoint written at an epoch end"):
        one.load_state_dict({**state, "epoch": 3, "position": 8})


def test_learning_rate_scaling_with_the_number_of_ranks():
    from spinestream.engine.build import effective_lr

    def cfg(rule):
        return load_config(RunConfig, None, ["optim.lr=1e-3", f"optim.lr_scaling={rule}"])

    assert effective_lr(cfg("none"), 4) == 1e-3
    assert effective_lr(cfg("linear"), 4) == pytest.approx(4e-3)
    assert effective_lr(cfg("sqrt"), 4) == pytest.approx(2e-3)
    assert effective_lr(cfg("linear"), 1) == 1e-3


def test_sync_batchnorm_without_cuda_is_refused_naming_the_fix(monkeypatch):
    from spinestream.engine.build import build_device
    from spinestream.engine.dist import Dist

    cfg = load_config(RunConfig, None, ["train.device=cpu", "train.sync_batchnorm=true"])
    with pytest.raises(InputError, match="train.sync_batchnorm=false"):
        build_device(cfg, Dist(rank=0, world=2))
    assert build_device(cfg, Dist())[0].type == "cpu"  # one process: nothing to synchronise


PROBE = """
import sys, time
from spinestream.engine import dist
d = dist.init_from_env(timeout_s=1)
if d.rank == 1:
    time.sleep(3.5)
    sys.exit(0)
try:
    d.barrier("rank 1's step")
except dist.RankTimeout as e:
    print("RankTimeout:", e)
    sys.exit(3)
"""


@pytest.mark.slow  # ~10 s of waiting for a timeout
def test_a_rank_that_hangs_stops_the_others_with_a_clear_error():
    r0, r1 = run_ranks(["-c", PROBE], check=False, timeout=60)
    assert r0.returncode == 3, r0.stderr
    assert "rank 0 of 2 waited for rank 1's step" in r0.stdout and "train.dist_timeout_s" in r0.stdout


def test_spinestream_run_under_torchrun_says_what_to_start_instead(monkeypatch):
    from spinestream import run

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="start the stages' verbs"):
        run.main([])


def test_one_process_is_a_world_of_one(monkeypatch):
    from spinestream.engine import dist

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    d = dist.Dist()
    assert (d.rank, d.world, d.main, d.enabled) == (0, 1, True, False)
    assert d.part([1, 2, 3]) == [1, 2, 3] and d.merge({"a": 1}) == {"a": 1}
    assert d.any_(torch.tensor(True)).item() and d.gather(5) == [5]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(InputError, match=r"RANK=2 is not in \[0, WORLD_SIZE=2\)"):
        dist.env_world()


@pytest.mark.slow
def test_the_torch_loader_splits_and_trains_data_parallel_too(shards, tmp_path):
    run_ranks([WORKER, *_sets(shards, tmp_path, **{"loader.backend": "torch"})],
              env={"DDP_OUT": str(tmp_path / "report")})
    a, b = (json.loads((tmp_path / "report" / f"rank{r}.json").read_text()) for r in range(2))
    assert a["params"] == b["params"] and a["val_split"] == a["val_alone"]
    for epoch in ("0", "1"):
        assert not set(a["seen"][epoch]) & set(b["seen"][epoch])
        assert len(a["seen"][epoch]) + len(b["seen"][epoch]) == a["samples"]
