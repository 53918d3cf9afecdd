"""``spinestream kaggle-bundle``: a folder to upload as a Kaggle dataset, for ``predict`` with the internet off.

    spinestream kaggle-bundle --run runs/round2 --out kaggle-bundle            # downloads wheels (network)
    spinestream kaggle-bundle --run runs/f0 --run runs/f1 --out kb --dry-run   # commands and files only

Writes ``OUT/wheels/`` (the project's wheel, its runtime dependencies as wheels for Kaggle's Python --
``--python``, default 3.11, manylinux x86_64 -- and nvidia-dali-cuda120, the DALI build that still runs on
the P100), ``OUT/runs/<name>/`` (run.json, config.yaml, best.pt, shard_spec.json per run) and
``OUT/bundle.json`` (what was written and the commands used). torch and torchvision are left out: Kaggle
has them, and a second CUDA torch would not fit the dataset limits.

Dependencies are pinned to the versions installed here (the tested set), walking the project's
requirements through the installed packages' metadata and stopping at torch/torchvision (whose own
dependencies -- the nvidia-* CUDA libraries, triton -- are Kaggle's). They are downloaded with
``--no-deps`` (the walk is the resolution); DALI is resolved by pip for the target, with its
dependencies. ``--dry-run`` prints the commands and the file list and downloads nothing.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from spinestream import InputError, MissingInput
from spinestream.shards.fsutil import atomic_write_json

PROJECT = "spinestream"
ROOT = Path(__file__).resolve().parents[1]  # the source tree the project's wheel is built from
EXCLUDED = ("torch", "torchvision")  # on Kaggle already
DALI = "nvidia-dali-cuda120"  # SM 5.0+: the P100 (sm60) included; cuda130 needs sm75
RUN_FILES = ("run.json", "config.yaml", "best.pt")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def target_env(python: str) -> dict:
    """The marker environment of Kaggle's image (Linux x86_64 CPython ``python``)."""
    return {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def project_requirements() -> list[str]:
    """The project's runtime requirements (pyproject.toml of the source tree; the installed metadata else)."""
    import tomllib

    py = ROOT / "pyproject.toml"
    if py.is_file():
        return list(tomllib.loads(py.read_text())["project"]["dependencies"])
    return list(metadata.requires(PROJECT) or [])


def runtime_pins(python: str) -> tuple[list[str], list[str]]:
    """(``name==version`` of every runtime dependency installed here, names required but not installed),
    the project's requirements walked transitively, torch/torchvision and what only they need left out."""
    from packaging.requirements import Requirement

    env = target_env(python)
    seen: dict[str, str] = {}
    absent: list[str] = []
    todo = [(Requirement(r), "") for r in project_requirements()]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = _norm(req.name)
        if name in EXCLUDED or name == PROJECT or name in seen:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            if name not in absent:
                absent.append(name)
            continue
        seen[name] = dist.version
        for r in dist.requires or []:
            for ex in req.extras or [""]:
                todo.append((Requirement(r), ex))
    return sorted(f"{n}=={v}" for n, v in seen.items()), sorted(absent)


def commands(out: Path, python: str, platform: str) -> list[list[str]]:
    """The pip commands that fill ``out/wheels`` (the project's wheel first)."""
    pins, absent = runtime_pins(python)
    wheels = str(out / "wheels")
    target = ["--only-binary=:all:", "--python-version", python, "--platform", platform,
              "--implementation", "cp", "-d", wheels]
    pip = [sys.executable, "-m", "pip"]
    return [
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, str(ROOT)],
        [*pip, "download", "--no-deps", *target, *pins, *absent],
        [*pip, "download", *target, DALI],
    ]


def run_files(run_dirs: list[Path]) -> list[tuple[Path | None, str, str]]:
    """``(source or None, path in the bundle, note)`` for each run's files; the shard spec is the run's
    own copy or made from its ``data.root``."""
    from spinestream.engine import checkpoint as ck
    from spinestream.engine.config import RunConfig
    from spinestream.shards.config import load_config

    from spinestream.shards.spec import SPEC_FILE

    names = [Path(r).resolve().name for r in run_dirs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise InputError(f"two --run directories are named {sorted(dup)}; the bundle keeps runs/<name>: rename one")
    out = []
    for rd, name in zip(run_dirs, names):
        rd = Path(rd)
        ck.check_run_dir(rd)
        ck.sync_best(rd)  # a kill between the step checkpoint and best.pt: bundle the best the record names
        for f in RUN_FILES:
            if not (rd / f).is_file():
                raise MissingInput(f"--run {rd}: no {f} (a finished `spinestream train` run has one)")
            out.append((rd / f, f"runs/{name}/{f}", ""))
        if (rd / SPEC_FILE).is_file():
            out.append((rd / SPEC_FILE, f"runs/{name}/{SPEC_FILE}", ""))
        else:
            root = load_config(RunConfig, rd / "config.yaml").data.root
            out.append((None, f"runs/{name}/{SPEC_FILE}", f"made from {root}"))
    return out


def write_runs(run_dirs: list[Path], out: Path) -> None:
    from spinestream.engine.config import RunConfig
    from spinestream.shards.config import load_config

    from spinestream.shards.spec import ShardSpec

    for src, dst, _ in run_files(run_dirs):
        (out / dst).parent.mkdir(parents=True, exist_ok=True)
        if src is not None:
            shutil.copy2(src, out / dst)
        else:
            rd = next(Path(r) for r in run_dirs if Path(r).resolve().name == Path(dst).parent.name)
            data = load_config(RunConfig, rd / "config.yaml").data
            ShardSpec.from_shards(data.root, exclude_fold=data.val_fold).save(out / dst.rsplit("/", 1)[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spinestream kaggle-bundle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, action="append", required=True, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, required=True, help="the folder to upload as a Kaggle dataset")
    p.add_argument("--python", default="3.11", help="Kaggle's Python version (major.minor)")
    p.add_argument("--platform", default="manylinux2014_x86_64", help="pip --platform tag")
    p.add_argument("--dry-run", action="store_true", help="print the commands and files; download nothing")
    args = p.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python):
        raise InputError(f"--python {args.python!r}: expected major.minor, e.g. 3.11")
    files = run_files(args.run)
    cmds = commands(args.out, args.python, args.platform)
    pins, absent = runtime_pins(args.python)
    print(f"# {len(pins)} pinned runtime wheels (torch, torchvision excluded), {DALI} resolved for Python "
          f"{args.python} {args.platform}" + (f"; not installed here, unpinned: {', '.join(absent)}" if absent else ""))
    for c in cmds:
        print(" ".join(c))
    print("# files:")
    print(f"{args.out}/wheels/{PROJECT}-*.whl and {len(pins) + len(absent)} dependency wheels + {DALI} (and its "
          f"dependencies)")
    for src, dst, note in files:
        print(f"{args.out}/{dst}" + (f"  ({note})" if note else f"  <- {src}"))
    if args.dry_run:
        return 0
    for c in cmds:
        if subprocess.run(c).returncode != 0:
            print(f"spinestream kaggle-bundle: error: failed: {' '.join(c)}", file=sys.stderr)
            return 1
    write_runs(args.run, args.out)
    atomic_write_json(args.out / "bundle.json", {
        "python": args.python, "platform": args.platform, "commands": cmds, "pins": pins, "unpinned": absent,
        "runs": [dst for _, dst, _ in files], "wheels": sorted(p.name for p in (args.out / "wheels").glob("*.whl"))})
    print(f"done -> {args.out} (upload it as a Kaggle dataset; see README 'Predict a Kaggle submission')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
