"""Where the synthetic cracks really are, as a slice truth table of a shard set.

The synthetic generator knows every crack, also in the studies without boxes, so the
quality of pseudo-labels (and of any slice classifier) is a measured number on synthetic
data. The specs are regenerated from the parameters recorded in the raw directory's
``SYNTH_COMPLETE`` marker (no pixels are rendered) and mapped to ``slice_id`` through the
shard set's ``slices.parquet`` (study + file number)::

    python -m spinestream.preprocess.synth_truth --raw demo-data/dataset --shards demo-data/shards --out crack-truth.parquet
    spinestream pseudo-label --run demo-data/runs/demo-round1 --truth crack-truth.parquet

A slice is positive for vertebra v when v's crack is drawn on it; ``any`` is the max of
C1..C7. Every sharded training slice gets a row (all cohorts).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from spinestream import InputError, MissingInput
from spinestream.shards.layout import Layout
from spinestream.shards.tables import LabelTable, label_frame, read_slice_table, write_label_table

MARKER = "SYNTH_COMPLETE"  # preprocess.synth's completion marker (its JSON holds the generator's parameters)


def synth_params(raw_dir: str | Path) -> dict:
    """The ``study_specs`` keyword arguments recorded in ``raw_dir/SYNTH_COMPLETE``."""
    path = Path(raw_dir) / MARKER
    if not path.is_file():
        raise MissingInput(f"{path} does not exist: {raw_dir} is not a finished synthetic dataset "
                           f"(only synthetic data has crack truth)")
    params = dict(json.loads(path.read_text())["params"])
    for key in ("slices", "crack_width"):  # tuples in the signature, lists in JSON
        if params.get(key) is not None:
            params[key] = tuple(params[key])
    return params


def crack_truth(raw_dir: str | Path, shards_root: str | Path) -> pd.DataFrame:
    """``DataFrame(slice_id, C1..C7, any)`` (uint8) for every slice of ``shards_root`` from a synthetic study."""
    from spinestream.preprocess.synth import study_specs

    params = synth_params(raw_dir)
    studies = params.pop("studies")
    seed = params.pop("seed")
    specs = {s.uid: s for s in study_specs(studies, seed, **params) if s.split == "train"}
    slices = read_slice_table(Layout(Path(shards_root)).slices,
                              columns=["slice_id", "StudyInstanceUID", "slice_number"])
    unknown = sorted(set(slices.StudyInstanceUID) - set(specs))
    if unknown:
        raise InputError(f"{shards_root} holds studies the dataset in {raw_dir} does not generate "
                         f"({unknown[:3]}...): shards of another dataset?")
    y = np.zeros((len(slices), 7), np.uint8)
    for uid, rows in slices.groupby("StudyInstanceUID").indices.items():
        numbers = slices.slice_number.to_numpy()[rows]
        for v, files in specs[uid].cracked_files.items():
            y[rows, v - 1] = np.isin(numbers, files)
    out = label_frame(slices.slice_id.to_numpy(np.int64), np.concatenate([y, y.max(axis=1, keepdims=True)], axis=1))
    return out.sort_values("slice_id", ignore_index=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spinestream.preprocess.synth_truth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", type=Path, required=True, help="the synthetic dataset (spinestream synth --out)")
    p.add_argument("--shards", type=Path, required=True, help="its shard set (spinestream shard --out)")
    p.add_argument("--out", type=Path, required=True, help="parquet file to write")
    args = p.parse_args(argv)
    df = crack_truth(args.raw, args.shards)
    write_label_table(args.out, LabelTable(df, {"source": "synthetic crack truth"}))
    print(f"{len(df)} slices, {int(df['any'].sum())} cracked -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
