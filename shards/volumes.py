"""Zarr volumes: one uint8 windowed array per study under ``volumes.zarr/<StudyInstanceUID>``.

Arrays are ``(Z, H, W)`` (``neighbours`` mode) or ``(Z, H, W, 3)`` (``windows`` mode), head to
feet, at the shards' image size, chunked by a few slices and Blosc-compressed. Attributes:
``study``, ``z`` (mm, per slice), ``slice_numbers`` (file numbers), ``spacing`` (dz, dy, dx of
the source), ``z_reversed``, ``channels``, ``offset_mm`` and, once the job has numbered the
slices, ``slice_id_offset`` (slice_id of index 0; slice i has slice_id offset + i).

A volume is written into a temporary directory and renamed into place, so a volume under
its final name is complete.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .fsutil import atomic_write_bytes, replace_dir


def write_volume(tmp_dir: Path, final_dir: Path, volume: np.ndarray, attrs: dict, *, chunk_depth: int = 8,
                 cname: str = "zstd", clevel: int = 1) -> None:
    """Write ``volume`` as a Zarr v3 array in ``tmp_dir``, then move it to ``final_dir``."""
    import zarr
    from zarr.codecs import BloscCodec

    if volume.dtype != np.uint8:
        raise ValueError(f"volumes are uint8, got {volume.dtype}")
    chunks = (min(chunk_depth, volume.shape[0]),) + volume.shape[1:]
    arr = zarr.create_array(
        store=str(tmp_dir),
        shape=volume.shape,
        chunks=chunks,
        dtype="uint8",
        compressors=BloscCodec(cname=cname, clevel=clevel, shuffle="noshuffle"),
        attributes=attrs,
        overwrite=True,
    )
    arr[...] = volume
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    replace_dir(tmp_dir, final_dir)


def set_attrs(array_dir: Path, updates: dict) -> None:
    """Update a volume's attributes with an atomic rewrite of its ``zarr.json``.

    (zarr rewrites the file in place; a crash then would leave an unreadable array.)
    """
    meta_path = Path(array_dir) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    attrs = meta.setdefault("attributes", {})
    if all(attrs.get(k) == v for k, v in updates.items()):
        return
    attrs.update(updates)
    atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())


def ensure_group(root: Path) -> None:
    """Make ``volumes.zarr`` a Zarr v3 group (children are discovered by listing)."""
    meta = root / "zarr.json"
    if not meta.exists():
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(meta, json.dumps({"attributes": {}, "zarr_format": 3, "node_type": "group"}, indent=2).encode())


def open_volume(root: str | Path, study: str):
    """Open one study's volume read-only (a ``zarr.Array``; slice it like numpy)."""
    import zarr

    path = Path(root) / study
    if not (path / "zarr.json").exists():
        raise FileNotFoundError(f"{path}: no volume for study {study} (was it sharded?)")
    return zarr.open_array(str(path), mode="r")


def volume_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "zarr.json").exists()) if root.exists() else []


__all__ = ["write_volume", "set_attrs", "ensure_group", "open_volume", "volume_dirs"]
