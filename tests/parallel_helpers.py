"""Launching tests/parallel_worker.py under torchrun (gloo, CPU) with a hard timeout."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "parallel_worker.py"
SPEC = str(ROOT / "specs" / "tiny_moe.toml")
# tiny_moe with a small vocabulary: the head dominates the step time otherwise
SETS = ["model.vocab_size=256"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(out: Path, nproc: int, layout: dict | None = None, sets: list[str] = (), extra: list[str] = (),
               timeout: float = 300) -> list[dict]:
    """Run the worker on `nproc` ranks (plain python for one) and return each rank's result.

    Without `layout` the worker takes the planner's layout for the spec with `sets` (e.g.
    "parallel.dp=2"); with it, that layout directly."""
    args = ["--spec", SPEC, "--out", str(out)]
    if layout is not None:
        args += ["--layout", json.dumps(layout)]
    for s in [*SETS, *sets]:
        args += ["--set", s]
    args += list(extra)
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKER), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(nproc)]


def merged_state(results: list[dict]) -> dict:
    """Full weights from every rank (pipeline stages hold different parts)."""
    state = {}
    for r in results:
        state.update(r["state"])
    return state


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12)).item()
