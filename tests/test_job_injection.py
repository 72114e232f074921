"""Shell injection through spec values: each attempt is rejected with a clear message, or is inert.

Inert is shown by running what llmc emits: the sbatch script is executed by bash with a fake
`srun` that records the argv it receives; the attack must arrive as one literal argument and no
command in it may run.
"""

import json
import os
import shlex
import subprocess

import pytest
import yaml

from llmc.compiler.cli import main
from slurm.llmc_cli import TINY, llmc

ATTACKS = ["'; rm -rf ~'", "$(touch pwned)", "`touch pwned`", "a\nb", "x; touch pwned"]


def compile_with(override: str, tmp_path, monkeypatch, capsys) -> tuple[int, str]:
    """`llmc compile TINY -o out --set OVERRIDE` (the CLI, in this process): exit code, stderr."""
    monkeypatch.chdir(tmp_path)
    code = main(["compile", TINY, "-o", "out", "--set", override])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("attack", ATTACKS)
def test_job_name_injection_is_rejected(tmp_path, monkeypatch, capsys, attack):
    code, err = compile_with(f"job.name={attack}", tmp_path, monkeypatch, capsys)
    assert code == 1
    assert "job.name" in err and "lowercase letters, digits and '-'" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["job.out_dir", "job.image", "job.partition", "job.queue"])
@pytest.mark.parametrize("attack", ["'; rm -rf ~'", "$(touch pwned)", "a\nb"])
def test_values_reaching_scheduler_options_are_rejected(tmp_path, monkeypatch, capsys, key, attack):
    code, err = compile_with(f"{key}={attack}", tmp_path, monkeypatch, capsys)
    assert code == 1 and key in err and "expected letters, digits" in err


@pytest.mark.parametrize("override, where", [
    ('job.env.X="a\\nb"', "job.env"), ("job.env.BAD-KEY=1", "job.env"),
    ('job.mounts=[{src="relative/path", dst="/d"}]', "job.mounts"),
    ('job.mounts=[{src="/a\\n/b", dst="/d"}]', "job.mounts")])
def test_newlines_and_bad_names_in_env_and_mounts_are_rejected(tmp_path, monkeypatch, capsys, override, where):
    code, err = compile_with(override, tmp_path, monkeypatch, capsys)
    assert code == 1 and where in err


@pytest.mark.parametrize("override", ["train.max_steps=2; rm -rf ~", "train.max_steps=$(touch pwned)",
                                      "no-equals-sign"])
def test_set_cannot_smuggle_commands(tmp_path, monkeypatch, capsys, override):
    code, err = compile_with(override, tmp_path, monkeypatch, capsys)
    assert code == 1 and "error:" in err
    assert not (tmp_path / "pwned").exists()


def test_errors_come_without_traceback_from_the_command(tmp_path):
    result = llmc("compile", TINY, "-o", "out", "--set", "job.name=x; rm -rf ~", cwd=tmp_path)
    assert result.returncode == 1 and "job.name" in result.stderr and "Traceback" not in result.stderr


def _run_sbatch_script(script, tmp_path):
    """Execute an sbatch script with bash and a recording srun; return srun's argv."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/usr/bin/env python3\nimport sys, json\n'
                    f'open({str(tmp_path / "argv.json")!r}, "w").write(json.dumps(sys.argv[1:]))\n')
    srun.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "42", "HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "keep").write_text("still here")
    subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, check=True, capture_output=True)
    return json.loads((tmp_path / "argv.json").read_text())


def test_env_values_and_paths_are_inert_in_the_sbatch_script(tmp_path):
    evil = "'; rm -rf ~; $(touch pwned) `touch pwned`"
    out_dir = "out; touch pwned"
    result = llmc("compile", TINY, "-o", out_dir, "--set", f"job.env.EVIL={evil}",
                  "--set", 'job.mounts=[{src="/data/$(touch pwned)/../x", dst="/d"}]', cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    argv = _run_sbatch_script(tmp_path / out_dir / "slurm.sbatch.sh", tmp_path)
    assert not (tmp_path / "pwned").exists()
    assert (tmp_path / "home" / "keep").exists()
    export = next(a for a in argv if a.startswith("--export="))
    assert f"EVIL={evil}" in export                                    # literal, one argument
    assert argv[argv.index("--plan") + 1] == f"{out_dir}/plan.json"    # the odd folder name, intact
    assert "42" in argv[argv.index("--rdzv_id") + 1]                   # only TorchX's $SLURM_JOB_ID expands

    manifest_ok = llmc("compile", TINY, "-o", "k8s", "--set", f"job.env.EVIL={evil}", "--set", "job.image=img",
                       "--set", "job.scheduler=kubernetes", "--set", "job.memory_gb_per_node=4", cwd=tmp_path)
    assert manifest_ok.returncode == 0, manifest_ok.stderr
    job = yaml.safe_load((tmp_path / "k8s" / "kubernetes.volcano.yaml").read_text())
    (container,) = job["spec"]["tasks"][0]["template"]["spec"]["containers"]
    assert {"name": "EVIL", "value": evil} in container["env"]          # a value, never a command
    assert container["command"][0] != "sh" and "-c" not in container["command"][:2]
    card = (tmp_path / out_dir / "job_card.md").read_text()
    assert shlex.quote(f"{out_dir}/plan.json") in card                 # shown quoted, copy-paste safe
    assert not os.path.exists(tmp_path / "pwned")


@pytest.mark.parametrize("override", ['job.name="tiny\\n"', 'job.namespace="ml\\n"', 'job.partition="gpu\\n"',
                                      'job.queue="default\\n"', 'job.image="img\\n"', 'job.out_dir="runs\\n"',
                                      'job.env.X="a\\n"',
                                      'job.mounts=[{src="/a\\n", dst="/d"}]'])
def test_a_final_newline_is_rejected_like_any_other(tmp_path, monkeypatch, capsys, override):
    # A regular expression's `$` also matches before a final newline (TOML's "\\n" is one): no value may end in one.
    code, err = compile_with(override, tmp_path, monkeypatch, capsys)
    assert code == 1 and override.split("=")[0].split(".")[1] in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
