"""Faults injected into a ``spinestream`` verb at a chosen point of its write sequence: SIGKILL, a torn write,
a full disk. For the tests (tests/test_faults.py) and ``spinestream bench reliability`` only: no verb imports
this module, so production pays nothing.

    python -m spinestream.faultinject count COUNTS.json -- shard --data raw --out shards
    python -m spinestream.faultinject kill ops:137 -- train --resume runs/t
    python -m spinestream.faultinject tear writes:42 --seed 7 -- evaluate --run runs/t
    python -m spinestream.faultinject enospc writes:42 -- predict --run runs/t ...
    python -m spinestream.faultinject serve      # the zygote benchmarks/reliability.py drives (see serve())

The process makes itself a process-group leader, patches the calls a verb's writes go through, then runs
``spinestream.cli.main`` in this process. Each patched call is an *event*, counted in memory shared with
forked children (the shard job's pool workers count too), in two sequences:

* ``ops``: ``open``/``io.open``/``os.open`` for writing (``w``, ``a``, ``x``, ``+``; ``O_WRONLY``, ``O_RDWR``,
  ``O_CREAT``), ``os.replace``/``os.rename`` (every atomic commit), ``os.fsync``, ``os.unlink``/``os.remove``/
  ``os.rmdir`` (``shutil.rmtree`` goes through them, file by file) and ``os.mkdir`` (``Path.mkdir``, ``makedirs``);
* ``writes``: every ``write`` call on a file opened for writing through ``open`` (``Path.write_bytes``,
  ``np.save``, ``torch.save`` to a file object, ``to_csv`` to a path ...; pyarrow's own native writes are not
  seen, their ``os.replace`` and ``fsync`` are).

Faults, at event N of one sequence (1-based), or at a named point (``op:KIND:PATHPART[:N]``,
``write:PATHPART[:N]``: the N-th such event on a path containing PATHPART; :func:`parse_at`):

* ``kill``: SIGKILL to the whole process group just before the event (the state a crash there leaves);
* ``tear`` (writes): a random part of the data written, then SIGKILL: a kill in the middle of a ``write``;
* ``enospc``: ``OSError(ENOSPC)`` as the OS raises it: a write writes a random part of its data first; an
  ``open``, ``mkdir``, ``replace``/``rename`` or ``fsync`` fails before it acts (unlink and rmdir never do);
* ``count``: none; COUNTS.json gets ``{"ops": ..., "writes": ...}`` at the end.

A killed run exits with -9; a run that ends before event N exits as it would. In a test's own process,
:func:`injected` gives the full disk (and the count) for the paths under one directory, for a block.
"""
from __future__ import annotations

import argparse
import atexit
import builtins
import contextlib
import errno
import io
import json
import mmap
import multiprocessing as mp
import os
import random
import signal
import stat
import struct
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_SEQS = ("ops", "writes")
_NO_ENOSPC = ("unlink", "remove", "rmdir", "fsync-dir")  # removing never needs space; a directory's
# fsync is best effort (spinestream.shards.fsutil.fsync_dir)


class Fault(Exception):
    """The request names no sequence or mode this module knows."""


def parse_at(at: str) -> tuple[str, int, str, str]:
    """Where a fault goes -> (sequence, N, kind, path part):

    * ``ops:N`` / ``writes:N``: the N-th event of the sequence;
    * ``op:KIND:PART[:N]``: the N-th op of KIND (``open``, ``replace``, ``fsync`` ..., ``*`` for any) on a path
      containing PART (a named point: a regression test's fault stays put when other writes come and go);
    * ``write:PART[:N]``: the N-th write to a file whose path contains PART."""
    parts = str(at).split(":")
    try:
        if parts[0] in _SEQS and len(parts) == 2:
            seq, n, kind, part = parts[0], int(parts[1]), "", ""
        elif parts[0] == "op" and len(parts) in (3, 4):
            seq, kind, part, n = "ops", parts[1], parts[2], int(parts[3]) if len(parts) == 4 else 1
        elif parts[0] == "write" and len(parts) in (2, 3):
            seq, kind, part, n = "writes", "*", parts[1], int(parts[2]) if len(parts) == 3 else 1
        else:
            raise ValueError
    except ValueError:
        raise Fault(f"at={at!r}: expected ops:N, writes:N, op:KIND:PATHPART[:N] or write:PATHPART[:N]") from None
    if n < 1:
        raise Fault(f"at={at!r}: N counts from 1")
    return seq, n, kind, part


def _fd_path(fd) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
    except (OSError, AttributeError, ValueError):
        return None


class _Injector:
    def __init__(self, mode: str, at: str | None, seed: int = 0, only: str | os.PathLike | None = None):
        if mode not in ("count", "kill", "tear", "enospc"):
            raise Fault(f"mode {mode!r}: expected count, kill, tear or enospc")
        self.mode, self.rng = mode, random.Random(seed)
        self.seq, self.at, self.match_kind, self.match_part = parse_at(at) if mode != "count" else ("", 0, "", "")
        if mode == "tear" and self.seq != "writes":
            raise Fault("tear applies to writes")
        self.only = None if only is None else os.path.abspath(only) + os.sep
        # MAP_SHARED | MAP_ANONYMOUS: forked children count into the same slots (ops, writes, named matches)
        self.shared = mmap.mmap(-1, 24)
        self.lock = mp.get_context("fork").Lock()
        self.orig: dict = {}
        self.kinds: dict[str, int] = {}
        self.fired = self.hit = False

    # ------------------------------------------------------------------ the counters

    def counts(self) -> dict[str, int]:
        ops, writes = struct.unpack("qq", self.shared[:16])
        return {"ops": ops, "writes": writes}

    def _next(self, slot: int) -> int:
        with self.lock:
            n = struct.unpack("q", self.shared[8 * slot:8 * slot + 8])[0] + 1
            self.shared[8 * slot:8 * slot + 8] = struct.pack("q", n)
        return n

    def _mine(self, path) -> bool:
        """Whether an event on ``path`` counts (with ``only``: under that directory)."""
        if self.only is None:
            return True
        return path is not None and os.path.abspath(os.fsdecode(path)).startswith(self.only)

    def _due(self, seq: str, kind: str, path) -> int:
        """The event's number in its sequence (0: not counted); whether the fault goes here is ``self.hit``."""
        n = self._next(_SEQS.index(seq))
        self.hit = False
        if self.fired or self.mode == "count" or seq != self.seq:
            return n
        if self.match_part:  # a named point: the N-th matching event
            if (self.match_kind in ("*", kind)) and path is not None and self.match_part in os.fsdecode(path):
                self.hit = self._next(2) == self.at
        else:
            self.hit = n == self.at
        self.fired = self.hit
        return n

    def op(self, kind: str, path=None) -> None:
        """An ``ops`` event, before the call runs."""
        if not self._mine(path):
            return
        n = self._due("ops", kind, path)
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if not self.hit:
            return
        where = f"{kind} {os.fsdecode(path) if path is not None else ''}".rstrip()
        if self.mode == "kill":
            self._die(f"before op {n} ({where})")
        if self.mode == "enospc" and (kind in _NO_ENOSPC or kind == "mkdir" and os.path.isdir(path)):
            self._say(f"no fault: op {n} ({where}) never fails for want of space")  # (an existing folder: EEXIST)
            return
        if self.mode == "enospc":
            self._say(f"ENOSPC at op {n} ({where})")
            named = [] if path is None or kind in ("fsync", "fsync-dir") else [os.fsdecode(path)]
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *named)

    def write(self, f, path: str, data) -> int:
        """A ``writes`` event: the write itself, whole or (at the chosen event) cut short."""
        if not self._mine(path):
            return f.write(data)
        n = self._due("writes", "write", path)
        if not self.hit:
            return f.write(data)
        size = len(data)
        # tear, ENOSPC: part of the data reaches the file, at least one byte does not; kill: none of it
        part = self.rng.randrange(size) if size and self.mode != "kill" else 0
        if part:
            f.write(data[:part])
        f.flush()
        if self.mode in ("kill", "tear"):
            self._die(f"in write {n} to {path} after {part} of {size}")
        self._say(f"ENOSPC at write {n} to {path} after {part} of {size}")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def _say(self, what: str) -> None:
        try:
            os.write(2, f"\nfaultinject: {what}\n".encode())
        except OSError:
            pass

    def _die(self, where: str) -> None:
        self._say(f"SIGKILL {where}")
        os.killpg(os.getpgrp(), signal.SIGKILL)

    # ------------------------------------------------------------------ the patches

    def install(self) -> None:
        o = self.orig = {name: getattr(os, name) for name in
                         ("open", "replace", "rename", "fsync", "unlink", "remove", "rmdir", "mkdir")}
        o["builtins.open"] = real_open = builtins.open
        inj = self

        class WFile:
            """A file opened for writing: ``write`` is an event, everything else the file's own."""

            def __init__(self, f, path: str):
                self._f, self._path = f, path

            def write(self, data):
                return inj.write(self._f, self._path, data)

            def writelines(self, lines):
                for line in lines:
                    self.write(line)

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __iter__(self):
                return iter(self._f)

            def __enter__(self):
                self._f.__enter__()
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

        def _open(file, mode="r", *a, **k):
            if isinstance(file, int) or not (isinstance(mode, str) and any(c in mode for c in "wax+")):
                return real_open(file, mode, *a, **k)
            self.op("open", file)
            return WFile(real_open(file, mode, *a, **k), os.fsdecode(file))

        def _os_open(path, flags, *a, **k):
            if flags & _WRITE_FLAGS:
                self.op("os.open", path)
            return o["open"](path, flags, *a, **k)

        def _moved(name):
            def f(src, dst, *a, **k):
                self.op(name, dst)
                return o[name](src, dst, *a, **k)
            return f

        def _fsync(fd):
            try:
                isdir = stat.S_ISDIR(os.fstat(fd if isinstance(fd, int) else fd.fileno()).st_mode)
            except (OSError, AttributeError):
                isdir = False
            self.op("fsync-dir" if isdir else "fsync", _fd_path(fd))
            return o["fsync"](fd)

        def _simple(name):
            def f(path, *a, **k):
                self.op(name, path)
                return o[name](path, *a, **k)
            return f

        builtins.open = io.open = _open
        os.open = _os_open
        os.replace, os.rename = _moved("replace"), _moved("rename")
        os.fsync = _fsync
        for name in ("unlink", "remove", "rmdir", "mkdir"):
            setattr(os, name, _simple(name))

    def uninstall(self) -> None:
        builtins.open = io.open = self.orig["builtins.open"]
        for name, f in self.orig.items():
            if name != "builtins.open":
                setattr(os, name, f)


@contextlib.contextmanager
def injected(mode: str, at: str | None = None, *, seed: int = 0, only: str | os.PathLike | None = None):
    """In this process (a test's): ``enospc`` at ``at``, or ``count``, for the events on paths under ``only``
    while the block runs; yields the injector (``.counts()``, ``.fired``). Kills need a process of their own
    (:func:`run_verb`)."""
    if mode not in ("enospc", "count"):
        raise Fault(f"in-process injection is enospc or count, not {mode!r}")
    inj = _Injector(mode, at, seed, only)
    inj.install()
    try:
        yield inj
    finally:
        inj.uninstall()


PRELOAD = ("numpy", "pandas", "pyarrow.parquet", "torch", "timm", "spinestream.cli", "spinestream.engine.train",
           "spinestream.engine.trainer", "spinestream.engine.evaluate", "spinestream.engine.pseudo", "spinestream.predict",
           "spinestream.run", "spinestream.preprocess.convert", "spinestream.engine.loader.torch_backend")
"""What the zygote imports once (about 10 s on a 2-core machine), so each verb it forks starts at once."""


def run_verb(verb: list[str], mode: str = "plain", at: str | None = None, seed: int = 0,
             counts: str | None = None) -> int:
    """In this process: become a process-group leader, install the injector (``plain``: none), run the verb."""
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)  # a group of its own: the kill takes the verb's workers, never the caller
    inj = None
    if mode != "plain":
        inj = _Injector(mode, at, seed)
        inj.install()
    try:
        from spinestream.cli import main as cli_main

        sys.argv = ["spinestream", *verb]
        try:
            return int(cli_main(verb) or 0)
        except SystemExit as e:  # argparse
            return e.code if isinstance(e.code, int) else 2
    finally:
        if inj is not None and counts is not None:
            with inj.orig["builtins.open"](counts, "w") as f:
                json.dump({**inj.counts(), "main_kinds": inj.kinds}, f)


def serve() -> int:
    """The zygote: import :data:`PRELOAD`, then for each JSON request on stdin fork a child that runs one verb
    (in its own session, cwd and log file, with the injector when asked) and answer one JSON line: its exit
    status (-9: killed), the seconds it ran and whether it ran past ``timeout`` (then its group is killed).
    ``kill_after``: SIGKILL to its group after that many seconds (a kill at a random moment)."""
    import importlib
    import time
    import traceback

    for name in PRELOAD:
        importlib.import_module(name)
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: never returns into this loop
            rc = 1
            try:
                os.setsid()
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.close(fd)
                sys.stdin.close()
                os.chdir(req.get("cwd") or ".")
                os.environ.update(req.get("env") or {})
                sys.modules["numpy"].random.seed()  # as a new process's (python reseeds random at fork itself):
                # forks of one zygote would otherwise share numpy's global state, hiding a run that depends on it
                rc = run_verb(req["argv"], req.get("mode", "plain"), req.get("at"), int(req.get("seed", 0)),
                              req.get("counts"))
            except BaseException:
                traceback.print_exc()
            finally:
                try:
                    atexit._run_exitfuncs()
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(rc & 0xFF if rc >= 0 else 1)
        deadline = t0 + float(req.get("timeout", 600))
        kill_at = t0 + float(req["kill_after"]) if req.get("kill_after") is not None else None
        timed_out = killed_by_timer = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            now = time.perf_counter()
            if kill_at is not None and now >= kill_at and not killed_by_timer:
                killed_by_timer = True
                _killpg(pid)
            if now >= deadline and not timed_out:
                timed_out = True
                _killpg(pid)
            time.sleep(0.01)
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        out.write(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0, "timed_out": timed_out,
                              "killed_by_timer": killed_by_timer}) + "\n")
        out.flush()
    return 0


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["serve"]:
        return serve()
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m spinestream.faultinject")
    p.add_argument("mode", choices=["count", "kill", "tear", "enospc"])
    p.add_argument("arg", help="count: the JSON file to write; otherwise ops:N or writes:N (1-based)")
    p.add_argument("--seed", type=int, default=0, help="where in a write's data the cut falls")
    args = p.parse_args(argv[:cut])
    count = args.mode == "count"
    return run_verb(argv[cut + 1:], args.mode, None if count else args.arg, args.seed, args.arg if count else None)


if __name__ == "__main__":
    sys.exit(main())
