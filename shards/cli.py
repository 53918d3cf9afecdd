"""The ``spinestream`` console script: one verb per job.

The table below names each verb's module by string and imports it only when that verb
runs, so the storage layer (``shards``) never imports ``preprocess`` or ``engine`` and
``spinestream --help`` stays fast.
"""
from __future__ import annotations

import importlib
import sys

VERBS: dict[str, tuple[str, str]] = {
    "synth": ("preprocess.synth", "write a synthetic dataset in the Kaggle layout"),
    "shard": ("preprocess.convert", "DICOM studies -> WebDataset shards + Zarr volumes (resumable)"),
    "verify": ("shards.verify", "check every shard against the manifest"),
    "train": ("engine.train", "train the slice classifier (round 1 / round 2), resumable"),
    "evaluate": ("engine.evaluate", "study-level metric, per-vertebra report and heat maps of a run"),
    "bench": ("benchmarks.cli", "run a benchmark suite (shard, loader, train)"),
    "demo": ("shards.demo", "the main job on the embedded synthetic default"),
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: spinestream <verb> [options]   (spinestream <verb> --help for each)", "", "verbs:"]
    lines += [f"  {v.ljust(width)}  {desc}" for v, (_, desc) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"spinestream: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
