"""``OUT/manifest.json`` as typed code: the dataclasses, their writer and their reader.

The manifest is written last by ``spinestream shard`` (its presence means the job is
complete) and is what every reader starts from: which shards exist (with sha256 and
sample count), the image spec they were written with, the counts, what was left out
(bad files, failed studies) and what was changed on the way (``warnings``).

    m = read_manifest("shards-512")           # Manifest; raises ManifestError on a bad file
    m.image.size, m.counts.slices, [s.path for s in m.select(cohorts=["boxed"])]
    write_manifest("shards-512", m)           # atomic, deterministic JSON

Unknown versions are refused (:data:`spinestream.shards.layout.VERSION` is the one this code reads
and writes); a field missing from the file, unknown to this code or of the wrong type names its
key path.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from spinestream import InputError, MissingInput, SpinestreamError

from .config import ConfigError, parse, to_dict
from .fsutil import atomic_write_json
from .layout import COHORTS, FORMAT, VERSION, Layout
from .shard_config import ShardConfig


class ManifestError(SpinestreamError, ValueError):
    """The manifest is missing a field, has a wrong type, or is of another format or version."""


@dataclass(kw_only=True)
class ImageSpec:
    """How the shard images were made (the loader and study inference must match it)."""

    size: int
    """Side of the square images in pixels."""
    channels: str
    """'neighbours' (slices offset_mm above/below + the slice) or 'windows' (3 windows of one slice)."""
    windows: list[list[float]]
    """[level, width] in HU per window."""
    offset_mm: float
    """Neighbour distance in mm ('neighbours')."""
    jpeg_quality: int
    subsampling: str = "4:4:4"
    channel_order: list[str] | str = "windows"
    """['above', 'slice', 'below'] for 'neighbours', else 'windows'."""


@dataclass(kw_only=True)
class CohortCount:
    studies: int
    slices: int


@dataclass(kw_only=True)
class Counts:
    studies: int
    slices: int
    shards: int
    failed_studies: int
    bad_files: int
    warnings: int
    by_cohort: dict[str, CohortCount]


@dataclass(kw_only=True)
class ShardEntry:
    """One tar + its DALI index, paths relative to the shard directory."""

    name: str
    path: str
    index: str
    cohort: str
    fold: int
    samples: int
    bytes: int
    sha256: str
    index_sha256: str
    oversample_of: str | None = None
    """Never in a written manifest: the name of the manifest shard this entry re-reads, on the
    in-memory copies positive oversampling adds to a selection (a subset ``.idx`` of that
    shard; engine.loader.selection.oversample_positives). None for the manifest's own entries."""


@dataclass(kw_only=True)
class StudySelection:
    """Which studies of the dataset the job converted (part of the job's identity)."""

    limit: int | None
    """``--limit`` (None: every study of train.csv less the excluded ones)."""
    studies: int
    sha256: str
    """sha256 of the selected StudyInstanceUIDs, newline-joined in UID order."""


@dataclass(kw_only=True)
class Source:
    train_csv_rows: int
    """Studies in the study table after exclusions and ``--limit``."""
    selection: StudySelection


@dataclass(kw_only=True)
class BadFile:
    """A DICOM file left out of its study; the study goes on without it."""

    study: str
    file: str
    reason: str


@dataclass(kw_only=True)
class FailedStudy:
    """A study left out of the dataset (bad input: unreadable series, bad boxes, ...)."""

    study: str
    reason: str


@dataclass(kw_only=True)
class DataWarningEntry:
    """Input that was used but changed (preprocess.errors.DataWarning): who, and what was done."""

    study: str
    """StudyInstanceUID, or "" for a job-level warning (e.g. boxes of unknown studies)."""
    message: str


@dataclass(kw_only=True)
class Tables:
    studies: str = "studies.parquet"
    slices: str = "slices.parquet"
    truth: str = "labels/truth.parquet"


@dataclass(kw_only=True)
class Manifest:
    """Everything ``spinestream shard`` wrote, and with what."""

    created_by: str
    source: Source
    config: ShardConfig
    """The config the job ran with (a changed config is refused on rerun); JSON lists read back as it was."""
    image: ImageSpec
    counts: Counts
    shards: list[ShardEntry]
    failed_studies: list[FailedStudy] = field(default_factory=list)
    bad_files: list[BadFile] = field(default_factory=list)
    warnings: list[DataWarningEntry] = field(default_factory=list)
    tables: Tables = field(default_factory=Tables)
    volumes: str = "volumes.zarr"
    format: str = FORMAT
    version: int = VERSION

    def select(self, cohorts: Sequence[str] | None = None, folds: Sequence[int] | None = None) -> list[ShardEntry]:
        """Shard entries of the given cohorts/folds (None = all); never empty."""
        if cohorts is not None:
            unknown = [c for c in cohorts if c not in COHORTS]
            if unknown:
                raise InputError(f"unknown cohort(s) {unknown}; known: {list(COHORTS)}")
        out = [s for s in self.shards
               if (cohorts is None or s.cohort in cohorts) and (folds is None or s.fold in folds)]
        if not out:
            raise InputError(f"no shards for cohorts={cohorts} folds={folds} in this manifest")
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (what :func:`write_manifest` writes); shard entries leave out
        ``oversample_of`` (an in-memory marker, see :class:`ShardEntry`)."""
        d = to_dict(self)
        for s in d["shards"]:
            if s.get("oversample_of") is None:
                s.pop("oversample_of", None)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest.json") -> Manifest:
        """Parse and check a dict read from JSON with the strict config loader
        (:func:`spinestream.shards.config.parse`: unknown keys, missing keys and wrong types are
        errors naming the key path)."""
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ManifestError(f"{where}: not a spinestream manifest (format={d.get('format')!r})")
        version = d.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
            raise ManifestError(
                f"{where}: written by a newer spinestream (manifest version {version}; this one reads version "
                f"{VERSION}): upgrade spinestream to read it, or re-run `spinestream shard` into a new --out")
        if version != VERSION:
            raise ManifestError(
                f"{where}: manifest version {d.get('version')!r} is not supported by this spinestream "
                f"(it reads version {VERSION}); re-run `spinestream shard` into a new --out with this version")
        try:
            m = parse(cls, d, where)
        except ConfigError as e:
            raise ManifestError(str(e)) from None
        _check_paths(m, where)
        return m


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _inside(rel: str) -> bool:
    """``rel`` is a relative path that stays inside the directory it is joined to (no '..', not absolute)."""
    p = PurePosixPath(rel)
    return bool(rel) and "\\" not in rel and "\0" not in rel and not p.is_absolute() and ".." not in p.parts


def _check_paths(m: Manifest, where: str) -> None:
    """Every file the manifest names lies inside the shard directory, and every shard name is a plain name
    (the loaders write ``<name>.pos.idx`` files under a run directory): a manifest that points elsewhere was
    not written by spinestream."""
    named = [(f"shards[{k}].path", s.path) for k, s in enumerate(m.shards)]
    named += [(f"shards[{k}].index", s.index) for k, s in enumerate(m.shards)]
    named += [(f"tables.{f}", getattr(m.tables, f)) for f in ("studies", "slices", "truth")]
    named.append(("volumes", m.volumes))
    for key, rel in named:
        if not _inside(rel):
            raise ManifestError(f"{where}: {key} = {rel!r} points outside the shard directory (only relative paths "
                                "without '..' are allowed); this manifest was not written by spinestream")
    for k, s in enumerate(m.shards):
        if not _NAME_RE.match(s.name):
            raise ManifestError(f"{where}: shards[{k}].name = {s.name!r} is not a plain name (letters, digits, '.', "
                                "'-', '_'); this manifest was not written by spinestream")


def write_manifest(root: str | Path, manifest: Manifest) -> Path:
    """Write ``OUT/manifest.json`` atomically (sorted keys: the same manifest gives the same bytes)."""
    views = [s.name for s in manifest.shards if s.oversample_of is not None]
    if views:
        raise ValueError(f"{views[:3]}: oversampled copies are views of a selection, not shards of a manifest")
    path = Layout(Path(root)).manifest
    atomic_write_json(path, manifest.to_dict())
    return path


def read_manifest(root: str | Path) -> Manifest:
    """Read and check ``OUT/manifest.json``.

    Raises:
        FileNotFoundError: ``root`` is not a finished shard directory.
        ManifestError: not JSON, another format or version, or a field missing or mistyped.
    """
    path = Layout(Path(root)).manifest
    if not path.is_file():
        raise MissingInput(
            f"{path} does not exist: {root} is not a finished shard directory "
            f"(run `spinestream shard --data DATA --out {root}`; a rerun resumes an interrupted job)"
        )
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from e
    return Manifest.from_dict(d, str(path))


__all__ = ["BadFile", "CohortCount", "Counts", "DataWarningEntry", "FailedStudy", "ImageSpec", "Manifest",
           "ManifestError", "ShardEntry", "Source", "StudySelection", "Tables", "read_manifest", "write_manifest"]
