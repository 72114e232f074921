"""job.retries on the local scheduler: TorchX's local scheduler does not retry ("Retry counts (no
retries supported)", its documentation says), so a local run says that job.retries does not apply."""

from torchx import specs
from torchx.runner import get_runner

from slurm.llmc_cli import TINY, llmc


def test_torchx_local_scheduler_runs_a_failing_role_once_whatever_its_max_retries(tmp_path):
    # The premise of the note below: if TorchX ever retries locally, llmc should stop saying it does not.
    attempts = tmp_path / "attempts"
    role = specs.Role(name="fails", image="", entrypoint="sh", args=["-c", f"echo x >> {attempts}; exit 3"],
                      max_retries=2)
    with get_runner() as runner:
        handle = runner.run(specs.AppDef(name="fails", roles=[role]), "local_cwd", cfg={"log_dir": str(tmp_path)})
        status = runner.wait(handle, wait_interval=0.2)
    assert status.state == specs.AppState.FAILED
    assert attempts.read_text() == "x\n"


def test_a_local_run_with_retries_says_they_do_not_apply(tmp_path):
    result = llmc("run", TINY, "--dryrun", "--set", "job.retries=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (note,) = [line for line in result.stderr.splitlines() if "job.retries" in line]
    assert note.startswith("note: job.retries = 2 does not apply to a local run")
    for quiet in (["--set", "job.retries=0"], ["--set", "job.retries=2", "--scheduler", "slurm"]):
        result = llmc("run", TINY, "--dryrun", *quiet, cwd=tmp_path)
        assert result.returncode == 0 and "job.retries" not in result.stderr, result.stderr
