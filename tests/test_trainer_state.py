"""The trainer's state: the auto batch probe leaves the model alone, resume is exact with gradient
accumulation, every RNG comes back, a skipped (non-finite) step is not a step, checkpoints and the
metrics log survive a kill, and study inference does not autotune per shape."""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from test_train import _cfg, _trainer
from tqdm import tqdm

from spinestream.engine import checkpoint as ck
from spinestream.engine.trainer import select_training_shards


def _bn_buffers(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


# --------------------------------------------------------------------------- batch_size: auto


def test_auto_batch_probe_leaves_a_fresh_model_and_the_rng_alone(shards, tmp_path):
    fixed = _trainer(_cfg(shards, tmp_path / "f", **{"train.batch_size": 8}))
    rng_fixed = torch.get_rng_state()
    t = _trainer(_cfg(shards, tmp_path / "a", **{"train.batch_size": "auto", "loader.batch_size": 8}))
    rng_auto = torch.get_rng_state()
    bn = _bn_buffers(t.model)
    assert bn, "the test model must have BatchNorm layers"
    for k, v in bn.items():  # untouched: still the fresh layer's statistics
        if k.endswith("running_mean") or k.endswith("num_batches_tracked"):
            assert torch.count_nonzero(v) == 0, k
        else:
            assert torch.equal(v, torch.ones_like(v)), k
    assert torch.equal(rng_fixed, rng_auto)  # the probe drew its random batches from a forked RNG
    for a, b in zip(fixed.model.state_dict().values(), t.model.state_dict().values()):
        assert torch.equal(a, b)
    rec = json.loads((t.run_dir / "batch_size.json").read_text())
    assert rec["memory_headroom_gb"] == t.cfg.train.memory_headroom_gb and "peak_gb" in rec
    assert "peak_note" in rec


def test_auto_batch_on_resume_reuses_the_record_and_keeps_the_checkpoints_bn(shards, tmp_path, monkeypatch):
    import spinestream.engine.autobatch as ab

    cfg = _cfg(shards, tmp_path, **{"train.batch_size": "auto", "train.max_steps": 4})
    a = _trainer(cfg)
    a.fit()
    path = ck.latest(a.run_dir)
    saved = _bn_buffers_from(ck.load(path)["model"])
    assert any(torch.count_nonzero(v) for k, v in saved.items() if k.endswith("running_mean"))

    def no_probe(*args, **kw):
        raise AssertionError("resume must reuse batch_size.json, not probe again")

    with monkeypatch.context() as m:
        m.setattr(ab, "auto_batch_size", no_probe)
        b = _trainer(cfg, resume=path)
    assert b.loader_cfg.batch_size == 8
    _assert_same(saved, _bn_buffers(b.model))
    (a.run_dir / "batch_size.json").unlink()  # an old run without the record: the probe runs, on a copy
    c = _trainer(cfg, resume=path)
    _assert_same(saved, _bn_buffers(c.model))


def _bn_buffers_from(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- exact resume


def _accum_batch(shards, tmp_path) -> int:
    """A batch size whose epoch is not a multiple of the accumulation window (else the test proves nothing)."""
    n = select_training_shards(_cfg(shards, tmp_path)).samples
    return next(b for b in (8, 7, 6, 5, 9) if -(-n // b) % 3)


def test_grad_accum_resume_equals_the_uninterrupted_run(shards, tmp_path):
    bs = _accum_batch(shards, tmp_path / "probe")
    sets = {"optim.grad_accum": 3, "train.epochs": 2, "train.batch_size": bs, "loader.batch_size": bs,
            "train.checkpoint_every_steps": 10_000}
    a = _trainer(_cfg(shards, tmp_path / "a", **sets))
    assert len(a.loader) % 3 != 0
    a.fit()
    first = ck.checkpoints(a.run_dir)[0]  # written at the end of epoch 1, after its short last window
    assert ck.load(first)["loader"]["position"] == 0
    b_dir = tmp_path / "b" / "t"
    b_dir.mkdir(parents=True)
    shutil.copy(first, b_dir / first.name)
    b = _trainer(_cfg(shards, tmp_path / "b", **sets), resume=b_dir / first.name)
    b.fit()
    assert b.step == a.step == 2 * a.steps_per_epoch
    diff = max((pa - pb).abs().max().item() for pa, pb in zip(a.model.state_dict().values(),
                                                                b.model.state_dict().values())
               if pa.dtype.is_floating_point)
    assert diff <= 1e-7, diff


def test_every_rng_is_restored_and_dropout_repeats(shards, tmp_path):
    t = _trainer(_cfg(shards, tmp_path))
    x = torch.randn(4, 3, 48, 48)
    path = tmp_path / "s.pt"
    ck.save(path, t.state())
    t.model.train()
    drawn = (torch.rand(5), np.random.rand(5), random.random(), t.model(x).detach())
    b = _trainer(_cfg(shards, tmp_path), resume=path)
    b.model.train()
    again = (torch.rand(5), np.random.rand(5), random.random(), b.model(x).detach())
    assert torch.equal(drawn[0], again[0])
    assert np.array_equal(drawn[1], again[1])
    assert drawn[2] == again[2]
    assert torch.equal(drawn[3], again[3])  # dropout draws the same masks


def test_cuda_rng_of_every_device_is_saved_and_restored(monkeypatch):
    from spinestream.engine.trainer import rng_state, set_rng_state

    states = [torch.arange(8, dtype=torch.uint8), torch.arange(8, 16, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: restored.extend(s))
    s = rng_state()
    assert len(s["cuda"]) == 2
    set_rng_state(s)
    assert len(restored) == 2 and all(torch.equal(a, b) for a, b in zip(restored, states))


# --------------------------------------------------------------------------- skipped steps


def _inf_once(t):
    """Make the first backward's gradient of one weight infinite (the loss stays finite)."""
    calls = [0]
    p = next(p for p in t.model.parameters() if p.requires_grad)

    def hook(g):
        calls[0] += 1
        return g * float("inf") if calls[0] == 1 else g

    p.register_hook(hook)
    return calls


@pytest.mark.parametrize("scaler", [True, False], ids=["fp16-gradscaler", "bf16-fp32-path"])
def test_a_skipped_step_is_not_a_step(shards, tmp_path, scaler):
    t = _trainer(_cfg(shards, tmp_path, **{"train.max_steps": 3, "train.checkpoint_every_steps": 10_000}))
    if scaler:  # GradScaler as in fp16 (on the CPU): it sees the inf gradient and skips Adam
        t.scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0 ** 8)
    _inf_once(t)
    t.fit()
    assert t.nan_total == 1
    assert t.step == 3 and t.sched.last_epoch == 3
    assert t.loader.position == 4 * t.loader_cfg.batch_size  # four windows were needed for three steps
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    if scaler:
        assert t.scaler.get_scale() < 2.0 ** 8  # the scaler backed off once


def test_skip_leaves_weights_ema_schedule_and_optimizer_alone(shards, tmp_path):
    t = _trainer(_cfg(shards, tmp_path, **{"optim.warmup_steps": 5}))
    t._bar = tqdm(disable=True)
    batches = iter(t.loader)
    params = [p.detach().clone() for p in t.model.parameters()]
    ema = [v.clone() for v in t.ema.state_dict().values()]
    lr0 = t.opt.param_groups[0]["lr"]
    _inf_once(t)
    assert t._step(next(batches))  # an optimizer step was issued ...
    t._settle(block=True)  # ... and turned out skipped on the device
    assert (t.step, t.nan_total, t.nan_streak, t.sched.last_epoch) == (0, 1, 1, 0)
    assert t.opt.param_groups[0]["lr"] == lr0 and t.sched.get_last_lr()[0] == lr0
    assert all(torch.equal(a, b) for a, b in zip(params, t.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema, t.ema.state_dict().values()) if a.dtype.is_floating_point)
    assert all(float(s["step"]) == 0 for s in t.opt.state.values())
    assert t._step(next(batches))
    t._settle(block=True)
    assert (t.step, t.nan_total, t.nan_streak) == (1, 1, 0)
    assert not all(torch.equal(a, b) for a, b in zip(params, t.model.parameters()))


# --------------------------------------------------------------------------- run directory


def test_resume_leaves_no_repeated_steps_in_metrics_and_no_stale_tmp(shards, tmp_path):
    cfg = _cfg(shards, tmp_path, **{"train.max_steps": 8})
    a = _trainer(cfg)
    a.fit()
    stale = a.run_dir / "ckpt-000000012.pt.tmp-4242"  # what a save killed mid-write leaves
    stale.write_bytes(b"half a checkpoint")
    b = _trainer(cfg, resume=a.run_dir / "ckpt-000000004.pt")  # "killed" after step 4: steps 5..8 run again
    assert not stale.exists()
    b.fit()
    rows = [json.loads(line) for line in (a.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "loss" in r]
    val_steps = [r["step"] for r in rows if "val" in r]
    assert train_steps == sorted(set(train_steps)) == [2, 4, 6, 8]
    assert len(val_steps) == len(set(val_steps)) == 1


def test_validation_runs_study_inference_in_fixed_size_batches(shards, tmp_path, monkeypatch):
    """The trainer validates through engine.infer (inputs built where the model runs): every model call has
    loader.batch_size rows, so cudnn.benchmark tunes one shape, and the EMA weights are the ones scored."""
    import spinestream.engine.infer as infer

    t = _trainer(_cfg(shards, tmp_path))
    shapes, calls = [], []
    real = infer.predict_studies

    def spy(model, *a, **k):
        calls.append(model)
        hook = model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
        try:
            return real(model, *a, **k)
        finally:
            hook.remove()

    monkeypatch.setattr(infer, "predict_studies", spy)
    result = t.validate()
    assert calls == [t.ema.module]
    assert result["studies"] == len(t.val_studies)
    bs, size = t.loader_cfg.batch_size, t.cfg.loader.image_size
    assert shapes and set(shapes) == {(bs, 3, size, size)}
