"""`llmc run` into a run directory that holds checkpoints of a run: refused before anything is
compiled or submitted (the job itself would refuse them, after its wait in the queue), unless
--resume asks to continue them. As `llmc train` refuses the same directory."""

import json

from slurm.llmc_cli import TINY, llmc


def used_run_dir(root):
    """runs/tiny as a run left it: a complete checkpoint (a step-N folder with its meta.json)."""
    step = root / "runs" / "tiny" / "checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 4, "world_size": 1, "spec": {}}))
    return root / "runs" / "tiny"


def test_run_refuses_a_run_directory_with_checkpoints(tmp_path):
    run_dir = used_run_dir(tmp_path)
    for scheduler in ("local", "slurm"):  # both run where they are submitted from
        result = llmc("run", TINY, "--scheduler", scheduler, cwd=tmp_path)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [
            f"error: {run_dir} already holds checkpoints of a run: pass --resume to continue it, "
            "or set job.name (or job.out_dir) for a new run directory"], result.stderr
        assert not (run_dir / "job").exists()  # nothing compiled, nothing submitted


def test_only_complete_checkpoints_count(tmp_path):
    # a run killed while writing its first checkpoint leaves a .tmp- folder only: nothing to continue
    from llmc.runtime.folders import checkpoints

    unfinished = tmp_path / "checkpoints" / ".tmp-step-00000001"
    unfinished.mkdir(parents=True)
    assert checkpoints(tmp_path) == []
    assert checkpoints(used_run_dir(tmp_path)) == [tmp_path / "runs" / "tiny" / "checkpoints" / "step-00000004"]
