"""Start N ranks of a Python program the way ``torchrun`` does (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT in each one's environment), on the CPU with gloo: the distributed tests' launcher.

    outs = run_ranks(["-m", "spinestream", "train", "-c", cfg], world=2)

Each rank is a separate interpreter (as under torchrun), one thread each (the machine has 2 cores);
a rank that does not finish in ``timeout`` seconds is killed with the others and the test fails with every
rank's output.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def run_ranks(args: list[str], world: int = 2, *, env: dict | None = None, timeout: float = 240,
              cwd: str | Path | None = None, check: bool = True) -> list[RankResult]:
    """Run ``python ARGS`` as ``world`` ranks; their results in rank order (``check``: all must exit 0)."""
    port = free_port()
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            **(env or {})}
    procs = [subprocess.Popen([sys.executable, *args], env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    results, timed_out = [], False
    for r, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            for q in procs:
                q.kill()
            out, err = p.communicate()
        results.append(RankResult(r, p.returncode, out, err))
    if timed_out or (check and any(x.returncode for x in results)):
        detail = "\n".join(f"--- rank {x.rank} (exit {x.returncode})\n{x.stdout[-3000:]}\n{x.stderr[-3000:]}"
                           for x in results)
        raise AssertionError(("ranks timed out" if timed_out else "a rank failed") + f":\n{detail}")
    return results
