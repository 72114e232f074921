"""Plan -> TorchX AppDef: the command line, layout from the plan only, resources, env, retries."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from llmc.compiler.errors import UserError
from llmc.compiler.job.appdef import RENDEZVOUS_SCRIPT, build_appdef, layout_of
from llmc.compiler.plan import build_plan
from llmc.compiler.spec import load_spec
from slurm.llmc_cli import TINY

GiB_MB = 1024


def plan_of(*overrides: str) -> dict:
    return build_plan(load_spec(TINY, list(overrides))).model_dump(mode="json")


def with_layout(plan: dict, nodes: int, procs: int) -> dict:
    """The plan with a layout the planner might have chosen (the job must follow it)."""
    layout = dict(plan["layout"])
    layout.update(nodes=nodes, procs_per_node=procs, world_size=nodes * procs)
    return {**plan, "layout": layout}


def test_single_node_command_is_torchrun_of_the_entry_with_this_interpreter():
    plan = plan_of("hardware.gpus_per_node=2")
    app = build_appdef(plan, "local", "runs/tiny/job/plan.json", "runs/tiny")
    (role,) = app.roles
    assert app.name == role.name == "tiny"
    assert role.num_replicas == 1
    assert role.entrypoint == sys.executable
    assert role.args == ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                         "--rdzv_backend", "c10d", "--rdzv_id", "${app_id}", "--rdzv_endpoint", "localhost:0",
                         "-m", "llmc.runtime.entry", "--plan", "runs/tiny/job/plan.json", "--out", "runs/tiny"]


def test_nodes_and_processes_come_from_the_plan_layout_not_the_hardware_table():
    plan = with_layout(plan_of("hardware.gpus_per_node=4", "train.micro_batch_size=2"), nodes=3, procs=2)
    assert layout_of(plan).world_size == 6
    (role,) = build_appdef(plan, "slurm", "p.json", "out").roles
    assert role.num_replicas == 3
    args = role.args
    assert args[args.index("--nnodes") + 1] == "3"
    assert args[args.index("--nproc_per_node") + 1] == "2"


def test_resources_from_the_hardware_table_and_job_overrides():
    # 2 nodes of 8 H100s: 8 GPUs, 8 CPUs per GPU, host memory = one device's 80 GiB per process.
    spec = ["hardware.accelerator=H100-80GB", "hardware.gpus_per_node=8", "hardware.nodes=2",
            "train.micro_batch_size=2", "train.global_batch_size=32", "job.image=img"]
    (role,) = build_appdef(plan_of(*spec), "kubernetes", "p.json", "out").roles
    assert (role.resource.gpu, role.resource.cpu, role.resource.memMB) == (8, 64, 8 * 80 * GiB_MB)
    assert role.entrypoint == "bash" and "python" in role.args   # the image's python, not this one
    # [job] overrides, and CPU devices ask for no GPU.
    (role,) = build_appdef(plan_of("job.cpus_per_node=6", "job.memory_gb_per_node=3"), "local", "p", "o").roles
    assert (role.resource.gpu, role.resource.cpu, role.resource.memMB) == (0, 6, 3 * GiB_MB)


def test_env_image_retries_mounts_reach_the_role():
    plan = plan_of("job.env.FOO=bar", 'job.env.OMP_NUM_THREADS="3"', "job.retries=2", "job.cpus_per_node=4",
                   "job.image=registry.example/llmc:1", 'job.mounts=[{src="/data/x/../corpus", dst="/data"}]')
    (role,) = build_appdef(plan, "kubernetes", "p.json", "out").roles
    assert role.env["FOO"] == "bar" and role.env["OMP_NUM_THREADS"] == "3"   # the spec wins over defaults
    assert role.image == "registry.example/llmc:1"
    assert role.max_retries == 2
    (mount,) = role.mounts
    assert (mount.src_path, mount.dst_path, mount.read_only) == ("/data/corpus", "/data", False)
    # Without an env override, threads per process = CPUs per node / processes per node.
    (role,) = build_appdef(plan_of("job.cpus_per_node=4", "hardware.gpus_per_node=2"), "local", "p", "o").roles
    assert role.env["OMP_NUM_THREADS"] == "2"


def test_multi_node_rendezvous_reads_rank0_host_from_the_environment(tmp_path):
    plan = plan_of("hardware.nodes=2", "train.micro_batch_size=8", "train.global_batch_size=32")
    (role,) = build_appdef(plan, "slurm", "p.json", "out").roles
    assert role.entrypoint == "bash" and role.args[:2] == ["-c", RENDEZVOUS_SCRIPT]
    assert role.args[3:5] == ["${rank0_env}", "29500"]
    assert "--rdzv_endpoint" not in role.args and role.port_map == {"c10d": 29500}
    # Run the launcher as a node would, with a probe in place of the interpreter.
    probe = tmp_path / "probe.sh"
    probe.write_text('#!/bin/sh\necho "endpoint=$PET_RDZV_ENDPOINT"\nprintf "%s\\n" "$@"\n')
    probe.chmod(0o755)
    torchrun = role.args[6:]
    argv = ["bash", "-c", RENDEZVOUS_SCRIPT, "llmc-rendezvous", "MY_RANK0", "29500", str(probe)] + torchrun
    out = subprocess.run(argv, env={"MY_RANK0": "node-a", "PATH": "/usr/bin:/bin"}, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[0] == "endpoint=node-a:29500"
    assert out[1:] == torchrun                                      # every argument arrives intact
    out = subprocess.run(argv, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "endpoint=localhost:29500"        # unset: this host


def test_scheduler_limits_are_explained():
    with pytest.raises(UserError, match="cannot contain ','"):
        build_appdef(plan_of("job.env.CUDA_VISIBLE_DEVICES=0,1"), "slurm", "p", "o")
    build_appdef(plan_of("job.env.CUDA_VISIBLE_DEVICES=0,1"), "local", "p", "o")   # fine elsewhere
    with pytest.raises(UserError, match="job.image is empty"):
        build_appdef(plan_of(), "kubernetes", "p", "o")
    with pytest.raises(UserError, match="requests would be 0"):
        build_appdef(plan_of("job.image=img", "job.memory_gb_per_node=1"), "kubernetes", "p", "o")
    with pytest.raises(UserError, match="unknown scheduler"):
        build_appdef(plan_of(), "lsf", "p", "o")


def test_paths_are_normalised_and_never_read_as_options():
    (role,) = build_appdef(plan_of(), "local", "-rf/../x/./plan.json", "runs//a/../tiny").roles
    assert role.args[-4:] == ["--plan", "x/plan.json", "--out", "runs/tiny"]
    (role,) = build_appdef(plan_of(), "local", "--help", "-o").roles
    assert role.args[-4:] == ["--plan", "./--help", "--out", "./-o"]


def test_compiler_job_modules_do_not_import_torch():
    code = textwrap.dedent("""
        import sys
        import llmc.compiler.job, llmc.compiler.job.cli
        assert "torch" not in sys.modules, "the compiler imported torch"
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


def test_resume_reaches_the_entry():
    (role,) = build_appdef(plan_of(), "local", "p.json", "out", resume=True).roles
    assert role.args[-5:] == ["--plan", "p.json", "--out", "out", "--resume"]


def test_status_of_a_job_the_scheduler_does_not_list_yet(tmp_path, monkeypatch):
    """Slurm's accounting lags behind sbatch: a job llmc submitted moments ago is PENDING, not
    unknown; one the scheduler does not know and llmc submitted long ago is an error."""
    from llmc.compiler.job import cli, track

    class NotListed:  # what TorchX's runner answers before sacct lists the job
        def status(self, handle):
            return None

    monkeypatch.chdir(tmp_path)
    track.record("slurm://llmc/7", scheduler="slurm", role="train", replicas=1, run_dir=str(tmp_path))
    assert cli._status(NotListed(), "slurm://llmc/7").startswith("PENDING")
    with track.RECORD.open("a") as f:   # submitted an hour ago, long forgotten by the scheduler
        f.write(json.dumps({"handle": "slurm://llmc/8", "time": time.time() - 3600, "scheduler": "slurm"}) + "\n")
    with pytest.raises(UserError, match="does not know slurm://llmc/8"):
        cli._status(NotListed(), "slurm://llmc/8")
    with pytest.raises(UserError, match="does not know slurm://llmc/9"):  # never submitted from here
        cli._status(NotListed(), "slurm://llmc/9")


@pytest.mark.parametrize("verb", ["status", "logs", "cancel"])
def test_job_verbs_report_bad_handles_and_a_failing_scheduler_without_a_traceback(verb, tmp_path):
    """A handle of a scheduler llmc never submits to, and a Slurm whose sacct fails (no
    controller, no accounting): an error line and exit 1, as for any user mistake."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sacct").write_text("#!/bin/sh\necho 'sacct: fatal: Could not establish a configuration source' >&2\n"
                                "exit 1\n")
    (fake / "sacct").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}

    def llmc(*args):
        return subprocess.run([sys.executable, "-m", "llmc.compiler.cli", *args], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=120)

    out = llmc(verb, "local://llmc/x")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "not a scheduler llmc submits to" in out.stderr and "'local'" in out.stderr
    out = llmc(verb, "slurm://llmc/123")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "sacct" in out.stderr and "exited 1" in out.stderr and "is the cluster up?" in out.stderr
