"""``RUN_DIR/shard_spec.json``: what a trained run needs of its shard set once the shards are gone.

A run's model only makes sense on images made the way its shards were (windows, image size,
2.5D neighbours), and a study that cannot be read is predicted with the training prevalence.
The trainer copies both into the run directory, so ``spinestream predict`` (on Kaggle, with no
shards) rebuilds the same inputs from raw DICOM::

    spec = ShardSpec.from_shards("shards-512", exclude_fold=0)   # config, image spec + training prevalence
    spec.save(run_dir)                               # RUN_DIR/shard_spec.json, atomically
    spec = ShardSpec.load(run_dir / SPEC_FILE)      # format and version checked

Writer beside reader, as for the rest of the contract (manifest.py, tables.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spinestream import InputError, MissingInput

from .config import ConfigError, parse, to_dict
from .fsutil import atomic_write_json
from .layout import ROW_TYPES, Layout
from .manifest import ImageSpec, read_manifest
from .shard_config import ShardConfig
from .tables import read_study_table

SPEC_FILE = "shard_spec.json"
SPEC_FORMAT = "spinestream-shard-spec"
SPEC_VERSION = 1
SPEC_KEYS = ("size", "channels", "windows", "offset_mm")
"""The image-spec fields that decide a model's input images (an ensemble's runs must agree on them)."""

__all__ = ["SPEC_FILE", "SPEC_KEYS", "ShardSpec", "run_shard_spec"]


@dataclass(frozen=True)
class ShardSpec:
    """The shard job's resolved config (manifest ``config``), its image spec, and per row type
    (C1..C7, patient_overall) the share of positive studies in the shard set, outside
    ``prevalence_excludes_fold`` when set (a run's validation fold: the prevalence is the training
    studies'; None: every study, as specs written before the field were). ``source``: where it was
    read from (named in messages)."""

    config: ShardConfig
    image: ImageSpec
    prevalence: dict[str, float]
    source: str = ""
    prevalence_excludes_fold: int | None = None

    @classmethod
    def from_shards(cls, root: str | Path, exclude_fold: int | None = None) -> ShardSpec:
        """The spec of a finished shard directory (its manifest and study table); the prevalence over the
        studies outside fold ``exclude_fold`` when given (the trainer passes its ``data.val_fold``, so
        ``predict``'s fallback is the training prevalence, as the trainer's constant baseline is)."""
        lay = Layout(Path(root))
        m = read_manifest(root)
        studies = read_study_table(lay.studies, columns=[*ROW_TYPES, "fold"])
        if studies.empty:
            raise InputError(f"{lay.studies}: no studies, so no training prevalence")
        if exclude_fold is not None:
            studies = studies[studies.fold != exclude_fold]
            if studies.empty:
                raise InputError(f"{lay.studies}: every study is in fold {exclude_fold}, so no training prevalence")
        prev = {t: float(studies[t].mean()) for t in ROW_TYPES}
        return cls(config=m.config, image=m.image, prevalence=prev, source=str(lay.root),
                   prevalence_excludes_fold=None if exclude_fold is None else int(exclude_fold))

    def save(self, run_dir: str | Path) -> Path:
        """Write ``RUN_DIR/shard_spec.json`` atomically."""
        path = Path(run_dir) / SPEC_FILE
        atomic_write_json(path, {"format": SPEC_FORMAT, "version": SPEC_VERSION, "config": to_dict(self.config),
                                 "image": to_dict(self.image), "prevalence": self.prevalence,
                                 "prevalence_excludes_fold": self.prevalence_excludes_fold})
        return path

    @classmethod
    def load(cls, path: str | Path) -> ShardSpec:
        """Read a ``shard_spec.json``; a file of another format or version, or one that lacks a field, is an
        error naming the file, as is a config or image spec the strict loader refuses (ConfigError, a
        ValueError). ``prevalence_excludes_fold`` is optional (files written before it: None)."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not JSON ({e}); delete it and rerun, or copy it again") from None
        if not isinstance(d, dict) or d.get("format") != SPEC_FORMAT or d.get("version") != SPEC_VERSION:
            got = (d.get("format"), d.get("version")) if isinstance(d, dict) else type(d).__name__
            raise InputError(f"{path}: not a {SPEC_FORMAT} version {SPEC_VERSION} file (got {got})")
        missing = [k for k in ("config", "image", "prevalence") if k not in d]
        missing += [t for t in ROW_TYPES if t not in d.get("prevalence", {})]
        if missing:
            raise InputError(f"{path}: lacks {missing}")
        try:
            config = parse(ShardConfig, d["config"], f"{path}: config")
            image = parse(ImageSpec, d["image"], f"{path}: image")
        except ConfigError as e:
            raise InputError(str(e)) from None
        excl = d.get("prevalence_excludes_fold")
        if excl is not None and (isinstance(excl, bool) or not isinstance(excl, int)):
            raise InputError(f"{path}: prevalence_excludes_fold must be a fold number or null, got {excl!r}")
        return cls(config=config, image=image,
                   prevalence={t: float(d["prevalence"][t]) for t in ROW_TYPES}, source=str(path),
                   prevalence_excludes_fold=excl)

    def key(self) -> dict[str, Any]:
        """The part that decides the model's input images (an ensemble must agree on it)."""
        return {k: getattr(self.image, k) for k in SPEC_KEYS}

    def check_same_images(self, other: ShardSpec, what: str) -> None:
        """ValueError naming both specs when ``other`` makes different input images than ``self`` (a run
        resumed, pseudo-labelled or evaluated on another shard set). ``what`` says what was attempted."""
        if self.key() != other.key():
            raise InputError(f"{what}: the shard sets make different images: {self.source or 'this run'} has "
                             f"{_fmt(self.key())}, {other.source or 'the other'} has {_fmt(other.key())}; "
                             f"use shards made with the run's settings (or train a new run on these)")


def _fmt(key: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in key.items())


def run_shard_spec(run_dir: str | Path, data_root: str | Path) -> ShardSpec:
    """``RUN_DIR/shard_spec.json`` if the run has one, else the spec of its ``data.root``."""
    own = Path(run_dir) / SPEC_FILE
    if own.is_file():
        return ShardSpec.load(own)
    if not Layout(Path(data_root)).manifest.is_file():
        raise MissingInput(f"{run_dir}: no {SPEC_FILE} and its data.root {data_root} has no manifest.json; "
                           f"predict needs the image spec the run trained on (write it with "
                           f"ShardSpec.from_shards(SHARDS).save(RUN_DIR) where the shards are)")
    return ShardSpec.from_shards(data_root)
