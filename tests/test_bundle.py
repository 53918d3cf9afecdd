"""``spinestream kaggle-bundle`` (spinestream/bundle.py): only what predict needs, pinned and enforced.

Fast: the plan of ``--dry-run`` (inference dependencies only, ``==`` the installed versions, binary wheels for
the target; EMA-only weights, config and shard spec per run), the refusals, and the project's wheel rebuilt
from an install (no source tree). Slow (``-m slow``, ~2-3 min on 2 cores): the real bundle installed with
``--no-index`` into an empty venv that sees torch as Kaggle's preinstalled one, replacing a preinstalled
other version of a dependency, then predicting the synthetic test studies from outside the checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest

from spinestream.bundle import main, runtime_pins, wheel_from_installed
from spinestream.cli import main as cli_main
from tests.test_predict import write_run

TRAIN_ONLY = {"wandb", "webdataset", "zarr", "matplotlib", "nibabel", "numcodecs", "nvidia-dali-cuda120",
              "nvidia-dali-cuda130"}


@pytest.fixture(scope="module")
def run_dirs(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle-runs")
    return [write_run(root / f"fold{k}", shards, seed=k) for k in range(2)]


def _download(text: str) -> list[str]:
    (line,) = [ln for ln in text.splitlines() if " -m pip download " in ln]
    return line.split()


def test_dry_run_plans_inference_wheels_and_ema_weights_only(run_dirs, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["--run", str(run_dirs[0]), "--run", str(run_dirs[1]), "--out", str(out), "--python-version",
                 "3.12", "--platform", "manylinux2014_x86_64", "--dry-run"]) == 0
    text = capsys.readouterr().out
    cmd = _download(text)
    assert "--only-binary=:all:" in cmd and "--no-deps" in cmd and cmd[cmd.index("--python-version") + 1] == "3.12"
    assert cmd[cmd.index("--platform") + 1] == "manylinux2014_x86_64"
    pins = [a for a in cmd if "==" in a]
    names = {a.split("==")[0] for a in pins}
    assert {"timm", "pydicom", "safetensors", "pandas"} <= names
    assert not names & (TRAIN_ONLY | {"torch", "torchvision", "triton"}), names & TRAIN_ONLY
    assert f"timm=={metadata.version('timm')}" in pins  # the tested version, exactly
    for k in (0, 1):
        for f in ("weights.safetensors", "config.yaml", "shard_spec.json"):
            assert f"{out}/runs/fold{k}/{f}" in text
    assert "best.pt  <-" not in text and "run.json" not in text  # no optimizer state, no training record
    assert not out.exists()


def test_extras_and_torch_are_added_only_when_asked():
    pins = {p.split("==")[0] for p in runtime_pins(None, ("train",), with_torch=True)[0]}
    assert {"wandb", "webdataset", "zarr", "torch", "torchvision"} <= pins


def test_refusals(run_dirs, tmp_path, capsys):
    same = tmp_path / "x" / run_dirs[0].name
    shutil.copytree(run_dirs[0], same)
    bundle = ["kaggle-bundle", "--out", str(tmp_path / "o"), "--dry-run"]  # through the console script: exit 2
    assert cli_main([*bundle, "--run", str(run_dirs[0]), "--run", str(same)]) == 2
    assert "rename one" in capsys.readouterr().err
    assert cli_main([*bundle, "--run", str(tmp_path)]) == 2
    assert cli_main([*bundle, "--run", str(run_dirs[0]), "--python-version", "311"]) == 2
    assert cli_main([*bundle, "--run", str(run_dirs[0]), "--extra", "nope"]) == 2


def _tiny_wheel(d: Path) -> Path:
    """A pure-Python wheel as a build backend writes one."""
    info = "tinypkg-1.2.dist-info"
    whl = d / "tinypkg-1.2-py3-none-any.whl"
    files = {"tinypkg/__init__.py": "X = 1\n", "tinypkg/data.txt": "data\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.2\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
             f"{info}/top_level.txt": "tinypkg\n"}
    with zipfile.ZipFile(whl, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr(f"{info}/RECORD", "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n")
    return whl


def test_the_project_wheel_is_rebuilt_from_an_install(tmp_path):
    whl = _tiny_wheel(tmp_path)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(target), str(whl)], check=True)
    (dist,) = metadata.distributions(path=[str(target)])
    rebuilt = wheel_from_installed(dist, tmp_path / "out")
    assert rebuilt.name == whl.name
    with zipfile.ZipFile(whl) as a, zipfile.ZipFile(rebuilt) as b:
        names = sorted(n for n in a.namelist() if not n.endswith("RECORD"))
        assert sorted(n for n in b.namelist() if not n.endswith("RECORD")) == names
        assert all(a.read(n) == b.read(n) for n in names)
        record = b.read("tinypkg-1.2.dist-info/RECORD").decode()
    assert "tinypkg/__init__.py,sha256=" in record and "INSTALLER" not in record


# --------------------------------------------------------------------------- end to end (slow)


def _torch_as_preinstalled(venv: Path, tmp: Path) -> None:
    """Make torch, torchvision and their dependencies visible to ``venv`` the way Kaggle has them: a .pth naming
    a directory of symlinks to their packages and dist-info folders in this interpreter's site-packages."""
    from packaging.requirements import Requirement

    links = tmp / "preinstalled"
    links.mkdir()
    todo, seen = [Requirement("torch"), Requirement("torchvision")], set()
    while todo:
        req = todo.pop()
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        key = (dist.metadata["Name"].lower(), tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        site = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or [] if not str(f).startswith("..")} - {"__pycache__"}:
            if (site / top).exists() and not (links / top).exists():
                (links / top).symlink_to(site / top)
        for r in map(Requirement, dist.requires or []):
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in req.extras or {""}):
                todo.append(r)
    (site_packages,) = venv.glob("lib/python*/site-packages")
    (site_packages / "kaggle_preinstalled.pth").write_text(f"{links}\n")


@pytest.mark.slow
def test_the_bundle_installs_offline_and_predicts(run_dirs, raw, tmp_path):
    out = tmp_path / "kb"
    assert main(["--run", str(run_dirs[0]), "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "runs" / "fold0").iterdir()) == ["config.yaml", "shard_spec.json",
                                                                          "weights.safetensors"]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # the venv's own old setuptools would shadow the preinstalled one torch requires (Kaggle's is consistent)
    subprocess.run([str(py), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True)
    _torch_as_preinstalled(venv, tmp_path)
    # a different version of a pinned dependency already there, as Kaggle's image has them: the pin must win
    pins = dict(line.strip().split("==") for line in (out / "requirements.txt").read_text().splitlines())
    old = "2.9.0.post0"
    assert pins["python-dateutil"] != old
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", f"python-dateutil=={old}"], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # the bundle's wheels only: no find-links or index from pip.conf
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(out / "wheels"), "-r",
                    str(out / "requirements.txt")], check=True, env=env, cwd=tmp_path)
    got = subprocess.run([str(py), "-c", "from importlib.metadata import version as v; print(v('python-dateutil'))"],
                         capture_output=True, text=True, check=True, env=env).stdout.strip()
    assert got == pins["python-dateutil"]
    sub = tmp_path / "submission.csv"
    res = subprocess.run([str(venv / "bin" / "spinestream"), "predict", "--run", str(out / "runs" / "fold0"),
                          "--images", str(raw / "test_images"), "--out", str(sub), "--workers", "0",
                          "--device", "cpu", "--no-progress"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    frame = pd.read_csv(sub)
    assert len(frame) % 8 == 0 and len(frame) > 0 and frame["fractured"].between(0, 1).all()
    wandb = subprocess.run([str(py), "-c", "import wandb"], capture_output=True, env=env)
    assert wandb.returncode != 0  # not in the bundle
