"""Loader guarantees, for each backend (DALI in its CPU-only mode, and the torch fallback):
exactly once per epoch across ranks, labels by slice_id, identity when augmentation is
off, seeded epochs, mid-epoch resume, and clear errors on bad input."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from spinestream.engine.loader import DeviceLabels, LoaderConfig, build_loader, select
from spinestream.engine.loader.config import AugmentConfig
from spinestream.shards.layout import TARGETS, Layout
from spinestream.shards.manifest import read_manifest
from spinestream.shards.tables import read_label_table, read_study_table
from spinestream.shards.sample import decode_jpeg
from spinestream.shards.wds import ShardError, iter_samples

BACKENDS = [pytest.param("dali", marks=pytest.mark.dali), "torch"]


def _cfg(backend, **kw):
    aug = kw.pop("augment", AugmentConfig())
    # torch: decode in the main process (0 workers) unless a test asks; worker start-up dominates tiny epochs
    threads = kw.pop("num_threads", 1 if backend == "dali" else 0)
    return LoaderConfig(backend=backend, batch_size=kw.pop("batch_size", 16), image_size=kw.pop("image_size", 48),
                        num_threads=threads, initial_fill=64, channels_last=False, augment=aug, **kw)


def _need(backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")


def _epoch(loader):
    ids, valid = [], []
    for b in loader:
        ids.append(b.slice_ids.cpu())
        valid.append(b.valid.cpu())
    return torch.cat(ids).numpy(), torch.cat(valid).numpy()


@pytest.fixture(scope="module")
def labelled(shards):
    return select(shards, cohorts=["boxed", "negative"]), DeviceLabels.load(shards)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_sample_once_across_two_ranks(backend, labelled):
    _need(backend)
    sel, labels = labelled
    seen = []
    for rank in range(2):
        loader = build_loader(sel, labels, _cfg(backend, batch_size=7, num_threads=2), rank=rank, world=2)
        ids, valid = _epoch(loader)
        assert len(ids) == loader.samples + loader.padded == len(loader) * 7 - (len(loader) * 7 - len(ids))
        assert valid.sum() == loader.samples and loader.padded in (0, 1)
        seen.append(ids[valid])
    a, b = seen
    assert len(set(a) & set(b)) == 0
    assert sorted(np.concatenate([a, b]).tolist()) == sorted(sel.slice_ids().tolist())
    assert len(a) == len(set(a)) and len(b) == len(set(b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_targets_come_from_the_label_table(backend, labelled, shards):
    _need(backend)
    sel, labels = labelled
    truth = read_label_table(Layout(shards).truth).frame.set_index("slice_id")
    loader = build_loader(sel, labels, _cfg(backend))
    n_pos = 0
    for b in loader:
        want = truth.loc[b.slice_ids.numpy(), list(TARGETS)].to_numpy(np.float32)
        np.testing.assert_array_equal(b.targets.numpy(), want)
        n_pos += int(want[:, -1].sum())
    assert n_pos > 0  # the boxed cohort has positive slices


@pytest.mark.parametrize("backend", BACKENDS)
def test_augmentation_off_gives_the_decoded_image(backend, labelled, shards):
    _need(backend)
    sel, labels = labelled
    cfg = _cfg(backend, augment=AugmentConfig().off())
    ref = {}
    for s in sel.shards[:2]:
        ref.update(iter_samples(shards / s.path))
    loader = build_loader(sel, labels, cfg)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.std).view(1, 3, 1, 1) * 255
    checked = 0
    for b in loader:
        img = (b.images.float() * std + mean).permute(0, 2, 3, 1).numpy()
        for k, sid in enumerate(b.slice_ids.tolist()):
            if sid in ref:
                want = decode_jpeg(ref[sid]).astype(np.float32)
                assert np.abs(img[k] - want).max() < 0.01, sid
                checked += 1
    assert checked > 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_augmentation_on_changes_images_but_keeps_shape(backend, labelled):
    _need(backend)
    sel, labels = labelled
    aug = AugmentConfig(p_crop=1.0, p_hflip=0.5, p_rotate=1.0, p_shift=1.0, p_brightness_contrast=1.0, p_clahe=1.0)
    off = build_loader(sel, labels, _cfg(backend, augment=aug.off(), image_size=32))
    on = build_loader(sel, labels, _cfg(backend, augment=aug, image_size=32))
    b0, b1 = next(iter(off)), next(iter(on))
    assert b1.images.shape == (16, 3, 32, 32) and torch.isfinite(b1.images).all()
    same = {s: i for i, s in enumerate(b0.slice_ids.tolist())}
    diffs = [float((b1.images[i] - b0.images[same[s]]).abs().mean()) for i, s in enumerate(b1.slice_ids.tolist())
             if s in same]
    assert diffs and min(diffs) > 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_epochs_are_reshuffled_and_seeded(backend, labelled):
    _need(backend)
    sel, labels = labelled
    a = build_loader(sel, labels, _cfg(backend, seed=1))
    e0, _ = _epoch(a)
    e1, _ = _epoch(a)
    assert a.epoch == 2
    assert sorted(e0) == sorted(e1) and not np.array_equal(e0, e1)
    again, _ = _epoch(build_loader(sel, labels, _cfg(backend, seed=1)))
    other, _ = _epoch(build_loader(sel, labels, _cfg(backend, seed=2)))
    assert np.array_equal(again, e0) and not np.array_equal(other, e0)


@pytest.mark.parametrize("clahe", [0.0, 0.5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_continues_with_the_unseen_samples(backend, clahe, labelled):
    """Read 3 batches of epoch 1, save, rebuild, restore: the rest of the epoch is what an
    uninterrupted loader yields — same samples, same order, same augmented pixels."""
    _need(backend)
    sel, labels = labelled
    cfg = _cfg(backend, seed=5, augment=dataclasses.replace(AugmentConfig(), p_clahe=clahe))
    full = build_loader(sel, labels, cfg)
    _epoch(full)  # epoch 0
    want = list(full)  # epoch 1, uninterrupted
    part = build_loader(sel, labels, cfg)
    _epoch(part)
    it = iter(part)
    first = [next(it) for _ in range(3)]
    state = part.state_dict()
    assert state["epoch"] == 1 and state["position"] == 3 * cfg.batch_size
    resumed = build_loader(sel, labels, cfg)
    resumed.load_state_dict(state)
    rest = list(resumed)
    got = first + rest
    assert [b.slice_ids.tolist() for b in got] == [b.slice_ids.tolist() for b in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g.images, w.images)
    assert resumed.epoch == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_a_clear_error(backend, shards, tmp_path):
    _need(backend)
    labels = DeviceLabels.load(shards)
    with pytest.raises(ValueError, match="positive-unboxed"):
        build_loader(select(shards, cohorts=["positive-unboxed"]), labels, _cfg(backend))
    with pytest.raises(ValueError, match="no shards"):
        select(shards, cohorts=["boxed"], folds=[7])
    with pytest.raises(ValueError, match="unknown cohort"):
        select(shards, cohorts=["boxes"])
    out = tmp_path / "copy"
    shutil.copytree(shards, out)
    victim = next(s for s in read_manifest(out).shards if s.cohort == "negative")
    tar = out / victim.path
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(ShardError, match=tar.name):
        select(out, cohorts=["negative"])
    tar.unlink()
    with pytest.raises(ShardError, match=tar.name):
        select(out, cohorts=["negative"])
    shutil.copy(shards / victim.path, tar)
    (out / victim.index).unlink()
    with pytest.raises(ShardError, match="missing"):
        select(out, cohorts=["negative"])
    other = tmp_path / "other.parquet"
    pd.DataFrame({"slice_id": [10**6], **{t: [0.0] for t in TARGETS}}).to_parquet(other)
    with pytest.raises(ValueError, match="another shard set"):
        DeviceLabels.load(shards, [str(other)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_positive_oversampling_reads_positives_k_times(backend, labelled, tmp_path):
    from spinestream.engine.loader import oversample_positives

    _need(backend)
    sel, labels = labelled
    over = oversample_positives(sel, labels, 3, tmp_path)
    ids = sel.slice_ids()
    pos = labels[torch.from_numpy(ids)][:, -1].numpy() >= 0.5
    assert 0 < pos.sum() < len(ids)
    assert over.samples == len(ids) + 2 * int(pos.sum())
    assert oversample_positives(sel, labels, 1, tmp_path) is sel
    got, valid = _epoch(build_loader(over, labels, _cfg(backend, batch_size=8, num_threads=2)))
    counts = pd.Series(got[valid]).value_counts()
    assert set(counts.index) == set(ids.tolist())
    assert (counts.loc[ids[pos]] == 3).all() and (counts.loc[ids[~pos]] == 1).all()
    # the shard set is untouched: the extra reads come from subset indexes in tmp_path
    views = [i for s, i in zip(over.shards, over.indexes) if s.oversample_of is not None]
    assert views and all(i.startswith(str(tmp_path.resolve())) for i in views)
    assert [i for s, i in zip(over.shards, over.indexes) if s.oversample_of is None] == sel.indexes
    assert over.oversampled == 2 * int(pos.sum()) and sel.oversampled == 0
    with pytest.raises(ValueError, match=">= 1"):
        oversample_positives(sel, labels, 0, tmp_path)


def test_state_from_another_selection_is_refused(labelled, shards):
    sel, labels = labelled
    a = build_loader(sel, labels, _cfg("torch"))
    b = build_loader(select(shards, cohorts=["negative"]), labels, _cfg("torch"))
    with pytest.raises(ValueError, match="same selection"):
        b.load_state_dict(a.state_dict())


def test_study_reader_walks_whole_studies_like_the_training_loader(labelled, shards):
    from study_reader import StudyReader

    sel, labels = labelled
    cfg = _cfg("torch", augment=AugmentConfig().off(), batch_size=8)
    seen = {}
    for b in build_loader(sel, labels, cfg):
        for k, sid in enumerate(b.slice_ids.tolist()):
            seen[sid] = b.images[k]
    studies = read_study_table(Layout(shards).studies)
    fold0 = studies[(studies.fold == 0) & studies.cohort.isin(["boxed", "negative"])]
    reader = StudyReader(shards, cfg, folds=[0], cohorts=["boxed", "negative"])
    got_ids, per_study = [], {}
    for b in reader:
        got_ids += b.slice_ids.tolist()
        per_study.setdefault(b.study, []).extend(b.slice_ids.tolist())
        for k, sid in enumerate(b.slice_ids.tolist()):
            # the volume rebuilds the shard image up to JPEG error
            assert (b.images[k] - seen[sid]).abs().mean() < 0.05
    assert set(per_study) == set(fold0.StudyInstanceUID)
    for row in fold0.itertuples():
        ids = per_study[row.StudyInstanceUID]
        assert ids == list(range(row.slice_id_offset, row.slice_id_offset + row.n_slices))  # head to feet, all
    with pytest.raises(ValueError, match="no studies"):
        StudyReader(shards, cfg, folds=[9])
