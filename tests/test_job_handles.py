"""Job handles a user mistypes: TorchX's app ids are sbatch's job number on Slurm and
NAMESPACE:NAME on Kubernetes; anything else is refused before any scheduler is asked."""

import pytest

from llmc.compiler.cli import main


@pytest.mark.parametrize("verb", ["status", "logs", "cancel"])
@pytest.mark.parametrize("handle, expected", [
    ("slurm://llmc/abc", "slurm://llmc/JOB_NUMBER"),
    ("slurm://llmc/12x", "slurm://llmc/JOB_NUMBER"),
    ("kubernetes://llmc/tiny-abc", "kubernetes://llmc/NAMESPACE:NAME"),    # the namespace left out
    ("kubernetes://llmc/default:", "kubernetes://llmc/NAMESPACE:NAME"),
])
def test_malformed_app_ids_are_refused_before_asking_the_scheduler(verb, handle, expected, tmp_path, monkeypatch,
                                                                   capsys):
    asked = tmp_path / "asked"
    for tool in ("sacct", "scancel"):   # a scheduler that would answer; it must not be asked
        (tmp_path / tool).write_text(f"#!/bin/sh\ntouch {asked}\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.chdir(tmp_path)
    assert main([verb, handle]) == 1
    err = capsys.readouterr().err
    assert f"expected {expected}" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not asked.exists()


@pytest.mark.parametrize("verb", ["status", "logs", "cancel"])
def test_kubernetes_without_a_cluster_configuration_says_so(verb, tmp_path, monkeypatch, capsys):
    """No kubeconfig: TorchX warned and then failed as 'LocationValueError: No host specified'."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.setenv("HOME", str(tmp_path))                  # no ~/.kube/config either
    monkeypatch.chdir(tmp_path)
    assert main([verb, "kubernetes://llmc/default:tiny-abc"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err            # no UserWarning before the error
    assert "kube config" in err and "KUBECONFIG" in err and "No host specified" not in err, err


def test_logs_of_a_job_that_has_not_started_return_at_once(tmp_path):
    """Without --follow, `llmc logs` prints what there is and returns; a Slurm job still PENDING
    has no log files yet (TorchX's reader would wait for them to appear)."""
    import os
    import subprocess
    import sys

    (tmp_path / "sacct").write_text("#!/bin/sh\nprintf 'JobID|JobName|State\\n5|tiny-0|PENDING\\n'\n")
    (tmp_path / "sacct").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    try:
        out = subprocess.run([sys.executable, "-m", "llmc.compiler.cli", "logs", "slurm://llmc/5"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("`llmc logs` of a pending job did not return")
    assert out.returncode == 0 and "PENDING" in out.stderr and "no logs yet" in out.stderr, out.stderr
