"""``spinestream predict``: raw test DICOM studies -> Kaggle's ``submission.csv``.

    spinestream predict --run runs/round2 --images test_images --sample-submission sample_submission.csv \\
        --out submission.csv
    spinestream predict --run runs/f0 --run runs/f1 --run runs/f2 --images test_images --out submission.csv

Each study goes through the shard job's own ingest, the one function ``spinestream.preprocess.ingest.ingest_study``
(the series read with ragged slices resized, windowed at the size the shards were made with,
stand-in z positions when a series has none, the 2.5D neighbour index), so predict's model inputs
equal the shards' by construction; then ``spinestream.engine.infer.predict_volumes`` runs each model as validation does (its
loader image size and mean/std, fixed-size batches) and ``spinestream.engine.metrics.study_probabilities``
applies the run's slice-to-study rule. Several ``--run``s are an ensemble: their slice
probabilities are averaged before the rule (they must share one image spec).

The image spec of a run: ``RUN_DIR/shard_spec.json`` when present (``ShardSpec``: the shard job's
config and image spec and the training prevalence, so predict needs no shards, e.g. on Kaggle),
else the manifest and studies table of the run's ``data.root``.

Speed: DICOM decoding runs in ``--workers`` processes that stay ahead of the model; at most
``workers + prefetch`` decoded studies wait in memory (each ~Z x S x S bytes of uint8).

Bad input never stops the job: unreadable slices are left out (a warning names each file), a
study with no readable slice gets the training prevalence (a warning names it), and rows of the
sample submission whose study is not in ``--images`` get the prevalence (one warning counts and
names them). With ``--sample-submission`` the output has exactly its rows, in its order; a row_id
it cannot parse is an error. Without it: every study directory in ``--images``, sorted, 8 rows each.
``--images`` must hold study directories of ``.dcm`` files: a folder with none (e.g. the dataset root,
whose ``test_images/`` is the one to pass) is refused with exit status 2.

Under ``torchrun --nproc-per-node N $(which spinestream) predict ...`` (:mod:`spinestream.engine.dist`) each rank
decodes and predicts its contiguous part of the test studies on its own device (``LOCAL_RANK``; ``--workers``
unset: the CPUs shared among the machine's ranks), says so on stderr and warns of its own studies' bad files; the
parts and counts are gathered, and rank 0 alone writes the submission: byte for byte the file one process writes.

The options are :class:`PredictConfig`'s fields: flags (``--workers 4``, ``--run`` repeated), a ``-c`` YAML file
or ``--set KEY=VALUE`` (a flag wins over ``--set``, which wins over the file); ``--print-config`` prints such a
file. From Python: :func:`run` with a :class:`PredictConfig`, or :func:`load_runs` and :func:`predict`.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from spinestream import SpinestreamError
from spinestream.preprocess.dicom import DicomError
from spinestream.preprocess.errors import DataWarning
from spinestream.preprocess.ingest import ingest_study
from spinestream.shards.config import ConfigError, parse_verb_config
from spinestream.shards.fsutil import atomic_write_bytes, remove_stale_tmp
from spinestream.shards.layout import ROW_TYPES
from spinestream.shards.shard_config import ShardConfig
from spinestream.shards.spec import ShardSpec, run_shard_spec


class PredictError(SpinestreamError, ValueError):
    """Input predict cannot use: no study directory in ``--images``, an unreadable sample submission, runs that
    cannot be one ensemble (the message says what to pass instead)."""


# --------------------------------------------------------------------------- decoding (worker processes)


@dataclass
class Decoded:
    """One test study after ingest: the uint8 volume as the shard job writes it, or why there is none."""

    uid: str
    volume: np.ndarray | None  # (Z, S, S) neighbours | (Z, S, S, 3) windows, uint8, head to feet
    nbr: np.ndarray | None = None  # (Z, 3) the shard job's 2.5D neighbour index ('neighbours'), else None
    bad_files: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # warnings raised while reading (re-issued by the parent)
    error: str | None = None  # set when no slice was readable
    seconds: float = 0.0


def decode_study(uid: str, image_dir: str | Path, cfg: ShardConfig) -> Decoded:
    """Ingest one study with the shard job's own function (``spinestream.preprocess.ingest.ingest_study``),
    keeping the volume in memory.

    Never raises for bad input: a study without a readable slice comes back with ``error`` set.
    """
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # the warnings ingest passes on
        warnings.simplefilter("always")
        try:
            study = ingest_study(image_dir, cfg)
        except (DicomError, OSError) as e:  # the shard job's bad-input policy (preprocess/errors.py)
            return Decoded(uid, None, error=str(e), notes=[str(w.message) for w in caught],
                           seconds=time.perf_counter() - t0)
    return Decoded(uid, study.volume, study.nbr, bad_files=[(str(a), str(b)) for a, b in study.bad_files],
                   notes=study.warnings + [str(w.message) for w in caught], seconds=time.perf_counter() - t0)


def _decode_task(args: tuple[str, str, ShardConfig]) -> Decoded:
    return decode_study(*args)


@contextlib.contextmanager
def decoding_pool(workers: int):
    """``workers`` decoding processes (None for 0: decode inline), terminated on exit. Start it before
    threads exist (models, progress bars): then it forks, as the shard job's pool does. A worker's death (a
    decoder's crash) fails only the study that caused it (``preprocess.workers``): never a hang."""
    if workers <= 0:
        yield None
        return
    from spinestream.preprocess.convert import start_method
    from spinestream.preprocess.workers import Workers

    pool = Workers(workers, start_method)
    try:
        pool.start()  # forked now, before the caller's threads exist
        yield pool
    finally:
        pool.terminate()


def _decode_died(task: tuple[str, str, ShardConfig], how) -> Decoded:
    """A study whose decoding process died again when run alone: listed as failed, the rest predicted."""
    return Decoded(task[0], None, error=f"the process decoding it was {how} (twice: in the pool, then alone): "
                                        "a decoder crashed on its files, or memory ran out")


def decoded_studies(studies: Sequence[tuple[str, Path]], cfg: ShardConfig, pool, *, ahead: int
                    ) -> Iterator[Decoded]:
    """Yield each ``(uid, directory)`` decoded, in order, by ``pool`` kept busy ahead of the consumer:
    at most ``ahead`` studies are submitted and not yet consumed, which bounds memory. ``pool=None``
    decodes in this process (no overlap)."""
    todo = iter([(uid, str(path), cfg) for uid, path in studies])  # the config pickles as it is, as convert's does
    if pool is None:
        yield from map(_decode_task, todo)
        return
    yield from pool.imap(_decode_task, todo, died=_decode_died, ahead=ahead)


def study_volume(d: Decoded, spec: ShardSpec):
    """A decoded study as ``spinestream.engine.infer.StudyVolume`` (with ingest's neighbour index, the shard job's)."""
    from spinestream.engine.infer import StudyVolume

    return StudyVolume(d.uid, d.volume, d.nbr, spec.image.channels, slice_id_offset=-1)  # -1: not from a shard set


# --------------------------------------------------------------------------- the runs


@dataclass
class Run:
    """One ``--run``: its model (EMA weights when present) and how to feed it."""

    path: Path
    model: object
    spec: ShardSpec
    rule: str
    kwargs: dict  # engine.infer.predict_volumes settings: image_size, mean, std, batch_size, precision, ...


def as_device(device):
    """``device`` as a ``torch.device``: one as is; ``auto``, ``cpu`` or ``cuda`` resolved as ``--device`` is
    (:func:`~spinestream.engine.device.pick_device`: an indexed CUDA device, or an error naming the fix); any other
    string as torch reads it (``cuda:1``). Everything downstream asks ``device.type``, which a string has not."""
    import torch

    from spinestream.engine.device import pick_device

    if isinstance(device, torch.device):
        return device
    return pick_device(device) if device in ("auto", "cpu", "cuda") else torch.device(device)


def load_model(run: Path, checkpoint: str, device):
    """(model, config, weights file) of a training run directory (its ``checkpoint``: best, last or a path) or
    of a bundle's run (``weights.safetensors``, EMA weights only: ``spinestream kaggle-bundle``)."""
    from spinestream.engine.evaluate import load_run_model
    from spinestream.engine.weights import is_weights_dir, load_weights_model

    if not is_weights_dir(run):
        return load_run_model(run, checkpoint, device)
    if checkpoint != "best":
        raise PredictError(f"--run {run} holds exported weights only (weights.safetensors): --checkpoint "
                         f"{checkpoint} needs the training run directory")
    return load_weights_model(run, device)


def load_runs(run_dirs: Sequence[Path], device, *, checkpoint: str = "best", batch_size: int | None = None,
              tta: bool = False) -> list[Run]:
    """Load each run's model and shard spec; refuse an ensemble whose runs saw different images. A run is a
    training run directory or a bundle's run (:func:`load_model`); ``device`` a ``torch.device`` or a string
    (:func:`as_device`)."""
    from spinestream.engine.device import resolve_precision
    from spinestream.engine.model import data_config

    if not run_dirs:
        raise PredictError("at least one --run is needed")
    device = as_device(device)
    runs = []
    for rd in run_dirs:
        model, cfg, _ = load_model(Path(rd), checkpoint, device)
        dc = data_config(model)
        runs.append(Run(Path(rd), model, run_shard_spec(rd, cfg.data.root), cfg.train.study_rule, dict(
            image_size=cfg.loader.image_size, mean=tuple(dc["mean"]), std=tuple(dc["std"]),
            batch_size=batch_size or cfg.loader.batch_size, device=device,
            precision=resolve_precision(cfg.train.precision, device), tta=tta)))
    first = runs[0]
    for r in runs[1:]:
        if r.spec.key() != first.spec.key():
            raise PredictError(f"--run {r.path} was trained on other images than --run {first.path} "
                             f"({r.spec.key()} vs {first.spec.key()}); an ensemble needs one image spec "
                             f"(shard size, channels, windows, offset_mm): ensemble runs of one shard set")
    return runs


def ensemble_rule(runs: Sequence[Run], rule: str | None) -> str:
    """``rule`` if given, else the runs' common ``train.study_rule`` (refused when they differ)."""
    if rule:
        return rule
    rules = {r.rule for r in runs}
    if len(rules) > 1:
        raise PredictError(f"the runs use different study rules ({sorted(rules)}); choose one with --rule")
    return rules.pop()


def slice_probabilities(runs: Sequence[Run], sv) -> np.ndarray:
    """``(n_slices, 8)``: the mean over the runs of their slice probabilities (the ensemble)."""
    from spinestream.engine.infer import predict_volumes

    per_run = [next(predict_volumes(r.model, [sv], **r.kwargs))[1] for r in runs]
    return np.mean(np.stack(per_run), axis=0)


def prevalence(runs: Sequence[Run]) -> np.ndarray:
    """``(8,)`` the runs' mean training prevalence (C1..C7, patient_overall)."""
    return np.mean([[r.spec.prevalence[t] for t in ROW_TYPES] for r in runs], axis=0)


# --------------------------------------------------------------------------- the submission


DATASET_DIRS = ("test_images", "train_images")
"""Subfolders that make a folder a dataset root in the Kaggle layout, not a folder of studies."""


def list_studies(images: Path) -> dict[str, Path]:
    """``{uid: directory}`` of every study directory in ``images``, sorted by uid.

    Raises :class:`PredictError` when ``images`` is not a directory or no subfolder of it holds
    ``.dcm`` files (an empty folder, or a dataset root: the message then names its test_images/).
    """
    if not images.is_dir():
        raise PredictError(f"--images {images}: no such directory (expected <StudyInstanceUID>/<n>.dcm)")
    found = {p.name: p for p in sorted(images.iterdir(), key=lambda p: p.name) if p.is_dir()}
    if not any(_holds_dicom(p) for p in found.values()):
        raise PredictError(_no_studies_message(images, found))
    return found


def _holds_dicom(directory: Path) -> bool:
    """Whether ``directory`` holds a ``.dcm`` file (as ``read_series`` lists them); stops at the first."""
    return any(p.suffix.lower() == ".dcm" and p.is_file() for p in directory.iterdir())


def _no_studies_message(images: Path, found: dict[str, Path]) -> str:
    msg = f"--images {images}: no study directory (none of its {len(found)} subfolder(s) holds .dcm files); " \
          f"expected {images}/<StudyInstanceUID>/<n>.dcm"
    if any(d in found for d in DATASET_DIRS):
        msg += (f". {images} looks like a dataset root ({', '.join(d + '/' for d in DATASET_DIRS if d in found)}): "
                f"pass --images {images / 'test_images'}")
    return msg


def read_sample(path: Path) -> pd.DataFrame:
    """A sample submission -> row_id, uid, kind in its row order; a row_id that is not
    ``<uid>_<C1..C7|patient_overall>`` is an error naming it."""
    from spinestream.engine.metrics import _ROW_ID

    df = pd.read_csv(path, dtype={"row_id": str})
    if "row_id" not in df.columns:
        raise PredictError(f"--sample-submission {path}: no row_id column (columns: {list(df.columns)})")
    ids = df["row_id"].fillna("").astype(str)
    parts = ids.str.extract(_ROW_ID)
    bad = parts["uid"].isna()
    if bad.any():
        raise PredictError(f"--sample-submission {path}: cannot parse row_id {ids[bad].iloc[0]!r} (line "
                         f"{int(np.flatnonzero(bad)[0]) + 2}; {int(bad.sum())} such rows); expected "
                         f"'<StudyInstanceUID>_<C1..C7|patient_overall>'")
    if ids.duplicated().any():
        raise PredictError(f"--sample-submission {path}: duplicated row_id {ids[ids.duplicated()].iloc[0]!r}")
    return pd.DataFrame({"row_id": ids, "uid": parts["uid"], "kind": parts["kind"]})


def _warn(msg: str) -> None:
    warnings.warn(msg, DataWarning, stacklevel=3)


def _names(items: Sequence[str], n: int = 10) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def predict_study_probs(runs: Sequence[Run], studies: Sequence[tuple[str, Path]], *, rule: str, workers: int,
                        prefetch: int, progress: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """``{uid: (8,) study probabilities}`` for ``studies`` (prevalence where nothing could be read),
    and a summary (counts, slices, seconds, decode seconds summed over the workers).

    Under torchrun (:mod:`spinestream.engine.dist`) each rank decodes and predicts its contiguous part of
    ``studies`` (a line on stderr says which) and every rank returns all of them, with the ranks' summaries
    combined (:func:`combine_stats`): what one process returns."""
    from spinestream.engine import dist

    d = dist.current()
    mine = d.part(list(studies))
    if d.enabled:
        print(f"spinestream predict: rank {d.rank} of {d.world} on {runs[0].kwargs['device']}: {len(mine)} of "
              f"{len(studies)} studies", file=sys.stderr)
    spec, prev = runs[0].spec, prevalence(runs)
    out: dict[str, np.ndarray] = {}
    stats = {"studies": len(mine), "slices": 0, "bad_files": 0, "unreadable_studies": [], "decode_s": 0.0}
    with decoding_pool(min(workers, len(mine))) as pool:
        t0 = time.perf_counter()
        _run_studies(runs, decoded_studies(mine, spec.config, pool, ahead=workers + prefetch),
                     rule, prev, out, stats, progress and d.main)
    stats["seconds"] = time.perf_counter() - t0
    if not d.enabled:
        return out, stats
    parts = d.gather((out, stats))  # in rank order: the parts are contiguous, so this is the studies' order
    merged = {u: p for part, _ in parts for u, p in part.items()}
    return {u: merged[u] for u, _ in studies}, combine_stats([s for _, s in parts])


def combine_stats(parts: Sequence[dict]) -> dict:
    """The ranks' summaries (in rank order) as one process's: counts, slices, bad files and decode seconds
    summed, unreadable studies in order, wall seconds the slowest rank's."""
    return {"studies": sum(s["studies"] for s in parts), "slices": sum(s["slices"] for s in parts),
            "bad_files": sum(s["bad_files"] for s in parts),
            "unreadable_studies": [u for s in parts for u in s["unreadable_studies"]],
            "decode_s": sum(s["decode_s"] for s in parts), "seconds": max(s["seconds"] for s in parts)}


def _run_studies(runs, decoded, rule: str, prev: np.ndarray, out: dict, stats: dict, progress: bool) -> None:
    bar = None
    if progress:
        from spinestream.shards.progress import bar as progress_bar

        bar = progress_bar(total=stats["studies"], unit="study", desc="predict", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for d in decoded:
            out[d.uid] = _study(runs, d, rule, prev, stats)
            if bar is not None:
                bar.update()
                bar.set_postfix(slices_s=f"{stats['slices'] / max(time.perf_counter() - t0, 1e-9):.0f}")
    finally:
        if bar is not None:
            bar.close()


def _study(runs, d: Decoded, rule: str, prev: np.ndarray, stats: dict) -> np.ndarray:
    """One decoded study's ``(8,)`` probabilities; its warnings issued, ``stats`` updated."""
    from spinestream.engine.infer import describe_nonfinite
    from spinestream.engine.metrics import study_probabilities

    stats["decode_s"] += d.seconds
    for note in d.notes:
        _warn(f"study {d.uid}: {note}")
    for name, reason in d.bad_files:
        _warn(f"study {d.uid}: slice {name} left out ({reason}); predicted from the other slices")
    stats["bad_files"] += len(d.bad_files)
    if d.volume is None:
        _warn(f"study {d.uid}: no readable slice ({d.error}); predicting the training prevalence "
              f"(from {', '.join(dict.fromkeys(r.spec.source for r in runs))})")
        stats["unreadable_studies"].append(d.uid)
        return prev.copy()
    stats["slices"] += int(d.volume.shape[0])
    p = slice_probabilities(runs, study_volume(d, runs[0].spec))
    if (why := describe_nonfinite(p)) is not None:  # the one check (engine.infer); predict must still write a row
        _warn(f"study {d.uid}: {why}; predicting the training prevalence")
        return prev.copy()
    return study_probabilities(p, rule)


def predict(runs: Sequence[Run], images: Path, *, sample: Path | None = None, rule: str | None = None,
            workers: int = 2, prefetch: int = 2, progress: bool = False) -> tuple[pd.DataFrame, dict]:
    """The submission frame (``row_id, fractured``) and a summary; see the module doc for the rules."""
    from spinestream.engine.metrics import submission_frame

    from spinestream.engine import dist

    main = dist.current().main  # under torchrun rank 0 says what concerns every study (a rank warns of its own)
    rule = ensemble_rule(runs, rule)
    found = list_studies(Path(images))
    prev = prevalence(runs)
    if sample is None:
        probs, stats = predict_study_probs(runs, list(found.items()), rule=rule, workers=workers, prefetch=prefetch,
                                           progress=progress)
        frame = submission_frame({u: probs[u] for u in sorted(probs)})
    else:
        rows = read_sample(Path(sample))
        wanted = list(dict.fromkeys(rows["uid"]))  # studies in first-appearance order
        missing = [u for u in wanted if u not in found]
        if missing and main:
            _warn(f"{len(missing)} stud{'y' if len(missing) == 1 else 'ies'} of the sample submission "
                  f"{'is' if len(missing) == 1 else 'are'} not in {images}, predicting the training prevalence: "
                  f"{_names(missing)}")
        extra = sorted(set(found) - set(wanted))
        if extra and main:
            print(f"spinestream predict: {len(extra)} stud(y/ies) in {images} not in the sample submission, "
                  f"skipped: {_names(extra, 3)}", file=sys.stderr)
        todo = [(u, found[u]) for u in wanted if u in found]
        probs, stats = predict_study_probs(runs, todo, rule=rule, workers=workers, prefetch=prefetch,
                                           progress=progress)
        col = {t: k for k, t in enumerate(ROW_TYPES)}
        values = [probs[u][col[k]] if u in probs else prev[col[k]] for u, k in zip(rows["uid"], rows["kind"])]
        frame = pd.DataFrame({"row_id": rows["row_id"].to_numpy(), "fractured": np.asarray(values, np.float64)})
        stats["missing_studies"] = missing
    check_submission(frame)
    stats["rule"] = rule
    return frame, stats


def check_submission(frame: pd.DataFrame) -> None:
    """Every value finite and in [0, 1] (an invariant of :func:`predict`)."""
    v = frame["fractured"].to_numpy(np.float64)
    assert np.isfinite(v).all() and ((v >= 0) & (v <= 1)).all(), "submission values must be finite in [0, 1]"


SUBMISSION_CLIP = 1e-4
"""The submission's probabilities are clipped to [SUBMISSION_CLIP, 1 - SUBMISSION_CLIP] (see write_submission)."""


def write_submission(frame: pd.DataFrame, out: Path) -> None:
    """``row_id,fractured`` CSV, written atomically (a temporary file renamed), probabilities clipped to
    ``[SUBMISSION_CLIP, 1 - SUBMISSION_CLIP]``.

    Why: float32 sigmoid saturates to exactly 1.0 (and ``%.6g`` writes anything above 0.9999995 as ``1``);
    the metric clips at 1e-15, so a wrong "1" costs -log(1e-15) = 34.5 times its weight (up to 14 for a
    patient_overall row, in a study whose weights sum to 14-28). Clipped, a wrong row costs at most -log(1e-4) = 9.2 and a
    right one -log(1 - 1e-4) = 1e-4: clipping pays as soon as more than about 1 in 250,000 of the clipped
    rows is wrong (1e-4 / (34.5 - 9.2)), and a model that is that sure and that right loses 1e-4 per row.
    The caller's frame is not changed; ``predict``'s own frame and scores are unclipped."""
    clipped = frame.assign(fractured=np.clip(frame["fractured"].to_numpy(np.float64), SUBMISSION_CLIP,
                                             1.0 - SUBMISSION_CLIP))
    remove_stale_tmp(Path(out).parent, (Path(out).name,))  # what a killed predict left
    atomic_write_bytes(out, clipped.to_csv(index=False, float_format="%.6g").encode())


# --------------------------------------------------------------------------- the verb


@dataclass(kw_only=True)
class PredictConfig:
    """``spinestream predict``: which runs predict which test studies into which file (``-c FILE``, ``--set
    KEY=VALUE`` or one flag per field; the pipeline's predict stage writes one)."""

    run: list[str] = field(default_factory=list)
    """Run directories; repeat --run for an ensemble (slice probabilities averaged). Required."""
    images: str | None = None
    """Test images: IMAGES/<StudyInstanceUID>/<n>.dcm; required."""
    sample_submission: str | None = None
    """The rows to write, in their order; unset: 8 rows per study directory in images."""
    out: str | None = None
    """The submission.csv to write; required."""
    workers: int | None = None
    """DICOM decoding processes; unset: one per CPU (under torchrun: shared among the machine's ranks); 0: decode
    inline."""
    prefetch: int = 2
    """Decoded studies waiting beyond one per worker."""
    batch_size: int | None = None
    """Slices per model batch; unset: the run's loader.batch_size."""
    checkpoint: str = "best"
    """best, last, or a checkpoint path."""
    rule: Literal["max", "mean_top_k", "quantile", "noisy_or"] | None = None
    """Slice -> study rule (engine.metrics.RULES); unset: the runs' train.study_rule."""
    tta: bool = False
    """Average with the horizontal flip."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the models run (auto: a GPU when one is visible)."""
    progress: bool = True
    """A progress bar on stderr."""

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0: decode inline), got {self.workers}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def default_workers() -> int:
    """Decoding processes when ``--workers`` is unset: the CPUs, shared among the ranks on this machine
    (torchrun's ``LOCAL_WORLD_SIZE``)."""
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    except ValueError:
        local = 1
    return max(1, (os.cpu_count() or 1) // local)


def run(cfg: PredictConfig) -> tuple[pd.DataFrame, dict]:
    """Predict ``cfg.images`` with ``cfg.run`` and write ``cfg.out``; returns the (unclipped) submission frame and
    the summary of :func:`predict`.

    Under torchrun (:mod:`spinestream.engine.dist`) each rank decodes and predicts its part of the studies on
    its own device (``LOCAL_RANK``), every rank returns the whole frame and summary, and rank 0 alone writes
    ``cfg.out``: the file one process writes; every rank returns once it is written."""
    from spinestream.engine import dist
    from spinestream.engine.device import pick_device

    missing = [f"--{k.replace('_', '-')}" for k in ("run", "images", "out") if not getattr(cfg, k)]
    if missing:
        raise ConfigError(f"predict: {', '.join(missing)} required (or {', '.join(m[2:] for m in missing)} in the "
                          f"-c file)")
    images, workers = Path(cfg.images), default_workers() if cfg.workers is None else cfg.workers
    list_studies(images)  # a wrong --images is refused before any model is loaded (on every rank alike)
    d = dist.init_from_env(device_type="cpu" if cfg.device == "cpu" else None)  # a world of one: a no-op
    dev = pick_device(cfg.device, d.local_rank)
    runs = load_runs([Path(r) for r in cfg.run], dev, checkpoint=cfg.checkpoint, batch_size=cfg.batch_size,
                     tta=cfg.tta)
    if d.main:
        print(f"spinestream predict: {len(runs)} run(s) on {dev}, image spec {runs[0].spec.key()} "
              f"(from {runs[0].spec.source}), {workers} decoding worker(s)"
              + (f" per rank, {d.world} ranks" if d.enabled else ""), file=sys.stderr)
    frame, stats = predict(runs, images, sample=None if cfg.sample_submission is None else Path(cfg.sample_submission),
                           rule=cfg.rule, workers=workers, prefetch=cfg.prefetch, progress=cfg.progress)
    d.main_only(lambda: write_submission(frame, Path(cfg.out)), f"writing {cfg.out}")
    return frame, stats


def main(argv: list[str] | None = None) -> int:
    """Errors are not caught here: the console script prints a project error on one line (exit 2), and
    anything else is a bug that keeps its traceback."""
    cfg = parse_verb_config(PredictConfig, "spinestream predict", __doc__, argv)
    if cfg is None:  # --print-config
        return 0
    warnings.simplefilter("always", DataWarning)  # every bad file and study is named, not the first only
    frame, stats = run(cfg)
    from spinestream.engine.dist import current

    if not current().main:  # under torchrun rank 0 reports, as it writes
        return 0
    rate = stats["studies"] / stats["seconds"] * 60 if stats["seconds"] > 0 else math.inf
    print(f"done: {len(frame)} rows, {stats['studies']} studies decoded ({stats['slices']} slices, "
          f"{stats['bad_files']} bad files, {len(stats['unreadable_studies'])} unreadable, "
          f"{len(stats.get('missing_studies', []))} missing -> prevalence), {rate:.1f} studies/min, rule "
          f"{stats['rule']} -> {cfg.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
