"""sbatch refusing a job: llmc's error carries sbatch's own reason, and asks "is the cluster up?" only
when the cluster could not be reached.

The first tests stand a fake sbatch in for the real one, saying word for word what Slurm 23's sbatch
says; the others submit to a real one-node cluster (tests/slurm/, as test_job_slurm.py), when installed.
"""

import os
import socket

import pytest

from slurm.cluster import LocalSlurmCluster, missing_binaries
from slurm.llmc_cli import TINY, llmc

RESOURCES = ["--set", "job.cpus_per_node=2", "--set", "job.memory_gb_per_node=2"]
TWO_GPUS = ["--set", "hardware.accelerator=A100-80GB", "--set", "hardware.gpus_per_node=2"]

INVALID_PARTITION = ("sbatch: error: invalid partition specified: nope\n"
                     "sbatch: error: Batch job submission failed: Invalid partition name specified\n")
NO_CONTROLLER = "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)\n"


def _submit(tmp_path, *overrides, env=None):
    result = llmc("run", TINY, "--scheduler", "slurm", "--no-follow", *RESOURCES, *overrides, cwd=tmp_path, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith("error: submitting to slurm failed: sbatch ")
    assert "sbatch: " not in result.stderr   # sbatch's words are in llmc's line, not beside it
    return error


def _fake_sbatch(tmp_path, says: str) -> dict:
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "sbatch").write_text(f"#!/bin/sh\nprintf '%s' '{says}' >&2\nexit 1\n")
    (folder / "sbatch").chmod(0o755)
    return {"PATH": f"{folder}:{os.environ['PATH']}"}


def test_a_refusal_shows_sbatchs_reason_without_asking_whether_the_cluster_is_up(tmp_path):
    error = _submit(tmp_path, "--set", "job.partition=nope", env=_fake_sbatch(tmp_path, INVALID_PARTITION))
    assert error.endswith("exited 1: invalid partition specified: nope; "
                          "Batch job submission failed: Invalid partition name specified")
    assert "is the cluster up?" not in error


def test_an_unreachable_controller_asks_whether_the_cluster_is_up(tmp_path):
    error = _submit(tmp_path, env=_fake_sbatch(tmp_path, NO_CONTROLLER))
    assert error.endswith("Batch job submission failed: Unable to contact slurm controller (connect failure); "
                          "is the cluster up?")


real_slurm = pytest.mark.skipif(bool(missing_binaries()) or os.geteuid() != 0,
                                reason="needs the Slurm packages (sudo .ci/install-slurm.sh) and root")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalSlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=2, memory_mb=4096) as running:
        yield running


@real_slurm
@pytest.mark.slurm
@pytest.mark.slow
def test_real_sbatch_refusals_and_an_unreachable_controller(cluster, tmp_path):
    env = {"SLURM_CONF": str(cluster.conf)}
    error = _submit(tmp_path, "--set", "job.partition=nope", env=env)
    assert "Invalid partition name specified" in error and "is the cluster up?" not in error
    # The test cluster's node has no GPUs (no gres): a request for two per task is not one it can take.
    error = _submit(tmp_path, *TWO_GPUS, "--set", "train.micro_batch_size=2", "--set", "train.global_batch_size=8",
                    env=env)
    assert "Invalid generic resource (gres) specification" in error   # the script asks --gpus-per-task=2
    assert "is the cluster up?" not in error

    # The same cluster, its controller looked for on a port where none listens.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    conf = tmp_path / "slurm.conf"
    conf.write_text("".join(f"SlurmctldPort={closed_port}\n" if line.startswith("SlurmctldPort=") else line
                            for line in cluster.conf.read_text().splitlines(keepends=True)))
    error = _submit(tmp_path, env={"SLURM_CONF": str(conf)})
    assert "Unable to contact slurm controller" in error and error.endswith("; is the cluster up?")
