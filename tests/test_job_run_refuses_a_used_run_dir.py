"""`llmc run` into a run directory that holds checkpoints of a run: refused before anything is
compiled or submitted (the job itself would refuse them, after its wait in the queue), unless
--resume asks to continue them. As `llmc train` refuses the same directory."""

import json
import os
import time

import pytest

from slurm.llmc_cli import TINY, llmc


def used_run_dir(root):
    """runs/tiny as a run left it: a complete checkpoint (a step-N folder with its meta.json)."""
    step = root / "runs" / "tiny" / "checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 4, "world_size": 1, "spec": {}}))
    return root / "runs" / "tiny"


def test_run_refuses_a_run_directory_with_checkpoints(tmp_path):
    run_dir = used_run_dir(tmp_path)
    for scheduler in ("local", "slurm"):  # both run where they are submitted from
        result = llmc("run", TINY, "--scheduler", scheduler, cwd=tmp_path)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [
            f"error: {run_dir} already holds checkpoints of a run: pass --resume to continue it, "
            "or set job.name (or job.out_dir) for a new run directory"], result.stderr
        assert not (run_dir / "job").exists()  # nothing compiled, nothing submitted


def test_only_complete_checkpoints_count(tmp_path):
    # a run killed while writing its first checkpoint leaves a .tmp- folder only: nothing to continue
    from llmc.runtime.folders import checkpoints

    unfinished = tmp_path / "checkpoints" / ".tmp-step-00000001"
    unfinished.mkdir(parents=True)
    assert checkpoints(tmp_path) == []
    assert checkpoints(used_run_dir(tmp_path)) == [tmp_path / "runs" / "tiny" / "checkpoints" / "step-00000004"]


def record(root, handle: str, run_dir, **fields):
    """A line of .llmc/jobs.jsonl, as `llmc run` writes it when it submits (and later when it knows more)."""
    jobs = root / ".llmc" / "jobs.jsonl"
    jobs.parent.mkdir(exist_ok=True)
    with jobs.open("a") as f:
        f.write(json.dumps({"handle": handle, "time": time.time(), "run_dir": str(run_dir), **fields}) + "\n")


def test_run_refuses_the_run_directory_of_a_job_still_running(tmp_path):
    """Two submissions of one spec: the second wrote its plan.json over the first's, and both trained
    into one folder (the first had no checkpoint yet, so nothing refused it)."""
    run_dir = tmp_path / "runs" / "tiny"
    handle = "local_cwd://torchx/tiny-abc"
    record(tmp_path, handle, run_dir, pid=os.getpid())   # its `llmc run` (here: this test) is alive
    result = llmc("run", TINY, "--scheduler", "local", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {run_dir} is the run directory of {handle}, which is RUNNING: wait for it, stop it "
        f"(llmc cancel {handle}), or set job.name (or job.out_dir) for another"), result.stderr
    assert not (run_dir / "job").exists()  # nothing compiled, nothing submitted


class FakeRunner:
    """TorchX's runner as _status asks it: the scheduler's state of each handle (None: unknown)."""

    def __init__(self, states: dict):
        self.states = states

    def status(self, handle):
        from torchx.specs import AppStatus
        state = self.states.get(handle)
        return None if state is None else AppStatus(state=state)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_only_jobs_queued_or_running_keep_a_run_directory(tmp_path, monkeypatch):
    from torchx.specs import AppState

    from llmc.compiler.errors import UserError
    from llmc.compiler.job import cli

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    queued, done, forgotten, new = (f"slurm://torchx/{n}" for n in (101, 102, 103, 104))
    record(tmp_path, done, run_dir)
    record(tmp_path, forgotten, run_dir, time=time.time() - 3600)   # beyond the scheduler's accounting
    record(tmp_path, "local_cwd://torchx/tiny-old", run_dir, pid=os.getpid(), state="SUCCEEDED")
    record(tmp_path, queued, tmp_path / "runs" / "other")            # another run directory
    states = {done: AppState.SUCCEEDED, queued: AppState.PENDING}
    monkeypatch.setattr(cli, "make_runner", lambda: FakeRunner(states))
    cli._refuse_a_busy_run_dir(run_dir)                      # none of them holds it
    assert cli.track.lookup(done)["state"] == "SUCCEEDED"    # (said once: not asked again)

    record(tmp_path, new, run_dir)          # just submitted: the scheduler does not list it yet
    with pytest.raises(UserError, match=f"is the run directory of {new}, which is PENDING"):
        cli._refuse_a_busy_run_dir(run_dir)
    states[new] = AppState.RUNNING
    with pytest.raises(UserError, match=f"is the run directory of {new}, which is RUNNING"):
        cli._refuse_a_busy_run_dir(run_dir)
