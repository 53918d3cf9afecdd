"""Nothing lost (issue 16, items 1, 2, 4, 5 and 6): every checkpoint resumes -- mid-epoch, at an epoch end, a
finished run's last one -- to the uninterrupted run on both loader backends; a failed resume leaves the run
directory as it was; a kill between a step checkpoint and best.pt loses nothing; a skipped non-finite step
leaves every parameter and buffer of the model and the EMA alone; Ctrl-C saves and says how to continue."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from test_train import _cfg, _trainer

from spinestream.engine import checkpoint as ck

BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.dali)]


def _need(backend: str) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali")


def _sets(backend: str, epochs: int, **more) -> dict:
    # boxed only: 5 steps an epoch; a flat schedule after warm-up (min_lr_ratio 1), so a run stretched from 2 to
    # 3 epochs has the learning rates of a 3-epoch run; a checkpoint every 5 steps lands on each epoch's end,
    # validation every second epoch (so epoch 1's end has a checkpoint without a validation)
    return {"data.train_cohorts": "[boxed]", "loader.backend": backend,
            "optim.min_lr_ratio": 1.0, "train.epochs": epochs, "train.val_every_epochs": 2,
            "train.checkpoint_every_steps": 5, "train.keep_last": 20, **more}


def _weights(t) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in t.model.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in t.ema.state_dict().items()})
    return out


def _assert_same_weights(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _val_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "val" in r]


def _resume_copy(ckpt: Path, cfg, tmp: Path):
    """A run directory holding only ``ckpt`` (the run "killed" right after it), resumed under ``cfg``."""
    run_dir = Path(cfg.out_dir) / cfg.name
    run_dir.mkdir(parents=True)
    shutil.copy(ckpt, run_dir / ckpt.name)
    return _trainer(cfg, resume=run_dir / ckpt.name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_checkpoint_resumes_to_the_uninterrupted_run(shards, tmp_path, backend):
    _need(backend)
    full = _trainer(_cfg(shards, tmp_path / "full", **_sets(backend, 3)))
    assert full.steps_per_epoch == 5
    full.fit()
    assert full.step == 15 and _val_steps(full.run_dir) == [10, 15]

    two = _trainer(_cfg(shards, tmp_path / "two", **_sets(backend, 2)))
    two.fit()
    steps = {ck.load(p)["step"]: p for p in ck.checkpoints(two.run_dir)}
    assert sorted(steps) == [5, 10]
    # the epoch-end checkpoints hold the next epoch's start, never "position == end of epoch"
    assert [(ck.load(steps[s])["loader"]["epoch"], ck.load(steps[s])["loader"]["position"]) for s in (5, 10)] == \
        [(1, 0), (2, 0)]

    # the finished run resumed as it is: nothing to train, nothing changed
    again = _trainer(_cfg(shards, tmp_path / "two", **_sets(backend, 2)), resume=ck.latest(two.run_dir))
    again.fit()
    assert again.step == 10
    _assert_same_weights(two, again)
    # ... and stretched to 3 epochs: the third epoch, with its own permutation, as the 3-epoch run had it
    more = _trainer(_cfg(shards, tmp_path / "two", **_sets(backend, 3)), resume=ck.latest(two.run_dir))
    more.fit()
    assert more.step == 15
    _assert_same_weights(full, more)
    assert _val_steps(two.run_dir) == [10, 15]  # no validation repeated on resume

    # the end of epoch 1 (a checkpoint with no validation at that step), resumed in another directory
    b = _resume_copy(steps[5], _cfg(shards, tmp_path / "from5", **_sets(backend, 3)), tmp_path)
    assert b.step == 5
    b.fit()
    _assert_same_weights(full, b)

    # a run finished mid-epoch (max_steps 7), continued without the cap
    part = _trainer(_cfg(shards, tmp_path / "part", **_sets(backend, 3, **{"train.max_steps": 7})))
    part.fit()
    last = ck.load(ck.latest(part.run_dir))
    assert (last["step"], last["loader"]["position"]) == (7, 16)
    c = _trainer(_cfg(shards, tmp_path / "part", **_sets(backend, 3)), resume=ck.latest(part.run_dir))
    c.fit()
    assert c.step == 15
    _assert_same_weights(full, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_checkpoint_of_the_old_end_of_epoch_form_resumes(shards, tmp_path, backend):
    """Checkpoints written before the fix hold "position == end of epoch": the loader reads them as the next
    epoch's start (DALI failed with "no data in the pipeline", the torch backend ran an empty epoch)."""
    _need(backend)
    t = _trainer(_cfg(shards, tmp_path / "a", **_sets(backend, 1)))
    state = t.loader.state_dict()
    old = {**state, "epoch": 0, "position": t.loader.positions}
    t.loader.load_state_dict(old)
    assert (t.loader.epoch, t.loader.position) == (1, 0)
    with pytest.raises(ValueError, match="outside"):
        t.loader.load_state_dict({**state, "position": t.loader.positions + 1})


# --------------------------------------------------------------------------- item 2: a failed resume


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def other_shards(raw, tmp_path_factory) -> Path:
    """The tiny dataset sharded at another image size and window."""
    from spinestream.preprocess.convert import shard_dataset
    from spinestream.shards.shard_config import ShardConfig

    out = tmp_path_factory.mktemp("other-shards") / "out"
    shard_dataset(raw, out, ShardConfig(image_size=40, folds=2, shard_max_samples=40, windows=[[80, 300]]), workers=2)
    return out


def test_a_failed_resume_leaves_the_run_as_it_was(shards, other_shards, tmp_path, capsys):
    from spinestream.cli import main

    sets = ["--set", f"data.root={shards}", "--set", f"out_dir={tmp_path}", "--set", "name=r",
            "--set", "model.name=test_resnet", "--set", "model.pretrained=false", "--set", "loader.image_size=48",
            "--set", "train.batch_size=8", "--set", "train.max_steps=2", "--set", "log.wandb=disabled",
            "--set", "data.val_fold=1"]
    assert main(["train", *sets]) == 0
    run = tmp_path / "r"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert Path(saved["data"]["root"]).is_absolute()  # the run can be used from any directory
    before = _files(run)
    capsys.readouterr()
    rc = main(["train", "--resume", str(run), "--set", f"data.root={other_shards}", "--set", "train.max_steps=4"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "size=48" in err and "size=40" in err and str(other_shards) in err  # both specs named
    assert _files(run) == before  # config.yaml and shard_spec.json untouched, nothing else written
    # a resume that works does not rewrite shard_spec.json either
    spec = (run / "shard_spec.json").stat()
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=4"]) == 0
    assert (run / "shard_spec.json").stat().st_mtime_ns == spec.st_mtime_ns
    assert ck.load(ck.latest(run))["step"] == 4


# --------------------------------------------------------------------------- item 4: best.pt


class Killed(BaseException):
    """What a SIGKILL does to the process, for the test: nothing after it runs."""


def test_a_kill_between_the_checkpoint_and_best_pt_loses_nothing(shards, tmp_path, monkeypatch):
    cfg = _cfg(shards, tmp_path, **{"train.max_steps": 4, "train.val_every_steps": 2,
                                    "train.checkpoint_every_steps": 100})
    t = _trainer(cfg)
    losses = iter([0.5, 0.4])
    monkeypatch.setattr(t, "validate", lambda: {"competition_loss": next(losses), "accuracy": 0.5})
    real = ck.save

    def save(path, state):
        if Path(path).name == ck.BEST and state["step"] == 4:
            raise Killed  # after ckpt-4 (whose record says: best at step 4), before best.pt
        real(path, state)

    monkeypatch.setattr(ck, "save", save)
    with pytest.raises(Killed):
        t.fit()
    monkeypatch.setattr(ck, "save", real)
    run = t.run_dir
    assert ck.load(ck.latest(run))["best"]["step"] == 4
    assert ck.load(run / ck.BEST)["step"] == 2  # an older best.pt would silently stay in use
    from spinestream.engine.evaluate import load_run_model

    load_run_model(run, "best")  # what evaluate, predict and pseudo-label read: repaired first
    assert ck.load(run / ck.BEST)["step"] == 4
    (run / ck.BEST).unlink()  # a kill before the first best.pt: the resumed trainer repairs it
    b = _trainer(cfg, resume=ck.latest(run))
    assert ck.load(run / ck.BEST)["step"] == 4 and b.best["step"] == 4


# --------------------------------------------------------------------------- item 5: a skipped step


def test_a_skipped_step_leaves_model_buffers_and_ema_as_they_were(shards, tmp_path):
    from tqdm import tqdm

    t = _trainer(_cfg(shards, tmp_path))
    t._bar = tqdm(disable=True)
    batches = iter(t.loader)
    assert t._step(next(batches))  # one good step first, so the EMA differs from the model
    t._settle(block=True)
    model = {k: v.clone() for k, v in t.model.state_dict().items()}
    ema = {k: v.clone() for k, v in t.ema.state_dict().items()}
    batch = next(batches)
    batch.images[0] = float("inf")  # an overflowing input: the forward pass writes NaN BatchNorm statistics
    assert t._step(batch)
    t._settle(block=True)
    assert (t.step, t.nan_total) == (1, 1)
    for k, v in t.model.state_dict().items():
        assert torch.equal(model[k], v), k  # running_mean/var and num_batches_tracked included
    for k, v in t.ema.state_dict().items():
        assert torch.equal(ema[k], v), k
    result = t.validate()  # finite probabilities: validation works after the skip
    assert result["competition_loss"] == result["competition_loss"]


# --------------------------------------------------------------------------- item 6: Ctrl-C


def test_ctrl_c_saves_and_prints_the_resume_command(shards, tmp_path, monkeypatch, capsys):
    from spinestream.engine.trainer import Trainer
    from spinestream.cli import main

    real = Trainer._after_step
    # as in a terminal: a job started in the background by a non-interactive shell (`.ci/run &`) inherits SIGINT
    # ignored, and the trainer then rightly leaves it alone
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    def after_step(self, epoch_end=False):
        out = real(self, epoch_end)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag: the step finishes, then it stops
        return out

    try:
        monkeypatch.setattr(Trainer, "_after_step", after_step)
        sets = ["--set", f"data.root={shards}", "--set", f"out_dir={tmp_path}", "--set", "name=c",
                "--set", "model.name=test_resnet", "--set", "model.pretrained=false", "--set", "loader.image_size=48",
                "--set", "train.batch_size=8", "--set", "train.max_steps=8", "--set", "log.wandb=disabled",
                "--set", "train.checkpoint_every_steps=100", "--set", "data.val_fold=1"]
        assert main(["train", *sets]) == 130
        err = capsys.readouterr().err
        run = tmp_path / "c"
        assert "Traceback" not in err
        assert f"spinestream train --resume {run}" in err and "ckpt-000000003.pt" in err
        assert ck.load(ck.latest(run))["step"] == 3
        monkeypatch.setattr(Trainer, "_after_step", real)
        assert main(["train", "--resume", str(run)]) == 0
        assert ck.load(ck.latest(run))["step"] == 8
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    finally:
        signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------- found in review


def test_the_last_checkpoint_is_taken_after_the_final_validation(shards, tmp_path, monkeypatch):
    """max_steps on a checkpoint step, mid-epoch: no ckpt-<last> before the final validation (a kill during it
    left a 'finished' checkpoint whose last weights were never validated)."""
    t = _trainer(_cfg(shards, tmp_path, **{"train.max_steps": 4, "train.checkpoint_every_steps": 2}))

    def killed():
        raise Killed

    monkeypatch.setattr(t, "validate", killed)
    with pytest.raises(Killed):
        t.fit()
    assert [ck.load(p)["step"] for p in ck.checkpoints(t.run_dir)] == [2]


def test_the_last_epoch_validates_and_saves_after_a_skipped_step(shards, tmp_path, monkeypatch):
    from test_trainer_state import _inf_once

    t = _trainer(_cfg(shards, tmp_path, **{"train.epochs": 1, "train.val_every_epochs": 2,
                                           "train.checkpoint_every_steps": 100}))
    _inf_once(t)
    t.fit()
    assert t.nan_total == 1 and t.step == t.total_steps - 1
    assert _val_steps(t.run_dir) == [t.step]  # the run's end is validated and checkpointed all the same
    assert ck.load(ck.latest(t.run_dir))["step"] == t.step


def test_a_fresh_run_in_a_directory_without_checkpoints_writes_its_own_spec(shards, other_shards, tmp_path):
    from spinestream.shards.spec import ShardSpec

    a = _trainer(_cfg(other_shards, tmp_path, **{"loader.image_size": 40}))  # built, never trained
    assert ShardSpec.load(a.run_dir / "shard_spec.json").image.size == 40
    _trainer(_cfg(shards, tmp_path))  # the same directory, other shards, no checkpoint: a fresh run
    assert ShardSpec.load(a.run_dir / "shard_spec.json").image.size == 48


def test_an_infinite_loss_with_finite_gradients_skips_adam_under_gradscaler(shards, tmp_path, monkeypatch):
    """fp16: a logit overflow gives an infinite loss whose gradients are finite; GradScaler sees only the
    gradients, so the trainer makes them NaN first: the step is skipped on the device, as it is counted."""
    import spinestream.engine.trainer as tr
    from tqdm import tqdm

    real = tr.weighted_bce
    calls = [0]

    def loss(*a, **k):
        calls[0] += 1
        out = real(*a, **k)
        return out + float("inf") if calls[0] == 1 else out

    monkeypatch.setattr(tr, "weighted_bce", loss)
    t = _trainer(_cfg(shards, tmp_path))
    t.scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0 ** 8)
    t._bar = tqdm(disable=True)
    params = [p.detach().clone() for p in t.model.parameters()]
    assert t._step(next(iter(t.loader)))
    t._settle(block=True)
    assert (t.step, t.nan_total) == (0, 1)
    assert all(torch.equal(a, b) for a, b in zip(params, t.model.parameters()))


def test_sync_best_never_replaces_a_newer_best(shards, tmp_path):
    t = _trainer(_cfg(shards, tmp_path, **{"train.max_steps": 2, "train.checkpoint_every_steps": 1}))
    t.fit()
    run = t.run_dir
    newest = ck.checkpoints(run)[-1]
    assert ck.load(run / ck.BEST)["step"] == 2
    newest.write_bytes(b"torn")  # the newest checkpoint unreadable: ckpt-1 is the newest readable one
    first = ck.load(ck.checkpoints(run)[0])
    first["best"] = {"metric": 0.5, "step": 1}
    ck.save(ck.checkpoints(run)[0], first)
    assert not ck.sync_best(run)
    assert ck.load(run / ck.BEST)["step"] == 2


def test_an_ignored_sigint_stays_ignored(shards, tmp_path):
    """A trainer started with SIGINT ignored (`cmd &` in a script) does not take Ctrl-C meant for another job."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        t = _trainer(_cfg(shards, tmp_path, **{"train.max_steps": 1}))
        seen = []
        t._log_train = lambda: seen.append(signal.getsignal(signal.SIGINT))
        t.cfg.log.every_steps = 1
        t.fit()
        assert seen == [signal.SIG_IGN]
    finally:
        signal.signal(signal.SIGINT, previous)
