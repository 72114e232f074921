"""GPUs of each vendor as the schedulers ask for them: Kubernetes by the vendor's device-plugin
resource (NVIDIA's nvidia.com/gpu, AMD's amd.com/gpu), Slurm by count, local without nvidia-smi on AMD."""

from pathlib import Path

import pytest
import yaml

from llmc.compiler.job.emit import compile_job
from llmc.compiler.job.schedulers import make_runner, torchx_scheduler
from llmc.compiler.spec import load_spec
from slurm.llmc_cli import TINY

EIGHT_GPUS = ["hardware.gpus_per_node=8", "train.global_batch_size=64", "job.image=registry.example/llmc:1.0"]


def _container_resources(tmp_path, accelerator: str) -> dict:
    spec = load_spec(TINY, [f"hardware.accelerator={accelerator}", *EIGHT_GPUS])
    job = compile_job(spec, tmp_path / accelerator, scheduler="kubernetes")
    volcano = yaml.safe_load((job.out / "kubernetes.volcano.yaml").read_text())
    (task,) = volcano["spec"]["tasks"]
    (container,) = task["template"]["spec"]["containers"]
    return container["resources"]


@pytest.mark.parametrize("accelerator, plugin_resource, other", [
    ("H100-80GB", "nvidia.com/gpu", "amd.com/gpu"),
    ("MI300X-192GB", "amd.com/gpu", "nvidia.com/gpu")])
def test_kubernetes_asks_for_the_vendors_gpu_resource(tmp_path, accelerator, plugin_resource, other):
    resources = _container_resources(tmp_path, accelerator)
    assert resources["limits"][plugin_resource] == "8"
    # Kubernetes takes an extended resource's request from its limit when none is given; if given, they are equal.
    assert resources["requests"].get(plugin_resource, "8") == "8"
    assert other not in resources["limits"] and other not in resources["requests"]


def test_slurm_asks_for_amd_gpus_by_count(tmp_path):
    spec = load_spec(TINY, ["hardware.accelerator=MI300X", "hardware.gpus_per_node=8", "train.global_batch_size=64"])
    job = compile_job(spec, tmp_path / "out", scheduler="slurm")
    script = (job.out / "slurm.sbatch.sh").read_text()
    options = {option for line in script.splitlines() if line.startswith("#SBATCH ") for option in line.split()[1:]}
    assert "--gpus-per-task=8" in options   # a generic GRES count: Slurm's gres.conf knows the vendor


def test_local_replicas_on_amd_gpus_never_run_nvidia_smi(tmp_path, monkeypatch):
    # TorchX counts GPUs with `nvidia-smi -L` to divide them among replicas: that counts NVIDIA's, not AMD's.
    calls = tmp_path / "nvidia-smi-calls"
    (tmp_path / "nvidia-smi").write_text(f"#!/bin/sh\necho called >> {calls}\nprintf 'GPU 0: x\\nGPU 1: x\\n'\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    spec = load_spec(TINY, ["hardware.accelerator=MI300X", "hardware.nodes=2", "hardware.gpus_per_node=1",
                            "train.micro_batch_size=2", "train.global_batch_size=8"])
    job = compile_job(spec, tmp_path / "out", scheduler="local")
    with make_runner() as runner:
        info = runner.dryrun(job.app(), torchx_scheduler(spec, "local"), cfg=job.cfg())
    (replicas,) = info.request.role_params.values()
    assert [replica.env.get("CUDA_VISIBLE_DEVICES") for replica in replicas] == [None, None]
    assert not Path(calls).exists()
