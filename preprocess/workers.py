"""Worker processes that a worker's death cannot hang: the shard job's and ``spinestream predict``'s pool.

Decoding runs C code on untrusted files (imagecodecs' libjpeg-turbo, CharLS, OpenJPEG, OpenJPH; GDCM and
pylibjpeg as fallbacks). ``multiprocessing.Pool`` replaces a worker that dies -- a decoder's segfault or
abort, the out-of-memory killer -- but never hands back the task it held: ``imap`` then waits for ever, and
a 9-hour Kaggle run ends without a submission. :class:`Workers` is a ``concurrent.futures`` process pool
(a dead worker breaks the pool: every unfinished task learns it) that starts a fresh pool and runs each
task the dead pool held **alone**, in a process of its own, so the one that kills its process is named:

* it succeeds alone (it was a neighbour's death, or memory pressure): its result, as if nothing happened;
* its process dies again: ``died(task, Died)`` decides -- the shard job records the study as failed (a
  decoder crash on its files is bad input) or stops (a SIGKILL is the system's, not the study's: the
  rerun resumes it); predict lists the study and predicts the rest.

A task that raises is not a death: its exception reaches the caller as with ``Pool`` (a bug stops the job,
bad input is the task's own business). ``tests/test_workers.py`` kills workers with real signals.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

__all__ = ["Died", "Workers", "run_alone"]


@dataclass(frozen=True)
class Died:
    """How a task's process ended without returning: its exit code (negative: the signal)."""

    exitcode: int | None

    @property
    def killed(self) -> bool:
        """SIGKILL: the out-of-memory killer or a person, not the task's input."""
        return self.exitcode == -signal.SIGKILL

    def __str__(self) -> str:
        if self.exitcode is not None and self.exitcode < 0:
            try:
                return f"killed by {signal.Signals(-self.exitcode).name}"
            except ValueError:
                return f"killed by signal {-self.exitcode}"
        return f"exited with code {self.exitcode}"


def _alone(fn: Callable, task: Any, conn) -> None:
    try:
        out = (True, fn(task))
    except BaseException as e:  # noqa: BLE001 -- handed to the parent, which re-raises it
        out = (False, e)
    conn.send(out)
    conn.close()


def run_alone(fn: Callable, task: Any, start_method: str) -> tuple[bool, Any]:
    """``fn(task)`` in a process of its own -> ``(True, result)``, or ``(False, Died)`` when the process
    ended without answering. An exception ``fn`` raised is re-raised here."""
    ctx = mp.get_context(start_method)
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_alone, args=(fn, task, send), daemon=True)
    p.start()
    send.close()
    try:
        msg = recv.recv()
    except EOFError:
        msg = None
    finally:
        recv.close()
    p.join()
    if msg is None:
        return False, Died(p.exitcode)
    ok, value = msg
    if not ok:
        raise value
    return True, value


class Workers:
    """``workers`` processes (started with ``start_method()``, called again for each fresh pool: after
    threads exist it says forkserver). ``died(task, Died) -> result`` is what a task that kills its
    process alone yields (it may raise to stop the caller)."""

    def __init__(self, workers: int, start_method: Callable[[], str]) -> None:
        self.workers = workers
        self._start_method = start_method
        self._pool: ProcessPoolExecutor | None = None
        self.deaths = 0  # pools broken by a worker's death (for reports and tests)

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context(self._start_method()))
        return self._pool

    def start(self) -> None:
        """Start the processes now (a fork pool forks them at its first task: the caller may want that
        done before its own threads exist)."""
        self._executor().submit(_noop).result()

    def _submit(self, fn: Callable, task: Any) -> Future:
        try:
            return self._executor().submit(fn, task)
        except BrokenProcessPool:  # broken since the last look: the tasks it held learn it from their futures
            self._discard()
            return self._executor().submit(fn, task)

    def _discard(self) -> None:
        if self._pool is not None:
            self.deaths += 1
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _result(self, fn: Callable, task: Any, future: Future, died: Callable[[Any, Died], Any]) -> Any:
        try:
            return future.result()
        except BrokenProcessPool:
            pass
        if self._pool is not None and getattr(self._pool, "_broken", False):
            self._discard()  # the next submissions go to a fresh pool
        ok, value = run_alone(fn, task, self._start_method())
        return value if ok else died(task, value)

    def imap_unordered(self, fn: Callable, tasks: Iterable, *, died: Callable[[Any, Died], Any],
                       window: int | None = None) -> Iterator:
        """``fn(task)`` for every task, each result as it is ready; at most ``window`` (default 2 x workers)
        submitted and not yet yielded."""
        todo = iter(tasks)
        window = max(1, window or 2 * self.workers)
        pending: dict[Future, Any] = {}
        for task in todo:
            pending[self._submit(fn, task)] = task
            if len(pending) >= window:
                break
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                task = pending.pop(future)
                yield self._result(fn, task, future, died)
                nxt = next(todo, _END)
                if nxt is not _END:
                    pending[self._submit(fn, nxt)] = nxt

    def imap(self, fn: Callable, tasks: Iterable, *, died: Callable[[Any, Died], Any], ahead: int) -> Iterator:
        """``fn(task)`` for every task, in order, with at most ``ahead`` submitted and not yet yielded."""
        todo = iter(tasks)
        pending: deque[tuple[Any, Future]] = deque()
        for task in todo:
            pending.append((task, self._submit(fn, task)))
            if len(pending) >= max(1, ahead):
                break
        while pending:
            task, future = pending.popleft()
            out = self._result(fn, task, future, died)
            nxt = next(todo, _END)
            if nxt is not _END:
                pending.append((nxt, self._submit(fn, nxt)))
            yield out

    def close(self) -> None:
        """Let the workers finish and exit."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def terminate(self) -> None:
        """Stop now: queued tasks are dropped, running workers are killed."""
        if self._pool is None:
            return
        procs = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join()
        self._pool = None


_END = object()


def _noop() -> None:
    return None
