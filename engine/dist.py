"""Data-parallel processes: the process group ``torchrun`` describes, and the few collectives the engine uses.

    torchrun --nproc-per-node 2 $(which spinestream) train -c round2            # two GPUs, one machine
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        $(which spinestream) train -c round2                                       # two machines

``torchrun`` (or anything that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
the same way: a Slurm script, a Kubernetes job) starts one process per device; :func:`init_from_env` joins
them into one process group: NCCL on GPUs, gloo on the CPU (so the tests run two ranks on a laptop). A single
process (no ``WORLD_SIZE``, or 1) is a world of one and every helper here is a no-op: the engine has one
code path.

What the engine relies on (each helper is a collective: every rank calls it at the same point):

* :meth:`Dist.part` -- this rank's contiguous part of a list (studies to infer), :meth:`Dist.gather` and
  :meth:`Dist.merge` to put the parts back together, in the list's order, on every rank;
* :meth:`Dist.any_` -- a flag agreed on every rank (a non-finite loss on one rank skips the step on all),
  :meth:`Dist.mean` / :meth:`Dist.sum_` for the logged loss and throughput;
* :meth:`Dist.main_first` -- rank 0 runs a block (writes files), the others run it after (they read them);
* :meth:`Dist.main_only` -- rank 0 alone runs a function (writes a verb's outputs), the others wait for it and
  raise :class:`MainFailed` when it failed;
* :meth:`Dist.broadcast_buffers` -- rank 0's BatchNorm statistics everywhere (before validation with EMA);
* every collective times out after ``timeout_s`` (``train.dist_timeout_s``): a rank that died or hangs
  raises :class:`RankTimeout` in the others, naming the wait, instead of leaving them waiting forever
  (``torchrun`` also stops the whole group when one rank exits with an error).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from spinestream import InputError, SpinestreamError

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 1800.0
"""How long a collective waits for the other ranks (a validation or a checkpoint on rank 0 included)."""


class RankTimeout(SpinestreamError, RuntimeError):
    """A collective waited longer than ``train.dist_timeout_s`` for the other ranks (one died or hangs)."""


class MainFailed(SpinestreamError, RuntimeError):
    """Rank 0 failed at a step the other ranks waited for (:meth:`Dist.main_only`); its own log has the error."""


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the group: ``rank`` of ``world`` (``local_rank``: its device on this
    machine). ``Dist()`` is a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints, metrics, tables and plots."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    # ------------------------------------------------------------------ splitting work

    def bounds(self, n: int) -> tuple[int, int]:
        """``[start, end)`` of this rank's contiguous part of ``n`` items (the loader's split)."""
        return (n * self.rank) // self.world, (n * (self.rank + 1)) // self.world

    def part(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous part of ``items`` (every item on exactly one rank; parts differ by <= 1)."""
        start, end = self.bounds(len(items))
        return list(items[start:end])

    # ------------------------------------------------------------------ collectives

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        with self._waiting("gather results"):
            torch.distributed.all_gather_object(out, obj)
        return out

    def merge(self, part: dict) -> dict:
        """The ranks' dicts as one (a key on two ranks is a bug: refused)."""
        if not self.enabled:
            return part
        merged: dict = {}
        for d in self.gather(part):
            dup = merged.keys() & d.keys()
            if dup:
                raise RuntimeError(f"ranks returned the same keys twice: {sorted(dup)[:5]}")
            merged.update(d)
        return merged

    def broadcast(self, obj: T, what: str = "rank 0's value") -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.main else None]
        with self._waiting(what):
            torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _reduce(self, t: torch.Tensor, op, what: str) -> torch.Tensor:
        if not self.enabled:
            return t
        t = t.clone()
        with self._waiting(what):
            torch.distributed.all_reduce(t, op=op)
        return t

    def any_(self, flag: torch.Tensor) -> torch.Tensor:
        """``flag`` (a bool tensor on the device) true on any rank, on every rank; no host sync."""
        if not self.enabled:
            return flag
        return self._reduce(flag.to(torch.int32), torch.distributed.ReduceOp.MAX, "an agreed flag").bool()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, torch.distributed.ReduceOp.SUM, "a sum")

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.sum_(t) / self.world if self.enabled else t

    def min_int(self, value: int, device: torch.device | str = "cpu") -> int:
        """The smallest of the ranks' ``value`` (``batch_size: auto``: every rank must run the same batch)."""
        if not self.enabled:
            return value
        return int(self._reduce(torch.tensor(value, device=device), torch.distributed.ReduceOp.MIN,
                                "the ranks' batch sizes").item())

    def barrier(self, what: str = "the other ranks") -> None:
        if not self.enabled:
            return
        with self._waiting(what):
            if self.backend == "nccl":
                torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
            else:
                torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self, what: str = "rank 0") -> Iterator[None]:
        """Rank 0 runs the block first (it writes), then the other ranks (they find what it wrote)."""
        if self.enabled and not self.main:
            self.barrier(what)
        yield
        if self.enabled and self.main:
            self.barrier(what)

    def main_only(self, fn: Callable[[], T], what: str = "rank 0's writes") -> T | None:
        """``fn()`` on rank 0 only (it writes the outputs); every rank returns once it is done, so the files
        exist when any rank has finished (torchrun reports success only then). An exception in ``fn`` is raised
        on rank 0 and, as :class:`MainFailed` naming it, on the others: no rank waits for a write that failed.
        Returns ``fn()``'s value on rank 0, None elsewhere."""
        if not self.enabled:
            return fn()
        result, error, failed = None, None, None
        if self.main:
            try:
                result = fn()
            except BaseException as e:  # re-raised below, once the other ranks know
                error, failed = e, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        failed = self.broadcast(failed, what)
        if error is not None:
            raise error
        if failed is not None:
            raise MainFailed(f"rank {self.rank} of {self.world}: rank 0 failed at {what} ({failed}); see its log")
        return result

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) in ``module`` on every rank (parameters are kept in
        step by DDP; buffers drift between its broadcasts)."""
        if not self.enabled:
            return
        with self._waiting("rank 0's buffers"):
            for b in module.buffers():
                torch.distributed.broadcast(b.data, src=0)

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers in ``module`` on every rank (a copy DDP does not know of: the EMA)."""
        if not self.enabled:
            return
        with self._waiting("rank 0's weights"):
            for t in [*module.parameters(), *module.buffers()]:
                torch.distributed.broadcast(t.data, src=0)

    @contextlib.contextmanager
    def _waiting(self, what: str) -> Iterator[None]:
        """A collective's timeout or a peer's exit as :class:`RankTimeout`, saying what this rank waited for."""
        try:
            yield
        except (RuntimeError, torch.distributed.DistBackendError) as e:
            text = str(e)
            lost = ("timed out" in text.lower() or "timeout" in text.lower() or "connection" in text.lower()
                    or "closed" in text.lower() or "reset by peer" in text.lower())
            if not lost or isinstance(e, SpinestreamError):
                raise
            raise RankTimeout(
                f"rank {self.rank} of {self.world} waited for {what} and gave up after at most "
                f"{self.timeout_s:.0f} s (train.dist_timeout_s): another rank died or hangs; see its log, then "
                f"resume from the last checkpoint ({text.splitlines()[0][:200] if text else type(e).__name__})"
            ) from e


# ---------------------------------------------------------------------- the process group

_CURRENT: Dist | None = None


def env_world(env: dict | None = None) -> tuple[int, int, int]:
    """``(rank, world, local_rank)`` from torchrun's variables (``(0, 1, 0)`` when they are not set)."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1") or 1)
        rank = int(env.get("RANK", "0") or 0)
        local = int(env.get("LOCAL_RANK", str(rank)) or 0)
    except ValueError as e:
        raise InputError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers (as torchrun sets them): {e}") from e
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world, local


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S, *, device_type: str | None = None) -> Dist:
    """Join the process group torchrun describes (once per process; later calls return the same
    :class:`Dist`). A world of one initialises nothing. ``device_type``: ``cuda`` -> NCCL, else gloo (default:
    NCCL when CUDA is available)."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    rank, world, local = env_world()
    if world == 1:
        _CURRENT = Dist(timeout_s=timeout_s)
        return _CURRENT
    if not torch.distributed.is_available():
        raise InputError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise InputError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the ranks with torchrun "
                         f"(torchrun --nproc-per-node N $(which spinestream) ...)")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES") != "" else "cpu"
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    _CURRENT = Dist(rank=rank, world=world, local_rank=local, backend=backend, timeout_s=timeout_s)
    return _CURRENT


def current() -> Dist:
    """The process group this process joined (:func:`init_from_env`), else a world of one."""
    return _CURRENT if _CURRENT is not None else Dist()


def shutdown() -> None:
    """Leave the process group (the end of a verb; a no-op for a world of one)."""
    global _CURRENT
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _CURRENT = None


def on_main(fn: Callable[..., T], *args, **kwargs) -> T | None:
    """``fn(...)`` on rank 0 only (a file write); None elsewhere."""
    return fn(*args, **kwargs) if current().main else None
