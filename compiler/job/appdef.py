"""Plan -> TorchX AppDef: one role that runs torchrun over the plan's nodes and processes.

Everything the job needs comes from the plan document (plan.json): its layout fixes the node count
and the processes per node, its resolved spec gives resources, image, env, mounts, retries and the
job name. Every value is passed to TorchX as a separate argument (argv), never spliced into shell
text; the one shell snippet used (multi-node rendezvous) is a constant that reads its inputs as
positional parameters.
"""

from __future__ import annotations

import posixpath
import sys
from dataclasses import dataclass

from torchx import specs
from torchx.schedulers.kubernetes_scheduler import RESERVED_MEMMB, RESERVED_MILLICPU

from ..errors import UserError
from ..plan.hardware import lookup
from ..spec import Spec

RDZV_PORT = 29500            # rank 0's c10d store port on multi-node jobs
ENTRY_MODULE = "llmc.runtime.entry"
SCHEDULERS = ("local", "slurm", "kubernetes")

# The Kubernetes resource a vendor's device plugin advertises its GPUs as. TorchX asks for
# Resource.gpu as nvidia.com/gpu; the others are asked for by name through Resource.devices.
KUBERNETES_GPU_RESOURCE = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu"}

# Multi-node only. $1 names the variable that holds rank 0's host (TorchX fills it per scheduler:
# a hostname, or on Slurm a node list), $2 is the port; the rest is the torchrun command line.
# torchrun reads PET_RDZV_ENDPOINT when --rdzv_endpoint is not given.
RENDEZVOUS_SCRIPT = (
    'host="${!1:-localhost}"; '
    'case "$host" in *[[,]*) host="$(scontrol show hostnames "$host" | head -n 1)";; esac; '
    'export PET_RDZV_ENDPOINT="$host:$2"; shift 2; exec "$@"'
)


@dataclass(frozen=True)
class Layout:
    """How many nodes and processes per node the job runs (from the plan)."""

    nodes: int
    procs_per_node: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


@dataclass(frozen=True)
class NodeResources:
    """What one node (one TorchX replica) asks the scheduler for."""

    cpus: int
    gpus: int
    memory_mb: int
    gpu_vendor: str = ""     # the accelerator catalog's vendor of the GPUs ("" without GPUs)


def layout_of(plan: dict) -> Layout:
    """The node count and processes per node of a plan document."""
    layout = plan["layout"]
    return Layout(nodes=int(layout["nodes"]), procs_per_node=int(layout["procs_per_node"]))


def node_resources(spec: Spec, layout: Layout) -> NodeResources:
    """CPUs, GPUs and host memory per node: from [job] when given, else from the hardware table.

    Defaults: GPUs = processes per node on a GPU accelerator (0 on CPU); CPUs = 8 per GPU process,
    1 per CPU process; host memory = one device's memory per process (room to stage a full shard
    of weights and optimizer state in host RAM).
    """
    device = lookup(spec.hardware.accelerator)
    on_gpu = device.kind == "gpu"
    procs = layout.procs_per_node
    cpus = spec.job.cpus_per_node or procs * (8 if on_gpu else 1)
    memory_mb = (spec.job.memory_gb_per_node * 1024 if spec.job.memory_gb_per_node
                 else procs * device.memory_bytes // 2**20)
    return NodeResources(cpus=cpus, gpus=procs if on_gpu else 0, memory_mb=memory_mb,
                         gpu_vendor=device.vendor if on_gpu else "")


def torchx_resource(resources: NodeResources, scheduler: str) -> specs.Resource:
    """One node's TorchX Resource. On Kubernetes a GPU not NVIDIA's is its vendor's device resource
    (TorchX sets it as a limit, which Kubernetes also takes as the request), not Resource.gpu,
    which TorchX would ask for as nvidia.com/gpu. Slurm's GPUs (--gpus-per-task) name no vendor."""
    if scheduler == "kubernetes" and resources.gpus and resources.gpu_vendor != "nvidia":
        return specs.Resource(cpu=resources.cpus, gpu=0, memMB=resources.memory_mb,
                              devices={KUBERNETES_GPU_RESOURCE[resources.gpu_vendor]: resources.gpus})
    return specs.Resource(cpu=resources.cpus, gpu=resources.gpus, memMB=resources.memory_mb)


def check_for_scheduler(spec: Spec, resources: NodeResources, scheduler: str) -> None:
    """Reject what a scheduler cannot carry faithfully (raises UserError)."""
    if scheduler == "slurm":
        # srun --export=ALL,K=V,... has no escape for ',': a comma would start another variable.
        for key, value in spec.job.env.items():
            if "," in value:
                raise UserError(f"job.env.{key}: Slurm passes environment variables as a comma-separated "
                                f"list (srun --export), so a value cannot contain ',' (found {value!r})")
    if scheduler == "kubernetes":
        # TorchX requests = limits minus a node reserve: keep the requests above zero.
        if not spec.job.image:
            raise UserError("job.image is empty: Kubernetes needs a container image "
                            "(e.g. --set job.image=ghcr.io/you/llmc:latest)")
        if resources.memory_mb <= RESERVED_MEMMB or resources.cpus * 1000 <= RESERVED_MILLICPU:
            raise UserError(f"Kubernetes requests would be 0: TorchX reserves {RESERVED_MEMMB} MB and "
                            f"{RESERVED_MILLICPU} mCPU per node; ask for more (job.memory_gb_per_node >= 2, "
                            f"job.cpus_per_node >= 1), found {resources.memory_mb} MB, {resources.cpus} CPUs")


def relative_path(path: str) -> str:
    """A normalised path for a command line: never read as an option (leading '-')."""
    path = posixpath.normpath(path)
    return "./" + path if path.startswith("-") else path


def torchrun_args(layout: Layout, plan_path: str, run_dir: str, resume: bool = False,
                  restartable: bool = False) -> list[str]:
    """Arguments after the interpreter: torchrun, then the training entry.

    One node: an agent-local store on a free port (localhost:0). Several nodes: the endpoint comes
    from the environment at launch (see RENDEZVOUS_SCRIPT), so --rdzv_endpoint is omitted here.
    `restartable` (job.retries > 0): the scheduler re-runs this same command after a failure, so
    the entry is given the job's id (the same in every attempt): an attempt continues from the
    checkpoints an earlier attempt of this job wrote, and refuses another run's.
    """
    args = ["-m", "torch.distributed.run",
            "--nnodes", str(layout.nodes), "--nproc_per_node", str(layout.procs_per_node),
            "--rdzv_backend", "c10d", "--rdzv_id", specs.macros.app_id]
    if layout.nodes == 1:
        args += ["--rdzv_endpoint", "localhost:0"]
    args += ["-m", ENTRY_MODULE, "--plan", relative_path(plan_path), "--out", relative_path(run_dir)]
    return (args + (["--resume"] if resume else [])
            + (["--job-id", specs.macros.app_id] if restartable else []))


def build_appdef(plan: dict, scheduler: str, plan_path: str, run_dir: str,
                 python: str | None = None, resume: bool = False) -> specs.AppDef:
    """The TorchX AppDef of a plan document for `scheduler`.

    `plan_path` and `run_dir` are as the job sees them (relative to its working directory);
    `resume` continues the run from its newest complete checkpoint. `python` is the interpreter:
    this one (sys.executable) for local and Slurm, where the job shares this machine's or
    cluster's file system; `python` on the image's PATH for Kubernetes.
    """
    if scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler (expected one of {', '.join(SCHEDULERS)}, found {scheduler!r})")
    spec = Spec.model_validate(plan["spec"])
    layout = layout_of(plan)
    resources = node_resources(spec, layout)
    check_for_scheduler(spec, resources, scheduler)
    if python is None:
        python = "python" if scheduler == "kubernetes" else sys.executable

    env = {"OMP_NUM_THREADS": str(max(1, resources.cpus // layout.procs_per_node)),
           "LOGLEVEL": "WARNING"}
    env.update(spec.job.env)  # the spec wins

    command = [python] + torchrun_args(layout, plan_path, run_dir, resume, restartable=spec.job.retries > 0)
    if layout.nodes == 1:
        entrypoint, args = command[0], command[1:]
    else:
        entrypoint = "bash"
        args = ["-c", RENDEZVOUS_SCRIPT, "llmc-rendezvous", specs.macros.rank0_env, str(RDZV_PORT)] + command

    role = specs.Role(
        name=spec.job.name,
        image=spec.job.image,
        entrypoint=entrypoint,
        args=args,
        num_replicas=layout.nodes,
        resource=torchx_resource(resources, scheduler),
        env=env,
        port_map={"c10d": RDZV_PORT} if layout.nodes > 1 else {},
        max_retries=spec.job.retries,
        mounts=[specs.BindMount(src_path=m.src, dst_path=m.dst, read_only=m.read_only)
                for m in spec.job.mounts],
    )
    return specs.AppDef(name=spec.job.name, roles=[role])

