"""The epoch-mix guarantee (engine/loader/base.py), for each backend (DALI in its CPU-only mode):
whatever the order of the selection and the shard sizes, every quarter of an epoch has the
epoch's composition within sampling noise, on every rank; each rank's part is a random sample
that changes per epoch. Also: ranks draw their own augmentations (and mixup), and mixup never
blends the padding row into real samples.

The selections here are cohort-blocked on purpose: every shard of group A is listed before every
shard of group B (as round 1 lists boxed then negative shards), with uneven shard sizes.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from spinestream.engine.loader import DeviceLabels, LoaderConfig, build_loader
from spinestream.engine.loader.config import AugmentConfig
from spinestream.engine.loader import Selection
from spinestream.shards.manifest import ShardEntry
from spinestream.shards.sample import encode_jpeg
from spinestream.shards.wds import ShardWriter

BACKENDS = [pytest.param("dali", marks=pytest.mark.dali), "torch"]
SIZE = 16


def _need(backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")


def _image(k: int | None) -> bytes:
    """A 16x16 RGB JPEG: the same gradient for every sample (k=None) or a constant grey per k."""
    if k is None:
        y, x = np.mgrid[0:SIZE, 0:SIZE]
        img = np.stack([x * 15, y * 15, (x + y) * 7], -1).astype(np.uint8)
    else:
        img = np.full((SIZE, SIZE, 3), k, np.uint8)
    return encode_jpeg(img)


def _selection(root: Path, groups: list[list[int]]) -> tuple[Selection, np.ndarray]:
    """Shards written group after group (shard sizes as given); returns the selection and each slice's group."""
    shards, group_of, sid = [], [], 0
    jpg = _image(None)
    for g, sizes in enumerate(groups):
        for k, size in enumerate(sizes):
            name = f"g{g}-{k:04d}"
            with ShardWriter(root / f"{name}.tar") as w:
                for _ in range(size):
                    w.add(sid, jpg)
                    sid += 1
                info = w.close()
            shards.append(ShardEntry(name=name, path=f"{name}.tar", index=f"{name}.idx", samples=info.samples,
                                     bytes=info.bytes, cohort=f"g{g}", fold=0, sha256=info.sha256,
                                     index_sha256=info.index_sha256))
            group_of += [g] * size
    return Selection(root, tuple(f"g{g}" for g in range(len(groups))), None, shards, sid, SIZE), np.array(group_of)


def _cfg(backend, **kw):
    aug = kw.pop("augment", AugmentConfig().off())
    return LoaderConfig(backend=backend, batch_size=kw.pop("batch_size", 25), image_size=SIZE,
                        num_threads=kw.pop("num_threads", 1 if backend == "dali" else 0), initial_fill=64,
                        channels_last=False, augment=aug, **kw)


def _epoch_ids(loader) -> np.ndarray:
    ids = [b.slice_ids.cpu()[b.valid.cpu()] for b in loader]
    return torch.cat(ids).numpy()


@pytest.fixture(scope="module")
def blocked(tmp_path_factory):
    """2,000 samples: group A (30%) in shards of 300/150/100/50, then group B in 700/400/200/60/40."""
    return _selection(tmp_path_factory.mktemp("blocked"), [[300, 150, 100, 50], [700, 400, 200, 60, 40]])


def _tolerance(p: float, m: int) -> float:
    return 4 * math.sqrt(p * (1 - p) / m) + 0.02  # 4 sigma of a binomial share, plus a little slack


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_quarter_of_an_epoch_has_the_epochs_composition(backend, world, blocked):
    """Measured before the fix on DALI's webdataset reader (buffer 64 = 3% of the epoch): the
    share of group A per quarter was about [1, 0.2, 0, 0]; with world=2, rank 0 read 60% A, rank 1 0%."""
    _need(backend)
    sel, group = blocked
    labels = DeviceLabels(torch.zeros(sel.n_total, 8), ["zeros"])
    p = float((group == 0).mean())
    parts = {}
    for rank in range(world):
        loader = build_loader(sel, labels, _cfg(backend, seed=3), rank=rank, world=world)
        for epoch in range(2):
            ids = _epoch_ids(loader)
            assert len(ids) == loader.samples and len(set(ids)) == len(ids)
            share = (group[ids] == 0).mean()
            assert abs(share - p) <= _tolerance(p, len(ids)), (rank, epoch, share, p)  # a random sample
            quarters = [(group[q] == 0).mean() for q in np.array_split(ids, 4)]
            tol = _tolerance(p, len(ids) // 4)
            assert all(abs(q - p) <= tol for q in quarters), (rank, epoch, quarters, p, tol)
            parts[rank, epoch] = set(ids.tolist())
    for rank in range(world):
        if world > 1:  # a different random part every epoch
            assert parts[rank, 0] != parts[rank, 1]
    if world == 2:
        for epoch in range(2):  # still exactly once across the ranks
            assert not parts[0, epoch] & parts[1, epoch]
            assert len(parts[0, epoch] | parts[1, epoch]) == sel.samples


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_draw_different_augmentations(backend, blocked):
    """Every sample has the same pixels: two ranks' images differ only by their augmentations, and
    their mixup weights differ too (before the fix the torch backend's seeds and DALI's mixup seed
    omitted the rank: both ranks drew the same)."""
    _need(backend)
    sel, group = blocked
    aug = AugmentConfig(p_crop=0.5, p_hflip=0.5, p_vflip=0.5, p_rotate=0.5, p_shift=0.5, p_brightness_contrast=0.5,
                        p_clahe=0.0)
    labels = DeviceLabels(torch.zeros(sel.n_total, 8), ["zeros"])
    first = [next(iter(build_loader(sel, labels, _cfg(backend, augment=aug, batch_size=8), rank=r, world=2)))
             for r in range(2)]
    assert (first[0].images - first[1].images).abs().amax(dim=(1, 2, 3)).max() > 0.1
    # mixup: targets one-hot by slice-id parity, so a row mixed with one of the other parity shows
    # min(lam, 1 - lam)
    onehot = torch.zeros(sel.n_total, 8)
    onehot[torch.arange(sel.n_total), torch.arange(sel.n_total) % 2] = 1.0
    mix = dataclasses.replace(AugmentConfig().off(), p_mixup=1.0)
    weights = []
    for r in range(2):
        loader = build_loader(sel, DeviceLabels(onehot, ["groups"]), _cfg(backend, augment=mix, batch_size=16),
                              rank=r, world=2)
        w = []
        for b, _ in zip(loader, range(6)):
            mixed = b.targets[:, 0][(b.targets[:, 0] > 1e-6) & (b.targets[:, 0] < 1 - 1e-6)]
            w.append(round(float(torch.minimum(mixed, 1 - mixed).min()), 5) if len(mixed) else None)
        weights.append(w)
    pairs = [(a, b) for a, b in zip(*weights) if a is not None and b is not None]
    assert pairs and any(a != b for a, b in pairs), weights


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixup_never_blends_the_padding_row(backend, tmp_path):
    """27 samples on 2 ranks: rank 0 has 13 and one padding position. With mixup on every batch,
    real rows are blended only with real rows (a permutation of them), so the valid rows' targets
    keep their sum; blending the padding copy in would count a sample twice."""
    _need(backend)
    sel, _ = _selection(tmp_path, [[10, 17]])
    targets = torch.from_numpy(np.random.default_rng(0).random((sel.n_total, 8)).astype(np.float32))
    labels = DeviceLabels(targets, ["random"])
    cfg = _cfg(backend, augment=dataclasses.replace(AugmentConfig().off(), p_mixup=1.0), batch_size=7, seed=11)
    loader = build_loader(sel, labels, cfg, rank=0, world=2)
    assert loader.padded == 1
    mixed = 0
    for _ in range(8):
        for b in loader:
            v = b.valid
            assert b.n_valid == int(v.sum())
            want = targets[b.slice_ids[v]].sum(0)
            torch.testing.assert_close(b.targets[v].sum(0), want, rtol=1e-5, atol=1e-5)
            mixed += int(not torch.equal(b.targets[v], targets[b.slice_ids[v]]))
    assert mixed > 8  # mixup did run


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_batches_equal_nchw_ones(backend, blocked):
    _need(backend)
    sel, _ = blocked
    labels = DeviceLabels(torch.zeros(sel.n_total, 8), ["zeros"])
    aug = AugmentConfig(p_clahe=0.0)
    a = next(iter(build_loader(sel, labels, _cfg(backend, augment=aug))))
    b = next(iter(build_loader(sel, labels, dataclasses.replace(_cfg(backend, augment=aug), channels_last=True))))
    assert b.images.is_contiguous(memory_format=torch.channels_last) and not b.images.is_contiguous()
    torch.testing.assert_close(a.images, b.images)
    assert torch.equal(a.slice_ids, b.slice_ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_samples_augmentation_does_not_depend_on_the_batching(backend, blocked):
    """Augmentation parameters are a function of (seed, epoch, rank, position): the same epoch in
    batches of 16 and of 10 gives the same samples with the same pixels, on rank 1 of 2 too."""
    _need(backend)
    sel, _ = blocked
    labels = DeviceLabels(torch.zeros(sel.n_total, 8), ["zeros"])
    aug = AugmentConfig(p_crop=0.5, p_hflip=0.5, p_vflip=0.5, p_rotate=0.5, p_shift=0.5, p_brightness_contrast=0.5,
                        p_clahe=0.5)
    got = []
    for bs in (16, 10):
        loader = build_loader(sel, labels, _cfg(backend, augment=aug, batch_size=bs, seed=4), rank=1, world=2)
        it, ids, imgs = iter(loader), [], []
        for _ in range(80 // bs):
            b = next(it)
            ids.append(b.slice_ids)
            imgs.append(b.images)
        got.append((torch.cat(ids), torch.cat(imgs)))
    assert torch.equal(got[0][0], got[1][0])
    torch.testing.assert_close(got[0][1], got[1][1])


def test_host_parameters_follow_the_configured_probabilities():
    from spinestream.engine.loader.params import draw_params, sample_key, sample_uniforms

    key = sample_key(0, 1, 0)
    u = sample_uniforms(key, 100, 4000)
    assert np.array_equal(u, np.concatenate([sample_uniforms(key, 100, 7), sample_uniforms(key, 107, 3993)]))
    assert not np.array_equal(u, sample_uniforms(sample_key(0, 1, 1), 100, 4000))  # another rank draws anew
    aug = AugmentConfig(p_crop=0.3, p_hflip=0.5, p_vflip=0.1, p_rotate=0.2, p_clahe=0.4, p_shift=0.3,
                        p_brightness_contrast=0.6)
    p = draw_params(aug, u)
    for coin, prob in ((p.crop, 0.3), (p.hflip, 0.5), (p.vflip, 0.1), (p.rotate, 0.2), (p.clahe, 0.4),
                       (p.shift.any(1), 0.3), (p.contrast != 1, 0.6)):
        assert abs(coin.mean() - prob) <= _tolerance(prob, len(u))
    # neutral where a coin is False, inside the configured ranges where True
    assert (p.angle[~p.rotate] == 0).all() and (np.abs(p.angle) <= aug.max_angle).all()
    assert (p.roi[~p.crop] == [0, 0, 1, 1]).all()
    area = p.roi[p.crop, 2] * p.roi[p.crop, 3]
    assert (area <= aug.crop_scale[1] + 1e-6).all() and (p.roi[:, :2] + p.roi[:, 2:] <= 1 + 1e-6).all()
    assert (np.abs(p.shift) <= aug.shift_limit).all() and (np.abs(p.contrast - 1) <= aug.contrast_limit + 1e-6).all()


def test_torch_decodes_on_the_cpu_without_a_hardware_jpeg_decoder(monkeypatch):
    import spinestream.engine.device as engine_device
    from spinestream.engine.loader.torch_backend import gpu_decode_default

    cuda = torch.device("cuda", 0)
    for hw in (False, True):
        monkeypatch.setattr(engine_device, "has_hw_jpeg_decoder", lambda d, hw=hw: hw)
        assert gpu_decode_default(LoaderConfig(), cuda) is hw  # P100/T4: CPU workers; A100/H100: nvJPEG
    assert gpu_decode_default(LoaderConfig(), torch.device("cpu")) is False
    assert gpu_decode_default(LoaderConfig(torch_decode="gpu"), torch.device("cpu")) is True


@pytest.mark.dali
def test_dali_hw_decoder_load_follows_the_card(monkeypatch):
    import spinestream.engine.device as engine_device
    from spinestream.engine.loader.dali_backend import hw_decoder_load

    cuda = torch.device("cuda", 0)
    for hw, want in ((False, 0.0), (True, 0.65)):
        monkeypatch.setattr(engine_device, "has_hw_jpeg_decoder", lambda d, hw=hw: hw)
        assert hw_decoder_load(LoaderConfig(), cuda) == want
    assert hw_decoder_load(LoaderConfig(hw_decoder_load=0.9), cuda) == 0.9
    with pytest.raises(ValueError, match="hw_decoder_load"):
        LoaderConfig(hw_decoder_load=1.5)


def test_training_refuses_the_legacy_webdataset_reader(blocked):
    """It does not mix across shards: only ``bench loader`` builds it (benchmarks/dali_webdataset.py)."""
    sel, _ = blocked
    labels = DeviceLabels(torch.zeros(sel.n_total, 8), ["zeros"])
    with pytest.raises(ValueError, match="dali_reader=webdataset.*bench loader"):
        build_loader(sel, labels, _cfg("dali", dali_reader="webdataset"))


@pytest.mark.dali
def test_legacy_webdataset_reader_still_reads_every_sample_and_its_state_stays_its_own(blocked):
    """The before line of ``bench loader``: it still yields each sample once; a state it wrote is refused by
    the index reader (its position means another order)."""
    pytest.importorskip("nvidia.dali")
    from spinestream.benchmarks.loader import dali_loader

    sel, _ = blocked
    labels = DeviceLabels(torch.zeros(sel.n_total, 8), ["zeros"])
    old = dali_loader(sel, labels, _cfg("dali", dali_reader="webdataset"), device="cpu")
    ids = _epoch_ids(old)
    assert sorted(ids.tolist()) == list(range(sel.samples))
    new = build_loader(sel, labels, _cfg("dali"))
    with pytest.raises(ValueError, match="dali_reader=webdataset"):
        new.load_state_dict(old.state_dict())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cuda_batch_needs_no_host_sync(backend, blocked):
    """torch.cuda.set_sync_debug_mode('error') around the loader's per-batch work (DALI's own
    internal synchronisation is not torch's and is not seen by it)."""
    _need(backend)
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    sel, _ = blocked
    labels = DeviceLabels(torch.zeros(sel.n_total, 8), ["zeros"])
    aug = AugmentConfig(p_clahe=0.5, p_mixup=0.5)
    loader = build_loader(sel, labels, _cfg(backend, augment=aug, num_threads=2), device=torch.device("cuda", 0))
    it = iter(loader)
    next(it)  # warm-up: tables, constants and pools built once
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            b = next(it)
            assert b.images.is_cuda and b.slice_ids.is_cuda and b.n_valid == len(b.slice_ids)
    finally:
        torch.cuda.set_sync_debug_mode(0)
