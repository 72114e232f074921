"""The loss over whole logits against the chunked loss (runtime/model/loss.py): memory and time.

One pass = the head (a [tokens, d] x [d, V] matmul) and its cross entropy, forward and backward,
in fp32 and under bf16 autocast with fp32 weights (as training without FSDP runs it). Each variant
runs in a process of its own, so that its peak resident memory (the OS's high-water mark, above a
baseline process holding the same inputs) is its own; the table prints it beside what the plan
counts for that loss (saved log-probabilities and the backward's temporaries,
compiler/plan/memory.py) and the median time of a pass. The chunked loss trades one more forward
of the head for memory that no longer grows with tokens x V.

    python bench/bench_loss.py [--tokens 4096] [--d 512] [--vocab 128256] [--reps 3]
"""

import argparse
import json
import resource
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

GiB = 2 ** 30


def one(args) -> dict:
    """Run one variant here: {"seconds": median pass, "maxrss": bytes}."""
    import torch

    from llmc.compiler.plan.activations import loss_chunk_tokens
    from llmc.runtime.model.loss import chunked_cross_entropy, cross_entropy

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    # made in place: a transient here would raise the baseline's high-water mark
    x = torch.randn(args.tokens, args.d, generator=g, dtype=dtype).requires_grad_()
    weight = torch.empty(args.vocab, args.d).normal_(0, 0.02, generator=g).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    chunk = loss_chunk_tokens("full", args.vocab)
    times = []
    for _ in range(args.reps if args.variant != "baseline" else 0):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            if args.variant == "whole":
                loss = cross_entropy(x @ weight.T, labels)
            else:
                loss = chunked_cross_entropy(x, weight, labels, chunk, dtype)
        loss.backward()
        times.append(time.perf_counter() - start)
        x.grad = weight.grad = None
    return {"seconds": sorted(times)[len(times) // 2] if times else 0.0,
            "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "chunk": chunk}


def planned(args, precision: str, chunk: int) -> dict:
    """The plan's bytes for each variant's loss: saved log-probabilities plus the temporaries."""
    from llmc.compiler.plan.memory import loss_temporary_bytes

    act = 2 if precision == "bf16" else 4
    whole = 4 * args.tokens * args.vocab + loss_temporary_bytes(args.vocab, args.d, args.tokens)
    chunked = loss_temporary_bytes(args.vocab, args.d, args.tokens, chunk=chunk, act=act)
    return {"whole": whole, "chunked": chunked}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="one precision (default: both)")
    ap.add_argument("--variant", choices=["baseline", "whole", "chunked"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:  # a child: one variant, its result as JSON
        print(json.dumps(one(args)))
        return

    table = Table(title=f"Loss over a head of {args.tokens} tokens x d {args.d} x vocab {args.vocab:,}, "
                        f"{args.threads} threads (peak memory above the inputs, median pass)")
    for col in ("precision", "loss", "chunk", "measured peak GiB", "plan GiB", "pass s", "time / whole"):
        table.add_column(col, justify="right")
    for precision in ([args.precision] if args.precision else ["fp32", "bf16"]):
        runs = {}
        for variant in ("baseline", "whole", "chunked"):
            command = [sys.executable, __file__, "--variant", variant, "--precision", precision,
                       *(f"--{k}={getattr(args, k)}" for k in ("tokens", "d", "vocab", "reps", "threads"))]
            runs[variant] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        plan = planned(args, precision, runs["chunked"]["chunk"])
        for variant in ("whole", "chunked"):
            r = runs[variant]
            table.add_row(precision, variant, f"{r['chunk']:,}" if variant == "chunked" else "-",
                          f"{(r['maxrss'] - runs['baseline']['maxrss']) / GiB:.2f}", f"{plan[variant] / GiB:.2f}",
                          f"{r['seconds']:.2f}", f"{r['seconds'] / runs['whole']['seconds']:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
