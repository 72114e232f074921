"""Keep freed host memory in the process, so that a training step does not page-fault its way
through fresh memory every time.

glibc's malloc serves large requests (above a threshold of up to 32 MB) with their own mmap and
unmaps them on free; each new tensor of that size then touches fresh pages, and the kernel has
to fault and zero every 4 KB of them. A CPU training step allocates and frees the same large
tensors (logits, the embedding's gradient, activations) every step: zeroing a fresh 64 MB tensor
measured 21 ms here, against 1.6 ms in memory malloc kept (bench/bench_model_step.py reports the
effect). PyTorch's CPU tuning guide recommends jemalloc or tcmalloc for the same reason; this
gets most of it from the malloc already in the process: no mmap for large blocks, no trimming of
the heap. The process's resident memory then stays at its peak instead of shrinking between steps.
"""

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_done = False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse; True if it took effect (Linux/glibc only).
    Idempotent; call it once before the first large allocations."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _done
