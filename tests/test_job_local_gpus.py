"""A plan of several GPU nodes run by the local scheduler: the replicas share one host's GPUs."""

from pathlib import Path

from llmc.compiler.job.emit import compile_job
from llmc.compiler.job.schedulers import make_runner, torchx_scheduler
from llmc.compiler.spec import load_spec
from slurm.llmc_cli import TINY, llmc

TWO_GPU_NODES = ["hardware.accelerator=A100-80GB", "hardware.nodes=2", "hardware.gpus_per_node=2",
                 "train.micro_batch_size=2", "train.global_batch_size=8"]


def _fake_nvidia_smi(folder: Path, gpus: int) -> None:
    lines = "".join(f"GPU {i}: NVIDIA A100-SXM4-80GB (UUID: GPU-{i})\\n" for i in range(gpus))
    (folder / "nvidia-smi").write_text(f"#!/bin/sh\nprintf '{lines}'\n")
    (folder / "nvidia-smi").chmod(0o755)


def _visible_devices(tmp_path, overrides) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each replica of the local job, as TorchX would launch it."""
    spec = load_spec(TINY, overrides)
    job = compile_job(spec, tmp_path / "out", scheduler="local")
    with make_runner() as runner:
        info = runner.dryrun(job.app(), torchx_scheduler(spec, "local"), cfg=job.cfg())
    (replicas,) = info.request.role_params.values()
    return [replica.env.get("CUDA_VISIBLE_DEVICES") for replica in replicas]


def test_local_replicas_get_disjoint_gpus(tmp_path, monkeypatch):
    # 2 nodes x 2 GPUs on a 4-GPU host: as TorchX documents, replica 0 gets GPUs 0,1 and replica 1 gets 2,3
    # (without it, local rank 0 of both replicas would use GPU 0).
    _fake_nvidia_smi(tmp_path, 4)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert _visible_devices(tmp_path, TWO_GPU_NODES) == ["0,1", "2,3"]
    # One node: the GPUs the user's shell made visible are left alone.
    assert _visible_devices(tmp_path, ["hardware.accelerator=A100-80GB", "hardware.gpus_per_node=2"]) == [None]


def test_compiling_a_multi_node_gpu_job_where_there_is_no_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.chdir(tmp_path)
    assert _visible_devices(tmp_path, TWO_GPU_NODES) == [None, None]
    assert (tmp_path / "out" / "local.request.txt").exists()


def test_torchx_local_gpu_warning_only_for_a_local_job(tmp_path):
    # Compiling a Slurm job renders its local request too: TorchX's warning that local replicas may
    # share GPUs is not about the job. A local run of replicas that do share them still shows it.
    slurm_job = ["--set", "job.scheduler=slurm", *[a for o in TWO_GPU_NODES for a in ("--set", o)]]
    result = llmc("compile", TINY, "-o", "out", *slurm_job, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "CUDA_VISIBLE_DEVICES" not in result.stderr
    result = llmc("run", TINY, "--dryrun", *slurm_job, "--scheduler", "local", cwd=tmp_path,
                  env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and "CUDA_VISIBLE_DEVICES" in result.stderr, result.stderr
