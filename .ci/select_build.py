#!/usr/bin/env python3
"""Which torch and DALI wheels this machine gets: the Makefile's one detection (standard library only).

    python3 .ci/select_build.py            # the choices and why, one KEY=VALUE a line
    python3 .ci/select_build.py --make     # one line of words for the Makefile
    python3 .ci/select_build.py --get dali_extra

Keys: ``torch_index`` (empty = PyPI's default torch, CUDA 13.0; else PyTorch's CUDA 12.6 index),
``dali_extra`` (dali-cu12 | dali-cu13) and ``system_torch`` (1 when the interpreter running this
script already has a torch that imports and computes on the visible GPU, as on Kaggle: the
Makefile then builds the venv with --system-site-packages and installs no torch). The GPU rules
live in engine/gpu_probe.py, which ``spinestream.engine.device`` also uses to say at run time which build
a card needs; nvidia-smi is found on PATH (tests put a fake one there).
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# imports torch, runs one kernel on the GPU, exits 0 only if all of it worked
PROBE = ("import torch, torchvision; "
         "assert torch.cuda.is_available(); "
         "assert float((torch.ones(2, device='cuda') * 2).sum()) == 4.0")


def load_probe():
    """engine/gpu_probe.py by path: no package import, so nothing beyond the standard library runs."""
    spec = importlib.util.spec_from_file_location("spinestream_gpu_probe", ROOT / "engine" / "gpu_probe.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


def system_torch_usable(python: str) -> bool:
    """Whether ``python`` has a torch (and torchvision) that computes on the GPU; a slow import is a no."""
    try:
        r = subprocess.run([python, "-c", PROBE], capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def select(python: str | None) -> dict[str, str]:
    """The choices for this machine, with the reasons; ``python`` None: no system-torch probe."""
    probe = load_probe()
    gpus = probe.query_gpus()
    build = probe.choose_build(gpus)
    # only where a GPU is visible: a CPU machine (CI) never pays for importing torch
    system = bool(gpus) and python is not None and system_torch_usable(python)
    return {"torch_index": build.torch_index, "dali_extra": build.dali_extra,
            "system_torch": "1" if system else "0", "cuda": build.cuda,
            "gpus": "; ".join(g.describe() for g in gpus) or "none",
            "reason": build.reason, "warning": build.warning or ""}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make", action="store_true", help="key=value words for the Makefile (values hold no spaces)")
    p.add_argument("--get", metavar="KEY", help="print one value")
    p.add_argument("--python", default=sys.executable, help="interpreter whose torch counts as the system torch")
    p.add_argument("--no-probe", action="store_true", help="do not look for a system torch (system_torch=0); "
                   "the Makefile passes it when USE_SYSTEM_TORCH is given")
    args = p.parse_args(argv)
    choice = select(None if args.no_probe else args.python)
    if choice["warning"] and (args.make or args.get):
        print(f"select_build: warning: {choice['warning']}", file=sys.stderr)
    if args.get:
        if args.get not in choice:
            p.error(f"--get {args.get}: one of {', '.join(choice)}")
        print(choice[args.get])
    elif args.make:
        print(" ".join(f"{k}={choice[k]}" for k in ("torch_index", "dali_extra", "system_torch")))
    else:
        for k, v in choice.items():
            print(f"{k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
