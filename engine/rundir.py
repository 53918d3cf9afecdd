"""A run directory as typed code: where each file is, and each record's writer beside its reader.

```
RUN/run.json               marks a run directory (format, version)             RunRecord
RUN/config.yaml            the resolved config (rewritten on resume with changed hyper-parameters)
RUN/batch_size.json        what batch_size: auto found (reused on resume)      BatchSizeRecord
RUN/metrics.jsonl          one JSON object per log line / validation
RUN/curves.png             loss and validation curves
RUN/shard_spec.json        the images the run trained on (spinestream.shards.spec.ShardSpec)
RUN/ckpt-<step>.pt         the last keep_last checkpoints (spinestream.engine.checkpoint)
RUN/best.pt                best by the validation metric (lower is better)
RUN/eval-f<k>[-last]/      spinestream evaluate: summary.json (EvalSummary), report.csv,
                           slice_probs.parquet, submission.csv, heatmaps.png
TABLE.parquet              spinestream pseudo-label (default <shards>/labels/pseudo-<run>.parquet), beside it
TABLE.summary.json         (PseudoSummary) and TABLE.heatmap.png
```

Modelled on :mod:`spinestream.shards.layout` and :mod:`spinestream.shards.manifest`: this module is the one
place that names these files; the trainer, autobatch, checkpoint, evaluate and pseudo-label write through it and
the report, plan, bundle, predict and the benchmarks read through it. Records are frozen dataclasses written
atomically as the JSON they always were (existing run directories read unchanged); a reader refuses a file
that lacks a field or has a wrong type with a :class:`RecordError` naming the file, the key and the fix.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from spinestream import SpinestreamError
from spinestream.shards.config import ConfigError, load_config, parse, to_dict
from spinestream.shards.fsutil import atomic_write_bytes, atomic_write_json, writing
from spinestream.shards.spec import SPEC_FILE

if TYPE_CHECKING:
    from .config import RunConfig  # (not at run time: the app layer reads run directories without torch)

RUN_FORMAT = "spinestream-run"
RUN_VERSION = 1
BEST = "best.pt"
CKPT_RE = re.compile(r"^ckpt-(\d{9})\.pt$")


class RunError(SpinestreamError, ValueError):
    """A run directory or checkpoint that cannot be used (message says why and what to do)."""


class RecordError(RunError):
    """A record of a run directory that is not JSON, lacks a field or has a wrong type."""


# --------------------------------------------------------------------------- where the files are


@dataclass(frozen=True)
class EvalLayout:
    """``RUN/eval-f<k>/`` (or ``evaluate --out DIR``): what ``spinestream evaluate`` writes."""

    root: Path

    summary = property(lambda self: self.root / "summary.json")
    report = property(lambda self: self.root / "report.csv")
    slice_probs = property(lambda self: self.root / "slice_probs.parquet")
    submission = property(lambda self: self.root / "submission.csv")
    heatmaps = property(lambda self: self.root / "heatmaps.png")


@dataclass(frozen=True)
class RunLayout:
    """``runs/<name>/``: what ``spinestream train`` writes, and where its evaluations go."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    marker = property(lambda self: self.root / "run.json")
    config = property(lambda self: self.root / "config.yaml")
    batch_size = property(lambda self: self.root / "batch_size.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    curves = property(lambda self: self.root / "curves.png")
    shard_spec = property(lambda self: self.root / SPEC_FILE)
    best = property(lambda self: self.root / BEST)
    weights = property(lambda self: self.root / "weights.safetensors")
    """A bundle's run (``spinestream kaggle-bundle``): the EMA weights alone, beside config.yaml and the shard spec
    (:mod:`spinestream.engine.weights`)."""

    def checkpoint(self, step: int) -> Path:
        return self.root / f"ckpt-{step:09d}.pt"

    def checkpoints(self) -> list[Path]:
        """Step checkpoints, oldest first (none when the directory does not exist)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if CKPT_RE.match(p.name))

    def evaluation(self, fold: int, *, last: bool = False) -> EvalLayout:
        """``eval-f<k>``: an evaluate stage's (best.pt by default); ``eval-f<k>-last``: the compare stage's."""
        return EvalLayout(self.root / f"eval-f{fold}{'-last' if last else ''}")

    def evaluations(self) -> list[EvalLayout]:
        return [EvalLayout(p) for p in sorted(self.root.glob("eval-f*")) if p.is_dir()]


@dataclass(frozen=True)
class PseudoLayout:
    """A pseudo-label table and the files ``spinestream pseudo-label`` writes beside it."""

    table: Path

    summary = property(lambda self: self.table.with_suffix(".summary.json"))
    heatmap = property(lambda self: self.table.with_suffix(".heatmap.png"))

    @classmethod
    def default(cls, shards: Path, run_dir: Path) -> PseudoLayout:
        """``<shards>/labels/pseudo-<run name>.parquet``: where pseudo-label writes without ``--out``."""
        return cls(Path(shards) / "labels" / f"pseudo-{Path(run_dir).resolve().name}.parquet")


# --------------------------------------------------------------------------- reading a record


def _read(cls, path: Path, fix: str):
    """``cls`` parsed from the JSON file ``path``; RecordError naming the file, the key and ``fix``."""
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise RecordError(f"{path}: not readable JSON ({e}); {fix}") from None
    try:
        return parse(cls, d, str(path))
    except ConfigError as e:
        raise RecordError(f"{e}; {fix}") from None


# --------------------------------------------------------------------------- run.json


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    format: str = RUN_FORMAT
    version: int = RUN_VERSION


def mark_run(run_dir: Path) -> RunLayout:
    """Create ``run_dir`` and its ``run.json`` (what every reader checks first)."""
    lay = RunLayout(run_dir)
    lay.root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(lay.marker, dataclasses.asdict(RunRecord()))
    return lay


def check_run_dir(run_dir: Path) -> RunLayout:
    """The layout of a run directory ``spinestream train`` made; RunError naming what to pass otherwise."""
    lay = RunLayout(run_dir)
    if not lay.marker.is_file():
        raise RunError(f"{run_dir} is not a spinestream run directory (no {lay.marker.name}); "
                       f"pass the directory `spinestream train` created, e.g. runs/round1")
    rec = _read(RunRecord, lay.marker, "pass a directory `spinestream train` created")
    if (rec.format, rec.version) != (RUN_FORMAT, RUN_VERSION):
        raise RunError(f"{lay.marker}: unsupported run format {dataclasses.asdict(rec)} (this spinestream reads "
                       f"{RUN_FORMAT} version {RUN_VERSION}); train a new run")
    return lay


# --------------------------------------------------------------------------- config.yaml


def write_config(run_dir: Path, cfg: RunConfig) -> Path:
    """``RUN/config.yaml``, atomically: what evaluate, pseudo-label, predict and a resume read back."""
    path = RunLayout(run_dir).config
    atomic_write_bytes(path, yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
    return path


def read_config(run_dir: Path, overrides: list[str] | None = None) -> RunConfig:
    from .config import RunConfig

    return load_config(RunConfig, RunLayout(run_dir).config, overrides or [])


# --------------------------------------------------------------------------- metrics.jsonl


def append_metrics(run_dir: Path, record: dict) -> None:
    path = RunLayout(run_dir).metrics
    with writing(path), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``metrics.jsonl``, in order; a line a kill cut short is skipped; none without the file."""
    path = RunLayout(run_dir).metrics
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in rows if isinstance(r, dict)]


def truncate_metrics(run_dir: Path, step: int) -> int:
    """Drop ``metrics.jsonl`` records logged after the checkpoint of ``step`` (a resume repeats those steps):
    every record past ``step``, the headline a resume from ``step`` logged (``hardware``: the run logs its own
    when it starts), and the lines a kill cut short; returns how many lines went. ``step`` -1: every record."""
    path = RunLayout(run_dir).metrics
    if not path.is_file():
        return 0
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = []
    for ln in lines:
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        at = int(rec.get("step", 0))
        if at < step or (at == step and "hardware" not in rec):
            keep.append(ln)
    if len(keep) != len(lines):
        atomic_write_bytes(path, "".join(k + "\n" for k in keep).encode())
    return len(lines) - len(keep)


# --------------------------------------------------------------------------- batch_size.json


@dataclass(frozen=True, kw_only=True)
class BatchSizeRecord:
    """What ``train.batch_size: auto`` found (:mod:`spinestream.engine.autobatch`), with the settings it
    probed under: on resume the batch size is reused only when they are unchanged."""

    batch_size: int
    tried: list[dict[str, Any]]
    """Per candidate: batch, ok, peak_gb (CUDA), why (a refusal)."""
    image_size: int
    device: str
    precision: str
    max_memory_gb: float
    memory_headroom_gb: float
    channels_last: bool
    peak_gb: float | None
    peak_note: str

    def probed_with(self, settings: dict[str, Any]) -> bool:
        return all(getattr(self, k) == v for k, v in settings.items())


def write_batch_size(run_dir: Path, rec: BatchSizeRecord) -> Path:
    path = RunLayout(run_dir).batch_size
    atomic_write_json(path, dataclasses.asdict(rec))
    return path


def read_batch_size(run_dir: Path) -> BatchSizeRecord | None:
    """The run's batch-size record; None when it has none (a fixed train.batch_size)."""
    path = RunLayout(run_dir).batch_size
    if not path.is_file():
        return None
    return _read(BatchSizeRecord, path, "delete it: the next resume probes the batch size again")


# --------------------------------------------------------------------------- eval-f<k>/summary.json


@dataclass(frozen=True, kw_only=True)
class EvalSummary:
    """What ``spinestream evaluate`` scored (the report's numbers)."""

    run: str
    checkpoint: str
    shards: str
    fold: int
    rule: str
    studies: int
    competition_loss: float
    constant_baseline: float
    """The trainer's baseline: each row type's prevalence outside the fold, predicted for every study."""
    accuracy: float
    validation_fold: bool
    """Whether ``fold`` is the run's validation fold (else the model may have trained on it)."""


def write_eval_summary(eval_dir: Path, s: EvalSummary) -> Path:
    path = EvalLayout(Path(eval_dir)).summary
    atomic_write_json(path, dataclasses.asdict(s))
    return path


def read_eval_summary(eval_dir: Path) -> EvalSummary | None:
    """The evaluation's summary; None when it wrote none (an evaluation from before summary.json)."""
    path = EvalLayout(Path(eval_dir)).summary
    if not path.is_file():
        return None
    return _read(EvalSummary, path, "delete it and rerun `spinestream evaluate` (the report then scores "
                                    "submission.csv itself)")


# --------------------------------------------------------------------------- TABLE.summary.json


@dataclass(frozen=True, kw_only=True)
class PositivesPerStudy:
    mean: float
    min: int
    max: int


@dataclass(frozen=True, kw_only=True)
class PseudoSummary:
    """What ``spinestream pseudo-label`` wrote: counts of positive slices (targets >= 0.5), how the
    thresholds were chosen, and with ``--truth`` the slice-level quality."""

    table: str
    run: str
    checkpoint: str
    shards: str
    mode: str
    thresholds: dict[str, float] | None
    studies: int
    slices: int
    positive_slices: dict[str, int]
    """Per target (C1..C7, any)."""
    positive_slices_per_study: PositivesPerStudy
    per_study: dict[str, dict[str, int]]
    """StudyInstanceUID -> positive slices per target, and ``slices``."""
    threshold_method: str | None = None
    """None in soft mode (and in summaries written before the threshold fields)."""
    threshold_source: str | None = None
    threshold_studies: list[str] | None = None
    threshold_folds: list[int] | None = None
    threshold_excludes_fold: int | None = None
    quality: dict[str, Any] | None = None
    """Precision/recall/F1 against a crack truth table (``--truth``): "overall", "any", C1..C7."""

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "pseudo-label summary") -> PseudoSummary:
        """The summary pseudo-label assembled, checked as the reader checks the file."""
        try:
            return parse(cls, d, where)
        except ConfigError as e:
            raise RecordError(str(e)) from None


def write_pseudo_summary(table: Path, s: PseudoSummary) -> Path:
    path = PseudoLayout(Path(table)).summary
    d = dataclasses.asdict(s)
    if d["quality"] is None:  # no --truth: no key, as the file has always been
        del d["quality"]
    atomic_write_json(path, d)
    return path


def read_pseudo_summary(table: Path) -> PseudoSummary | None:
    """The summary beside a pseudo-label table; None when there is none."""
    path = PseudoLayout(Path(table)).summary
    if not path.is_file():
        return None
    return _read(PseudoSummary, path, "rerun `spinestream pseudo-label` to write it again")
