"""`llmc compile`: the resolved spec, plan.json, AppDef, each scheduler's request and the job card."""

import json
import re
import shlex
import sys

from llmc.compiler.plan import build_plan
from llmc.compiler.spec import load_spec
from slurm.llmc_cli import TINY, llmc

OVERRIDES = ["--set", "hardware.gpus_per_node=2", "--set", "job.cpus_per_node=2", "--set", "job.memory_gb_per_node=3",
             "--set", "job.partition=gpu-a", "--set", "job.time_limit=90", "--set", "job.retries=1"]


def test_compile_writes_every_file(tmp_path):
    result = llmc("compile", TINY, "-o", "out", *OVERRIDES, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert names == {"spec.toml", "plan.json", "appdef.json", "local.request.txt", "slurm.sbatch.sh", "job_card.md"}
    assert "no kubernetes request: job.image is empty" in result.stderr   # said, not silently skipped

    overrides = OVERRIDES[1::2]
    expected_plan = build_plan(load_spec(TINY, overrides)).model_dump(mode="json")
    assert json.loads((out / "plan.json").read_text()) == expected_plan
    assert load_spec(out / "spec.toml") == load_spec(TINY, overrides)   # the resolved spec round-trips

    (role,) = json.loads((out / "appdef.json").read_text())["roles"]
    assert role["entrypoint"] == sys.executable and role["num_replicas"] == 1 and role["max_retries"] == 1
    assert role["resource"]["cpu"] == 2 and role["resource"]["memMB"] == 3 * 1024 and role["resource"]["gpu"] == 0
    args = role["args"]
    assert args[args.index("--nproc_per_node") + 1] == "2"
    # job.retries = 1: a restart continues the job's own run, named by TorchX's app id (test_job_retries_resume)
    assert args[-6:] == ["--plan", "out/plan.json", "--out", "runs/tiny", "--job-id", "${app_id}"]


def test_sbatch_script_carries_the_plan_and_the_job_table(tmp_path):
    assert llmc("compile", TINY, "-o", "out", *OVERRIDES, cwd=tmp_path).returncode == 0
    script = (tmp_path / "out" / "slurm.sbatch.sh").read_text()
    (sbatch,) = [line for line in script.splitlines() if line.startswith("#SBATCH ")]
    options = set(sbatch.split()[1:])
    assert {"--job-name=tiny-0", "--ntasks-per-node=1", "--cpus-per-task=2", f"--mem={3 * 1024}",
            "--partition=gpu-a", "--time=90"} <= options
    assert "TORCHX_MAX_RETRIES=1" in script
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    argv = shlex.split(srun)
    assert argv[argv.index("--nproc_per_node") + 1] == "2"
    assert argv[argv.index("-m") + 1] == "torch.distributed.run"
    assert sys.executable in argv


def test_job_card_has_the_plan_summary_and_exact_commands(tmp_path):
    assert llmc("compile", TINY, "-o", "out", *OVERRIDES, cwd=tmp_path).returncode == 0
    card = (tmp_path / "out" / "job_card.md").read_text()
    assert f"llmc run {TINY} --scheduler local " + " ".join(OVERRIDES) in card
    params = build_plan(load_spec(TINY)).params.total
    assert f"{params:,}" in card
    node_line = next(line for line in card.splitlines() if "torch.distributed.run" in line)
    assert shlex.split(node_line)[:2] == [sys.executable, "-m"]
    assert re.search(r"2 x CPU \(1 node x 2 processes\)", card)
    assert "job.image is empty" in card


def test_dryrun_prints_the_request_and_submits_nothing(tmp_path):
    result = llmc("run", TINY, "--dryrun", "--scheduler", "slurm", *OVERRIDES, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "nothing submitted" in result.stdout and "#SBATCH --job-name=tiny-0" in result.stdout
    assert "runs/tiny/job/plan.json" in result.stdout       # the paths a real run would use
    assert not (tmp_path / "runs").exists() and not (tmp_path / ".llmc").exists()


def test_bad_spec_and_bad_handle_are_errors_without_traceback(tmp_path):
    (tmp_path / "bad.toml").write_text("[model]\nd_model = 'wide'\n")
    for argv in [("compile", "bad.toml", "-o", "out"), ("status", "not-a-handle"), ("logs", "local_cwd://llmc/nope")]:
        result = llmc(*argv, cwd=tmp_path)
        assert result.returncode == 1 and "error" in result.stderr and "Traceback" not in result.stderr, argv
