"""One study's ingest: a DICOM series -> the windowed uint8 volume and its 2.5D neighbours.

    study = ingest_study("train_images/<uid>", ShardConfig(image_size=512))
    study.volume    # (Z, S, S) uint8 ('neighbours') | (Z, S, S, 3) ('windows'), head to feet
    study.nbr       # (Z, 3) [above, self, below] volume indices ('neighbours'), else None

The one place a study becomes pixels. The shard job (``spinestream.preprocess.convert``), ``spinestream
predict`` and both benchmarks (``benchmarks/shard.py``'s floor, ``benchmarks/predict.py``'s decode)
call :func:`ingest_study`, so what predict feeds a model equals what the shards hold by
construction: the same ``read_series`` settings (ragged slices resized, not dropped), the same
windows and output size (``spinestream.preprocess.window.make_slice_fn``), the same stand-in z positions for
a series without any, and the same neighbour index (``spinestream.shards.sample.neighbour_index``).

Warnings follow the error policy (preprocess/errors.py): the DataWarnings raised while reading are
returned as messages (``IngestedStudy.warnings``), any other warning is passed on as it was. Bad
input raises :class:`~spinestream.preprocess.dicom.DicomError` (no readable slice) or ``OSError``, after
passing on every warning caught so far, so a caller's own recorder still sees them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spinestream.shards.sample import neighbour_index
from spinestream.shards.shard_config import ShardConfig

from .dicom import SeriesMeta, read_series
from .errors import DataWarning
from .window import make_slice_fn

RAGGED = "resize"
"""What ingest does with slices whose (rows, cols) differ from the series': resize them to it
(``read_series(ragged=...)``); part of what the shards are, so it is fixed here, not an option."""


@dataclass
class IngestedStudy:
    """A study after ingest, as the shard job stores it and predict feeds it to a model."""

    volume: np.ndarray
    """(Z, S, S) uint8 for 'neighbours', (Z, S, S, n_windows) for 'windows'; head to feet."""
    meta: SeriesMeta
    """``read_series``' metadata, with ``meta.z`` the stand-in positions when the series has none."""
    nbr: np.ndarray | None
    """(Z, 3) int64 [above, self, below] for 'neighbours' (``spinestream.shards.sample.neighbour_index``), else None."""
    warnings: list[str] = field(default_factory=list)
    """The DataWarning messages raised while reading, in order."""

    @property
    def n_slices(self) -> int:
        return int(self.volume.shape[0])

    @property
    def bad_files(self) -> list[tuple[str, str]]:
        return self.meta.bad_files


def ingest_study(image_dir: str | Path, cfg: ShardConfig) -> IngestedStudy:
    """Read one study directory (``<n>.dcm`` files) as the shard job does; see the module doc.

    Raises:
        DicomError: no ``.dcm`` file, or none readable (bad input: the caller's policy decides).
        OSError: the directory cannot be listed.
    """
    volume, meta, notes = _read(image_dir, cfg)
    meta.z = standin_z(meta.z, volume.shape[0], meta.spacing[0])
    nbr = neighbour_index(meta.z, cfg.offset_mm) if cfg.channels == "neighbours" else None
    return IngestedStudy(volume, meta, nbr, notes)


def standin_z(z: np.ndarray, n: int, dz: float) -> np.ndarray:
    """``z`` itself when every position is finite; else (no ImagePositionPatient anywhere:
    ``read_series`` ordered the slices by InstanceNumber / file number) evenly spaced descending
    positions ``dz`` apart, so neighbours in mm still work."""
    if np.all(np.isfinite(z)):
        return z
    return -np.arange(n, dtype=np.float64) * float(dz)


def _read(image_dir: str | Path, cfg: ShardConfig) -> tuple[np.ndarray, SeriesMeta, list[str]]:
    """``read_series`` with the shard job's settings -> (volume, meta, DataWarning messages)."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DataWarning)
            volume, meta = read_series(image_dir, slice_fn=make_slice_fn(cfg.windows, cfg.image_size),
                                       ragged=RAGGED)
    except BaseException:
        _pass_on(caught, keep=False)
        raise
    return volume, meta, _pass_on(caught, keep=True)


def _pass_on(caught: list[warnings.WarningMessage], *, keep: bool) -> list[str]:
    """Re-issue the caught warnings as they were, except the DataWarnings when ``keep``: those are
    returned as messages."""
    kept = []
    for w in caught:
        if keep and issubclass(w.category, DataWarning):
            kept.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return kept
