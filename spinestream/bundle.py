"""``spinestream kaggle-bundle``: a folder to upload as a Kaggle dataset, holding only what ``predict`` needs.

    spinestream kaggle-bundle --run runs/round2 --out kb --python-version 3.11 --platform manylinux2014_x86_64
    spinestream kaggle-bundle --run runs/f0 --run runs/f1 --out kb --dry-run     # the plan; writes nothing

Writes ``OUT/``:

* ``wheels/``: the project's wheel and its inference dependencies (``[project] dependencies``, walked through
  the installed packages' metadata), each pinned ``==`` the version installed here -- the tested set -- and
  fetched as a binary wheel for the target Python and platform (defaults: this interpreter's). torch and
  torchvision are left out (Kaggle preinstalls a CUDA build; ``--with-torch`` adds them); so are the
  training extras (DALI, wandb, webdataset, zarr, ...: ``--extra train`` or ``--extra dali-cu12`` add them).
* ``requirements.txt``: those pins, and the project's own. The install line
  ``pip install --no-index --find-links wheels -r requirements.txt`` enforces them: an exact pin replaces a
  version Kaggle preinstalled, where a bare ``pip install --no-index wheels/*`` keeps any preinstalled
  version that satisfies the project's ``>=`` bounds.
* ``runs/<name>/``: ``weights.safetensors`` (the EMA weights predict uses, no optimizer state:
  spinestream/engine/weights.py), ``config.yaml`` and ``shard_spec.json`` (the run's own, or made from its
  ``data.root``). ``spinestream predict --run`` and ``api.load_runs`` read it as they read a run directory.
* ``README.md`` (the notebook cell: offline install, then predict) and ``bundle.json`` (what was written, how).

The project's wheel comes from a copy of the source tree when this runs from a checkout (``pip wheel --no-deps``).
Installed from a wheel there is no source tree, so the wheel is rebuilt from the installed distribution: its
files as its RECORD lists them (bytecode and the installer's own records -- INSTALLER, REQUESTED,
direct_url.json -- left out), under the same dist-info (METADATA, WHEEL, entry points, licenses), with a new
RECORD whose hashes are computed from the files as they are now. That reproduces the original wheel's
contents (tests/test_bundle.py checks it) unless someone edited the installed files.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from spinestream import InputError, MissingInput, SpinestreamError
from spinestream.shards.fsutil import atomic_write_bytes, atomic_write_json

PROJECT = "spinestream"
ROOT = Path(__file__).resolve().parents[1]  # the checkout, when this runs from one
TORCH = ("torch", "torchvision")  # Kaggle's own CUDA build; --with-torch bundles these too
INSTALLER_FILES = ("INSTALLER", "REQUESTED", "direct_url.json", "RECORD")  # an install's, not the wheel's


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def marker_env(python: str | None) -> dict:
    """The marker environment of the target: this interpreter's, with ``python`` (major.minor) when given."""
    from packaging.markers import default_environment

    env = dict(default_environment())
    if python:
        env.update(python_version=python, python_full_version=f"{python}.0")
    return env


def is_checkout() -> bool:
    return (ROOT / "pyproject.toml").is_file() and (ROOT / "engine" / "__init__.py").is_file()


def project_requirements(extras: tuple[str, ...] = ()) -> list[str]:
    """The project's requirements, with ``extras``' (pyproject.toml in a checkout, the installed metadata else);
    extras' entries carry their ``extra == ...`` marker as the metadata does."""
    if is_checkout():
        import tomllib

        proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        opt = proj.get("optional-dependencies", {})
        unknown = [e for e in extras if e not in opt]
        if unknown:
            raise InputError(f"--extra {unknown[0]}: the project's extras are {', '.join(opt)}")
        return list(proj["dependencies"]) + [r for e in extras for r in opt[e]]
    return list(metadata.requires(PROJECT) or [])


def runtime_pins(python: str | None, extras: tuple[str, ...] = (), with_torch: bool = False
                 ) -> tuple[list[str], list[str]]:
    """(``name==version`` of every dependency installed here that the target needs, names required but not
    installed): the project's requirements (and ``extras``') walked transitively, markers evaluated for the
    target; the walk stops at torch/torchvision unless ``with_torch`` (their CUDA libraries are Kaggle's)."""
    from packaging.requirements import Requirement

    env = marker_env(python)
    seen: dict[str, str] = {}
    absent: list[str] = []
    todo = [(Requirement(r), tuple(extras)) for r in project_requirements(extras)]
    while todo:
        req, active = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in active or ("",)):
            continue
        name = _norm(req.name)
        if (name in TORCH and not with_torch) or name == PROJECT or name in seen:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            if name not in absent:
                absent.append(name)
            continue
        seen[name] = dist.version
        todo += [(Requirement(r), tuple(req.extras)) for r in dist.requires or []]
    return sorted(f"{n}=={v}" for n, v in seen.items()), sorted(absent)


def download_command(wheels: Path, pins: list[str], python: str | None, platforms: list[str]) -> list[str]:
    target = ["--only-binary=:all:"]
    if python:
        target += ["--python-version", python, "--implementation", "cp"]
    for platform in platforms:
        target += ["--platform", platform]
    return [sys.executable, "-m", "pip", "download", "--no-deps", *target, "-d", str(wheels), *pins]


class BundleError(SpinestreamError, RuntimeError):
    """Building the project's wheel or downloading the pinned ones failed (pip printed why)."""


# --------------------------------------------------------------------------- the project's wheel


#: what the project's wheel is built from: pyproject.toml's package-dir folders and the files it names
#: (tests/test_install.py checks the folders against pyproject.toml)
SOURCES = ("spinestream", "engine", "shards", "preprocess", "benchmarks", "configs", "pyproject.toml", "README.md",
           "LICENSE")


def project_wheel(wheels: Path) -> Path:
    """The project's wheel in ``wheels``: built from a copy of the checkout's :data:`SOURCES`, else rebuilt from
    the installed files. The copy because setuptools stages a build in ``build/`` beside the sources, and a stale
    one there (an earlier build's) carries modules deleted since into the wheel."""
    import tempfile

    wheels.mkdir(parents=True, exist_ok=True)
    if not is_checkout():
        return wheel_from_installed(metadata.distribution(PROJECT), wheels)
    with tempfile.TemporaryDirectory(prefix="spinestream-src-") as tmp:
        for name in SOURCES:
            src, dst = ROOT / name, Path(tmp) / name
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "results"))
            else:
                shutil.copy2(src, dst)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), tmp]
        if subprocess.run(cmd).returncode != 0:
            raise BundleError(f"failed (pip said why above): {' '.join(cmd)}")
    return max(wheels.glob(f"{PROJECT}-*.whl"), key=lambda p: p.stat().st_mtime)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def wheel_from_installed(dist: metadata.Distribution, wheels: Path) -> Path:
    """Rebuild ``dist``'s wheel from its installed files (see the module doc); refused for an editable install,
    whose files are in a source tree, not in site-packages."""
    files = [f for f in dist.files or [] if "__pycache__" not in f.parts and f.suffix != ".pyc"]
    info = next((f.parts[0] for f in files if f.parts[0].endswith(".dist-info")), None)
    if info is None or any(f.name == "direct_url.json" and '"editable": true' in (f.read_text() or "")
                           for f in files if f.parts[0] == info):
        raise BundleError(f"{PROJECT} is not installed from a wheel here and {ROOT} is no checkout: run "
                           f"kaggle-bundle from the checkout or from a wheel install")
    keep = [f for f in files if not (f.parts[0] == info and f.name in INSTALLER_FILES)
            and not str(f).startswith("..")]  # the console script lives outside site-packages: pip remakes it
    tag = next(line.split(":", 1)[1].strip() for line in (dist.read_text("WHEEL") or "").splitlines()
               if line.startswith("Tag:"))
    wheels.mkdir(parents=True, exist_ok=True)
    out = wheels / f"{_norm(dist.metadata['Name']).replace('-', '_')}-{dist.version}-{tag}.whl"
    record = []
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(keep, key=lambda f: (f.parts[0] == info, str(f))):  # dist-info last, as wheels have it
            data = Path(f.locate()).read_bytes()
            z.writestr(str(f.as_posix()), data)
            record.append(f"{f.as_posix()},{_record_hash(data)},{len(data)}")
        record.append(f"{info}/RECORD,,")
        z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return out


# --------------------------------------------------------------------------- the runs


def run_names(run_dirs: list[Path]) -> list[str]:
    names = [Path(r).resolve().name for r in run_dirs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise InputError(f"two --run directories are named {sorted(dup)}; the bundle keeps runs/<name>: rename one")
    return names


def check_runs(run_dirs: list[Path]) -> list[tuple[str, str]]:
    """``(path in the bundle, where it comes from)`` of each run's files, every run checked first."""
    from spinestream.engine import checkpoint as ck
    from spinestream.engine.weights import WEIGHTS_FILE

    plan = []
    for rd, name in zip(map(Path, run_dirs), run_names(run_dirs)):
        lay = ck.check_run_dir(rd)
        for f in (lay.best, lay.config):
            if not f.is_file():
                raise MissingInput(f"--run {rd}: no {f.name} (a finished `spinestream train` run has one)")
        plan.append((f"runs/{name}/{WEIGHTS_FILE}", f"EMA weights of {lay.best}"))
        plan.append((f"runs/{name}/{lay.config.name}", str(lay.config)))
        spec = lay.shard_spec
        plan.append((f"runs/{name}/{spec.name}", str(spec) if spec.is_file() else "made from its data.root"))
    return plan


def write_runs(run_dirs: list[Path], out: Path) -> None:
    from spinestream.engine.rundir import RunLayout, read_config
    from spinestream.engine.weights import export_weights
    from spinestream.shards.spec import ShardSpec

    for rd, name in zip(map(Path, run_dirs), run_names(run_dirs)):
        lay, dst = RunLayout(rd), out / "runs" / name
        export_weights(rd, dst)  # the EMA weights of best.pt (synced with the run's record first)
        shutil.copy2(lay.config, dst / lay.config.name)
        if lay.shard_spec.is_file():
            shutil.copy2(lay.shard_spec, dst / lay.shard_spec.name)
        else:
            data = read_config(rd).data
            ShardSpec.from_shards(data.root, exclude_fold=data.val_fold).save(dst)


# --------------------------------------------------------------------------- the verb


INSTALL = "pip install --no-index --find-links {d}/wheels -r {d}/requirements.txt"

README = """# spinestream Kaggle bundle

{runs} run(s) ({names}) and the wheels to run `spinestream predict` offline: spinestream {version} and its
inference dependencies pinned to the tested versions, for Python {python} ({platform}).
torch/torchvision {torch}. Made by `spinestream kaggle-bundle` (bundle.json: what and how).

In a notebook with this dataset attached as `{d}` (internet off):

```python
!{install}

from spinestream import api

runs = api.load_runs([{paths}], device="cuda")
sub = api.predict("/kaggle/input/rsna-2022-cervical-spine-fracture-detection/test_images", runs,
                  sample_submission="/kaggle/input/rsna-2022-cervical-spine-fracture-detection/sample_submission.csv",
                  workers=2)
api.write_submission(sub, "submission.csv")
```

or, after the install line: `!spinestream predict {cli_runs} --images .../test_images --sample-submission
.../sample_submission.csv --out submission.csv --no-progress`.
"""


def write_readme(out: Path, names: list[str], pins: list[str], args) -> None:
    d = f"/kaggle/input/{out.resolve().name}"
    from spinestream import __version__

    text = README.format(runs=len(names), names=", ".join(names), version=__version__, d=d,
                         python=args.python_version or f"{sys.version_info.major}.{sys.version_info.minor}",
                         platform=", ".join(args.platform) or "this machine's platform",
                         torch="included" if args.with_torch else "not included: Kaggle's preinstalled CUDA build",
                         install=INSTALL.format(d=d), paths=", ".join(f'"{d}/runs/{n}"' for n in names),
                         cli_runs=" ".join(f"--run {d}/runs/{n}" for n in names))
    atomic_write_bytes(out / "README.md", text.encode())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spinestream kaggle-bundle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, action="append", required=True, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, required=True, help="the folder to upload as a Kaggle dataset")
    p.add_argument("--python-version", default=None, help="the target's Python (major.minor; Kaggle: 3.11); "
                   "default: this interpreter's")
    p.add_argument("--platform", action="append", default=[], help="pip --platform tag, repeatable (Kaggle: "
                   "manylinux2014_x86_64 and manylinux_2_35_x86_64, its glibc: pip does not expand one to the "
                   "other); default: this machine's")
    p.add_argument("--extra", action="append", default=[], help="add a project extra's dependencies (train, "
                   "dali-cu12, ...); repeatable")
    p.add_argument("--with-torch", action="store_true", help="bundle torch and torchvision too (Kaggle has them)")
    p.add_argument("--dry-run", action="store_true", help="print the plan; write and download nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    """Errors are not caught here: the console script prints a project error on one line (exit 2)."""
    args = build_parser().parse_args(argv)
    if args.python_version and not re.fullmatch(r"3\.\d+", args.python_version):
        raise InputError(f"--python-version {args.python_version!r}: expected major.minor, e.g. 3.11")
    plan = check_runs(args.run)
    pins, absent = runtime_pins(args.python_version, tuple(args.extra), args.with_torch)
    if absent:
        raise MissingInput(f"required but not installed here, so untested: {', '.join(absent)}; install them (or "
                           f"drop the --extra that needs them)")
    out, wheels = args.out, args.out / "wheels"
    download = download_command(wheels, pins, args.python_version, args.platform)
    print(f"# {PROJECT} wheel + {len(pins)} pinned wheels (torch/torchvision "
          f"{'included' if args.with_torch else 'left to Kaggle'}); runs:")
    for dst, src in plan:
        print(f"{out}/{dst}  <- {src}")
    print(" ".join(download))
    if args.dry_run:
        return 0
    own = project_wheel(wheels)
    if subprocess.run(download).returncode != 0:
        raise BundleError(f"failed (pip said why above): {' '.join(download)}")
    write_runs(args.run, out)
    from spinestream import __version__

    requirements = [f"{PROJECT}=={__version__}", *pins]
    atomic_write_bytes(out / "requirements.txt", "".join(r + "\n" for r in requirements).encode())
    write_readme(out, run_names(args.run), pins, args)
    atomic_write_json(out / "bundle.json", {
        "python": args.python_version, "platform": args.platform, "extras": args.extra,
        "with_torch": args.with_torch, "requirements": requirements, "install": INSTALL.format(d="."),
        "download": download, "project_wheel": own.name, "runs": [dst for dst, _ in plan],
        "wheels": sorted(p.name for p in wheels.glob("*.whl"))})
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"done -> {out} ({size / 1e6:.1f} MB; upload it as a Kaggle dataset, README.md has the notebook cell)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
