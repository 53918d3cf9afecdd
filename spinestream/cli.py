"""The ``spinestream`` console script: one verb per job (``python -m spinestream.cli`` too).

The table below names each verb's module by string and imports it only when that verb
runs, so ``spinestream --help`` stays fast and a verb's dependencies load only for it.

One error policy for every verb: an error the project raises on purpose (a
:class:`~spinestream.SpinestreamError`: a bad config, bad input, a run or shard set in a state the verb
cannot use, a full disk) is printed here as one line, ``spinestream <verb>: <message>``, with exit status 2,
and so is an OSError of a full or read-only file system that no writer turned into a WriteError; anything
else (a torch bug, an out-of-memory) is not caught and keeps its traceback. Verbs do not catch errors
themselves, so ``spinestream run``, which calls them in this process through :func:`main`, gets the same
one line and status from a stage that fails.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from . import SpinestreamError

VERBS: dict[str, tuple[str, str]] = {
    "synth": ("spinestream.preprocess.synth.cli", "write a synthetic dataset in the Kaggle layout"),
    "shard": ("spinestream.preprocess.convert", "DICOM studies -> WebDataset shards + Zarr volumes (resumable)"),
    "verify": ("spinestream.shards.verify", "check every shard against the manifest"),
    "train": ("spinestream.engine.train", "train the slice classifier (round 1 / round 2), resumable"),
    "evaluate": ("spinestream.engine.evaluate", "study-level metric, per-vertebra report and heat maps of a run"),
    "compare": ("spinestream.engine.compare", "two evaluations on the same studies: loss difference and its bootstrap interval"),
    "pseudo-label": ("spinestream.engine.pseudo", "round-1 model over the positive-unboxed studies -> a pseudo-label table"),
    "synth-truth": ("spinestream.preprocess.synth_truth", "where the synthetic cracks are, per slice (to measure pseudo-labels)"),
    "bench": ("spinestream.benchmarks.cli", "run a benchmark suite (shard, loader, train, infer, predict, reliability)"),
    "run": ("spinestream.run", "the whole pipeline, stage by stage, resumable (shard -> ... -> report)"),
    "demo": ("spinestream.demo", "the main job on the embedded synthetic default"),
    "predict": ("spinestream.predict", "test DICOM studies -> Kaggle submission.csv (one run or an ensemble)"),
    "kaggle-bundle": ("spinestream.bundle", "a folder to upload as a Kaggle dataset: wheels + runs, for offline predict"),
    "configs": ("spinestream.shipped", "the shipped configs (-c NAME): list, show, copy out to edit"),
}


def version() -> str:
    """``spinestream X.Y.Z``: pyproject.toml reads the version from ``spinestream.__version__``."""
    from . import __version__

    return f"spinestream {__version__}"


def usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: spinestream [--version] <verb> [options]   (spinestream <verb> --help for each)", "",
             "verbs:"]
    lines += [f"  {v.ljust(width)}  {desc}" for v, (_, desc) in VERBS.items()]
    lines += ["", "every verb also takes --no-progress (no progress bars; off a terminal they redraw at most every 30 s).",
              "A refused input or state is one line on stderr and exit status 2; anything else keeps its traceback."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(version())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"spinestream: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if "--no-progress" in rest:  # every verb: no progress bar anywhere (predict also keeps its own flag)
        from spinestream.shards.progress import set_enabled

        set_enabled(False)
        rest = [a for a in rest if a != "--no-progress"] if verb != "predict" else rest
    return run_verb(verb, importlib.import_module(VERBS[verb][0]).main, rest)


def run_verb(verb: str, verb_main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """``verb_main(argv)``'s exit status under the error policy (the module doc): a SpinestreamError is one line
    on stderr and status 2; anything else propagates with its traceback."""
    try:
        return int(verb_main(argv) or 0)
    except SpinestreamError as e:
        print(f"spinestream {verb}: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only disk that no writer named (its writers raise a WriteError)
        from spinestream.shards.fsutil import NO_SPACE, WriteError

        if e.errno not in NO_SPACE:
            raise
        print(f"spinestream {verb}: {one_line(WriteError.of(e.filename or 'its output', e))}", file=sys.stderr)
        return 2
    finally:
        dist = sys.modules.get("spinestream.engine.dist")  # a verb run under torchrun leaves its process group
        if dist is not None:
            dist.shutdown()


def one_line(e: BaseException) -> str:
    """The error's message on one line (a message that lists several problems keeps them, joined by '; ')."""
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
