"""Which torch and DALI a machine gets: .ci/select_build.py and the Makefile, with fake nvidia-smi on PATH.

The fake answers the queries the real one would on that card and driver; ``calls`` records each
invocation, so the Makefile's one-detection promise is checked too.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spinestream.engine import gpu_probe

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "select_build.py"
CU126 = "https://download.pytorch.org/whl/cu126"

# name, compute_cap ("" = a driver too old for that field), driver
P100 = ("Tesla P100-PCIE-16GB", "6.0", "535.104.05")
H100 = ("NVIDIA H100 80GB HBM3", "9.0", "580.65.06")
T4 = ("Tesla T4", "7.5", "550.54.15")
OLD_P100 = ("Tesla P100-PCIE-16GB", "", "470.82.01")


def fake_smi(tmp_path: Path, gpu: tuple[str, str, str] | None) -> Path:
    """A directory holding an nvidia-smi for ``gpu`` (None: a driver with no GPU: 'No devices were found')."""
    d = tmp_path / "bin"
    d.mkdir()
    log = tmp_path / "calls"
    if gpu is None:
        body = 'echo "No devices were found"; exit 6'
    else:
        name, cap, drv = gpu
        query_cap = (f'echo "{name}, {cap}, {drv}"' if cap
                     else 'echo \'Field "compute_cap" is not a valid field to query.\'; exit 2')
        body = f"""case "$*" in
  *compute_cap*) {query_cap} ;;
  *--query-gpu=name,driver_version*) echo "{name}, {drv}" ;;
  *) echo "| NVIDIA-SMI {drv}   Driver Version: {drv}   CUDA Version: 12.2 |" ;;
esac"""
    (d / "nvidia-smi").write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n{body}\n')
    (d / "nvidia-smi").chmod(0o755)
    return d


def fake_python(tmp_path: Path, works: bool) -> Path:
    """An 'interpreter' whose torch probe succeeds or fails, instead of importing a real torch."""
    p = tmp_path / "python-with-torch"
    p.write_text(f"#!/bin/sh\nexit {0 if works else 1}\n")
    p.chmod(0o755)
    return p


# what an outer make (`make test` runs this file) exports to its children: a nested make would print
# "Entering directory" lines and inherit the outer command line's variables
OUTER_MAKE = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "MAKE_TERMOUT", "MAKE_TERMERR"}


def env_with(bin_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OUTER_MAKE}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def select(tmp_path, gpu, system_torch=False) -> dict:
    env = env_with(fake_smi(tmp_path, gpu))
    out = subprocess.run([sys.executable, str(SCRIPT), "--python", str(fake_python(tmp_path, system_torch))],
                         env=env, capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


@pytest.mark.parametrize("gpu, index, dali", [
    (P100, CU126, "dali-cu12"),   # sm_60: no CUDA 13 kernels, and a CUDA 12 driver
    (H100, "", "dali-cu13"),      # the default: PyPI's cu130 torch
    (T4, CU126, "dali-cu12"),     # sm_75 has cu130 kernels, but R550 cannot run CUDA 13
    (None, "", "dali-cu13"),      # no GPU: as CI installs today
    (OLD_P100, CU126, "dali-cu12"),  # a driver without the compute_cap field: the name table
], ids=["P100-535", "H100-580", "T4-550", "no-gpu", "P100-470-no-compute-cap"])
def test_selection_for_each_card(tmp_path, gpu, index, dali):
    got = select(tmp_path, gpu)
    assert (got["torch_index"], got["dali_extra"], got["system_torch"]) == (index, dali, "0")
    assert got["cuda"] == ("12.6" if index else "13.0")


def test_old_driver_is_warned_about(tmp_path):
    got = select(tmp_path, OLD_P100)
    assert "R525" in got["warning"] and "sm_60" in got["gpus"]


def test_a_system_torch_that_computes_on_the_gpu_is_kept(tmp_path):
    assert select(tmp_path, T4, system_torch=True)["system_torch"] == "1"


def test_no_gpu_never_probes_the_system_torch(tmp_path):
    # CI has no GPU: importing a torch there would only cost time, and a CPU torch is no reason to keep it
    assert select(tmp_path, None, system_torch=True)["system_torch"] == "0"


def test_dali_extra_wrapper_agrees(tmp_path):
    out = subprocess.run(["bash", str(ROOT / ".ci" / "dali-extra.sh")], env=env_with(fake_smi(tmp_path, P100)),
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "dali-cu12"


# ---------------------------------------------------------------- the Makefile

make = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")


def make_n(tmp_path, gpu, *extra) -> tuple[list[str], list[str]]:
    """`make -n venv` in a fresh copy of the Makefile's inputs: the commands, and nvidia-smi's calls."""
    work = tmp_path / "w"
    (work / ".ci").mkdir(parents=True)
    (work / "engine").mkdir()
    shutil.copy(ROOT / "Makefile", work)
    shutil.copy(ROOT / "pyproject.toml", work)
    shutil.copy(SCRIPT, work / ".ci")
    shutil.copy(ROOT / "engine" / "gpu_probe.py", work / "engine")
    env = env_with(fake_smi(tmp_path, gpu))
    out = subprocess.run(["make", "-n", "venv", "PYTHON=python3", *extra], cwd=work, env=env,
                         capture_output=True, text=True, check=True).stdout
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    return out.splitlines(), calls


@make
def test_make_without_gpu_installs_exactly_as_before(tmp_path):
    # the commands CI ran before the selection existed (`make -n venv` at the parent commit), with the `train`
    # extra since the inference dependencies became the core ones (the Kaggle bundle installs only those)
    lines, _ = make_n(tmp_path, None)
    assert lines == [
        "python3 -m venv .venv",
        ".venv/bin/python -m pip install --upgrade pip",
        ".venv/bin/python -m pip install torch==2.14.1 torchvision==0.29.1",
        '.venv/bin/python -m pip install -e ".[dev,train,dali-cu13]" torch==2.14.1 torchvision==0.29.1',
        "touch .venv/.installed",
    ]


@make
def test_make_on_a_p100_takes_the_cu126_pair_and_dali_cu12_from_one_detection(tmp_path):
    lines, calls = make_n(tmp_path, P100, "USE_SYSTEM_TORCH=0")
    assert f".venv/bin/python -m pip install --index-url {CU126} torch==2.14.1 torchvision==0.29.1" in lines
    assert '.venv/bin/python -m pip install -e ".[dev,train,dali-cu12]" torch==2.14.1 torchvision==0.29.1' in lines
    assert len(calls) == 1  # one nvidia-smi query for torch and DALI together


@make
def test_make_keeps_a_system_torch(tmp_path):
    lines, _ = make_n(tmp_path, H100, "USE_SYSTEM_TORCH=1")
    assert lines[0] == "python3 -m venv --system-site-packages .venv"
    assert not any("pip install torch" in l or "torch==" in l for l in lines)


@make
def test_make_overrides_win(tmp_path):
    lines, calls = make_n(tmp_path, H100, f"TORCH_INDEX={CU126}", "DALI_EXTRA=dali-cu12", "USE_SYSTEM_TORCH=0")
    assert f".venv/bin/python -m pip install --index-url {CU126} torch==2.14.1 torchvision==0.29.1" in lines
    assert calls == []  # everything given: nothing detected


# ---------------------------------------------------------------- the rules, in-process


def test_name_table_matches_whole_tokens():
    assert gpu_probe.cap_from_name("NVIDIA A10G") == (8, 6)
    assert gpu_probe.cap_from_name("NVIDIA A100-SXM4-40GB") == (8, 0)
    assert gpu_probe.cap_from_name("Tesla P40") == (6, 1)
    assert gpu_probe.cap_from_name("Tesla V100-SXM2-16GB") == (7, 0)
    assert gpu_probe.cap_from_name("Some Future GPU") is None


def test_mixed_cards_follow_the_oldest():
    gpus = [gpu_probe.Gpu("NVIDIA H100", (9, 0), "580.1"), gpu_probe.Gpu("Tesla V100", (7, 0), "580.1")]
    assert gpu_probe.choose_build(gpus).dali_extra == "dali-cu12"


def test_missing_nvidia_smi_means_no_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_probe.run_nvidia_smi(["-L"]) is None
    assert gpu_probe.query_gpus() == []
