"""Following a submitted job: its state changes and its logs, until it ends."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from torchx.runner import Runner
from torchx.schedulers.api import Stream
from torchx.specs import AppState, is_terminal, parse_app_handle

POLL_SECONDS = 1.0


def log_streams(handle: str) -> list[Stream | None]:
    """Which log streams to print: local keeps a combined file; Slurm keeps stdout and stderr apart."""
    scheduler = parse_app_handle(handle).scheduler_backend
    if scheduler.startswith("local"):
        return [Stream.COMBINED]
    if scheduler == "slurm":
        return [Stream.STDOUT, Stream.STDERR]
    return [None]


def print_logs(runner: Runner, handle: str, role: str, replicas: int, *, tail: bool, out=None) -> None:
    """Print every replica's logs (all of them now, or following them until the job ends)."""
    out = out or sys.stdout
    threads = []
    for k in range(replicas):
        for stream in log_streams(handle):
            def pump(k=k, stream=stream):
                try:
                    for line in runner.log_lines(handle, role, k, should_tail=tail, streams=stream):
                        out.write(line if line.endswith("\n") else line + "\n")
                        out.flush()
                except Exception as e:  # noqa: BLE001 - a missing log must not stop the follow
                    print(f"[logs of {role}/{k}: {e}]", file=sys.stderr)
            threads.append(threading.Thread(target=pump, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def wait_known(runner: Runner, handle: str, timeout: float = 60.0):
    """The job's status once the scheduler knows it (accounting can lag behind submission)."""
    deadline = time.monotonic() + timeout
    while True:
        status = runner.status(handle)
        if status is not None or time.monotonic() > deadline:
            return status
        time.sleep(POLL_SECONDS)


def follow(runner: Runner, handle: str, role: str, replicas: int, *, logs: bool = True) -> AppState:
    """Print state changes (and logs) until the job ends; return its final state."""
    status = wait_known(runner, handle)
    if status is None:
        print(f"{handle}: the scheduler does not know this job", file=sys.stderr)
        return AppState.UNKNOWN
    print(f"{handle}: {status.state.name}", flush=True)
    log_thread = None
    if logs:
        log_thread = threading.Thread(target=print_logs, args=(runner, handle, role, replicas),
                                      kwargs={"tail": True}, daemon=True)
        log_thread.start()
    last = status.state
    while not is_terminal(last):
        time.sleep(POLL_SECONDS)
        status = runner.status(handle)
        if status is not None and status.state != last:
            last = status.state
            print(f"{handle}: {last.name}", flush=True)
    if log_thread is not None:
        log_thread.join(timeout=30)   # the log iterators stop once they see the end
    return last


def print_report(run_dir: Path) -> None:
    """The run report the training entry wrote, if any."""
    report = run_dir / "report.md"
    if report.exists():
        print(report.read_text(encoding="utf-8"), end="")
    else:
        print(f"(no run report at {report})")
