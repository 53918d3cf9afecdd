"""``spinestream kaggle-bundle --dry-run`` (spinestream/bundle.py), offline: the pip commands target
Kaggle's Python and platform with binary wheels only, exclude torch/torchvision, add the P100's DALI,
list each run's files (the shard spec made from data.root when the run has none), and write nothing."""
from __future__ import annotations

import shutil

import pytest

from spinestream.bundle import main, runtime_pins
from spinestream.cli import main as cli_main
from tests.test_predict import write_run


@pytest.fixture(scope="module")
def run_dirs(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle-runs")
    return [write_run(root / f"fold{k}", shards, seed=k) for k in range(2)]


def test_dry_run_prints_the_commands_and_files_and_downloads_nothing(run_dirs, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["--run", str(run_dirs[0]), "--run", str(run_dirs[1]), "--out", str(out), "--python", "3.12",
                 "--dry-run"]) == 0
    text = capsys.readouterr().out
    cmds = [line.split() for line in text.splitlines() if " -m pip " in line]
    assert [c[c.index("pip") + 1] for c in cmds] == ["wheel", "download", "download"]
    for c in cmds[1:]:
        assert "--only-binary=:all:" in c and c[c.index("--python-version") + 1] == "3.12"
        assert c[c.index("--platform") + 1] == "manylinux2014_x86_64"
    names = {a.split("==")[0] for c in cmds[1:] for a in c if not a.startswith("-") and "/" not in a}
    assert "nvidia-dali-cuda120" in cmds[2] and {"timm", "pydicom", "zarr"} <= names
    assert not names & {"torch", "torchvision", "triton"} and not any(n.startswith("nvidia-cu") for n in names)
    for k in (0, 1):
        for f in ("run.json", "config.yaml", "best.pt", "shard_spec.json"):
            assert f"{out}/runs/fold{k}/{f}" in text
    assert "made from" in text  # these runs carry no shard_spec.json: it comes from data.root
    assert not out.exists()


def test_refusals(run_dirs, tmp_path, capsys):
    same = tmp_path / "x" / run_dirs[0].name
    shutil.copytree(run_dirs[0], same)
    bundle = ["kaggle-bundle", "--out", str(tmp_path / "o"), "--dry-run"]  # through the console script: exit 2
    assert cli_main([*bundle, "--run", str(run_dirs[0]), "--run", str(same)]) == 2
    assert "rename one" in capsys.readouterr().err
    assert cli_main([*bundle, "--run", str(tmp_path)]) == 2
    assert cli_main([*bundle, "--run", str(run_dirs[0]), "--python", "311"]) == 2


def test_pins_are_the_installed_versions():
    from importlib.metadata import version

    pins, _ = runtime_pins("3.11")
    assert f"timm=={version('timm')}" in pins and f"numpy=={version('numpy')}" in pins
