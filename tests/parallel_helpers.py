"""Launching tests/parallel_worker.py (and workers like it) under torchrun (gloo, CPU), several runs
to a launch, with a hard timeout."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
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


def worker_args(out: Path, layout: dict | None = None, sets: list[str] = (), extra: list[str] = ()) -> list[str]:
    """The worker's arguments for one run. Without `layout` the worker takes the planner's layout
    for the spec with `sets` (e.g. "parallel.dp=2"); with it, that layout directly."""
    args = ["--spec", SPEC, "--out", str(out)]
    if layout is not None:
        args += ["--layout", json.dumps(layout)]
    for s in [*SETS, *sets]:
        args += ["--set", s]
    return args + list(extra)


def _launch(nproc: int, args: list[str], timeout: float, worker: Path = WORKER) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, str(worker), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(worker), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_each(listing: str, run, out_of) -> None:
    """In a worker launched by Batch: `run(entry)` for each entry of the JSON file `listing`. When
    one fails, its traceback goes to OUT/error{rank}.txt (OUT = `out_of(entry)`) and the process
    ends: the other ranks may wait in a collective, and torchrun then stops them all."""
    import traceback
    import torch.distributed as dist
    for entry in json.loads(Path(listing).read_text()):
        try:
            run(entry)
        except BaseException:
            out = Path(out_of(entry))
            out.mkdir(parents=True, exist_ok=True)
            (out / f"error{dist.get_rank() if dist.is_initialized() else 0}.txt").write_text(traceback.format_exc())
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)


class Batch:
    """Several worker runs on the same number of ranks, done by one launch of the worker (each
    rank imports torch once): `batch[name]` is that run's per-rank results, or fails the calling
    test with the run's error (a failed run stops the launch: the runs after it are not done).

    Each run's arguments are `args(root / name, **run)`; the worker (`worker --batch LISTING`) does
    them in turn and writes `result` (of each rank r) in the run's folder, which `load` reads."""

    def __init__(self, root: Path, nproc: int, runs: dict[str, dict], timeout: float = 900, *, worker: Path = WORKER,
                 args=worker_args, result: str = "rank{}.pt", load=torch.load):
        root.mkdir(parents=True, exist_ok=True)
        self.outs = {name: root / name for name in runs}
        listing = root / "batch.json"
        listing.write_text(json.dumps([args(self.outs[name], **run) for name, run in runs.items()]))
        self.nproc, self.result, self.load = nproc, result, load
        self.proc = _launch(nproc, ["--batch", str(listing)], timeout, worker)

    def __getitem__(self, name: str) -> list:
        files = [self.outs[name] / self.result.format(r) for r in range(self.nproc)]
        if all(f.is_file() for f in files):
            return [self.load(f) for f in files]
        errors = "".join(e.read_text() for e in sorted(self.outs[name].glob("error*.txt")))
        detail = errors or ("not run: an earlier run of the batch failed\n" if self.proc.returncode else "")
        pytest.fail(f"{name} on {self.nproc} ranks: {detail}{self.proc.stdout[-2000:]}{self.proc.stderr[-3000:]}")


class Batches:
    """Named worker runs {name: (nproc, worker_args' keywords)}, launched a Batch per number of
    ranks when one of its runs is first asked for (after every run of `after`, whose outputs they
    may read)."""

    def __init__(self, root: Path, runs: dict[str, tuple[int, dict]], after: "Batches | None" = None):
        self.root, self.runs, self.after, self.batches = root, runs, after, {}

    def __getitem__(self, name: str) -> list[dict]:
        return self._batch(self.runs[name][0])[name]

    def _batch(self, nproc: int) -> Batch:
        if nproc not in self.batches:
            if self.after is not None:
                self.after.launch_all()
            same = {n: run for n, (k, run) in self.runs.items() if k == nproc}
            self.batches[nproc] = Batch(self.root / f"ranks{nproc}", nproc, same)
        return self.batches[nproc]

    def launch_all(self) -> None:
        for nproc in sorted({k for k, _ in self.runs.values()}):
            self._batch(nproc)


def merged_state(results: list[dict]) -> dict:
    """Full weights from every rank (pipeline stages hold different parts)."""
    state = {}
    for r in results:
        state.update(r["state"])
    return state


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12)).item()
