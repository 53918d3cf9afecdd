"""``spinestream bench <suite>``: named benchmark suites. Each prints its figures and saves
them as JSON (and a PNG chart) under ``benchmarks/results/``."""
from __future__ import annotations

import importlib
import sys

SUITES = {
    "shard": ("spinestream.benchmarks.shard", "DICOM -> shards throughput vs the naive PNG way and the decode+encode floor"),
    "loader": ("spinestream.benchmarks.loader", "images/s into the training loop: dicom baseline, torch, DALI, decode-only"),
    "train": ("spinestream.benchmarks.train", "model-only vs through-the-loader training images/s (saturation), auto batch"),
    "predict": ("spinestream.benchmarks.predict", "test DICOM -> submission: studies/min per syntax, 1,500-study projection"),
    "decode": ("spinestream.benchmarks.decode", "DICOM decode per transfer syntax: spinestream vs each library alone (the floor)"),
    "infer": ("spinestream.benchmarks.infer", "study inference slices/s from Zarr vs the model alone (saturation), peak memory"),
    "reliability": ("spinestream.benchmarks.reliability", "every verb killed (SIGKILL, torn writes) and fed a full disk, then rerun: "
                    "the clean result, nothing lost"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: spinestream bench <suite> [options]\n\nsuites:")
        for name, (_, desc) in SUITES.items():
            print(f"  {name:11s} {desc}")
        return 0
    if argv[0] not in SUITES:
        print(f"spinestream bench: unknown suite {argv[0]!r} (known: {', '.join(SUITES)})", file=sys.stderr)
        return 2
    return int(importlib.import_module(SUITES[argv[0]][0]).main(argv[1:]) or 0)
