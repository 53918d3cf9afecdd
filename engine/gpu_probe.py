"""What ``nvidia-smi`` says about this machine's GPUs, and which torch and DALI builds fit them.

Standard library only, and importing nothing of the project: ``.ci/select_build.py`` loads this
file by path before any virtual environment exists (the Makefile's choice of wheels), and
``spinestream.engine.device`` uses it at run time to say why a visible GPU is unusable and which build to
install instead. One detection for both, so the advice at run time is what ``make venv`` does.

The two builds (torch 2.14 ships both; 2.15 is planned without the CUDA 12.6 one):

* default — PyPI's torch (CUDA 13.0: kernels sm_75 … sm_120, needs an R580+ driver) and
  ``dali-cu13``; also on machines without a GPU (DALI's CPU-only mode works with either wheel);
* legacy — PyTorch's CUDA 12.6 index (sm_50 … sm_90, R525+) and ``dali-cu12``: Pascal and Volta
  (the Kaggle P100, V100), or any card whose driver predates CUDA 13 (a T4 on R550).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

CU126_INDEX = "https://download.pytorch.org/whl/cu126"
CUDA13_MIN_DRIVER = 580   # CUDA 13.x needs R580+
CUDA12_MIN_DRIVER = 525   # CUDA 12.x (minor-version compatibility) needs R525+
CUDA13_MIN_CAP = (7, 5)   # CUDA 13 dropped Maxwell, Pascal and Volta

# Drivers older than ~R510 do not know the compute_cap field: the capability from the product name.
# Matched as a whole token ("A10" is not "A100", "P4" is not "P40"); longest names first.
NAME_CAPS: tuple[tuple[str, tuple[int, int]], ...] = (
    ("H200", (9, 0)), ("H100", (9, 0)), ("A100", (8, 0)), ("A30", (8, 0)), ("A10", (8, 6)),
    ("L4", (8, 9)), ("T4", (7, 5)), ("V100", (7, 0)), ("P100", (6, 0)), ("P40", (6, 1)), ("P4", (6, 1)),
)

# runs nvidia-smi with these arguments: its stdout, or None when it is missing or fails
Runner = Callable[[Sequence[str]], Optional[str]]


@dataclass(frozen=True)
class Gpu:
    """One GPU as nvidia-smi reports it; capability None when neither the query nor the name tells."""

    name: str
    capability: tuple[int, int] | None
    driver: str

    @property
    def sm(self) -> str:
        return "sm_??" if self.capability is None else f"sm_{self.capability[0]}{self.capability[1]}"

    @property
    def driver_major(self) -> int | None:
        m = re.match(r"\s*(\d+)", self.driver)
        return int(m.group(1)) if m else None

    def describe(self) -> str:
        return f"{self.name} ({self.sm}, driver {self.driver or '?'})"


@dataclass(frozen=True)
class Build:
    """The torch wheel index and DALI extra for a machine, and why."""

    torch_index: str   # "" = PyPI's default torch (CUDA 13.0)
    dali_extra: str    # the pip extra of pyproject.toml: dali-cu12 | dali-cu13
    reason: str
    warning: str | None = None

    @property
    def cuda(self) -> str:
        return "12.6" if self.torch_index == CU126_INDEX else "13.0"


def run_nvidia_smi(args: Sequence[str]) -> str | None:
    """The real runner: nvidia-smi from PATH, None when it is absent, fails or hangs."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        r = subprocess.run([exe, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def cap_from_name(name: str) -> tuple[int, int] | None:
    """Compute capability from a product name ("Tesla P100-PCIE-16GB" -> (6, 0)); None if unknown."""
    for key, cap in NAME_CAPS:
        if re.search(rf"(?<![A-Za-z0-9]){key}(?![0-9])", name):
            return cap
    return None


def _parse_cap(text: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def query_gpus(run: Runner = run_nvidia_smi) -> list[Gpu]:
    """Every GPU nvidia-smi lists ([] without nvidia-smi or a GPU); the capability falls back to the name."""
    out = run(["--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"])
    with_cap = out is not None
    if not with_cap:  # an old driver rejects the compute_cap field: ask without it
        out = run(["--query-gpu=name,driver_version", "--format=csv,noheader"])
    if out is None:
        return []
    gpus = []
    for line in out.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.rsplit(",", 2 if with_cap else 1)]
        if len(fields) != (3 if with_cap else 2):
            continue  # not a CSV row (a warning line): nothing to learn from it
        name, driver = fields[0], fields[-1]
        cap = (_parse_cap(fields[1]) if with_cap else None) or cap_from_name(name)
        gpus.append(Gpu(name, cap, driver))
    return gpus


def choose_build(gpus: Sequence[Gpu]) -> Build:
    """The torch index and DALI extra for these GPUs: the oldest card and the driver decide."""
    if not gpus:
        return Build("", "dali-cu13", "no NVIDIA GPU visible: PyPI's torch (CUDA 13.0) and dali-cu13 "
                                      "(DALI's CPU-only mode works with either wheel)")
    known = [g for g in gpus if g.capability is not None]
    oldest = min(known, key=lambda g: g.capability) if known else None
    drivers = [g.driver_major for g in gpus if g.driver_major is not None]
    driver = min(drivers) if drivers else None
    warning = None
    if driver is not None and driver < CUDA12_MIN_DRIVER:
        warning = (f"driver {driver} is older than R{CUDA12_MIN_DRIVER}: neither the CUDA 12.6 nor the CUDA 13 "
                   f"torch runs on it; update the driver (or pick an older torch by hand: TORCH_INDEX, TORCH_SPEC)")
    elif oldest is not None and oldest.capability < (5, 0):
        warning = f"{oldest.describe()} is older than any current torch build supports (sm_50+)"
    if oldest is not None and oldest.capability < CUDA13_MIN_CAP:
        why = f"{oldest.describe()}: CUDA 13 builds start at sm_75"
    elif driver is not None and driver < CUDA13_MIN_DRIVER:
        why = f"{gpus[0].describe()}: CUDA 13 needs an R{CUDA13_MIN_DRIVER}+ driver"
    else:
        return Build("", "dali-cu13", f"{gpus[0].describe()}: PyPI's torch (CUDA 13.0) and dali-cu13", warning)
    return Build(CU126_INDEX, "dali-cu12", f"{why}: torch from PyTorch's CUDA 12.6 index and dali-cu12", warning)


def install_hint(build: Build) -> str:
    """How to get this build: the Makefile variables, and the plain pip line."""
    index = f" --index-url {build.torch_index}" if build.torch_index else ""
    make_vars = f"TORCH_INDEX={build.torch_index} " if build.torch_index else ""
    return (f"`rm -rf .venv && make venv` picks it from nvidia-smi (or force it: "
            f"`make venv {make_vars}DALI_EXTRA={build.dali_extra}`); by hand: "
            f"`pip install{index} torch==<version> torchvision==<its pair>` "
            f"(README: \"Installing by hand, and which DALI\")")
