"""``spinestream configs``: the configs that ship with spinestream, which every ``-c`` takes by name.

    spinestream configs                                  # list them, one line each
    spinestream configs show round1                      # print one (what -c round1 loads)
    spinestream configs copy pipeline round1 round2 --to my-configs   # copy them out to edit
    spinestream configs copy --all --to my-configs
    spinestream run -c my-configs/pipeline.yaml --out /data/spine      # the edited copy

A copy's relative paths are then relative to the copy's own directory (so set a copied pipeline's
``shard.data`` to the dataset's absolute path), and a stage's ``config: round1``
finds ``round1.yaml`` beside it before the shipped one, so a copied set refers to itself. An existing file
is never overwritten without ``--force``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spinestream.shards.config import SHIPPED_DIR, HelpFormatter, plain, shipped_configs
from spinestream.shards.fsutil import atomic_write_bytes

from . import InputError


def describe(path: Path) -> str:
    """A config's one-line description: its first comment line."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def pick(names: list[str]) -> dict[str, Path]:
    """Name -> file of the shipped configs ``names``; InputError naming the unknown ones and the shipped ones."""
    shipped = shipped_configs()
    unknown = [n for n in names if n not in shipped]
    if unknown:
        raise InputError(f"no shipped config named {', '.join(unknown)} (shipped: {', '.join(shipped)})")
    return {n: shipped[n] for n in names}


def copy(configs: dict[str, Path], to: Path, force: bool = False) -> list[Path]:
    """Copy ``configs`` into ``to`` (created); refuses, copying nothing, when a target exists and not ``force``."""
    targets = {to / p.name: p for p in configs.values()}
    there = [str(t) for t in targets if t.exists()]
    if there and not force:
        raise InputError(f"{', '.join(there)} already exist(s): pass --force to overwrite, or --to another directory")
    for target, src in targets.items():
        atomic_write_bytes(target, src.read_bytes())
    return list(targets)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spinestream configs", description=plain(__doc__), formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="action")
    show = sub.add_parser("show", help="print a shipped config")
    show.add_argument("name")
    cp = sub.add_parser("copy", help="copy shipped configs into a directory, to edit them")
    cp.add_argument("names", nargs="*", metavar="NAME")
    cp.add_argument("--all", action="store_true", help="every shipped config")
    cp.add_argument("--to", type=Path, required=True, metavar="DIR", help="where to copy them (created)")
    cp.add_argument("--force", action="store_true", help="overwrite files already there")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.action is None:
        shipped = shipped_configs()
        width = max(map(len, shipped))
        for name, path in shipped.items():
            print(f"{name.ljust(width)}  {describe(path)}")
        print(f"\n-c NAME uses one; spinestream configs show NAME prints it (files in {SHIPPED_DIR})")
        return 0
    if args.action == "show":
        sys.stdout.write(pick([args.name])[args.name].read_text())
        return 0
    if bool(args.names) == args.all:
        parser.error("configs copy: name the configs to copy, or pass --all (not both)")
    names = list(shipped_configs()) if args.all else args.names
    for target in copy(pick(names), args.to, force=args.force):
        print(f"{target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
