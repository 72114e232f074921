"""Shared by the training tests: a small stdlib run of `llmc train` in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A model of ~0.2M parameters on 300 kB of the standard library: a step takes a fraction of a second.
SMALL = ["model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_hidden=128", "model.max_seq_len=64", "train.seq_len=64", "data.max_bytes=300000",
         "train.schedule.warmup_steps=2", "train.eval_batches=2"]


def train_args(tmp_path: Path, out: str, *sets: str, nproc: int | None = None, resume: bool = False,
               spec: Path = REPO / "specs" / "tiny.toml") -> list[str]:
    """The arguments of `llmc train SPEC` (specs/tiny.toml) with SMALL and `sets`, data cached under tmp_path."""
    args = ["train", str(spec), "--out", str(tmp_path / out),
            "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    for s in SMALL + list(sets):
        args += ["--set", s]
    if nproc:
        args += ["--nproc", str(nproc)]
    if resume:
        args.append("--resume")
    return args


def llmc_train(tmp_path: Path, out: str, *sets: str, nproc: int | None = None, resume: bool = False,
               popen: bool = False, timeout: float = 300, spec: Path = REPO / "specs" / "tiny.toml"):
    """Run `llmc train` (train_args) in a subprocess."""
    cmd = [sys.executable, "-m", "llmc.compiler.cli",
           *train_args(tmp_path, out, *sets, nproc=nproc, resume=resume, spec=spec)]
    env = dict(os.environ, OMP_NUM_THREADS="1" if nproc and nproc > 1 else "2")
    if popen:
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
