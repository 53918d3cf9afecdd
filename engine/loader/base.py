"""The interface every loader backend implements, and the epoch bookkeeping they share.

Guarantees (documented here, tested in tests/test_loader.py and tests/test_loader_mix.py for
each backend; DALI in its CPU-only mode):

* **An epoch is a global shuffle.** Each epoch is one seeded permutation of the whole
  selection (:func:`epoch_order`), cut into one contiguous part per rank
  (:func:`rank_part`). Whatever the order of the selection (cohort by cohort, oversampled
  copies next to their shard) and whatever the shard sizes, every rank's part is a uniform
  random sample of the selection, a different one each epoch, and any contiguous stretch of
  it (a quarter, the last few hundred steps) has the epoch's composition within sampling
  noise: a group holding a share ``p`` of the selection fills ``p`` of a stretch of ``m``
  samples up to binomial noise (standard deviation ``sqrt(p (1 - p) / m)``). Both backends
  read samples by their ``.idx`` offsets in this order; neither relies on a shuffle buffer.
  (The legacy DALI ``webdataset`` reader, ``loader.dali_reader: webdataset``, kept only for
  the benchmark's before/after line, does *not* give this: it walks shards in order.)
* **Exactly once.** One epoch yields every selected sample exactly once per rank, the
  ranks' parts are disjoint and together cover the selection. Ranks get
  ``ceil(N / world)`` positions so they all run the same number of steps; the at most one
  position per rank beyond its real samples is padding (a repeat of the rank's last sample,
  at the end of its part), marked ``valid == False`` in the batch, counted in
  :attr:`Loader.padded` and in :attr:`Batch.n_valid` from the positions on the host — never
  silently trained on as data, and never mixed into a real sample by mixup.
* **Corrupt samples** (``loader.bad_samples``). A sample whose bytes fail their CRC-32 or whose JPEG
  does not decode stops the epoch with a :class:`~spinestream.shards.wds.SampleError` naming the shard
  and the sample (``error``, the default), or (``skip``) keeps its position as an invalid row: like
  padding it is ``valid == False``, never a mixup partner, not in :attr:`Batch.n_valid`; it is counted
  in :attr:`Loader.skipped` (real positions only) and named in a :class:`BadSampleWarning`. Positions,
  the order and resumption are unchanged: exactly once still holds for every sample, read or skipped.
* **Seeded.** The order differs from epoch to epoch and is the same for the same seed.
  Every augmentation parameter of a batch is drawn on the host from a generator seeded by
  (seed, epoch, rank, position) (:mod:`spinestream.engine.loader.params`): ranks draw different
  augmentations, and a batch's pixels do not depend on what ran before it.
* **Resumable.** :meth:`Loader.state_dict` records the epoch and the number of samples
  this rank has consumed in it; a loader built with the same config and selection and
  given that state continues with exactly the samples not yet seen, in the same order and
  with the same augmented pixels an uninterrupted run would have produced (a seek: no
  replay, no DALI checkpoint). A state taken after the epoch's last batch (every finished run's
  last checkpoint, and any checkpoint that lands on an epoch end) is the start of the next epoch:
  :meth:`Loader.state_dict` records it so, :meth:`Loader.load_state_dict` reads an older
  checkpoint's "position == end of epoch" so too, and the next epoch draws its own permutation.
  Another number of ranks (``torchrun --nproc-per-node``) may resume a state at an epoch's start (the
  next epoch is split the new way); a mid-epoch state is refused for it, naming the fix: the samples
  its ranks have not yet seen are not one stretch of the epoch.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from spinestream import InputError


class BadSampleWarning(UserWarning):
    """A corrupt sample was skipped (``loader.bad_samples: skip``); the message names its shard and slice_id."""


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S) normalised, LoaderConfig.dtype, channels_last if asked
    targets: torch.Tensor  # (B, 8) float32: C1..C7, any (mixed if mixup ran)
    slice_ids: torch.Tensor  # (B,) int64
    valid: torch.Tensor  # (B,) bool: False for epoch padding
    n_valid: int = -1  # valid.sum() known on the host from the loader's positions (no device sync to read it)


def rank_part(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous range ``[start, end)`` of epoch positions that is this rank's (DALI's split)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    return (n * rank) // world, (n * (rank + 1)) // world


def per_rank(n: int, world: int) -> int:
    """Positions per rank per epoch (padded so every rank runs the same number of steps)."""
    return math.ceil(n / world)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The global sample order of one epoch (a permutation of ``range(n)``)."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def rank_order(n: int, seed: int, epoch: int, rank: int, world: int, shuffle: bool = True) -> np.ndarray:
    """This rank's record indices for one epoch, by position: its part of the epoch's global order
    (``range(n)`` when not shuffling), padded to :func:`per_rank` positions by repeating its last
    sample (those positions are the invalid ones, ``position >= samples``)."""
    order = epoch_order(n, seed, epoch) if shuffle else np.arange(n)
    start, end = rank_part(n, rank, world)
    mine = order[start:end]
    pad = per_rank(n, world) - len(mine)
    if pad:
        last = mine[-1:] if len(mine) else order[-1:]  # a rank with no sample of its own (n < world)
        mine = np.concatenate([mine, np.repeat(last, pad)])
    return mine


def report_bad_samples(loader: Loader, errors: list, n_real: int) -> list[int]:
    """The rows of a batch whose sample is corrupt (``errors[k]`` a SampleError, else None).

    Under ``bad_samples: error`` the first one is raised; under ``skip`` each in the first ``n_real`` rows (the
    real samples; the rest are padding, already invalid) is counted in ``loader.skipped``, listed in
    ``loader.skipped_samples`` as (tar, slice_id) and warned about, and all the rows are returned."""
    bad = [k for k, e in enumerate(errors) if e is not None]
    if not bad:
        return bad
    if loader.cfg.bad_samples == "error":
        raise errors[bad[0]]
    for k in bad:
        if k < n_real:
            e = errors[k]
            loader.skipped += 1
            loader.skipped_samples.append((e.tar, e.slice_id))
            warnings.warn(f"skipped a corrupt sample (loader.bad_samples=skip): {e.tar}: slice_id {e.slice_id} "
                          f"{e.reason}", BadSampleWarning, stacklevel=3)
    return bad


def exclude_from_mixup(mix, bad: list[int]):
    """``mix`` (params.MixParams) with the ``bad`` rows out of mixup: each is its own partner, and a real
    row whose drawn partner is bad keeps itself (it is not mixed this batch) -- a blank image is never
    blended into a real sample."""
    if not bad or not mix.on:
        return mix
    rows = np.arange(len(mix.partner))
    is_bad = np.zeros(len(rows), dtype=bool)
    is_bad[bad] = True
    keep_self = is_bad | is_bad[mix.partner]
    return dataclasses.replace(mix, partner=np.where(keep_self, rows, mix.partner))


class Loader:
    """Iterate to get one epoch of :class:`Batch`; ``len()`` is its number of steps."""

    backend: str = "?"
    samples: int  # real samples this rank yields per epoch
    padded: int  # padding positions this rank yields per epoch (valid == False)
    epoch: int
    skipped: int = 0  # corrupt samples skipped so far (loader.bad_samples=skip), over all epochs
    skipped_samples: list  # their (tar, slice_id), in the order met

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self):
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    positions: int  # positions this rank yields per epoch (samples + padded)

    @property
    def at_epoch_end(self) -> bool:
        """Every position of the current epoch has been yielded (the epoch has not rolled over yet)."""
        return self.position >= self.positions

    def _state(self, **extra) -> dict:
        """The resumable position: after the epoch's last batch that is (epoch + 1, 0), the same place the
        loader is once its iterator has finished."""
        epoch, position = (self.epoch + 1, 0) if self.at_epoch_end else (self.epoch, self.position)
        return {"backend": self.backend, **extra, "epoch": epoch, "position": position, "seed": self.cfg.seed,
                "n": self.n, "rank": self.rank, "world": self.world}

    def _seek(self, state: dict) -> None:
        """Go to a :meth:`_state` position (an old checkpoint's end-of-epoch position is the next epoch's start)."""
        epoch, position = int(state["epoch"]), int(state["position"])
        positions = per_rank(self.n, int(state.get("world") or self.world))  # the saving ranks' epoch length
        if not 0 <= position <= positions:
            raise InputError(f"loader state position {position} is outside this rank's epoch of {positions} "
                             f"positions")
        self.epoch, self.position = (epoch + 1, 0) if position == positions else (epoch, position)

    def _check_state(self, state: dict) -> None:
        """A saved position only means something for the same backend, selection, ranks and seed."""
        if state.get("backend") != self.backend:
            raise InputError(f"loader state was written by the {state.get('backend')!r} backend; resume with it "
                             f"(loader.backend={state.get('backend')})")
        if (state.get("n"), state.get("seed")) != (self.n, self.cfg.seed):
            raise InputError(f"loader state is for n={state.get('n')} seed={state.get('seed')}, this loader has "
                             f"n={self.n} seed={self.cfg.seed}: resume with the same selection and seed")
        position = int(state.get("position", 0))
        if state.get("world") != self.world and position not in (0, per_rank(self.n, int(state.get("world") or 1))):
            # a mid-epoch position counts this rank's part of a split into another number of ranks: the samples
            # not yet seen are not one stretch of the epoch, so no other split can continue them exactly once
            raise InputError(f"this checkpoint stopped {state.get('position')} samples into epoch {state.get('epoch')} "
                             f"of each of {state.get('world')} rank(s); it cannot continue that epoch on "
                             f"{self.world}: resume with {state.get('world')} rank(s) (torchrun --nproc-per-node), "
                             f"or from a checkpoint written at an epoch end")

    def close(self) -> None:
        pass
