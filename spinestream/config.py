"""The pipeline's configuration (``-c pipeline``: configs/pipeline.yaml): which stages run, in order, and per
stage its verb's config, ``--set`` overrides and arguments.

Loaded with ``spinestream.shards.config.load_config`` (unknown keys and wrong types are errors naming the key's
path; ``spinestream run --set a.b=value`` overrides). Paths in a pipeline YAML are relative to it
(:data:`~spinestream.shards.config.FilePath`) and may hold ``{out}``, replaced by the pipeline's output
directory (``--out``), e.g. ``data: "{out}/raw"`` for the demo's synthetic data; a stage's config is a
shipped config's name or a file (:data:`~spinestream.shards.config.ConfigRef`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from spinestream.engine.evaluate import EvaluateConfig
from spinestream.engine.pseudo import PseudoLabelConfig
from spinestream.predict import PredictConfig
from spinestream.preprocess.synth import SynthConfig
from spinestream.shards.config import ConfigRef, FilePath

#: every stage, in the only order they can run (a pipeline lists a subsequence of it)
STAGES = ("synth", "shard", "verify", "bench", "round1", "evaluate1", "pseudo", "round2", "evaluate2",
          "predict", "compare", "report")


@dataclass(kw_only=True)
class ShardStage:
    """``spinestream shard --data DATA --out DIR/shards``."""

    data: FilePath = "{out}/raw"
    """The dataset in the Kaggle layout (train.csv, train_images/, ...); the demo's synth writes {out}/raw."""
    config: ConfigRef | None = None
    """A shard config: a shipped config's name (shard) or a YAML file; unset: the shard job's built-in defaults."""
    fields: dict = field(default_factory=dict)
    """Shard config fields written here instead of (or on top of) the file, e.g. {image_size: 128}."""
    set: list[str] = field(default_factory=list)
    """--set KEY=VALUE overrides, applied last."""
    limit: int | None = None
    """Only the first N studies (by UID), for a trial run."""


@dataclass(kw_only=True)
class VerifyStage:
    """``spinestream verify DIR/shards``."""

    quick: bool = False
    """Index files and tables only (no hashing, no tar parsing)."""
    decode: bool = False
    """Also decode every JPEG."""


@dataclass(kw_only=True)
class BenchStage:
    """``spinestream bench loader --shards DIR/shards --results DIR/bench``: the loader's images/s."""

    batches: int = 10
    """Timed batches per line."""
    warmup: int = 2
    lines: str | None = None
    """Comma-separated lines (dicom,torch,dali-cpu,dali-gpu,decode-only); unset: the suite's default."""
    image_size: int | None = None
    """Output image size; unset: the suite's default."""
    dicom: bool = True
    """Add the DICOM baseline line, read from the shard stage's dataset."""


@dataclass(kw_only=True)
class TrainStage:
    """``spinestream train -c CONFIG``, with data.root, out_dir and name set by the pipeline."""

    config: ConfigRef = "round1"
    """The run config: a shipped config's name (round1, round2, demo-round1, ...) or a YAML file."""
    set: list[str] = field(default_factory=list)
    """--set KEY=VALUE overrides of the run config."""
    init_from: Literal["round1"] | None = None
    """Start from this pipeline run's best.pt (--set model.init_from=DIR/runs/round1/best.pt); round 2 only."""


# The evaluate, pseudo and predict stages are their verb's config (each option declared once, beside the verb),
# less the paths the pipeline owns: those are redeclared init=False, so setting one here is an unknown key.


@dataclass(kw_only=True)
class EvaluateStage(EvaluateConfig):
    """``spinestream evaluate -c DIR/stages/<stage>.yaml``: EvaluateConfig's options; the pipeline sets run
    (DIR/runs/<round>), shards (DIR/shards) and out (RUN/eval-f<k>). ``checkpoint`` is the one evaluated into
    RUN/eval-f<k>/: best.pt is the run's lowest loss among its validations on this same fold, so its loss here is
    optimistic; the compare stage also evaluates the last checkpoint (RUN/eval-f<k>-last/, with this stage's
    other options) for the report's verdict."""

    run: str | None = field(default=None, init=False)
    shards: str | None = field(default=None, init=False)
    out: str | None = field(default=None, init=False)

    def fold_of(self, run_cfg) -> int:
        """The fold this stage evaluates the run of ``run_cfg`` (a RunConfig) on."""
        return run_cfg.data.val_fold if self.fold is None else self.fold


@dataclass(kw_only=True)
class PseudoStage(PseudoLabelConfig):
    """``spinestream pseudo-label -c DIR/stages/pseudo.yaml``: PseudoLabelConfig's options; the pipeline sets run
    (DIR/runs/round1), shards (DIR/shards), out (DIR/shards/labels/pseudo-round1.parquet) and truth."""

    run: str | None = field(default=None, init=False)
    shards: str | None = field(default=None, init=False)
    out: str | None = field(default=None, init=False)
    truth: str | None = field(default=None, init=False)
    synth_truth: bool = False
    """Synthetic data only: measure the pseudo-labels against where the cracks really are (precision, recall,
    F1 in the summary; the truth table is DIR/crack-truth.parquet, from the shard stage's dataset)."""


@dataclass(kw_only=True)
class PredictStage(PredictConfig):
    """``spinestream predict -c DIR/stages/predict.yaml``: PredictConfig's options; the pipeline sets run (from
    ``runs``) and out (DIR/submission.csv)."""

    run: list[str] = field(default_factory=list, init=False)
    out: str | None = field(default=None, init=False)
    runs: list[Literal["round1", "round2"]] = field(default_factory=lambda: ["round2"])
    """This pipeline's runs to predict with (several: an ensemble)."""
    images: FilePath | None = "{out}/raw/test_images"
    """Test studies, IMAGES/<StudyInstanceUID>/<n>.dcm ({out}: the pipeline's directory)."""
    sample_submission: FilePath | None = "{out}/raw/sample_submission.csv"
    """Kaggle's sample submission (its rows, in its order); unset: 8 rows per study found."""


@dataclass(kw_only=True)
class PipelineConfig:
    """Everything ``spinestream run`` needs."""

    out: FilePath = "pipeline"
    """Output directory (spinestream run --out wins): raw/, shards/, runs/, stages/, submission.csv, report.md."""
    stages: list[str] = field(default_factory=lambda: [s for s in STAGES if s not in ("synth", "bench")])
    """The stages to run, a subsequence of: synth shard verify bench round1 evaluate1 pseudo round2 evaluate2
    predict compare report. compare evaluates both rounds' last checkpoints (RUN/eval-f<k>-last/): the
    report's round 2 vs round 1 verdict compares those, not best.pt (picked on the reported fold)."""
    workers: int = 0
    """Processes / threads for synth, shard and bench (0 = every CPU); not part of any stage's inputs."""
    synth: SynthConfig = field(default_factory=SynthConfig)
    """The synthetic dataset (spinestream synth's fields; slices and crack_width as [lo, hi])."""
    shard: ShardStage = field(default_factory=ShardStage)
    verify: VerifyStage = field(default_factory=VerifyStage)
    bench: BenchStage = field(default_factory=BenchStage)
    round1: TrainStage = field(default_factory=TrainStage)
    evaluate1: EvaluateStage = field(default_factory=EvaluateStage)
    pseudo: PseudoStage = field(default_factory=PseudoStage)
    round2: TrainStage = field(default_factory=lambda: TrainStage(config="round2", init_from="round1"))
    evaluate2: EvaluateStage = field(default_factory=EvaluateStage)
    predict: PredictStage = field(default_factory=PredictStage)

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"stages: unknown stage(s) {unknown}; known, in order: {' '.join(STAGES)}")
        order = [STAGES.index(s) for s in self.stages]
        if order != sorted(set(order)):
            raise ValueError(f"stages: {self.stages} must be listed once each, in the order "
                             f"{' '.join(STAGES)}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = every CPU), got {self.workers}")
        if "round2" in self.stages and self.round2.init_from == "round1" and "round1" not in self.stages:
            raise ValueError("round2.init_from: round1 needs the round1 stage in stages (or set it to null)")
