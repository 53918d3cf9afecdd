"""Round 2's engine features on the tiny shard set: ``model.init_from`` starts from round 1's EMA weights
(and refuses another model's checkpoint, and one that trained on this run's validation fold unless
``model.init_from_any_fold``, and gives way to the run's own checkpoint on resume), round 1's
best on the same fold is logged and drawn as the reference, ``train.val_every_steps`` validates inside an
epoch without validating a step twice, the run projects its epoch time, warns once when validation takes
too much of the run, and keeps ``shard_spec.json``; ``evaluate`` writes ``summary.json``."""
from __future__ import annotations

import json

import pytest
import torch
from test_train import _cfg, _trainer

from spinestream.engine import checkpoint as ck
from spinestream.engine import trainer as trainer_mod
from spinestream.engine.model import build_model, model_fingerprint
from spinestream.shards.spec import SPEC_FILE, ShardSpec


def _records(run_dir, key: str) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if key in r]


@pytest.fixture(scope="module")
def round1(shards, tmp_path_factory):
    """A short round-1 run (EMA on, validated on fold 1): its run directory."""
    out = tmp_path_factory.mktemp("r1")
    t = _trainer(_cfg(shards, out, **{"name": "round1", "train.max_steps": 6, "optim.ema_decay": 0.5}))
    t.fit()
    return t.run_dir


def _round2(shards, out, init, **sets):
    """Round 1's cohorts (round 2's selection and label tables: tests/test_pseudo.py), started from ``init``."""
    return _cfg(shards, out, **{"name": "round2", "model.init_from": str(init), "train.max_steps": 4, **sets})


def test_init_from_loads_round_ones_ema_weights_and_its_reference(shards, tmp_path, round1):
    best = ck.load(round1 / "best.pt")
    assert best.get("ema") is not None
    t = _trainer(_round2(shards, tmp_path, round1 / "best.pt"))
    got = t.model.state_dict()
    for k, v in best["ema"].items():
        assert torch.equal(got[k].cpu(), v), k  # the EMA weights, not the raw ones and not a fresh init
    assert any(not torch.equal(best["ema"][k], best["model"][k]) for k in best["ema"])  # the two differ
    assert t.reference == {"name": "round1", "competition_loss": best["best"]["metric"],
                           "step": best["best"]["step"], "fold": 1}
    t.fit()
    assert _records(t.run_dir, "reference")[0]["reference"] == t.reference  # logged once, at step 0
    assert all(r["val"]["reference"] == t.reference["competition_loss"] for r in _records(t.run_dir, "val"))
    assert (t.run_dir / "curves.png").is_file()


def test_init_from_a_run_that_trained_on_the_validation_fold_is_refused(shards, tmp_path, round1):
    """Round 1 held out fold 0 and trained on fold 1: round 2 validated on fold 1 would be scored on studies
    its starting weights were trained on. Refused, naming both folds and the fix, unless
    model.init_from_any_fold says so (then no reference line either: round 1's loss is of another fold)."""
    from spinestream.engine.build import init_reference

    cfg = _round2(shards, tmp_path, round1 / "best.pt")
    state = ck.load(round1 / "best.pt")
    assert init_reference(cfg, state) is not None
    state["config"]["data"]["val_fold"] = 0
    with pytest.raises(ck.RunError, match=r"val_fold=0.*data\.val_fold=1.*data\.val_fold=0.*init_from_any_fold"):
        init_reference(cfg, state)
    anyway = _round2(shards, tmp_path, round1 / "best.pt", **{"model.init_from_any_fold": "true"})
    assert anyway.model.init_from_any_fold is True
    assert init_reference(anyway, state) is None
    del state["config"]  # a checkpoint that does not say which fold it held out: refused too
    with pytest.raises(ck.RunError, match="does not record"):
        init_reference(cfg, state)
    assert init_reference(cfg, None) is None


def test_init_from_refuses_another_models_checkpoint_and_a_missing_file(shards, tmp_path):
    other = build_model(_cfg(shards, tmp_path, **{"model.name": "test_resnet"}).model)
    path = tmp_path / "resnet.pt"
    ck.save(path, {"model_fingerprint": model_fingerprint(other), "model": other.state_dict(), "ema": None,
                   "step": 0})  # a spinestream checkpoint in form (ck.load checks that first), of another model
    with pytest.raises(ck.RunError, match=r"test_resnet.*test_efficientnet"):
        _trainer(_round2(shards, tmp_path, path))
    with pytest.raises(FileNotFoundError, match=r"model\.init_from=.*train round 1 first"):
        _trainer(_round2(shards, tmp_path, tmp_path / "nowhere.pt", name="r2b"))


def test_resume_takes_the_runs_own_checkpoint_not_init_from(shards, tmp_path, round1):
    cfg = _round2(shards, tmp_path, round1 / "best.pt", **{"train.checkpoint_every_steps": 2})
    t = _trainer(cfg)
    t.fit()
    last = ck.latest(t.run_dir)
    state = ck.load(last)
    (round1 / "best.pt").rename(round1 / "moved.pt")  # resume must not need it
    try:
        r = _trainer(cfg, resume=last)
    finally:
        (round1 / "moved.pt").rename(round1 / "best.pt")
    got = r.model.state_dict()
    assert all(torch.equal(got[k].cpu(), v) for k, v in state["model"].items())
    assert r.reference == t.reference is not None  # kept across the resume


def test_val_every_steps_validates_inside_the_epoch_once_per_step(shards, tmp_path, round1):
    t = _trainer(_round2(shards, tmp_path, round1 / "best.pt", **{"train.max_steps": 7, "train.val_every_steps": 3,
                                                                  "train.val_every_epochs": 1}))
    assert t.steps_per_epoch > 7  # all of it inside the first epoch
    t.fit()
    steps = [r["step"] for r in _records(t.run_dir, "val")]
    assert steps == [3, 6, 7]  # every 3 steps, then the last step once
    assert all(r["val"]["seconds"] > 0 for r in _records(t.run_dir, "val"))


def test_projection_and_one_validation_share_warning(shards, tmp_path, round1, monkeypatch, capsys):
    monkeypatch.setattr(trainer_mod, "PROJECT_WARMUP_STEPS", 1)
    monkeypatch.setattr(trainer_mod, "PROJECT_STEPS", 2)
    monkeypatch.setattr(trainer_mod, "VAL_SHARE_WARN", 0.0)  # any validation at all is "too much"
    t = _trainer(_round2(shards, tmp_path, round1 / "best.pt", **{"train.max_steps": 6, "train.val_every_steps": 2,
                                                                  "log.every_steps": 1}))
    t.fit()
    (p,) = [r["projection"] for r in _records(t.run_dir, "projection")]
    assert p["measured_steps"] >= 2 and p["seconds_per_step"] > 0
    assert p["epoch_seconds"] == pytest.approx(p["seconds_per_step"] * t.steps_per_epoch)
    assert len(_records(t.run_dir, "warning")) == 1  # three validations, one warning
    err = capsys.readouterr()
    text = err.out + err.err
    assert "projected:" in text and "per epoch" in text
    assert text.count("warning: validation has taken") == 1 and "train.val_every_steps=2" in text


def test_every_run_keeps_its_shard_spec(shards, tmp_path):
    t = _trainer(_cfg(shards, tmp_path, name="spec"))
    spec = ShardSpec.load(t.run_dir / SPEC_FILE)
    want = ShardSpec.from_shards(shards, exclude_fold=1)  # the training prevalence: without the validation fold
    assert (spec.config, spec.image, spec.prevalence) == (want.config, want.image, want.prevalence)
    assert spec.prevalence_excludes_fold == 1
    assert spec.image.size == 48


def test_evaluate_writes_a_summary_beside_the_report(shards, tmp_path, round1):
    from spinestream.engine.evaluate import main

    assert main(["--run", str(round1), "--device", "cpu"]) == 0
    s = json.loads((round1 / "eval-f1" / "summary.json").read_text())
    assert s["fold"] == 1 and s["studies"] > 0 and s["checkpoint"].endswith("best.pt")
    assert 0 < s["competition_loss"] and 0 < s["constant_baseline"] and 0 <= s["accuracy"] <= 1
