"""Every training config field is range-checked with a message naming its full key; cohorts are
checked by name and against the shard set; round 1's selection holds out the validation fold and
balances negatives as configured."""
from __future__ import annotations

import pandas as pd
import pytest
from test_train import _cfg

from spinestream.engine.config import RunConfig
from spinestream.shards.config import ConfigError, load_config
from spinestream.shards.layout import Layout

BAD = [
    ("train.val_every_epochs=0", "train.val_every_epochs"),
    ("train.checkpoint_every_steps=0", "train.checkpoint_every_steps"),
    ("log.every_steps=0", "log.every_steps"),
    ("optim.min_lr_ratio=5", "optim.min_lr_ratio"),
    ("train.max_memory_gb=0", "train.max_memory_gb"),
    ("train.memory_headroom_gb=20", "train.memory_headroom_gb"),
    ("train.early_stopping_patience=-2", "train.early_stopping_patience"),
    ("optim.pos_weight=-1", "optim.pos_weight"),
    ("optim.focal_gamma=-1", "optim.focal_gamma"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.clip_grad_norm=-1", "optim.clip_grad_norm"),
    ("optim.lr=0", "optim.lr"),
    ("optim.grad_accum=0", "optim.grad_accum"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.ema_decay=1", "optim.ema_decay"),
    ("train.epochs=0", "train.epochs"),
    ("train.max_steps=-1", "train.max_steps"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.keep_last=0", "train.keep_last"),
    ("train.max_nan_steps=0", "train.max_nan_steps"),
    ("model.drop_rate=1", "model.drop_rate"),
    ("model.num_classes=7", "model.num_classes"),
    ("data.negatives_per_positive=-1", "data.negatives_per_positive"),
    ("data.val_fold=-1", "data.val_fold"),
    ("data.label_tables=[]", "data.label_tables"),
    ("data.train_cohorts=[]", "data.train_cohorts"),
    ("data.val_cohorts=[boxed, negatve]", r"data.val_cohorts: unknown cohort\(s\) \['negatve'\]"),
    ("data.train_cohorts=[boxd]", r"data.train_cohorts: unknown cohort"),
    ("log.project=''", "log.project"),
    ("name=a/b", "name"),
]


@pytest.mark.parametrize("override,key", BAD, ids=[b[0] for b in BAD])
def test_every_bad_value_is_refused_naming_its_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(RunConfig, None, [override])


def test_the_shipped_configs_pass():
    for name in ("configs/round1.yaml", "configs/demo-round1.yaml"):
        load_config(RunConfig, name)


def test_cohorts_are_checked_against_the_shard_set(shards, tmp_path):
    from spinestream.engine.build import check_cohorts

    studies = pd.read_parquet(Layout(shards).studies)
    # the tiny set's boxed study is in fold 0: with fold 0 held out nothing boxed is left to train on
    with pytest.raises(ValueError, match=r"data.train_cohorts: .*\['boxed'\]"):
        check_cohorts(_cfg(shards, tmp_path, **{"data.val_fold": 0}), studies)
    with pytest.raises(ValueError, match=r"data.val_cohorts: .*\['positive-unboxed'\]"):
        check_cohorts(_cfg(shards, tmp_path), studies[studies.cohort != "positive-unboxed"])
    check_cohorts(_cfg(shards, tmp_path), studies)


def test_round1_never_trains_on_the_validation_fold(shards, tmp_path):
    from spinestream.engine.trainer import select_training_shards

    slices = pd.read_parquet(Layout(shards).slices)
    for fold in (1,):
        cfg = _cfg(shards, tmp_path, **{"data.val_fold": fold, "data.negatives_per_positive": 0})
        ids = set(select_training_shards(cfg).records()["slice_id"].tolist())
        held_out = set(slices.slice_id[slices.fold == fold].tolist())
        assert ids and held_out and not ids & held_out
        assert ids == set(slices.slice_id[(slices.fold != fold) & slices.cohort.isin(["boxed", "negative"])])


@pytest.mark.parametrize("ratio", [0.5, 1.0, 2.0])
def test_negatives_are_balanced_as_configured(shards, tmp_path, ratio):
    from spinestream.engine.trainer import select_training_shards

    from spinestream.shards.manifest import read_manifest

    cfg = _cfg(shards, tmp_path, **{"data.negatives_per_positive": ratio})
    sel = select_training_shards(cfg)
    neg = [s for s in sel.shards if s.cohort == "negative"]
    n_neg, n_pos = sum(s.samples for s in neg), sum(s.samples for s in sel.shards if s.cohort != "negative")
    assert n_pos > 0 and neg
    assert all(s.fold != cfg.data.val_fold for s in neg)
    available = sum(s.samples for s in read_manifest(shards).shards
                    if s.cohort == "negative" and s.fold != cfg.data.val_fold)
    want = ratio * n_pos
    # whole shards are added until the negatives reach the wanted multiple, and not one shard more
    assert n_neg >= min(want, available)
    assert n_neg - max(s.samples for s in neg) < want
