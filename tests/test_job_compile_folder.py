"""`llmc compile` and `llmc run` as a demanding user meets them: failures leave no half-written files."""

from llmc.compiler.cli import main
from slurm.llmc_cli import TINY

K8S = ["--set", "job.scheduler=kubernetes", "--set", "job.memory_gb_per_node=4"]


def test_a_failed_compile_leaves_the_earlier_compile_untouched(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["compile", TINY, "-o", "out", *K8S, "--set", "job.image=registry.example/llmc:1"]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert "kubernetes.volcano.yaml" in before
    # The same job without its image cannot be compiled for Kubernetes: an error, and the folder
    # still holds one consistent compile (not a new spec.toml and plan.json beside the old AppDef).
    assert main(["compile", TINY, "-o", "out", *K8S, "--set", "train.max_steps=7"]) == 1
    assert "job.image is empty" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_a_spec_that_cannot_be_planned_creates_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["compile", TINY, "-o", "out", "--set", "model.d_model=65536", "--set", "model.n_layers=64"]) == 1
    assert "does not fit" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sbatch_script_run_as_its_header_says_finds_its_plan(tmp_path, monkeypatch, capsys):
    """job.image names the job's working folder on Slurm: TorchX submits with sbatch --chdir, and
    the emitted script's "Run with:" line must say so too, or a job submitted by hand runs elsewhere."""
    import shlex
    from pathlib import Path

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["compile", TINY, "-o", "work/build", "--set", "job.scheduler=slurm", "--set", "job.image=work"]) == 0
    script = (tmp_path / "work" / "build" / "slurm.sbatch.sh").read_text()
    (header,) = [line for line in script.splitlines() if line.startswith("# Run with: ")]
    sbatch = shlex.split(header.removeprefix("# Run with: "))
    chdirs = [a.split("=", 1)[1] for a in sbatch if a.startswith("--chdir=")]
    job_cwd = Path(chdirs[-1]) if chdirs else tmp_path    # sbatch runs the job where it is called without one
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    argv = shlex.split(srun)
    assert (job_cwd / argv[argv.index("--plan") + 1]).is_file()
    assert job_cwd == tmp_path / "work"


def test_without_the_kubernetes_client_compile_says_so_and_writes_the_rest(tmp_path, monkeypatch, capsys):
    """`pip install llmc` leaves out torchx[kubernetes]: a spec with an image still compiles for the
    other schedulers, and asking for Kubernetes says what to install (not a traceback)."""
    import sys

    monkeypatch.setitem(sys.modules, "kubernetes", None)   # as if not installed
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    assert main(["compile", TINY, "-o", "out", "--set", "job.image=work"]) == 0
    assert 'no kubernetes request: the Kubernetes scheduler needs the kubernetes client: pip install "torchx[kubernetes]"' \
        in capsys.readouterr().err
    assert {"local.request.txt", "slurm.sbatch.sh", "job_card.md"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert main(["run", TINY, "--dryrun", "--scheduler", "kubernetes", *K8S[2:], "--set", "job.image=img"]) == 1
    assert "torchx[kubernetes]" in capsys.readouterr().err
