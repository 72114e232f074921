"""Running the `llmc` command in the job tests (tests/test_job_*.py); REPO is the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "specs" / "tiny.toml")

# A run of the tiny spec short enough for a test: two optimizer steps on a little text.
SHORT_RUN = ["--set", "train.max_steps=2", "--set", "train.checkpoint_every=0", "--set", "train.eval_every=0",
             "--set", "train.eval_batches=1", "--set", "train.micro_batch_size=4", "--set", "train.global_batch_size=8",
             "--set", "train.seq_len=64", "--set", "data.max_bytes=300000", "--set", "data.tokenizer.vocab_size=512",
             "--set", "model.vocab_size=512"]


def llmc(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the `llmc` command (this interpreter) in `cwd`; returns the finished process (text)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, "-m", "llmc.compiler.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def handle_of(stdout: str, scheduler: str) -> str:
    """The app handle `llmc run` printed."""
    for line in stdout.splitlines():
        if line.startswith(f"{scheduler}://"):
            return line.split()[0].rstrip(":")
    raise AssertionError(f"no {scheduler}:// handle in:\n{stdout}")


def shared_data_cache(tmp_path_factory) -> list[str]:
    """`--set data.cache_dir=...` pointing at one folder per test session: the job tests prepare
    the tiny corpus once (prepared data is keyed by a fingerprint of its settings)."""
    return ["--set", f"data.cache_dir={tmp_path_factory.getbasetemp() / 'llmc-data-cache'}"]
