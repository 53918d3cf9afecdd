"""The package a user installs: the wheel holds everything under ``spinestream.`` (nothing generic
top-level), the shipped configs travel with it, and the verbs and the Python API work from a directory
outside the checkout.

The venv is built the way a user's is, offline: the wheel is built from this checkout and installed with
``pip --no-index`` into a fresh venv whose dependencies are this environment's installed distributions
(linked into one folder on the venv's path, as Kaggle preinstalls torch and friends) — everything
except spinestream itself, which only the wheel provides.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = ("engine", "shards", "preprocess", "benchmarks")


def _pyproject_packages() -> tuple[dict[str, str], list[str]]:
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return cfg["package-dir"], cfg["packages"]


def test_the_package_list_names_every_package_folder():
    """A sub-package missing from pyproject's explicit list would be missing from the wheel (and only from
    the wheel: the checkout would still import it)."""
    package_dir, packages = _pyproject_packages()
    folders = {v: k for k, v in package_dir.items()}
    found = set()
    for top, name in folders.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    found.add("spinestream.configs")  # data only, no __init__.py
    assert sorted(found) == sorted(packages)
    assert {folders[m] for m in MAPPED} == {f"spinestream.{m}" for m in MAPPED}
    from spinestream.bundle import SOURCES

    assert set(package_dir.values()) <= set(SOURCES)  # the wheel is built from a copy of these


def _site_links(dest: Path) -> Path:
    """A folder of links to this environment's installed distributions, spinestream's own excluded."""
    dest.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        n = entry.name
        if n.startswith(("spinestream", "__editable__", "_virtualenv", "pip", "__pycache__")) or n.endswith(".pth"):
            continue
        (dest / n).symlink_to(entry)
    return dest


def _run(cmd, cwd, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(WANDB_MODE="disabled", **kw.pop("env", {}))
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("install")
    from spinestream.bundle import project_wheel

    wheel = project_wheel(tmp / "dist")  # what kaggle-bundle ships: built from a copy of the sources
    v = tmp / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", v], cwd=tmp).returncode == 0
    py = v / "bin" / "python"
    purelib = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip()
    (Path(purelib) / "preinstalled.pth").write_text(f"{_site_links(tmp / 'preinstalled')}\n")
    r = _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-index", "-q", wheel], cwd=tmp)
    assert r.returncode == 0, r.stderr
    return v


def test_the_wheel_installs_nothing_generic_top_level(venv, tmp_path):
    py = venv / "bin" / "python"
    for name in MAPPED:
        r = _run([py, "-c", f"import {name}"], cwd=tmp_path)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, (name, r.stdout, r.stderr)
    r = _run([py, "-c", "import spinestream.engine.trainer as t, spinestream; print(t.__file__); "
                        "print(spinestream.__version__)"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    where, version = r.stdout.split()
    assert str(venv) in where and str(ROOT) not in where
    assert re.fullmatch(r'version = "([^"]+)"', next(line for line in (ROOT / "pyproject.toml").read_text()
                                                    .splitlines() if line.startswith("version ="))
                        .split("  #")[0]).group(1) == version


def test_the_verbs_run_from_outside_the_checkout(venv, tmp_path):
    exe = venv / "bin" / "spinestream"
    r = _run([exe, "--version"], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("spinestream "), r.stderr
    r = _run([venv / "bin" / "python", "-m", "spinestream", "--version"], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("spinestream "), r.stderr
    r = _run([exe, "configs"], cwd=tmp_path)
    assert r.returncode == 0 and "pipeline" in r.stdout and "smoke" in r.stdout, r.stderr
    # the whole pipeline on the shipped smoke config: synth, shard, a few training steps, predict, report
    r = _run([exe, "run", "-c", "smoke", "--out", tmp_path / "smoke", "--set", "workers=1", "--no-progress"],
             cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "smoke"
    assert (out / "submission.csv").is_file() and (out / "report.md").is_file()
    # the Python API a notebook uses, with strings for the device and the paths
    code = ("from spinestream.api import load_runs, predict\n"
            f"models = load_runs(['{out / 'runs' / 'round1'}'], device='cpu')\n"
            f"df = predict('{out / 'raw' / 'test_images'}', models)\n"
            "print(len(df), sorted(df.columns))\n")
    r = _run([venv / "bin" / "python", "-c", code], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows, _ = r.stdout.split(" ", 1)
    assert int(rows) == 8 * len(list((out / "raw" / "test_images").iterdir()))
