"""`llmc cancel` of a local job, seen from the `llmc run` that owns it and from `llmc status`."""

import os
import subprocess
import sys
import time

from slurm.llmc_cli import TINY, handle_of, llmc

# `llmc run` with a probe in place of the training entry: only the launch and the stop are under test.
DRIVER = """
import sys
from llmc.compiler.job import appdef
appdef.ENTRY_MODULE = "probe_entry"
from llmc.compiler.cli import main
sys.exit(main(sys.argv[1:]))
"""
PROBE = """
import os, pathlib, time
pathlib.Path("probe.pid").write_text(str(os.getpid()))
print("probe started", flush=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    with open(f"/proc/{pid}/stat") as f:   # a zombie is not running
        return f.read().split(") ")[1][0] != "Z"


def test_cancelled_local_job_ends_cancelled_without_a_traceback(tmp_path):
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "probe_entry.py").write_text(PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, "driver.py", "run", TINY, "--set", f"job.env.PYTHONPATH={tmp_path}"],
                           cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in run.stdout:   # until the job's own output shows it is running
            lines.append(line)
            if "probe started" in line:
                break
        handle = handle_of("".join(lines), "local_cwd")
        probe_pid = int((tmp_path / "probe.pid").read_text())
        cancel = llmc("cancel", handle, cwd=tmp_path)
        assert cancel.returncode == 0, cancel.stderr
        out, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode != 0
    assert "Traceback" not in err, err
    deadline = time.monotonic() + 30
    while _alive(probe_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(probe_pid)                       # the job was stopped, not orphaned
    # TorchX's state for a job stopped on request is CANCELLED, and so is the job's status afterwards.
    status = llmc("status", handle, cwd=tmp_path)
    assert status.stdout.strip() == f"{handle}: CANCELLED", status.stdout + status.stderr
