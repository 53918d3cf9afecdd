"""Dataset assembly: every study's files, then the CSV tables, then ``SYNTH_COMPLETE``.

:func:`make_dataset` writes a dataset in Kaggle's layout from a :class:`SynthConfig` (or its
fields as keywords); studies render in parallel processes and the result does not depend on
how many.
"""
from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from spinestream import SpinestreamError

from .config import SynthConfig
from .dicom_io import _StudyResult, write_study
from .spec import PREDICTION_TYPES, VERTEBRAE, StudySpec, study_specs

COMPLETE_MARKER = "SYNTH_COMPLETE"

LAYOUT = (
    "train.csv",
    "train_bounding_boxes.csv",
    "train_images",
    "segmentations",
    "test_images",
    "test.csv",
    "sample_submission.csv",
    COMPLETE_MARKER,
)


class OutputExists(SpinestreamError, FileExistsError):
    """--out holds something this tool must not overwrite without --force (the message says what)."""


def _prepare(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExists(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            state = "a complete synthetic dataset" if (out / COMPLETE_MARKER).exists() else "files"
            raise OutputExists(
                f"{out} is not empty (it holds {state}); choose an empty or new directory, "
                "or pass --force to replace the dataset there"
            )
        # remove only what this tool writes: --force on the wrong directory must not wipe it
        for name in LAYOUT:
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)




def make_dataset(
    out: str | Path,
    config: SynthConfig | None = None,
    *,
    workers: int = 1,
    force: bool = False,
    progress: bool = False,
    **fields: Any,
) -> dict[str, Any]:
    """Write a synthetic dataset in Kaggle's layout under ``out`` (see the package doc).

    The dataset is ``config``, or :class:`SynthConfig` built from ``fields`` (``studies=10,
    seed=3, size=64, ...``). ``workers`` processes render studies in parallel (the output does
    not depend on it). Raises ``FileExistsError`` if ``out`` is not empty, unless ``force``.
    Returns a summary: studies per cohort, file counts and bytes per syntax, box rows,
    segmentations.
    """
    t0 = time.perf_counter()
    cfg = SynthConfig.of(config, **fields)
    specs = study_specs(cfg)
    out = Path(out)
    _prepare(out, force)
    for sub in ("train_images", "test_images", "segmentations"):
        (out / sub).mkdir()
    results = _write_studies(specs, out, workers, progress)
    box_rows = _write_tables(specs, results, out)
    summary = _summary(cfg, specs, results, box_rows)
    # the marker goes last: its presence is what "this dataset is complete" means
    marker = out / COMPLETE_MARKER
    tmp = out / (COMPLETE_MARKER + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    tmp.replace(marker)
    return {"out": str(out), **summary, "seconds": round(time.perf_counter() - t0, 2)}


def _write_studies(specs: list[StudySpec], out: Path, workers: int, progress: bool) -> dict[str, _StudyResult]:
    results: dict[str, _StudyResult] = {}
    bar = None
    if progress:
        from spinestream.shards.progress import bar as progress_bar

        bar = progress_bar(total=len(specs), unit="study", desc="synth")
    try:
        if workers <= 1:
            for spec in specs:
                results[spec.uid] = write_study(spec, out)
                if bar is not None:
                    bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(write_study, spec, out) for spec in specs]
                for fut in as_completed(futures):
                    r = fut.result()
                    results[r.uid] = r
                    if bar is not None:
                        bar.update()
    finally:
        if bar is not None:
            bar.close()
    return results


def _write_tables(specs: list[StudySpec], results: dict[str, _StudyResult], out: Path) -> int:
    """train.csv, train_bounding_boxes.csv, test.csv and sample_submission.csv; returns the box rows."""
    import pandas as pd

    train = [s for s in specs if s.split == "train"]
    test = [s for s in specs if s.split == "test"]
    pd.DataFrame(
        [{"StudyInstanceUID": s.uid, **s.labels} for s in train],
        columns=["StudyInstanceUID", "patient_overall", *VERTEBRAE],
    ).to_csv(out / "train.csv", index=False)
    boxes = [b for s in train for b in results[s.uid].boxes]
    box_df = pd.DataFrame(boxes, columns=["StudyInstanceUID", "x", "y", "width", "height", "slice_number"])
    box_df = box_df.astype({"x": float, "y": float, "width": float, "height": float, "slice_number": int})
    box_df.to_csv(out / "train_bounding_boxes.csv", index=False)
    rows = [(f"{s.uid}_{p}", s.uid, p) for s in test for p in PREDICTION_TYPES]
    test_df = pd.DataFrame(rows, columns=["row_id", "StudyInstanceUID", "prediction_type"])
    test_df.to_csv(out / "test.csv", index=False)
    pd.DataFrame({"row_id": [r[0] for r in rows], "fractured": [0.5] * len(rows)}).to_csv(
        out / "sample_submission.csv", index=False
    )
    return len(boxes)


def _summary(cfg: SynthConfig, specs: list[StudySpec], results: dict[str, _StudyResult], box_rows: int) -> dict:
    """``SYNTH_COMPLETE``'s content: the config's params and what was written."""
    files_per_syntax: Counter = Counter()
    bytes_per_syntax: Counter = Counter()
    for s in specs:
        files_per_syntax[s.syntax] += results[s.uid].files
        bytes_per_syntax[s.syntax] += results[s.uid].nbytes
    return {
        "params": cfg.params(),
        "cohorts": dict(sorted(Counter(s.cohort for s in specs if s.split == "train").items())),
        "test_studies": sum(s.split == "test" for s in specs),
        "files": sum(r.files for r in results.values()),
        "files_per_syntax": dict(sorted(files_per_syntax.items())),
        "bytes_per_syntax": dict(sorted(bytes_per_syntax.items())),
        "box_rows": box_rows,
        "segmentations": sum(s.has_segmentation for s in specs),
        "reversed": sum(s.reversed for s in specs),
    }
