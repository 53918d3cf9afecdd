"""The shard job's configuration (``configs/shard.yaml``): part of the storage contract.

The manifest and a run's ``shard_spec.json`` store the resolved config (``Manifest.config``,
``ShardSpec.config``) and read it back through the one strict loader
(:func:`spinestream.shards.config.parse`), so every reader gets this dataclass, never a dict.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .layout import DROPPED_STUDIES
from .sample import CHANNEL_MODES


@dataclass(kw_only=True)
class ShardConfig:
    """How DICOM studies become shards and volumes. Changing any of these means re-sharding."""

    image_size: int = 512
    """Output side in pixels (slices are resized to image_size × image_size)."""
    channels: Literal["neighbours", "windows"] = "neighbours"
    """'neighbours': the slices offset_mm above/below + the slice, one window; 'windows': 3 windows of one slice."""
    windows: list[tuple[float, float]] = field(default_factory=lambda: [(400.0, 1800.0)])
    """Windows as [level, width] HU. One for 'neighbours' (bone 400/1800), three for 'windows'."""
    offset_mm: float = 1.0
    """Neighbour distance in mm for 'neighbours' (stable across 0.5–1 mm slice thickness)."""
    jpeg_quality: int = 95
    """JPEG quality of the shard images (always 4:4:4)."""
    folds: int = 10
    """Number of folds; studies are dealt into folds deterministically within each cohort."""
    seed: int = 0
    """Seed for folds and the within-group shuffle."""
    shard_max_samples: int = 2048
    """A shard is cut after this many samples ..."""
    shard_max_bytes: int = 256 * 1024 * 1024
    """... or before it would exceed this many bytes."""
    zarr_chunk_depth: int = 8
    """Slices per Zarr chunk."""
    zarr_codec: Literal["zstd", "lz4", "lz4hc", "zlib", "blosclz"] = "lz4"
    """Blosc codec of the volumes: lz4 (fast, default) or zstd (~40% smaller, ~3x the CPU; see BENCHMARKS.md)."""
    zarr_clevel: int = 1
    zarr_shuffle: Literal["noshuffle", "shuffle", "bitshuffle"] = "bitshuffle"
    """Bit-shuffling helps lz4 on noisy uint8 CT; it does not help zstd."""
    label_max_gap: int = 1
    """Boxed slices up to this many missing slices apart form one run (label rule 3)."""
    exclude_studies: list[str] = field(default_factory=lambda: list(DROPPED_STUDIES))
    """Studies left out (default: the real data's two broken scans, shards.layout.DROPPED_STUDIES)."""

    def __post_init__(self) -> None:
        if not 16 <= self.image_size <= 2048:
            raise ValueError(f"image_size must be in [16, 2048], got {self.image_size}")
        if self.channels not in CHANNEL_MODES:
            raise ValueError(f"channels must be one of {CHANNEL_MODES}, got {self.channels!r}")
        need = 1 if self.channels == "neighbours" else 3
        if len(self.windows) != need:
            raise ValueError(f"channels={self.channels!r} needs {need} window(s), got {len(self.windows)}")
        for lvl, width in self.windows:
            if width <= 0:
                raise ValueError(f"window width must be positive, got [{lvl}, {width}]")
        # one form however it was made (YAML lists, JSON lists, tuples, ints): a config read back from
        # a manifest equals the one the job ran with, and a changed config is told from a reread one
        self.windows = [(float(lvl), float(width)) for lvl, width in self.windows]
        self.exclude_studies = list(self.exclude_studies)
        if self.offset_mm < 0:
            raise ValueError(f"offset_mm must be >= 0, got {self.offset_mm}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, got {self.folds}")
        if self.shard_max_samples < 1 or self.shard_max_bytes < 1024:
            raise ValueError("shard_max_samples must be >= 1 and shard_max_bytes >= 1024")
        if self.zarr_chunk_depth < 1 or not 0 <= self.zarr_clevel <= 9:
            raise ValueError("zarr_chunk_depth must be >= 1 and zarr_clevel in [0, 9]")
