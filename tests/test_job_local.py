"""`llmc run specs/tiny.toml` on TorchX's local_cwd scheduler: a real (very short) training run.

Two processes, because the plan says so (hardware.gpus_per_node=2): the run report must count them.
Then status, logs and list answer from another process.
"""

import json

import pytest

from slurm.llmc_cli import SHORT_RUN, TINY, handle_of, llmc, shared_data_cache

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("local-run")
    attack = "$(touch pwned); rm -rf ~"   # an env value: must reach the job as text, never run
    result = llmc("run", TINY, *SHORT_RUN, *shared_data_cache(tmp_path_factory), "--set", "hardware.gpus_per_node=2",
                  "--set", f"job.env.LLMC_PROBE={attack}", cwd=cwd, env={"HOME": str(cwd)})
    return cwd, result


def test_local_run_trains_with_the_planned_processes_and_prints_the_report(local_run):
    cwd, result = local_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    handle = handle_of(result.stdout, "local_cwd")
    assert f"{handle}: RUNNING" in result.stdout and f"{handle}: finished SUCCEEDED" in result.stdout
    assert "step 2/2" in result.stdout                       # followed logs
    run_dir = cwd / "runs" / "tiny"
    report = (run_dir / "report.md").read_text()
    assert report in result.stdout                           # ends with the run report
    assert "processes: 2" in report
    plan = json.loads((run_dir / "job" / "plan.json").read_text())
    assert plan["layout"]["world_size"] == 2
    assert (run_dir / "model" / "model.safetensors").exists()
    assert not (cwd / "pwned").exists()


def test_status_logs_list_from_another_process(local_run):
    cwd, result = local_run
    handle = handle_of(result.stdout, "local_cwd")
    status = llmc("status", handle, cwd=cwd)
    assert status.returncode == 0 and status.stdout.strip() == f"{handle}: SUCCEEDED"
    logs = llmc("logs", handle, cwd=cwd)
    assert logs.returncode == 0 and "step 2/2" in logs.stdout
    listing = llmc("list", cwd=cwd)
    assert listing.returncode == 0 and f"{handle}\tSUCCEEDED" in listing.stdout
    cancel = llmc("cancel", handle, cwd=cwd)
    assert cancel.returncode == 1 and "is not running" in cancel.stderr


def test_a_failing_job_ends_failed_with_its_error_shown(tmp_path):
    result = llmc("run", TINY, "--set", 'data.sources=[{path="/nonexistent/corpus.txt"}]', cwd=tmp_path)
    assert result.returncode == 1
    handle = handle_of(result.stdout, "local_cwd")
    assert f"{handle}: finished FAILED" in result.stdout
    assert "/nonexistent/corpus.txt: file not found" in result.stdout   # the job's own message, followed
    assert llmc("status", handle, cwd=tmp_path).stdout.strip() == f"{handle}: FAILED"


def test_two_nodes_meet_through_the_rendezvous_launcher(tmp_path, monkeypatch, capsys):
    """Two TorchX replicas ("nodes") on this host find each other through RENDEZVOUS_SCRIPT.
    A probe module stands in for the training entry: only the launch path is under test here."""
    from llmc.compiler.cli import main
    from llmc.compiler.job import appdef

    (tmp_path / "probe_entry.py").write_text(
        "import os\n"
        "print('probe', os.environ['GROUP_RANK'], os.environ['RANK'], os.environ['WORLD_SIZE'], flush=True)\n")
    monkeypatch.setattr(appdef, "ENTRY_MODULE", "probe_entry")
    monkeypatch.chdir(tmp_path)
    code = main(["run", TINY, "--set", "hardware.nodes=2", "--set", "train.micro_batch_size=8",
                 "--set", "train.global_batch_size=16", "--set", f"job.env.PYTHONPATH={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0, out
    probes = sorted(line.split()[1:] for line in out.splitlines() if line.startswith("probe "))
    assert probes == [["0", "0", "2"], ["1", "1", "2"]]   # node (group) rank, global rank, world size
