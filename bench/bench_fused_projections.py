"""Would fusing llmc's projections make its training step faster? q/k/v as one matmul, gate/up as one.

llmc keeps wq, wk, wv and w1, w3 as separate Linear layers: tensor parallelism splits each by
heads or columns, and Hugging Face checkpoints name them so. Fused, a block would run one wider
matmul instead of three (or two), forward and backward. This times both, on the shapes of
bench_model_step.py's model (d_model 512, 8 heads of 64, 4 kv heads, ffn 1536, 2 x 256 tokens),
alternating between them so that a shared machine's load hits both alike, and prints the median
of each and their ratio: a fusion worth its cost would be well below 1.00x.

    python bench/bench_fused_projections.py [--threads 2] [--reps 30]
"""

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from llmc.runtime.model.linear import linear

TOKENS, D_MODEL = 512, 512
SHAPES = {"q, k, v": [512, 256, 256], "gate, up": [1536, 1536]}


def forward_backward(x, weights):
    """The products x W^T of each weight (as llmc's layers multiply: runtime/model/linear.py), then
    their backward (a gradient of ones into each)."""
    def step():
        outs = [linear(x, w) for w in weights]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        x.grad = None
        for w in weights:
            w.grad = None
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    table = Table(title=f"{TOKENS} tokens x d_model {D_MODEL}, forward + backward, {args.threads} threads")
    for col in ("dtype", "projections", "separate ms", "fused ms", "fused / separate"):
        table.add_column(col, justify="right")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(TOKENS, D_MODEL, dtype=dtype, requires_grad=True)
        for name, outs in SHAPES.items():
            separate = [torch.randn(o, D_MODEL, dtype=dtype, requires_grad=True) for o in outs]
            fused = [torch.randn(sum(outs), D_MODEL, dtype=dtype, requires_grad=True)]
            steps = {"separate": forward_backward(x, separate), "fused": forward_backward(x, fused)}
            times = {k: [] for k in steps}
            for _ in range(3):
                for step in steps.values():
                    step()
            for _ in range(args.reps):
                for k, step in steps.items():
                    t = time.perf_counter()
                    step()
                    times[k].append(time.perf_counter() - t)
            ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            table.add_row(str(dtype).removeprefix("torch."), name, f"{ms['separate']:.2f}", f"{ms['fused']:.2f}",
                          f"{ms['fused'] / ms['separate']:.2f}x")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
