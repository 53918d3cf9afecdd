"""benchmarks/device_check.sh in its CPU dry run: every step runs and leaves its JSON before GPU time is spent."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("timeout") is None, reason="coreutils timeout missing")


def run_check(tmp_path, work, **env) -> dict:
    out = tmp_path / "out"
    e = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "WORK": str(work), "PYTHON": sys.executable,
         "PYTHONPATH": str(ROOT), **env}
    subprocess.run(["bash", str(SCRIPT)], env=e, cwd=tmp_path, check=True, capture_output=True, text=True,
                   timeout=280)
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("device-check-data")  # the synthetic shards, made once, reused


@pytest.fixture(scope="module")
def dry(tmp_path_factory, work):
    return run_check(tmp_path_factory.mktemp("device-check"), work)


# The whole dry run is ~36 s of the default suite's ~6-minute budget; the script matters only when a GPU is
# lent, and a session that gets one runs `pytest -m slow tests/test_device_check.py` before spending it.
@pytest.mark.slow
def test_dry_run_every_step_succeeds_with_figures(dry):
    steps = dry["steps"]
    assert set(steps) == {"env", "data", "gpu-tests", "train-fp32-cl", "train-fp32-nocl", "loader"}
    assert all(s["ok"] for s in steps.values()), {k: s["rc"] for k, s in steps.items()}
    assert dry["dry_run"] and dry["ok"]
    env = steps["env"]["result"]["env"]
    assert env["pick_device"] == "cpu" and "arch_list" in env["torch"]
    assert "dali_extra=" in env["select_build"]["out"]
    for name in ("train-fp32-cl", "train-fp32-nocl"):
        t = steps[name]["result"][name]
        assert t["model"] == "test_efficientnet" and t["image_size"] == 64 and t["model_only"]["images"] > 0
    assert steps["loader"]["result"]["loader"]["lines"]["decode-only"]["images_per_s"] > 0


@pytest.mark.slow
def test_dry_run_fills_the_gpu_test_slots(dry):
    slots = dry["steps"]["gpu-tests"]["result"]["gpu-tests"]["slots"]
    assert set(slots) == {"sync_debug", "dali_checkpoint", "clahe_gpu_vs_cpu", "kill_and_resume"}
    assert all(s["status"] in {"missing", "passed", "failed", "skipped"} for s in slots.values())


@pytest.mark.slow  # a second whole dry run
def test_a_failing_step_does_not_stop_the_others(tmp_path, work, dry):
    # fp8 is no precision: bench train refuses its config; the loader step after it still runs
    got = run_check(tmp_path, work, PRECISIONS="fp8", LAYOUTS="cl")
    steps = got["steps"]
    assert steps["train-fp8-cl"]["rc"] not in (0, None) and not got["ok"]
    assert steps["loader"]["ok"] and steps["env"]["ok"] and steps["data"]["ok"]


def test_steps_past_the_deadline_are_recorded_as_skipped(tmp_path, work):
    got = run_check(tmp_path, work, DEADLINE_S="1")
    assert got["steps"] and all(s["rc"] is None and "deadline" in s["skipped"] for s in got["steps"].values())
