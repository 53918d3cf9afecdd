"""``spinestream demo``: the main job on the embedded synthetic default — the whole pipeline.

    spinestream demo            # = spinestream run -c demo --out demo-data   (from any directory)

synth -> shard -> verify -> bench loader -> round 1 -> evaluate -> pseudo-label -> round 2 -> evaluate
-> predict -> compare -> report, every stage a ``spinestream`` verb run by ``spinestream run`` (resumable: rerunning
the demo skips what is done). A demo directory whose synthetic data was made with other settings is
refused (with what differs) instead of being rebuilt under the user's feet.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from spinestream.shards.config import HelpFormatter, plain

    from . import InputError
    from .run import main as run

    p = argparse.ArgumentParser(prog="spinestream demo", description=plain(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("demo-data"), help="where the demo writes everything")
    p.add_argument("--studies", type=int, default=256, help="synthetic studies")
    p.add_argument("--size", type=int, default=128, help="synthetic DICOM size (pixels)")
    p.add_argument("--slices", default="24:40", help="slices per study, LO:HI")
    p.add_argument("--boxed-share", type=float, default=0.5,
                   help="fraction of boxed studies: enriched from the real 12%% so the CPU run sees enough "
                        "fractured slices")
    p.add_argument("--crack-width", default="3:4",
                   help="crack widths in mm: wider than the synth default (1.2:2.0) so a tiny network at 128 px "
                        "sees them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("-c", "--config", default="demo",
                   help="the demo's pipeline config: a shipped config's name or a YAML file")
    args = p.parse_args(argv)

    stale = _stale(args.dir / "raw" / "SYNTH_COMPLETE", args)
    if stale:
        raise InputError(f"{args.dir} holds a demo made with other settings ({stale}); remove it "
                         f"(rm -rf {args.dir}) or pass --dir NEW_DIR")
    sc = _synth_config(args)
    sets = [f"synth.studies={sc.studies}", f"synth.seed={sc.seed}", f"synth.size={sc.size}",
            f"synth.slices=[{sc.slices[0]}, {sc.slices[1]}]", f"synth.boxed_share={sc.boxed_share}",
            f"synth.crack_width=[{sc.crack_width[0]}, {sc.crack_width[1]}]", f"workers={args.workers}"]
    return run(["-c", args.config, "--out", str(args.dir), *[a for kv in sets for a in ("--set", kv)]])


def _synth_config(args: argparse.Namespace):
    """The SynthConfig the demo's flags ask for (the synth step passes the same values)."""
    from spinestream.preprocess.synth import SynthConfig
    from spinestream.preprocess.synth.cli import mm_range_arg, slices_arg

    return SynthConfig(studies=args.studies, seed=args.seed, size=args.size, slices=slices_arg(args.slices),
                       boxed_share=args.boxed_share, crack_width=mm_range_arg(args.crack_width))


def _stale(marker: Path, args: argparse.Namespace) -> str:
    """What differs between the finished synthetic dataset in ``marker``'s directory and the one asked for
    ('' when it matches or there is none): the later steps resume, so they must not mix two datasets.
    Every SynthConfig field is compared."""
    if not marker.exists():
        return ""
    import json

    try:
        have = json.loads(marker.read_text())["params"]
    except (ValueError, KeyError):
        return "an unreadable SYNTH_COMPLETE"
    want = _synth_config(args).params()
    diff = [f"{k} {have.get(k)} != {v}" for k, v in want.items() if have.get(k) != v]
    return ", ".join(diff)

if __name__ == "__main__":
    sys.exit(main())
