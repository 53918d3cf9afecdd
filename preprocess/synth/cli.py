"""``spinestream synth``: the flags are :class:`SynthConfig`'s fields, their help its docstrings."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path

from spinestream.shards.config import ConfigError, HelpFormatter, add_print_config, field_docs, plain, print_config

from .config import SYNTAXES, SynthConfig
from .dataset import make_dataset

CHOICES = {"syntax": ["mixed", *SYNTAXES]}
METAVARS = {"slices": "LO:HI", "crack_width": "LO:HI", "boxed_share": "F"}


def _range_arg(cast: type, what: str):
    """An argparse type for ``LO:HI`` (or a single ``N``, meaning N:N) of ``cast`` values."""

    def parse(text: str) -> tuple:
        try:
            lo, _, hi = text.partition(":")
            return cast(lo), cast(hi or lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    return parse


slices_arg = _range_arg(int, "LO:HI slice counts (e.g. 48:96)")
mm_range_arg = _range_arg(float, "a LO:HI range in mm (e.g. 1.2:2.0)")


def _arg_type(tp: typing.Any):
    """The argparse ``type`` of a SynthConfig annotation: int, float (also ``float | None``), str or a
    ``LO:HI`` pair."""
    if tp == tuple[int, int]:
        return slices_arg
    if tp == tuple[float, float]:
        return mm_range_arg
    if tp in (int, float, str):
        return tp
    if tp == float | None:
        return float
    raise AssertionError(f"no command-line form for SynthConfig type {tp}")  # a new field needs one


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One ``--flag`` per SynthConfig field (``test_studies`` -> ``--test-studies``), help = its docstring."""
    hints, docs = typing.get_type_hints(SynthConfig), field_docs(SynthConfig)
    group = p.add_argument_group("dataset (SynthConfig; the same values give byte-identical files)")
    for f in dataclasses.fields(SynthConfig):
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_arg_type(hints[f.name]),
                           default=f.default, choices=CHOICES.get(f.name), metavar=METAVARS.get(f.name),
                           help=plain(docs[f.name]).replace("%", "%%"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spinestream synth",
        description=(
            "Write a synthetic CT dataset in the RSNA 2022 cervical-spine Kaggle layout "
            "(train.csv, train_bounding_boxes.csv, train_images/<uid>/<n>.dcm, segmentations/, "
            "test_images/, test.csv, sample_submission.csv). Neck phantoms with seven vertebrae; "
            "fractures are thin dark cracks. Deterministic: the same arguments give "
            "byte-identical files. A SYNTH_COMPLETE file is written last; without it the "
            "directory is an interrupted run."
        ),
        epilog="example: spinestream synth --out demo-data/dataset --studies 24 --seed 0 --size 256",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", type=Path, default=None, help="dataset directory (must be empty or new); required")
    add_config_arguments(p)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="parallel processes; the output does not depend on it (default: min(4, CPUs))")
    p.add_argument("--force", action="store_true", help="replace the dataset files in a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_print_config(p)
    return p


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    """The SynthConfig the parsed flags describe (ConfigError when a value is out of range, as from a YAML)."""
    try:
        return SynthConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig)})
    except ValueError as e:  # __post_init__'s check of one flag: the user's to fix, like load_config's errors
        raise ConfigError(str(e)) from e


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if args.print_config:
        print_config(cfg)
        return 0
    if args.out is None:
        parser.error("the following arguments are required: --out")
    summary = make_dataset(args.out, cfg, workers=args.workers, force=args.force, progress=not args.quiet)
    cohorts = ", ".join(f"{v} {k}" for k, v in summary["cohorts"].items())
    syntaxes = ", ".join(f"{k} {v}" for k, v in summary["files_per_syntax"].items())
    mb = sum(summary["bytes_per_syntax"].values()) / 1e6
    print(
        f"synth: {cfg.studies} train studies ({cohorts}) + {summary['test_studies']} test, "
        f"{summary['files']} files ({syntaxes}), {mb:.1f} MB, {summary['box_rows']} boxes, "
        f"{summary['segmentations']} segmentations -> {summary['out']} in {summary['seconds']:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
