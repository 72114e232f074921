"""job.retries > 0: Slurm (TorchX's requeue) and Volcano (maxRetry) restart a failed job by running its
command again, and that command trained from step 0 over the run's checkpoints. The job's command now
carries the job's id (the same in every attempt) exactly when retries > 0, and an attempt continues
from the checkpoints an earlier attempt of the same job wrote. A run directory holding checkpoints
of another run is refused, with or without retries (the job path trained over them from step 0).

The end-to-end test runs the entry command the compiled job runs (one process, without torchrun),
kills it after a checkpoint, and runs the same command again, as a scheduler's restart would.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurm.llmc_cli import TINY, llmc
from train_helpers import SMALL, metrics

STEPS = 16
RUN = [*SMALL, f"train.max_steps={STEPS}", "train.checkpoint_every=2", "train.eval_every=0",
       "train.keep_checkpoints=2", "train.global_batch_size=4", "train.micro_batch_size=2"]
JOB_ID = "4242"
APP_ID_MACRO = "${app_id}"   # TorchX's macro for the scheduler's id of the job (torchx.specs.macros.app_id)


def compile_job(cwd: Path, out: str, *sets: str) -> Path:
    """`llmc compile` of the tiny spec with RUN and `sets` into cwd/out; returns that folder."""
    args = [a for s in (*RUN, f"data.cache_dir={cwd / 'cache'}", *sets) for a in ("--set", s)]
    result = llmc("compile", TINY, "-o", out, *args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd / out


def entry_command(job: Path, job_id: str) -> list[str]:
    """What the job's torchrun runs on each rank (appdef.json), as this interpreter, one process."""
    (role,) = json.loads((job / "appdef.json").read_text())["roles"]
    args = role["args"]
    entry = args[args.index("llmc.runtime.entry") - 1:]
    return [sys.executable, *(job_id if a == APP_ID_MACRO else a for a in entry)]


def run_entry(cmd: list[str], cwd: Path, log: Path | None = None):
    """Run the entry command in cwd: to its end, or (with `log`, where its output goes) in the background."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    if log:
        with log.open("w") as out:
            return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(json.loads(meta.read_text())["step"] for meta in (run_dir / "checkpoints").glob("step-*/meta.json"))


def snapshot(run_dir: Path) -> dict:
    """What a refused attempt must leave as it was: checkpoints, their files' times, the metrics."""
    files = {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")}
    return {"checkpoints": files, "metrics": (run_dir / "metrics.jsonl").read_text()}


# ---------------------------------------------------------------- what the scheduler is asked to run

def srun_args(job: Path, cwd: Path) -> list[str]:
    """Run the sbatch script with bash as Slurm would (SLURM_JOB_ID set) and a stand-in srun that
    writes the arguments it is given, one a line: the command a node runs, after the shell's quoting."""
    bin_dir = cwd / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {cwd / 'srun.args'}\n")
    (bin_dir / "srun").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID=JOB_ID)
    done = subprocess.run(["bash", str(job / "slurm.sbatch.sh")], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return (cwd / "srun.args").read_text().splitlines()


def entry_args(command: list[str]) -> list[str]:
    return command[command.index("llmc.runtime.entry") + 1:]


@pytest.mark.parametrize("retries", [0, 2])
def test_the_job_command_names_the_job_exactly_when_it_may_be_restarted(tmp_path, retries):
    base = ["--plan", "out/plan.json", "--out", "runs/tiny"]
    expected = base + (["--job-id", JOB_ID] if retries else [])

    job = compile_job(tmp_path, "out", f"job.retries={retries}")
    assert entry_args(entry_command(job, JOB_ID)) == expected                    # the AppDef
    assert entry_args(srun_args(job, tmp_path)) == expected                       # the sbatch script, run
    assert "--requeue" in (job / "slurm.sbatch.sh").read_text()

    # Volcano: each pod's command carries the Job's own name, which a restart (RestartJob) keeps.
    job = compile_job(tmp_path, "k8s", f"job.retries={retries}", "job.image=registry.example/llmc:1.0",
                      "job.scheduler=kubernetes")
    volcano = yaml.safe_load((job / "kubernetes.volcano.yaml").read_text())
    assert volcano["spec"]["maxRetry"] == retries
    (task,) = volcano["spec"]["tasks"]
    (container,) = task["template"]["spec"]["containers"]
    name = volcano["metadata"]["name"]
    assert entry_args(container["command"]) == ["--plan", "k8s/plan.json", "--out", "runs/tiny"] + (
        ["--job-id", name] if retries else [])


# ---------------------------------------------------------------- a restarted attempt, end to end

@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
    """A job with retries killed after a checkpoint (its first attempt), then its command run again."""
    cwd = tmp_path_factory.mktemp("retries")
    job = compile_job(cwd, "job", "job.retries=2")
    run_dir = cwd / "runs" / "tiny"
    cmd = entry_command(job, JOB_ID)

    first = run_entry(cmd, cwd, log=cwd / "first-attempt.log")
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not checkpoint_steps(run_dir):
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL, f"the first attempt ended by itself: {(cwd / 'first-attempt.log').read_text()[-3000:]}"
    killed_at = checkpoint_steps(run_dir)[-1]
    assert killed_at < STEPS
    before = [m for m in metrics(run_dir) if m["step"] <= killed_at]
    assert [m["step"] for m in before] == list(range(1, killed_at + 1))   # the first attempt started at step 1

    second = run_entry(cmd, cwd)
    return {"cwd": cwd, "job": job, "run_dir": run_dir, "killed_at": killed_at, "before": before, "second": second}


def test_a_restarted_attempt_continues_from_the_checkpoint_of_the_one_before(restarted):
    second, run_dir, killed_at = restarted["second"], restarted["run_dir"], restarted["killed_at"]
    assert second.returncode == 0, second.stderr[-3000:]
    after = metrics(run_dir)
    assert [m["step"] for m in after] == list(range(1, STEPS + 1))
    # Steps up to the checkpoint were not trained again: their records (measured step times included)
    # are the first attempt's; a run from step 0 would have rewritten them.
    assert after[:killed_at] == restarted["before"]
    assert json.loads((run_dir / "report.json").read_text())["steps"] == STEPS
    assert checkpoint_steps(run_dir)[-1] == STEPS
    assert f"continuing from step-{killed_at:08d} (step {killed_at})" in second.stderr


@pytest.mark.parametrize("job_id", [None, "9999"])
def test_another_job_refuses_the_run_directory_of_a_run_it_did_not_write(restarted, job_id):
    """A job of retries 0 (no id) or another job (another id) over this run directory: refused in one
    line, nothing changed (it used to train from step 0 and overwrite the run's checkpoints)."""
    cwd, run_dir = restarted["cwd"], restarted["run_dir"]
    job = compile_job(cwd, "job-again", f"job.retries={2 if job_id else 0}")
    kept = snapshot(run_dir)
    result = run_entry(entry_command(job, job_id or JOB_ID), cwd)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == [f"error (rank 0): runs/tiny already holds checkpoints of job {JOB_ID}, not of this job: "
                      "pass --resume to continue them (llmc run --resume), or train into another run directory "
                      "(job.name, job.out_dir)"], result.stderr
    assert snapshot(run_dir) == kept


def test_a_restart_under_a_changed_plan_is_refused_naming_the_change(restarted):
    """The same job restarted after its plan.json was compiled again from another spec (`llmc run`
    writes RUN_DIR/job/ anew): the checkpoint is not of this plan, which the restart says."""
    cwd, run_dir = restarted["cwd"], restarted["run_dir"]
    job = compile_job(cwd, "job-changed", "job.retries=2", "model.d_model=32")
    kept = snapshot(run_dir)
    result = run_entry(entry_command(job, JOB_ID), cwd)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "the spec changed since it was written" in result.stderr and "model.d_model: 64 -> 32" in result.stderr
    assert snapshot(run_dir) == kept
