"""``spinestream shard``: DICOM studies -> windowed uint8 WebDataset shards + Zarr volumes, once.

    spinestream shard --data /kaggle/input/rsna-2022-cervical-spine-fracture-detection --out shards-512
    spinestream shard --data demo-data/raw --out demo-data/shards --set image_size=128 --workers 2

Two resumable phases:

1. **per study** (parallel): ingest the DICOM series (``spinestream.preprocess.ingest.ingest_study``, which
   predict calls too: sorted along the slice normal, head to feet, windowed to uint8 at the
   output size), write the Zarr volume, JPEG-encode every slice's 2.5D image and compute the
   slice labels. Output goes to
   ``_work/studies/<uid>.tmp`` and is committed by renaming the directory; the volume is
   moved into ``volumes.zarr`` just before. A committed study is never redone.
2. **the group phase** (:func:`finalize`), named steps on the storage contract in shards/:
   number slices (``slice_id``: studies in UID order, slices head to feet) -> write groups
   (per (cohort, fold): a seeded shuffle, cut into shards written under a temporary name,
   index included, then the group committed) -> write tables -> write manifest (last).

As a job array (a Slurm array, or N processes on one machine; README, "Sharding as a job array"),
phase 1 is split and phase 2 runs once at the end, all on the same ``--out``:

    spinestream shard --data D --out O --worker-index I --num-workers N   # for I = 0..N-1, at once or not
    spinestream shard --data D --out O --merge                            # when every worker is done

Worker ``I`` converts the studies with ``sha1(StudyInstanceUID) % N == I`` (:func:`worker_of`)
exactly as a plain run would, into the shared ``_work/studies``; it stages volumes in its own
``_work/tmp/w<I>-of-<N>`` (the only temporary directory it cleans), records itself in
``_work/workers`` and writes no shards. Workers are resumable on their own, and the job identity
check is race-safe for workers starting together (:func:`check_job`). ``--merge`` checks that
every study of the selection was committed or failed (else a JobError names the missing studies
and their workers, and no manifest is written), then runs phase 2 (:func:`finalize`): the result is
byte-identical to one plain run. A plain run on an OUT where workers committed studies resumes:
it converts the rest, then finalizes.

The error policy (preprocess/errors.py): bad input -- DicomError, OSError, LabelError -- is
reported per file (``bad_files``) or per study (``failed_studies``) and the job goes on;
DataWarnings raised while a study is converted are captured per study and listed in the
manifest's ``warnings``; anything else is a bug and stops the job with its traceback.

The job is identified by its config and its study selection (``--limit``): a rerun of
the same job resumes or is a no-op, another job on the same ``--out`` is refused.

A crash or kill at any point followed by a rerun gives byte-identical output to a clean
run: every file is written under a temporary name and renamed, and everything that
depends on order (slice ids, shuffles, tar bytes) depends only on the input and config.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spinestream.shards import layout as L, progress
from spinestream.shards.config import HelpFormatter, add_print_config, config_fields_help, load_config, \
    print_config, to_dict
from spinestream.shards.fsutil import NO_SPACE, WriteError, atomic_write_json, remove_stale_tmp, replace_dir
from spinestream.shards.sample import encode_jpeg, sample_image
from spinestream.shards.manifest import (BadFile, CohortCount, Counts, DataWarningEntry, FailedStudy, ImageSpec, Manifest,
                             ManifestError, ShardEntry, Source, StudySelection, read_manifest, write_manifest)
from spinestream.shards.shard_config import ShardConfig
from spinestream.shards.tables import LabelTable, label_frame, write_label_table, write_slice_table, write_study_table
from spinestream.shards.volumes import VolumeAttrs, ensure_group, set_attrs, write_volume
from spinestream.shards.wds import ShardWriter

from spinestream import MissingInput, SpinestreamError, __version__

from .dicom import DicomError
from .errors import DataWarning, JobError, LabelError
from .ingest import ingest_study
from .labels import boxes_to_index, build_study_table, slice_labels
from .segmentation import read_segmentation
from .workers import Died, Workers

TOOL = f"spinestream {__version__}"  # written into the manifest (created_by)


# --------------------------------------------------------------------------- inputs


@dataclass
class Dataset:
    """A dataset directory in the Kaggle layout."""

    root: Path
    train: pd.DataFrame
    boxes: pd.DataFrame

    @classmethod
    def open(cls, root: Path) -> Dataset:
        if not root.is_dir():
            raise MissingInput(f"--data {root}: no such directory")
        missing = [n for n in ("train.csv", "train_images") if not (root / n).exists()]
        if missing:
            raise MissingInput(
                f"--data {root}: missing {', '.join(missing)}; expected the Kaggle layout "
                "(train.csv, train_bounding_boxes.csv, train_images/<StudyInstanceUID>/<n>.dcm, segmentations/)"
            )
        train = pd.read_csv(root / "train.csv")
        bpath = root / "train_bounding_boxes.csv"
        boxes = pd.read_csv(bpath) if bpath.exists() else pd.DataFrame(
            columns=["StudyInstanceUID", "x", "y", "width", "height", "slice_number"])
        return cls(root, train, boxes)


# --------------------------------------------------------------------------- phase 1: one study


@dataclass
class StudyTask:
    uid: str
    cohort: str
    fractured: list[int]
    image_dir: str
    seg_path: str | None
    boxes: list[list[float]]  # rows of (slice_number, x, y, width, height)
    out: str
    cfg: ShardConfig
    staging: str = ""
    """Where the study's volume is written before it is moved into ``volumes.zarr``: the run's own
    temporary directory (:func:`staging_dir`), which no other run cleans."""


# Bad input: the study is reported as failed and the job goes on (preprocess/errors.py).
BAD_INPUT = (DicomError, OSError, LabelError)
# Never caught: the user or the OS asked the process to stop.
_PASS_THROUGH = (KeyboardInterrupt, SystemExit)


class StudyCrash(RuntimeError):
    """A BaseException that is not an Exception escaped a study (e.g. a codec's panic outside
    the decoder). Re-raised as an Exception so the worker hands it back as the study's error instead of
    dying of it (``preprocess.workers`` survives a death, but would run the study again alone first)."""


def process_study(task: StudyTask) -> dict:
    """Phase 1 for one study; returns a small summary.

    Bad input (:data:`BAD_INPUT`) is recorded under ``_work/failed`` and returned as
    ``{"error": ...}``; any other exception is a bug and propagates (with a note naming the
    study), which stops the job.
    """
    lay = L.Layout(Path(task.out))
    tmp = lay.work / "studies" / f"{task.uid}.tmp"
    try:
        return _process_study(task, lay, tmp)
    except BAD_INPUT as e:
        if isinstance(e, OSError) and e.errno in NO_SPACE:  # a full disk is no bad input: the job stops
            raise (e if isinstance(e, WriteError) else WriteError.of(e.filename or tmp, e)) from e
        shutil.rmtree(tmp, ignore_errors=True)
        atomic_write_json(lay.work / "failed" / f"{task.uid}.json", {"uid": task.uid, "reason": str(e)})
        return {"uid": task.uid, "n_slices": 0, "error": str(e)}
    except _PASS_THROUGH:
        raise
    except Exception as e:
        e.add_note(f"spinestream shard: a bug, not bad input, while converting study {task.uid}")
        raise
    except BaseException as e:
        raise StudyCrash(f"study {task.uid}: {type(e).__name__}: {e}") from e


def _process_study(task: StudyTask, lay: L.Layout, tmp: Path) -> dict:
    cfg = task.cfg
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    # DataWarnings are the study's record of what was changed: captured here, kept in
    # study.json and listed in the manifest (the error policy, preprocess/errors.py)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        study, labels, sizes, used_seg = _convert_study(task, cfg, tmp)
    volume, meta = study.volume, study.meta
    info = {
        "uid": task.uid,
        "n_slices": int(volume.shape[0]),
        "sizes": sizes.tolist(),
        "z": [float(v) for v in meta.z],
        "slice_numbers": [int(v) for v in meta.slice_numbers],
        "spacing": [float(v) for v in meta.spacing],
        "z_reversed": bool(meta.z_reversed),
        "rows_cols": [int(v) for v in meta.shape],
        "transfer_syntaxes": list(meta.transfer_syntaxes),
        "bad_files": [[str(a), str(b)] for a, b in meta.bad_files],
        "has_segmentation": used_seg,
        "warnings": study_warnings(task, caught, first=study.warnings),
    }
    attrs = VolumeAttrs(
        study=task.uid, z=info["z"], slice_numbers=info["slice_numbers"], spacing=info["spacing"],
        z_reversed=info["z_reversed"], channels=cfg.channels, windows=[list(w) for w in cfg.windows],
        offset_mm=cfg.offset_mm, direction=[float(v) for v in meta.direction],
        normal=[float(v) for v in meta.normal], origin=None if meta.origin is None else list(meta.origin),
        source_shape=info["rows_cols"],
    )
    staging = Path(task.staging) if task.staging else staging_dir(lay, None, None)
    write_volume(staging / f"{task.uid}.zarr", lay.volumes / task.uid, volume, attrs,
                 chunk_depth=cfg.zarr_chunk_depth, cname=cfg.zarr_codec, clevel=cfg.zarr_clevel,
                 shuffle=cfg.zarr_shuffle)
    atomic_write_json(tmp / "study.json", info)
    replace_dir(tmp, lay.work / "studies" / task.uid)  # the commit point
    (lay.work / "failed" / f"{task.uid}.json").unlink(missing_ok=True)
    return {"uid": task.uid, "n_slices": info["n_slices"], "bad_files": len(meta.bad_files)}


def _convert_study(task: StudyTask, cfg: ShardConfig, tmp: Path):
    """Ingest, label and JPEG-encode one study into ``tmp`` -> (the ingested study, labels, sample
    sizes, whether a segmentation decided labels)."""
    study = ingest_study(task.image_dir, cfg)  # the one ingest, predict's too (preprocess/ingest.py)
    volume, meta, n = study.volume, study.meta, study.n_slices
    labels, used_seg = study_labels(task, meta, n, cfg)
    sizes = np.empty(n, dtype=np.int64)
    with open(tmp / "samples.bin", "wb") as f:
        for i in range(n):
            data = encode_jpeg(sample_image(volume, i, study.nbr, cfg.channels), cfg.jpeg_quality)
            sizes[i] = len(data)
            f.write(data)
    if labels is not None:
        np.save(tmp / "labels.npy", labels)
    return study, labels, sizes, used_seg


def study_warnings(task: StudyTask, caught: list[warnings.WarningMessage], first: list[str] = ()) -> list[str]:
    """The DataWarning messages of one study (``first``: those ingest returned, then those
    ``caught`` after it), with the dataset path made relative (the manifest must not depend on
    where the data lies); other warnings are re-emitted as they were."""
    out = [m.replace(task.image_dir, f"train_images/{task.uid}") for m in first]
    for w in caught:
        if issubclass(w.category, DataWarning):
            out.append(str(w.message).replace(task.image_dir, f"train_images/{task.uid}"))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out


def study_labels(task: StudyTask, meta, n: int, cfg: ShardConfig) -> tuple[np.ndarray | None, bool]:
    """Slice targets (n, 8) for boxed and negative studies (None for positive-unboxed), and
    whether a segmentation was used for them."""
    if task.cohort == "negative":
        return np.zeros((n, len(L.TARGETS)), dtype=np.uint8), False
    if task.cohort != "boxed":
        return None, False
    rows = pd.DataFrame(task.boxes, columns=["slice_number", "x", "y", "width", "height"])
    rows["StudyInstanceUID"] = task.uid
    mapping = {int(s): i for i, s in enumerate(meta.slice_numbers)}
    boxed_index, box_arr = boxes_to_index(rows, mapping, task.uid)
    seg = study_segmentation(task, (n, *meta.shape)) if task.seg_path else None
    labels = slice_labels(n, boxed_index, task.fractured, seg=seg, boxes=box_arr, max_gap=cfg.label_max_gap)
    return labels, seg is not None


def _seg_read_errors() -> tuple[type[BaseException], ...]:
    import nibabel.filebasedimages
    import nibabel.spatialimages

    return (OSError, ValueError, nibabel.filebasedimages.ImageFileError, nibabel.spatialimages.HeaderDataError)


def study_segmentation(task: StudyTask, shape: tuple[int, int, int]) -> np.ndarray | None:
    """The study's vertebra segmentation on its volume grid, or None (with a DataWarning) when it
    cannot be read or does not fit: the study is then labelled without it, not failed."""
    assert task.seg_path is not None
    try:
        seg = read_segmentation(task.seg_path)
    except _seg_read_errors() as e:
        warnings.warn(f"{task.uid}: segmentation {Path(task.seg_path).name} cannot be read "
                      f"({type(e).__name__}: {e}); labelling without it", DataWarning, stacklevel=2)
        return None
    if seg is None:  # the reader left it out (reversed or unusable), with its own DataWarning
        return None
    if seg.shape != shape:
        warnings.warn(f"{task.uid}: segmentation shape {seg.shape} does not match the series "
                      f"{shape}; labelling without it", DataWarning, stacklevel=2)
        return None
    return seg


# --------------------------------------------------------------------------- phase 2: groups


def _group_rng(seed: int, group: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(group.encode())])


def plan_shards(ids: np.ndarray, sizes: np.ndarray, cfg: ShardConfig) -> list[np.ndarray]:
    """Cut a shuffled group into shards by sample count and byte size (tar overhead included)."""
    out, start, acc = [], 0, 0
    member = ((sizes + 511) // 512) * 512 + 512 + 1024  # jpg data + header, .id member
    for i in range(len(ids)):
        if i > start and (i - start >= cfg.shard_max_samples or acc + member[i] > cfg.shard_max_bytes):
            out.append(np.arange(start, i))
            start, acc = i, 0
        acc += int(member[i])
    if len(ids) > start:
        out.append(np.arange(start, len(ids)))
    return out


def write_group(args: tuple) -> list[dict]:
    """Write (or find committed) the shards of one (cohort, fold) group."""
    out, group, cohort, fold, rows, cfg = args
    lay = L.Layout(Path(out))
    done = lay.work / "groups" / f"{group}.json"
    if done.exists():
        return json.loads(done.read_text())
    ids, uids, offs, sizes = rows
    perm = _group_rng(cfg.seed, group).permutation(len(ids))
    ids, uids, offs, sizes = ids[perm], uids[perm], offs[perm], sizes[perm]
    handles: dict[str, object] = {}
    entries = []
    try:
        for k, part in enumerate(plan_shards(ids, sizes, cfg)):
            name = L.shard_name(cohort, fold, k)
            with ShardWriter(lay.wds / f"{name}.tar", lay.wds / f"{name}.idx") as w:
                for j in part:
                    f = handles.get(uids[j])
                    if f is None:
                        f = handles[uids[j]] = open(lay.work / "studies" / uids[j] / "samples.bin", "rb")
                    f.seek(int(offs[j]))
                    w.add(int(ids[j]), f.read(int(sizes[j])))
                info = w.close()
            entries.append({
                "name": name, "path": f"wds/{name}.tar", "index": f"wds/{name}.idx", "cohort": cohort,
                "fold": int(fold), "samples": info.samples, "bytes": info.bytes, "sha256": info.sha256,
                "index_sha256": info.index_sha256, "slice_ids": [int(ids[j]) for j in part],
            })
    finally:
        for f in handles.values():
            f.close()
    atomic_write_json(done, entries)
    return entries


def finalize(out: Path, table: pd.DataFrame, cfg: ShardConfig, pool=None, limit: int | None = None,
             job_warnings: list[str] = ()) -> Manifest:
    """Phase 2 as named steps on the storage contract (shards/): number slices -> write groups ->
    write tables -> write manifest. Each step reads only what the steps before it wrote, so a
    job-array ``--merge`` can run them over the workers' committed studies."""
    lay = L.Layout(out)
    for d in (lay.root, lay.wds, lay.truth.parent, lay.volumes, *lay.volumes.glob("*/")):
        remove_stale_tmp(d)  # a killed group phase's (this phase runs alone: none is in progress)
    infos, failed = collect_studies(lay, table)
    studies, slices = number_slices(table, infos)
    shards, shard_of = write_groups(out, slices, cfg, pool)
    slices["shard"] = shard_of[slices.slice_id.to_numpy()]
    write_tables(lay, studies, slices, infos)
    manifest = build_manifest(table, studies, cfg, shards, infos, failed, study_selection(table, limit),
                              job_warnings)
    write_manifest(out, manifest)
    return manifest


def collect_studies(lay: L.Layout, table: pd.DataFrame) -> tuple[dict[str, dict], list[FailedStudy]]:
    """The committed studies' ``study.json`` by UID, and the studies that failed (with the reason)."""
    infos, failed = {}, []
    for uid in table.StudyInstanceUID:
        sj = lay.work / "studies" / uid / "study.json"
        if sj.exists():
            infos[uid] = json.loads(sj.read_text())
        else:
            fj = lay.work / "failed" / f"{uid}.json"
            reason = json.loads(fj.read_text())["reason"] if fj.exists() else "not processed"
            failed.append(FailedStudy(study=uid, reason=reason))
    if not infos:
        raise JobError(f"no study could be read; see {lay.work / 'failed'} for the reasons")
    return infos, failed


def number_slices(table: pd.DataFrame, infos: dict[str, dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Global slice ids: studies in UID order (the table is sorted), slices head to feet.

    Returns the study rows of the converted studies (with n_slices, slice_id_offset) and one
    row per slice (with the private ``_offset``/``_size`` of its JPEG in ``samples.bin``).
    """
    ok = table[table.StudyInstanceUID.isin(infos)].reset_index(drop=True)
    counts = np.array([infos[u]["n_slices"] for u in ok.StudyInstanceUID], dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    ok["n_slices"] = counts
    ok["slice_id_offset"] = first
    parts = []
    for row, f0 in zip(ok.itertuples(index=False), first):
        info = infos[row.StudyInstanceUID]
        n = info["n_slices"]
        sizes = np.asarray(info["sizes"], dtype=np.int64)
        parts.append(pd.DataFrame({
            "slice_id": np.arange(f0, f0 + n, dtype=np.int64),
            "StudyInstanceUID": row.StudyInstanceUID,
            "slice_number": np.asarray(info["slice_numbers"], dtype=np.int64),
            "index": np.arange(n, dtype=np.int32),
            "z": np.asarray(info["z"], dtype=np.float64),
            "cohort": row.cohort,
            "fold": np.int8(row.fold),
            "_offset": np.concatenate([[0], np.cumsum(sizes)[:-1]]),
            "_size": sizes,
        }))
    return ok, pd.concat(parts, ignore_index=True)


def write_groups(out: Path, slices: pd.DataFrame, cfg: ShardConfig, pool=None) -> tuple[list[ShardEntry], np.ndarray]:
    """Shards per (cohort, fold) group -> (entries sorted by name, shard name per slice_id)."""
    tasks = []
    for (cohort, fold), g in slices.groupby(["cohort", "fold"], sort=True):
        tasks.append((str(out), L.group_name(cohort, int(fold)), cohort, int(fold),
                      (g.slice_id.to_numpy(), g.StudyInstanceUID.to_numpy(), g._offset.to_numpy(), g._size.to_numpy()),
                      cfg))
    entries: list[dict] = []
    with progress.bar(total=len(tasks), desc="shards (groups)", unit="group") as bar:
        groups = pool.imap(write_group, tasks, died=_group_died, ahead=2 * pool.workers) if pool else map(
            write_group, tasks)
        for group in groups:
            entries.extend(group)
            bar.update()
    shard_of = np.empty(len(slices), dtype=object)
    for e in entries:
        shard_of[np.asarray(e.pop("slice_ids"), dtype=np.int64)] = e["name"]
    shards = sorted((ShardEntry(**e) for e in entries), key=lambda s: s.name)
    return shards, shard_of


def write_tables(lay: L.Layout, studies: pd.DataFrame, slices: pd.DataFrame, infos: dict[str, dict]) -> None:
    """The study, slice and truth tables (shards.tables), then the volumes' slice_id offsets."""
    studies = studies.copy()
    col = {  # study.json field -> study-table columns
        "spacing_z": lambda i: i["spacing"][0], "spacing_y": lambda i: i["spacing"][1],
        "spacing_x": lambda i: i["spacing"][2], "rows": lambda i: i["rows_cols"][0],
        "cols": lambda i: i["rows_cols"][1], "z_reversed": lambda i: i["z_reversed"],
        "n_bad_files": lambda i: len(i["bad_files"]), "transfer_syntax": lambda i: ";".join(i["transfer_syntaxes"]),
        "has_segmentation": lambda i: i["has_segmentation"], "n_warnings": lambda i: len(i.get("warnings", [])),
    }
    for name, get in col.items():
        studies[name] = [get(infos[u]) for u in studies.StudyInstanceUID]
    ids, labels = [], []
    for uid, f0 in zip(studies.StudyInstanceUID, studies.slice_id_offset):
        lp = lay.work / "studies" / uid / "labels.npy"
        if lp.exists():
            lab = np.load(lp)  # (n, 8) uint8
            ids.append(np.arange(f0, f0 + len(lab), dtype=np.int64))
            labels.append(lab)
    truth = label_frame(np.concatenate(ids) if ids else np.zeros(0, np.int64),
                        np.concatenate(labels) if labels else np.zeros((0, len(L.TARGETS)), np.uint8))
    write_study_table(lay.studies, studies)
    write_slice_table(lay.slices, slices)
    write_label_table(lay.truth, LabelTable(truth, {"source": "truth", "cohorts": ["boxed", "negative"]}))
    ensure_group(lay.volumes)
    for uid, f0 in zip(studies.StudyInstanceUID, studies.slice_id_offset):
        set_attrs(lay.volumes / uid, {"slice_id_offset": int(f0)})


def build_manifest(table: pd.DataFrame, studies: pd.DataFrame, cfg: ShardConfig, shards: list[ShardEntry],
                   infos: dict[str, dict], failed: list[FailedStudy], selection: dict,
                   job_warnings: list[str]) -> Manifest:
    """The manifest of a finished job (written last: its presence means complete)."""
    uids = list(studies.StudyInstanceUID)
    bad = [BadFile(study=u, file=f, reason=r) for u in uids for f, r in infos[u]["bad_files"]]
    warned = [DataWarningEntry(study="", message=m) for m in job_warnings]
    warned += [DataWarningEntry(study=u, message=m) for u in uids for m in infos[u].get("warnings", [])]
    return Manifest(
        created_by=TOOL,
        source=Source(train_csv_rows=int(len(table)), selection=StudySelection(**selection)),
        config=cfg,
        image=ImageSpec(
            size=cfg.image_size, channels=cfg.channels, windows=[list(w) for w in cfg.windows],
            offset_mm=cfg.offset_mm, jpeg_quality=cfg.jpeg_quality, subsampling="4:4:4",
            channel_order=["above", "slice", "below"] if cfg.channels == "neighbours" else "windows"),
        counts=Counts(
            studies=len(uids), slices=int(studies.n_slices.sum()), shards=len(shards),
            failed_studies=len(failed), bad_files=len(bad), warnings=len(warned),
            by_cohort={c: CohortCount(studies=int((studies.cohort == c).sum()),
                                      slices=int(studies.n_slices[studies.cohort == c].sum())) for c in L.COHORTS}),
        shards=shards, failed_studies=failed, bad_files=bad, warnings=warned,
    )


# --------------------------------------------------------------------------- the job


def start_method() -> str:
    """'fork' when this process is single-threaded (workers start at once, nothing is
    imported again), else 'forkserver' (forking a threaded process can copy a held lock)."""
    if "fork" in mp.get_all_start_methods() and threading.active_count() == 1:
        return "fork"
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


@contextlib.contextmanager
def _pool(workers: int):
    """Worker processes (None for one worker; ``preprocess.workers``: a worker's death fails only the
    study that caused it, never hangs the job), closed on exit, terminated on an error."""
    if workers <= 1:
        yield None
        return
    pool = Workers(workers, start_method)
    try:
        yield pool
        pool.close()
    except BaseException:
        pool.terminate()
        raise


class WorkerDied(SpinestreamError):
    """A worker process died while writing shards (not a study's decode: no study to blame)."""


def _study_died(task: StudyTask, how: Died) -> dict:
    """A study whose process died again when run alone: a decoder crashed on its files (bad input: recorded
    under ``_work/failed`` like any other), unless SIGKILL ended it -- the out-of-memory killer or a person,
    not the study: then the job stops and a rerun converts it."""
    lay = L.Layout(Path(task.out))
    if how.killed:
        raise WorkerDied(f"the process converting study {task.uid} was {how} (twice: in the pool, then alone) -- "
                         "the out-of-memory killer? Rerun the same command to resume, with fewer --workers if "
                         "memory is short")
    shutil.rmtree(lay.work / "studies" / f"{task.uid}.tmp", ignore_errors=True)
    reason = (f"the process converting it was {how} (twice: in the pool, then alone): a decoder crashed "
              "on its files")
    atomic_write_json(lay.work / "failed" / f"{task.uid}.json", {"uid": task.uid, "reason": reason})
    return {"uid": task.uid, "n_slices": 0, "error": reason}


def _group_died(task: tuple, how: Died) -> list:
    raise WorkerDied(f"the process writing shard group {task[1]} was {how} (twice: in the pool, then alone); "
                     "rerun the same command to resume")


def staging_dir(lay: L.Layout, worker_index: int | None, num_workers: int | None) -> Path:
    """A run's own temporary directory under ``_work/tmp`` (volumes being written): ``job`` for a
    plain run, ``w<i>-of-<n>`` for job-array worker ``i``. A run cleans only its own at start (what a
    killed run of it left), so workers sharing OUT never delete each other's files."""
    return lay.work / "tmp" / ("job" if worker_index is None else f"w{worker_index}-of-{num_workers}")


def build_tasks(ds: Dataset, table: pd.DataFrame, out: Path, cfg: ShardConfig,
                staging: Path | None = None) -> list[StudyTask]:
    boxes = ds.boxes
    by_study = {u: g for u, g in boxes.groupby("StudyInstanceUID")} if len(boxes) else {}
    staging = staging if staging is not None else staging_dir(L.Layout(out), None, None)
    tasks = []
    for row in table.itertuples(index=False):
        uid = row.StudyInstanceUID
        seg = ds.root / "segmentations" / f"{uid}.nii"
        b = by_study.get(uid)
        tasks.append(StudyTask(
            uid=uid,
            cohort=row.cohort,
            fractured=[k for k, v in enumerate(L.VERTEBRAE, 1) if getattr(row, v) == 1],
            image_dir=str(ds.root / "train_images" / uid),
            seg_path=str(seg) if seg.exists() else None,
            boxes=b[["slice_number", "x", "y", "width", "height"]].to_numpy(float).tolist() if b is not None else [],
            out=str(out),
            cfg=cfg,
            staging=str(staging),
        ))
    return tasks


def job_level_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """DataWarnings of the job's own inputs (train.csv, boxes) for the manifest; others re-emitted."""
    out = []
    for w in caught:
        if issubclass(w.category, DataWarning):
            out.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out


def study_selection(table: pd.DataFrame, limit: int | None) -> dict:
    """Which studies a job converts: part of the job's identity, like its config.

    A ``--limit`` run is a different job from the full one (another dataset), so the
    manifest records the selection and a rerun with another one is refused.
    """
    uids = "\n".join(table.StudyInstanceUID)
    return {"limit": limit, "studies": int(len(table)), "sha256": hashlib.sha256(uids.encode()).hexdigest()}


def _describe(sel: dict) -> str:
    return f"{sel['studies']} studies" + (f" (--limit {sel['limit']})" if sel.get("limit") else " (all)")


def _claim_json(path: Path, obj) -> object | None:
    """Write ``obj`` (as :func:`atomic_write_json` would) to ``path`` unless a file is there already;
    returns None when this call wrote it, else what the file holds.

    Race-safe for job-array workers that start together, on several machines sharing the filesystem:
    the content goes to a temporary file with a unique name (``mkstemp``; a pid is not unique across
    hosts), which is hard-linked to ``path``: the link fails when another run got there first, so one
    content wins and every other run compares itself against it. Where the filesystem has no hard
    links, it falls back to check-then-rename.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write((json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return None
        except FileExistsError:
            pass
        except OSError:  # no hard links on this filesystem (EPERM, ENOTSUP, ...)
            if not path.exists():
                os.replace(tmp, path)
                return None
        return json.loads(path.read_text())
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def check_job(lay: L.Layout, cfg_json: dict, selection: dict) -> Manifest | None:
    """The manifest if ``lay.root`` already holds this very job, complete; None to (re)start it.

    Raises JobError when ``lay.root`` holds another job (another config or study
    selection), complete or interrupted. Safe when job-array workers of one job start at the same
    time on the same ``--out``: the first to record the job's config and selection in ``_work``
    wins (:func:`_claim_json`) and a worker with another config is still refused.
    """
    out = lay.root
    if lay.manifest.exists():
        try:
            m = read_manifest(out)
        except ManifestError as e:
            raise JobError(f"{out} holds a shard set this version cannot read ({e}); use another --out "
                           f"or delete it") from e
        if to_dict(m.config) != cfg_json:
            raise JobError(f"{out} already holds shards made with another config; use another --out or delete it")
        held = dataclasses.asdict(m.source.selection)
        if held != selection:
            raise JobError(
                f"{out} holds a complete job over {_describe(held)}; "
                f"this command selects {_describe(selection)}. A limited run is another dataset and is not "
                f"extended in place: use another --out (or delete {out}) for this one, or rerun with the "
                f"same --limit to reuse it")
        return m
    held = _claim_json(lay.work / "config.json", cfg_json)
    if held is not None and held != cfg_json:
        raise JobError(f"{out} holds an interrupted job with another config; rerun with that config, "
                       f"or delete {out} to start over")
    held = _claim_json(lay.work / "selection.json", selection)
    if held is not None and held != selection:
        raise JobError(f"{out} holds an interrupted job over {_describe(held)}; this command selects "
                       f"{_describe(selection)}. Rerun with that --limit to finish it, or delete {out} to start over")
    return None


@dataclass
class Job:
    """What every run of a job opens first: the dataset, its study table and whether OUT holds it complete."""

    lay: L.Layout
    ds: Dataset
    table: pd.DataFrame
    job_warnings: list[str]
    done: Manifest | None


def open_job(data: Path, out: Path, cfg: ShardConfig, limit: int | None) -> Job:
    """Open the dataset, build the study table (``--limit`` applied) and check OUT's job (:func:`check_job`)."""
    if limit is not None and limit < 1:
        raise JobError(f"--limit must be >= 1, got {limit}")
    lay = L.Layout(out)
    ds = Dataset.open(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        table = build_study_table(ds.train, ds.boxes, folds=cfg.folds, seed=cfg.seed, exclude=cfg.exclude_studies)
    job_warnings = job_level_warnings(caught)
    if limit:
        table = table.iloc[:limit].reset_index(drop=True)
    done = check_job(lay, to_dict(cfg), study_selection(table, limit))
    return Job(lay, ds, table, job_warnings, done)


def _committed(lay: L.Layout, uid: str) -> bool:
    return (lay.work / "studies" / uid / "study.json").exists()


def convert_studies(todo: list[StudyTask], pool) -> tuple[int, list[dict]]:
    """Phase 1 over ``todo`` (in ``pool`` when there is one) -> (slices converted, failures)."""
    t0, n_slices, errors = time.perf_counter(), 0, []
    with progress.bar(total=len(todo), desc="studies", unit="study") as bar:
        results = pool.imap_unordered(process_study, todo, died=_study_died) if pool else map(process_study, todo)
        for res in results:
            n_slices += res["n_slices"]
            if "error" in res:
                errors.append(res)
                progress.write(f"  failed {res['uid']}: {res['error']}", file=sys.stderr)
            dt = time.perf_counter() - t0
            bar.set_postfix(slices=n_slices, slices_s=f"{n_slices / dt:.0f}" if dt > 0 else "-")
            bar.update()
    return n_slices, errors


def _print_done(manifest: Manifest, out: Path, timing: str) -> None:
    c = manifest.counts
    print(f"done: {c.studies} studies, {c.slices} slices, {c.shards} shards, {c.failed_studies} failed "
          f"studies, {c.bad_files} bad files, {c.warnings} data warnings (manifest.json) -> {out} ({timing})",
          file=sys.stderr)


def shard_dataset(data: Path, out: Path, cfg: ShardConfig, *, workers: int, keep_work: bool = False,
        limit: int | None = None) -> Manifest:
    """The whole job; resumes from ``out/_work`` if an earlier run was interrupted (or job-array
    workers committed some studies: it converts the rest).

    ``limit`` converts only the first N studies (by UID): another job, whose output is
    refused as the output of the full one and vice versa (:func:`check_job`).
    """
    job = open_job(data, out, cfg, limit)
    lay = job.lay
    if job.done is not None:
        if not keep_work:
            shutil.rmtree(lay.work, ignore_errors=True)  # what a kill during the last clean-up left
        print(f"{out}: already complete ({job.done.counts.slices} slices in {job.done.counts.shards} shards)")
        return job.done
    staging = staging_dir(lay, None, None)
    tasks = build_tasks(job.ds, job.table, out, cfg, staging)
    todo = [t for t in tasks if not _committed(lay, t.uid)]
    shutil.rmtree(staging, ignore_errors=True)  # half-written volumes from a killed run
    lay.volumes.mkdir(parents=True, exist_ok=True)
    print(f"spinestream shard: {len(tasks)} studies ({len(tasks) - len(todo)} already done), "
          f"{workers} worker(s), {cfg.image_size}px {cfg.channels} -> {out}", file=sys.stderr)

    t0 = time.perf_counter()
    # one pool for both phases: starting workers costs as much as converting a few studies
    with _pool(workers) as pool:
        convert_studies(todo, pool)
        t1 = time.perf_counter()
        manifest = finalize(out, job.table, cfg, pool, limit, job.job_warnings)
    t2 = time.perf_counter()
    if not keep_work:
        shutil.rmtree(lay.work, ignore_errors=True)
    _print_done(manifest, out, f"studies {t1 - t0:.1f}s, groups and tables {t2 - t1:.1f}s")
    return manifest


# --------------------------------------------------------------------------- the job as an array of workers


def worker_of(uid: str, num_workers: int) -> int:
    """The job-array worker that converts study ``uid``: the sha1 of the UID string, as an integer,
    modulo ``num_workers`` (stable across machines, runs and Python versions, unlike ``hash``)."""
    return int(hashlib.sha1(uid.encode()).hexdigest(), 16) % num_workers


def check_array_args(worker_index: int | None, num_workers: int | None, merge: bool) -> None:
    """JobError (one line, saying what to do) for a misuse of ``--worker-index/--num-workers/--merge``."""
    if merge and (worker_index is not None or num_workers is not None):
        raise JobError("--merge runs once, after every worker: give it the workers' --data, --out and config "
                       "but not --worker-index/--num-workers")
    if worker_index is None and num_workers is None:
        return
    if worker_index is None or num_workers is None:
        given, needed = ("--worker-index", "--num-workers")
        if worker_index is None:
            given, needed = needed, given
        raise JobError(f"{given} needs {needed}: a job-array worker is --worker-index I --num-workers N "
                       f"(0 <= I < N, N the same for every worker)")
    if num_workers < 1:
        raise JobError(f"--num-workers must be >= 1, got {num_workers}")
    if not 0 <= worker_index < num_workers:
        raise JobError(f"--worker-index must be 0..{num_workers - 1} for --num-workers {num_workers}, "
                       f"got {worker_index}")


def worker_record(lay: L.Layout, worker_index: int, num_workers: int) -> Path:
    """``_work/workers/w<i>-of-<n>.json``: where and when worker ``i`` ran and whether it finished (for
    :func:`merge_job`'s message naming the workers to rerun)."""
    return lay.work / "workers" / f"w{worker_index}-of-{num_workers}.json"


@dataclass
class WorkerReport:
    """What one job-array worker did (:func:`shard_worker`)."""

    worker_index: int
    num_workers: int
    studies: int
    """This worker's share of the selection."""
    already_done: int
    """Of them, committed before this run (a rerun resumes)."""
    converted: int
    failed: int
    """Bad input, recorded under ``_work/failed`` and listed by the merge's manifest."""
    slices: int
    seconds: float
    complete: bool = False
    """The job was already merged (OUT holds its manifest): nothing done."""


def shard_worker(data: Path, out: Path, cfg: ShardConfig, *, worker_index: int, num_workers: int,
                 workers: int = 1, limit: int | None = None) -> WorkerReport:
    """Job-array worker ``worker_index`` of ``num_workers``: phase 1 for its share of the studies
    (:func:`worker_of`) into OUT's ``_work``, beside the other workers, which may run at the same time on
    other machines. Resumable on its own; writes no shards (:func:`merge_job` does, once all are done)."""
    check_array_args(worker_index, num_workers, merge=False)
    job = open_job(data, out, cfg, limit)
    lay = job.lay
    staging = staging_dir(lay, worker_index, num_workers)
    tasks = build_tasks(job.ds, job.table, out, cfg, staging)
    mine = [t for t in tasks if worker_of(t.uid, num_workers) == worker_index]
    who = f"worker {worker_index} of {num_workers}"
    if job.done is not None:
        print(f"{out}: already complete (merged); {who} has nothing to do")
        return WorkerReport(worker_index, num_workers, len(mine), len(mine), 0, 0, 0, 0.0, complete=True)
    todo = [t for t in mine if not _committed(lay, t.uid)]
    shutil.rmtree(staging, ignore_errors=True)  # what a killed run of this worker left; never another's
    lay.volumes.mkdir(parents=True, exist_ok=True)
    record = {"worker_index": worker_index, "num_workers": num_workers, "studies": len(mine),
              "host": socket.gethostname(), "pid": os.getpid(), "finished": False}
    atomic_write_json(worker_record(lay, worker_index, num_workers), record)
    print(f"spinestream shard: {who}: {len(mine)} of {len(tasks)} studies ({len(mine) - len(todo)} already "
          f"done), {workers} process(es), {cfg.image_size}px {cfg.channels} -> {out}", file=sys.stderr)
    t0 = time.perf_counter()
    with _pool(workers) as pool:
        n_slices, errors = convert_studies(todo, pool)
    report = WorkerReport(worker_index, num_workers, len(mine), len(mine) - len(todo), len(todo) - len(errors),
                          len(errors), n_slices, time.perf_counter() - t0)
    atomic_write_json(worker_record(lay, worker_index, num_workers),
                      {**record, "finished": True, **dataclasses.asdict(report)})
    print(f"{who} done: {report.converted} studies converted ({n_slices} slices, {report.seconds:.1f}s), "
          f"{report.failed} failed, {report.already_done} already done. When all {num_workers} workers are done, "
          f"run the same command with --merge instead of --worker-index/--num-workers", file=sys.stderr)
    return report


def missing_studies(lay: L.Layout, table: pd.DataFrame) -> list[str]:
    """Studies of the selection neither committed nor recorded as failed: a worker did not run or finish."""
    return [u for u in table.StudyInstanceUID
            if not _committed(lay, u) and not (lay.work / "failed" / f"{u}.json").exists()]


def _missing_message(lay: L.Layout, missing: list[str], total: int, show: int = 20) -> str:
    """One line: how many studies are missing, which workers to rerun (from their records), the first UIDs."""
    records = []
    for p in sorted((lay.work / "workers").glob("w*-of-*.json")):
        with contextlib.suppress(OSError, ValueError):
            records.append(json.loads(p.read_text()))
    ns = sorted({int(r["num_workers"]) for r in records})
    head = (f"--merge: {len(missing)} of {total} studies are neither converted nor recorded as failed, "
            f"so a worker of the job array is missing or unfinished")
    if not ns:
        what = (f"; no worker ran on this --out ({lay.work / 'workers'} is empty): run the workers "
                f"(--worker-index I --num-workers N) first, or run without --merge to convert them here")
        who = {u: "" for u in missing}
    else:
        state = {(int(r["num_workers"]), int(r["worker_index"])): r for r in records}
        parts = []
        for n in ns:
            idx = sorted({worker_of(u, n) for u in missing})
            desc = []
            for i in idx:
                r = state.get((n, i))
                how = ("never started" if r is None else "finished" if r.get("finished")
                       else f"started on {r.get('host')}, not finished")
                desc.append(f"{i} ({how})")
            parts.append(f"--worker-index {', '.join(desc)} of --num-workers {n}")
        what = (f": rerun {'; '.join(parts)} with the same --data, --out and config, then --merge again "
                f"(or run without --merge to convert them in one process)")
        who = {u: " (worker " + ", ".join(f"{worker_of(u, n)}/{n}" for n in ns) + ")" for u in missing}
    listed = ", ".join(f"{u}{who[u]}" for u in missing[:show])
    more = f" and {len(missing) - show} more" if len(missing) > show else ""
    return f"{head}{what}. Missing: {listed}{more}"


def merge_job(data: Path, out: Path, cfg: ShardConfig, *, workers: int, keep_work: bool = False,
              limit: int | None = None) -> Manifest:
    """``--merge``: the group phase (:func:`finalize`) over the studies the job-array workers committed,
    once every study of the selection is there exactly once (committed, or failed with its reason);
    then ``_work`` is removed unless ``keep_work``. The result is byte-identical to one plain
    :func:`shard_dataset` run of the same data and config. A JobError naming the missing studies
    and their workers (and no manifest) when a worker did not run or finish."""
    job = open_job(data, out, cfg, limit)
    lay = job.lay
    if job.done is not None:
        print(f"{out}: already complete ({job.done.counts.slices} slices in {job.done.counts.shards} shards)")
        return job.done
    missing = missing_studies(lay, job.table)
    if missing:
        raise JobError(_missing_message(lay, missing, len(job.table)))
    n_failed = sum(not _committed(lay, u) for u in job.table.StudyInstanceUID)
    print(f"spinestream shard --merge: {len(job.table)} studies ({n_failed} failed) from the workers, "
          f"{workers} process(es) -> {out}", file=sys.stderr)
    t0 = time.perf_counter()
    with _pool(workers) as pool:
        manifest = finalize(out, job.table, cfg, pool, limit, job.job_warnings)
    t1 = time.perf_counter()
    if not keep_work:
        shutil.rmtree(lay.work, ignore_errors=True)
    _print_done(manifest, out, f"merge: groups and tables {t1 - t0:.1f}s")
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spinestream shard",
        description="Convert a dataset in the Kaggle RSNA 2022 layout into windowed uint8 WebDataset shards "
                    "(2.5D JPEG, DALI .idx files) and Zarr volumes. Resumable: rerun the same command after "
                    "a crash or kill and it finishes the job without redoing committed studies. As a job "
                    "array (several machines or processes): run --worker-index I --num-workers N for I = 0..N-1, "
                    "all with the same --data, --out and config, then --merge once they are all done.",
        epilog=config_fields_help(ShardConfig), formatter_class=HelpFormatter,
    )
    p.add_argument("--data", type=Path, help="dataset directory (train.csv, train_images/, ...)")
    p.add_argument("--out", type=Path, help="output directory")
    p.add_argument("-c", "--config", type=Path, default=None,
                   help="shard config: a shipped one's name (shard) or a YAML file (default: built-in = -c shard)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="parallel processes (of this run; in a job array, per worker: e.g. $SLURM_CPUS_PER_TASK)")
    p.add_argument("--keep-work", action="store_true",
                   help="keep OUT/_work (per-study staging) after success (a plain run or --merge)")
    p.add_argument("--limit", type=int, default=None, help="only the first N studies (by UID), for a trial run")
    arr = p.add_argument_group(
        "job array", "Split the per-study phase over N workers that share --out (on one machine or several, "
                     "at the same time or not); each is resumable on its own. --merge comes last, once.")
    arr.add_argument("--worker-index", type=int, default=None, metavar="I",
                     help="be worker I (0..N-1) of a job array: convert only the studies with "
                          "sha1(StudyInstanceUID) %% N == I into --out's _work, write no shards, and say to --merge; "
                          "needs --num-workers")
    arr.add_argument("--num-workers", type=int, default=None, metavar="N",
                     help="how many workers the job array has (the same N for every worker)")
    arr.add_argument("--merge", action="store_true",
                     help="after every worker is done: check that each study was converted or failed (else name "
                          "the missing ones and their workers), then write the shards, tables and manifest "
                          "(byte-identical to one plain run) and remove _work; same --data, --out, config, --limit")
    add_print_config(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(ShardConfig, args.config, args.set)
    if args.print_config:
        print_config(cfg)
        return 0
    if args.data is None or args.out is None:
        build_parser().error("--data and --out are required (only --print-config runs without them)")
    # what the user can fix raises a SpinestreamError (one line from the console script); a bug keeps its traceback
    check_array_args(args.worker_index, args.num_workers, args.merge)
    workers = max(1, args.workers)
    if args.merge:
        merge_job(args.data, args.out, cfg, workers=workers, keep_work=args.keep_work, limit=args.limit)
    elif args.worker_index is not None:
        shard_worker(args.data, args.out, cfg, worker_index=args.worker_index, num_workers=args.num_workers,
                     workers=workers, limit=args.limit)
    else:
        shard_dataset(args.data, args.out, cfg, workers=workers, keep_work=args.keep_work, limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
