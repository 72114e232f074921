"""keep_freed_memory: the large temporaries of a step, freed and allocated again step after step,
reuse memory instead of faulting in fresh pages (counted by the kernel's minor page faults)."""

import subprocess
import sys

import pytest

PROGRAM = """
import resource, sys, torch
from llmc.runtime.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():  # big temporaries of different sizes, freed in another order than allocated
    x = torch.zeros(16 << 20); y = torch.zeros(8 << 20); del x; z = torch.zeros(4 << 20); del y, z
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_large_tensors_are_reused_without_page_faults():
    faults = {mode: int(subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True,
                                       check=True).stdout)
              for mode in ("default", "keep")}
    pages = 10 * ((16 + 8 + 4) << 22) // 4096   # every page of every tensor of the 10 steps
    assert faults["default"] > pages // 2       # glibc maps and unmaps each large tensor
    # kept memory is reused (a few faults may remain: the host may reclaim idle pages under load)
    assert faults["keep"] * 4 < faults["default"]
