"""The interface every loader backend implements, and the epoch bookkeeping they share.

Guarantees (documented here, tested in tests/test_loader.py for each backend):

* **Exactly once.** One epoch yields every selected sample exactly once per rank, the
  ranks' parts are disjoint and together cover the selection. Ranks get
  ``ceil(N / world)`` positions so they all run the same number of steps; the at most one
  position per rank beyond its real samples is padding, marked ``valid == False`` in the
  batch and counted in :attr:`Loader.padded` — never silently trained on as data.
* **Seeded.** The order differs from epoch to epoch and is the same for the same seed.
* **Resumable.** :meth:`Loader.state_dict` records the epoch and the number of samples
  this rank has consumed in it; a loader built with the same config and selection and
  given that state continues with exactly the samples not yet seen, in the same order
  an uninterrupted run would have used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


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


class Loader:
    """Iterate to get one epoch of :class:`Batch`; ``len()`` is its number of steps."""

    backend: str = "?"
    samples: int  # real samples this rank yields per epoch
    padded: int  # padding positions this rank yields per epoch (valid == False)
    epoch: int

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self):
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def _check_state(self, state: dict) -> None:
        """A saved position only means something for the same backend, selection, ranks and seed."""
        if state.get("backend") != self.backend:
            raise ValueError(f"loader state was written by the {state.get('backend')!r} backend; resume with it "
                             f"(loader.backend={state.get('backend')})")
        if (state.get("n"), state.get("world"), state.get("seed")) != (self.n, self.world, self.cfg.seed):
            raise ValueError(f"loader state is for n={state.get('n')} world={state.get('world')} "
                             f"seed={state.get('seed')}, this loader has n={self.n} world={self.world} "
                             f"seed={self.cfg.seed}: resume with the same selection, ranks and seed")

    def close(self) -> None:
        pass
