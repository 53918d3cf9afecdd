"""Atomic file writes and hashing: nothing half-written is ever visible under its final name.

A write goes to ``<path>.tmp-<pid>``, is fsynced and renamed over ``path``. When it fails, its temporary file
is removed (on a full disk it holds the space the next attempt needs) and a full or read-only file system is a
:class:`WriteError` naming ``path`` (a :class:`~spinestream.SpinestreamError`: one line from the console
script); the file under ``path`` is the previous one, untouched. A write killed outright (SIGKILL, a power cut)
leaves its temporary file: :func:`remove_stale_tmp` is for the one writer of a directory to clear them.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spinestream import SpinestreamError

NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
"""The errors of a full, over-quota or read-only file system: never a bug, never bad input; the user frees
space (or remounts) and reruns."""
TMP_RE = re.compile(r"\.tmp-\d+$")
"""The temporary name of an atomic write in progress (or killed): ``<name>.tmp-<pid>``."""


class WriteError(SpinestreamError, OSError):
    """Writing ``filename`` failed because its file system is full, over quota or read-only (``errno`` says
    which). Built like an OSError, ``WriteError(errno, strerror, filename)`` (so it crosses process pools);
    :meth:`of` makes one from the OSError a write raised."""

    @classmethod
    def of(cls, path: str | Path, e: OSError) -> WriteError:
        return cls(e.errno, e.strerror or os.strerror(e.errno), str(path))

    def __str__(self) -> str:
        return (f"cannot write {self.filename}: {self.strerror}; free space (or make the file system writable) "
                f"and rerun the same command")


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Inside the block, an OSError of a full or read-only file system (:data:`NO_SPACE`) becomes a
    :class:`WriteError` naming ``path`` (a ``write`` that fails names no file); other errors pass unchanged."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        cause = _no_space(e)
        if cause is not None:
            raise WriteError.of(path, cause) from e
        raise


def _no_space(e: BaseException | None) -> OSError | None:
    """The full-disk OSError ``e`` is or masks: torch.save's writer, for one, raises a RuntimeError ("unexpected
    pos") while the write's ENOSPC is still in flight, so only ``__context__`` holds it."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def _tmp_for(path: Path) -> Iterator[Path]:
    """``<path>.tmp-<pid>``, removed when the block fails; the block's OSErrors as :func:`writing` makes them."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path):
            yield tmp
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def remove_stale_tmp(directory: str | Path, names: tuple[str, ...] | None = None) -> list[Path]:
    """Remove the temporary files killed atomic writes left in ``directory`` (``*.tmp-<pid>``; with ``names``,
    only those of these targets). Only for a directory's one writer, before it writes: another process's write
    in progress would lose its file."""
    d = Path(directory)
    if not d.is_dir():
        return []
    gone = []
    for p in d.iterdir():
        if TMP_RE.search(p.name) and (names is None or TMP_RE.sub("", p.name) in names) and p.is_file():
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to ``<path>.tmp-<pid>``, fsync, rename over ``path``."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    with _tmp_for(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Deterministic JSON (sorted keys, fixed indent) written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def atomic_save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """A matplotlib figure as an image (format from the suffix), written atomically; the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_parquet(path: str | Path, df, metadata: dict[bytes, bytes] | None = None) -> None:
    """A pandas DataFrame as parquet (zstd), written atomically and byte-reproducibly: no pandas index metadata,
    only ``metadata`` (a label table's record of where it came from) as the schema's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(metadata)
    with _tmp_for(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # as atomic_write_bytes: the bytes are on disk before the name is
        finally:
            os.close(fd)
        os.replace(tmp, path)


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place, replacing a stale one left by an earlier crash."""
    with writing(dst):
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(src, dst)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
