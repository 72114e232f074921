"""Slurm's clients absent (not a Slurm login node): submitting, asking for the status of and cancelling
a Slurm job each end in one line naming the missing client, not a FileNotFoundError traceback."""

import pytest

from slurm.llmc_cli import TINY, llmc

RESOURCES = ["--set", "job.cpus_per_node=2", "--set", "job.memory_gb_per_node=2"]


@pytest.fixture
def no_slurm(tmp_path):
    """An environment whose PATH holds no Slurm client (an empty folder: llmc runs by its full path)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    return {"PATH": str(empty)}


@pytest.mark.parametrize("verb, client", [
    (["run", TINY, "--scheduler", "slurm", "--no-follow", *RESOURCES], "sbatch"),
    (["status", "slurm://llmc/1234"], "sacct"),
    (["cancel", "slurm://llmc/1234"], "sacct"),   # (TorchX asks sacct whether the job exists before scancel)
])
def test_a_missing_slurm_client_is_one_line_naming_it(tmp_path, no_slurm, verb, client):
    result = llmc(*verb, cwd=tmp_path, env=no_slurm)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "FileNotFoundError" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {client} is not on PATH (is this a Slurm login node?): llmc submits Slurm jobs "
                      "with sbatch and follows them with sacct and scancel"], result.stderr
