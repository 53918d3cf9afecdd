"""The trainer on the tiny shard set: config errors with key paths, auto batch size on the CPU,
resume with identical optimizer state and identical continuation, refusal of foreign run
directories / checkpoints / label tables, NaN handling, and the CLI."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from spinestream.engine import checkpoint as ck
from spinestream.engine.config import RunConfig
from spinestream.engine.trainer import Trainer, write_config
from spinestream.shards.config import ConfigError, load_config


def _cfg(shards: Path, out: Path, **sets) -> RunConfig:
    base = [
        f"data.root={shards}", f"out_dir={out}", "name=t", "model.name=test_efficientnet", "model.pretrained=false",
        "loader.image_size=48", "loader.batch_size=8", "loader.num_threads=1", "loader.augment.p_clahe=0",
        "train.batch_size=8", "train.epochs=1", "train.checkpoint_every_steps=4", "train.keep_last=5",
        "log.wandb=disabled", "log.every_steps=2", "optim.warmup_steps=2", "data.val_fold=1",
    ]
    return load_config(RunConfig, None, base + [f"{k}={v}" for k, v in sets.items()])


def _trainer(cfg: RunConfig, resume: Path | None = None) -> Trainer:
    run_dir = Path(cfg.out_dir) / cfg.name
    ck.mark_run(run_dir)
    write_config(run_dir, cfg)
    return Trainer(cfg, run_dir, resume_from=resume)


def test_bad_config_names_the_key_path(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key"):
        load_config(RunConfig, None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"loader\.augment\.p_crop: expected a number"):
        load_config(RunConfig, None, ["loader.augment.p_crop=often"])
    with pytest.raises(ConfigError, match=r"loader\.augment.*probability"):
        load_config(RunConfig, None, ["loader.augment.p_crop=2"])
    with pytest.raises(ConfigError, match=r"data.*oversample_positives must be >= 1"):
        load_config(RunConfig, None, ["data.oversample_positives=0"])
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  batch_size: huge\n")
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(RunConfig, p)
    assert load_config(RunConfig, "configs/round1.yaml").model.name == "tf_efficientnetv2_s"


def test_auto_batch_size_on_cpu(shards, tmp_path):
    t = _trainer(_cfg(shards, tmp_path, **{"train.batch_size": "auto", "loader.batch_size": 8}))
    import json

    rec = json.loads((t.run_dir / "batch_size.json").read_text())
    assert rec["batch_size"] == 8 and rec["device"] == "cpu" and all(x["ok"] for x in rec["tried"])
    assert t.loader_cfg.batch_size == 8


def test_resume_continues_at_the_saved_step_with_identical_state(shards, tmp_path):
    cfg = _cfg(shards, tmp_path / "a", **{"train.max_steps": 8})
    a = _trainer(cfg)
    a.fit()
    assert a.step == 8
    ckpt4 = a.run_dir / "ckpt-000000004.pt"
    saved = ck.load(ckpt4)
    assert saved["step"] == 4 and saved["loader"]["position"] > 0
    # "interrupt" after step 4: a new run directory holding only that checkpoint
    b_dir = tmp_path / "b" / "t"
    b_dir.mkdir(parents=True)
    shutil.copy(ckpt4, b_dir / ckpt4.name)
    b = _trainer(_cfg(shards, tmp_path / "b", **{"train.max_steps": 8}), resume=b_dir / ckpt4.name)
    assert b.step == 4 and b.loader.position == saved["loader"]["position"]
    for (ka, va), (kb, vb) in zip(saved["optimizer"]["state"].items(), b.opt.state_dict()["state"].items()):
        assert ka == kb
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(va[name], vb[name])
    assert b.sched.last_epoch == 4
    b.fit()
    assert b.step == 8
    for pa, pb in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        torch.testing.assert_close(pa, pb)  # the continuation equals the uninterrupted run


def test_resume_with_a_new_learning_rate(shards, tmp_path):
    a = _trainer(_cfg(shards, tmp_path, **{"train.max_steps": 4}))
    a.fit()
    cfg = _cfg(shards, tmp_path, **{"train.max_steps": 6, "optim.lr": 1e-5, "optim.warmup_steps": 0})
    b = Trainer(cfg, a.run_dir, resume_from=ck.latest(a.run_dir))
    assert b.step == 4
    assert b.opt.param_groups[0]["initial_lr"] == 1e-5
    assert b.sched.get_last_lr()[0] <= 1e-5


def test_refusals_before_any_training_step(shards, tmp_path):
    with pytest.raises(ck.RunError, match="not a spinestream run directory"):
        ck.check_run_dir(tmp_path)
    a = _trainer(_cfg(shards, tmp_path / "a", **{"train.max_steps": 4}))
    a.fit()
    other = _cfg(shards, tmp_path / "c", **{"model.name": "test_resnet"})
    with pytest.raises(ck.RunError, match="model"):
        _trainer(other, resume=ck.latest(a.run_dir))
    with pytest.raises(ValueError, match="positive-unboxed"):
        _trainer(_cfg(shards, tmp_path / "d", **{"data.train_cohorts": "[positive-unboxed]"}))
    foreign = tmp_path / "foreign.parquet"
    pd.DataFrame({"slice_id": [10**7], **{t: [0.0] for t in ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "any")}}
                 ).to_parquet(foreign)
    with pytest.raises(ValueError, match="another shard set"):
        _trainer(_cfg(shards, tmp_path / "e", **{"data.label_tables": f"[{foreign}]"}))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ck.RunError, match="not a spinestream checkpoint"):
        ck.load(junk)


def test_nan_losses_skip_steps_then_stop(shards, tmp_path, monkeypatch):
    import spinestream.engine.trainer as tr

    monkeypatch.setattr(tr, "weighted_bce", lambda logits, *a, **k: logits.sum() * float("nan"))
    t = _trainer(_cfg(shards, tmp_path, **{"train.max_nan_steps": 3}))
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        t.fit()
    assert t.step == 0 and t.nan_total == 3


def test_cli_train_then_evaluate(shards, tmp_path):
    from spinestream.cli import main

    sets = ["--set", f"data.root={shards}", "--set", f"out_dir={tmp_path}", "--set", "name=cli",
            "--set", "model.name=test_efficientnet", "--set", "model.pretrained=false",
            "--set", "loader.image_size=48", "--set", "train.batch_size=8", "--set", "train.max_steps=3",
            "--set", "log.wandb=disabled", "--set", "train.epochs=1", "--set", "data.val_fold=1"]
    assert main(["train", *sets]) == 0
    run = tmp_path / "cli"
    assert (run / "best.pt").is_file() and (run / "curves.png").is_file() and (run / "config.yaml").is_file()
    assert main(["train", *sets]) == 2  # refuses to overwrite a run
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=4"]) == 0
    assert ck.load(ck.latest(run))["step"] == 4
    assert main(["evaluate", "--run", str(run)]) == 0
    out = run / "eval-f1"
    assert (out / "heatmaps.png").is_file() and (out / "submission.csv").is_file()
    rep = pd.read_csv(out / "report.csv", index_col=0)
    assert {"sensitivity", "specificity", "auc"} <= set(rep.columns)
    assert main(["evaluate", "--run", str(tmp_path)]) == 2
