"""Atomic file writes and hashing: nothing half-written is ever visible under its final name."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    table = pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(metadata)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place, replacing a stale one left by an earlier crash."""
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
