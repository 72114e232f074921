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
