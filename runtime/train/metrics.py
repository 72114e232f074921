"""Metrics of a run: metrics.jsonl (one JSON object per optimizer step), TensorBoard when installed,
and what a person watching sees: a rich progress bar with ETA on a terminal, plain lines in logs.

Only rank 0 writes. On resume, metrics.jsonl is cut back to the checkpoint's step, so the file
always tells the story of the run that produced the final weights.
"""

import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict]:
    """RUN_DIR/metrics.jsonl's records (none when the run has written none)."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records of steps after `last_step` (they are about to be redone)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


class MetricsLog:
    """Append per-step records; mirror scalars to TensorBoard if it is installed."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._file = open(self.path, "a") if enabled else None
        self._tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


class ProgressDisplay:
    """A live bar on a terminal; a plain line every `every` steps when the output is a log."""

    def __init__(self, total: int, start: int, every: int, enabled: bool):
        self.enabled, self.every, self.total = enabled, every, total
        self.console = Console(stderr=True)
        self.live = enabled and sys.stderr.isatty()
        self._t0, self._start = time.perf_counter(), start
        self._bar = None
        if self.live:
            self._bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console)
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def step(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        info = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s"
        if self.live:
            self._bar.update(self._task, completed=step, info=info)
        elif step % self.every == 0 or step == self.total:
            done = step - self._start
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / done * (self.total - step) if done else 0.0
            print(f"step {step}/{self.total}  {info}  eta {eta:.0f}s", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            (self._bar.console if self.live else self.console).print(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
