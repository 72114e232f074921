"""runtime/folders.py: staging folders that killed processes left behind are cleaned up."""

import os
import socket
import subprocess
import sys

from llmc.runtime.folders import staged_folder


def test_staging_removes_what_dead_processes_of_this_host_left_and_nothing_else(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)  # that process has exited
    host = socket.gethostname()
    out = tmp_path / "model"
    left = {name: tmp_path / f".model.tmp-{name}" for name in
            (f"{host}-{dead}", f"{host}-{os.getppid()}", f"elsewhere-{dead}")}
    for folder in left.values():
        folder.mkdir()
        (folder / "part.safetensors").write_text("partial")
    with staged_folder(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").read_text() == "{}"
    assert not left[f"{host}-{dead}"].exists()
    assert left[f"{host}-{os.getppid()}"].is_dir()   # a running process is still writing it
    assert left[f"elsewhere-{dead}"].is_dir()         # another host's: its pids are not ours to judge
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model", f".model.tmp-{host}-{os.getppid()}", f".model.tmp-elsewhere-{dead}"])
