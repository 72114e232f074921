"""`llmc train --nproc N` launches torchrun through runtime/train/launch.py: a failed worker ends the
launch in one line (which rank, how), not torchrun's traceback; the workers share this host's cores."""

import subprocess
import sys

from llmc.runtime.train.cli import _threads_per_process

# rank 0 ends as argv[1] says (an exit code, or "kill": SIGKILL, as the OOM killer does); rank 1 is fine
WORKER = """
import os, signal, sys
if os.environ["RANK"] == "0":
    print("error (rank 0): the worker's own message", file=sys.stderr, flush=True)
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(int(sys.argv[1]))
"""


def launch(tmp_path, how: str, script: str = WORKER):
    """`script` on 2 processes through the launcher, given `how` as its argument."""
    worker = tmp_path / "worker.py"
    worker.write_text(script)
    return subprocess.run([sys.executable, "-m", "llmc.runtime.train.launch", "--standalone", "--nproc_per_node=2",
                           str(worker), how], capture_output=True, text=True, timeout=120)


def test_a_failed_worker_ends_the_launch_in_one_line(tmp_path):
    done = launch(tmp_path, "3")
    assert done.returncode == 1
    assert "error (rank 0): the worker's own message" in done.stderr
    assert done.stderr.rstrip().splitlines()[-1] == "rank 0: exit code 3"
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr


def test_a_killed_worker_is_said_so(tmp_path):
    done = launch(tmp_path, "kill")
    assert done.returncode == 1
    assert done.stderr.rstrip().splitlines()[-1] == "rank 0: killed by SIGKILL (out of memory?)"
    assert "Traceback" not in done.stderr


def test_the_failed_ranks_are_grouped_by_how_they_ended():
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from llmc.runtime.train.launch import summary

    def ended(code):
        return ProcessFailure(local_rank=0, pid=1, exitcode=code, error_file="")
    assert summary({3: ended(1)}) == "rank 3: exit code 1"
    assert summary({2: ended(-15), 1: ended(1), 0: ended(-15)}) == \
        "ranks 0, 2: killed by SIGTERM; rank 1: exit code 1"


def test_a_clean_launch_exits_0(tmp_path):
    done = launch(tmp_path, "0")
    assert done.returncode == 0, done.stderr


def test_workers_share_the_cores_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert _threads_per_process(2)["OMP_NUM_THREADS"] == "4"
    assert _threads_per_process(3)["OMP_NUM_THREADS"] == "2"
    assert _threads_per_process(16)["OMP_NUM_THREADS"] == "1"   # never 0
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert _threads_per_process(2)["OMP_NUM_THREADS"] == "7"


# rank 1 leaves at once; rank 0 (deaf to torchrun's SIGTERM) meets gloo's error in a collective
PEER_LEFT = """
import os, signal, sys
import torch, torch.distributed as dist
from llmc.runtime.entry import _a_peer_left
dist.init_process_group("gloo")
if dist.get_rank() == 1:
    os._exit(1)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
try:
    dist.all_reduce(torch.ones(4))
except RuntimeError as e:
    open(sys.argv[1], "w").write(str(_a_peer_left(e)))
os._exit(1)
"""


def test_a_rank_whose_peer_left_knows_it_from_gloos_error(tmp_path):
    """The other ranks of a failed one printed gloo's traceback ("Connection closed by peer") below
    its message; runtime/entry.py says it in one line when gloo's error is of a peer that left."""
    said = tmp_path / "said"
    launch(tmp_path, str(said), PEER_LEFT)
    assert said.read_text() == "True"
