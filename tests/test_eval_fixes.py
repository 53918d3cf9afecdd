"""evaluate / pseudo-label / inference fixes (issue 16): a fixed-input-size model (``test_vit`` at 48 px) is
evaluated at the size it trained at; ``evaluate --shards`` and ``pseudo-label --shards`` refuse a shard set
that makes other images; a relative ``data.root`` that does not exist from the current directory is an error
naming ``--shards``; a model giving non-finite probabilities is an error naming the study (one check,
:func:`spinestream.engine.infer.check_finite`) and no pseudo-label is written from NaN; the run's shard spec records
the prevalence without the validation fold."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_train import _cfg, _trainer

from spinestream.engine import checkpoint as ck
from spinestream.engine.infer import NonFiniteProbabilities
from spinestream.shards.layout import ROW_TYPES, Layout
from spinestream.shards.spec import SPEC_FILE, ShardSpec


@pytest.fixture(scope="module")
def vit_run(shards, tmp_path_factory) -> Path:
    """``test_vit`` (fixed input size) trained 2 steps at 48 px, validated on fold 1."""
    out = tmp_path_factory.mktemp("vit")
    t = _trainer(_cfg(shards, out, **{"name": "vit", "model.name": "test_vit", "train.max_steps": 2,
                                      "train.checkpoint_every_steps": 2}))
    t.fit()
    assert (t.run_dir / "best.pt").is_file()
    return t.run_dir


@pytest.fixture(scope="module")
def other_shards(shards, tmp_path_factory) -> Path:
    """The shard set with its manifest saying 64 px: a set that makes other images."""
    other = tmp_path_factory.mktemp("other") / "shards-64"
    shutil.copytree(shards, other)
    m = json.loads((other / "manifest.json").read_text())
    m["image"]["size"] = 64
    m["config"]["image_size"] = 64
    (other / "manifest.json").write_text(json.dumps(m))
    return other


def test_a_fixed_input_size_model_is_evaluated_at_its_trained_size(vit_run, shards):
    from spinestream.engine.evaluate import load_run_model, main

    model, cfg, _ = load_run_model(vit_run, "best", "cpu")
    assert cfg.loader.image_size == 48 and model.pretrained_cfg["input_size"][-1] == 48
    assert main(["--run", str(vit_run), "--device", "cpu"]) == 0
    s = json.loads((vit_run / "eval-f1" / "summary.json").read_text())
    assert s["studies"] > 0 and np.isfinite(s["competition_loss"])


def test_evaluate_shards_relative_root_and_another_shard_set(vit_run, shards, other_shards, tmp_path,
                                                             monkeypatch):
    from spinestream.engine.evaluate import main

    run = tmp_path / "runs" / "r2"
    shutil.copytree(vit_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["root"] = "data/shards"  # relative: like every path in a YAML file, to the file's directory
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    monkeypatch.chdir(tmp_path)  # not where it resolves to
    (tmp_path / "data").mkdir()
    shutil.copytree(shards, tmp_path / "data" / "shards")  # what the current directory would have found
    with pytest.raises(Exception, match=f"{run / 'data/shards'}/manifest.json does not exist"):
        main(["--run", str(run.resolve()), "--device", "cpu"])
    with pytest.raises(ck.RunError, match=r"evaluate --shards.*size=(64.*size=48|48.*size=64)"):
        main(["--run", str(run.resolve()), "--device", "cpu", "--shards", str(other_shards)])
    assert main(["--run", str(run.resolve()), "--device", "cpu", "--shards", str(shards)]) == 0
    assert json.loads((run / "eval-f1" / "summary.json").read_text())["studies"] > 0


def test_pseudo_label_refuses_another_shard_set(vit_run, other_shards, tmp_path):
    from spinestream.engine.pseudo import main

    out = tmp_path / "p.parquet"
    with pytest.raises(ck.RunError, match=r"pseudo-label --shards.*size=64"):
        main(["--run", str(vit_run), "--device", "cpu", "--shards", str(other_shards), "--out", str(out),
              "--threshold", "0.5", "--heatmap-studies", "0"])
    assert not out.exists()


# --------------------------------------------------------------------------- non-finite probabilities


@pytest.fixture(scope="module")
def nan_run(shards, tmp_path_factory) -> Path:
    """A run whose classifier gives NaN on every slice (a diverged checkpoint)."""
    from test_pseudo import _write_run

    from spinestream.engine.config import RunConfig
    from spinestream.engine.model import build_model
    from spinestream.shards.config import load_config

    overrides = [f"data.root={shards}", "loader.image_size=48", "log.wandb=disabled", "data.val_fold=1"]
    model = build_model(load_config(RunConfig, "configs/demo-round1.yaml", overrides).model)
    with torch.no_grad():
        model.get_classifier().bias.fill_(float("nan"))
    return _write_run(tmp_path_factory.mktemp("nan") / "round1", overrides, model=model)


def test_check_finite_names_the_studies():
    from spinestream.engine.infer import check_finite, describe_nonfinite

    good, bad = np.full((4, 8), 0.5, np.float32), np.full((4, 8), 0.5, np.float32)
    bad[2, 3] = np.nan
    assert describe_nonfinite(good) is None
    assert "1 of 4 slices" in describe_nonfinite(bad)
    check_finite({"a": good}, "validation")
    with pytest.raises(ValueError, match=r"validation: .*1 of 2 studies.*study b: 1 of 4 slices"):
        check_finite({"a": good, "b": bad}, "validation")


def test_non_finite_probabilities_are_an_error_naming_the_study(nan_run, shards, tmp_path):
    """Validation, evaluate and pseudo-label all go through engine.infer.predict_run: one check, one error."""
    from spinestream.engine.evaluate import load_run_model, main as evaluate
    from spinestream.engine.infer import predict_run
    from spinestream.engine.pseudo import main as pseudo

    studies = pd.read_parquet(Layout(shards).studies)
    model, cfg, _ = load_run_model(nan_run, "best", "cpu")
    uid = studies.StudyInstanceUID.iloc[0]
    with pytest.raises(ValueError, match=f"study {uid}: .* non-finite"):  # the trainer's validate() path
        predict_run(model, cfg, [uid], "cpu", "fp32", batch_size=16)
    with pytest.raises(NonFiniteProbabilities) as e:
        evaluate(["--run", str(nan_run), "--device", "cpu"])
    err = str(e.value)
    fold1 = studies.StudyInstanceUID[studies.fold == 1]
    assert "non-finite" in err and any(u in err for u in fold1), err
    out = tmp_path / "p.parquet"
    with pytest.raises(NonFiniteProbabilities) as e:
        pseudo(["--run", str(nan_run), "--device", "cpu", "--out", str(out), "--heatmap-studies", "0"])
    err = str(e.value)
    unboxed = studies.StudyInstanceUID[studies.cohort == "positive-unboxed"]
    assert "non-finite" in err and any(u in err for u in unboxed), err
    assert not out.exists()  # never labels from NaN


def test_pseudo_table_refuses_nan_probabilities(shards):
    from spinestream.engine.pseudo import pseudo_table

    studies = pd.read_parquet(Layout(shards).studies)
    row = studies[studies.cohort == "positive-unboxed"].iloc[0]
    p = np.full((int(row.n_slices), 8), 0.2, np.float32)
    p[0, 0] = np.nan
    with pytest.raises(ValueError, match=f"study {row.StudyInstanceUID}"):
        pseudo_table({row.StudyInstanceUID: p}, studies, mode="hard", thresholds=np.full(7, 0.5))


# --------------------------------------------------------------------------- the training prevalence


def test_spec_prevalence_excludes_the_validation_fold(shards, tmp_path):
    studies = pd.read_parquet(Layout(shards).studies)
    spec = ShardSpec.from_shards(shards, exclude_fold=1)
    train = studies[studies.fold != 1]
    assert spec.prevalence == pytest.approx({t: float(train[t].mean()) for t in ROW_TYPES})
    assert spec.prevalence != pytest.approx({t: float(studies[t].mean()) for t in ROW_TYPES})
    assert spec.prevalence_excludes_fold == 1
    path = spec.save(tmp_path)
    assert json.loads(path.read_text())["prevalence_excludes_fold"] == 1
    back = ShardSpec.load(path)
    assert back.prevalence == spec.prevalence and back.prevalence_excludes_fold == 1
    # a spec written before the field existed still loads (all studies, as it was computed then)
    d = json.loads(path.read_text())
    del d["prevalence_excludes_fold"]
    (tmp_path / SPEC_FILE).write_text(json.dumps(d))
    assert ShardSpec.load(tmp_path / SPEC_FILE).prevalence_excludes_fold is None
    assert ShardSpec.from_shards(shards).prevalence_excludes_fold is None
