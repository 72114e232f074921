"""Training-step speed: llmc's Transformer vs transformers' LlamaForCausalLM, same config, same process.

One step = forward + backward + fused AdamW, on a ~50M-parameter Llama-style model, in fp32 and
under bf16 autocast (optionally torch.compile'd too). Prints tokens/s of both, their ratio, and
the achieved FLOP/s as a fraction of this machine's matmul peak, measured here with a large
product in the same dtype: torch.mm's, or oneDNN's where llmc uses it (fp32 on x86 CPUs,
runtime/model/linear.py) and it is faster. On an AMD CPU MKL, behind torch.mm and transformers'
fp32 layers, runs at about half oneDNN's rate. FLOPs per token follow the PaLM convention:
6 x non-embedding parameters + 12 x n_layers x d_model x seq_len (attention scores and values,
forward+backward).

It also prints the step's floor: its FLOPs at the measured matmul peak plus the fused AdamW
update timed alone (memory-bound, the same for both models). No implementation that calls these
kernels can step faster, so hf / floor bounds what any library could gain over transformers.
"step pairs" is the median and range of hf / llmc over steps run back to back: where the range
spans 1.00x, a ratio of best times near 1 is a tie within this machine's noise.

    python bench/bench_model_step.py [--threads 2] [--steps 5] [--compile [--compile-scope blocks]]
"""

import argparse
import contextlib
import time

import torch
from rich.console import Console
from rich.table import Table

from llmc.compiler.spec import ModelSpec
from llmc.runtime.allocator import keep_freed_memory
from llmc.runtime.model import Transformer
from llmc.runtime.model.linear import matmul_nt, on_onednn

CONFIG = dict(vocab_size=32000, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_hidden=1536,
              max_seq_len=512, norm_eps=1e-5, activation="swiglu", attention={"kind": "gqa"})


def hf_llama(cfg: ModelSpec):
    import transformers
    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope.theta,
        tie_word_embeddings=False, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config)


def matmul_rates(dtype, n: int = 2048, reps: int = 6) -> dict[str, float]:
    """FLOP/s of the best of `reps` n x n x n products in `dtype`, by torch.mm and, where llmc's
    layers use it, by oneDNN."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    kernels = {"torch.mm": lambda: a @ b}
    if on_onednn(a, b):
        kernels["oneDNN"] = lambda: matmul_nt(a, b)  # a @ b.T: the same FLOPs
    rates = {}
    for name, product in kernels.items():
        product()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - t)
        rates[name] = 2 * n ** 3 / best
    return rates


def adamw_seconds(model, reps: int = 6) -> float:
    """Best time of one fused AdamW update of `model`'s parameters (random gradients)."""
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    best = float("inf")
    for _ in range(reps + 1):
        t = time.perf_counter()
        opt.step()
        best = min(best, time.perf_counter() - t)
    for p in params:
        p.grad = None
    return best


def step_fn(model, kind: str, tokens, labels, opt, precision: str):
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    def step():
        with autocast:
            if kind == "llmc":
                loss = model(tokens, labels).loss
            else:  # transformers shifts the labels itself: give it the tokens
                loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def time_interleaved(steps: dict, n: int, warmup: int) -> dict:
    """Seconds of each of n steps of each step function, alternating between them step by step so
    a shared, fluctuating CPU load hits both alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {k: [] for k in steps}
    for _ in range(n):
        for k, step in steps.items():
            t = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--compile", action="store_true",
                    help="also time both models under torch.compile (slow to compile on 2 cores)")
    ap.add_argument("--compile-scope", choices=["model", "blocks"], default="model",
                    help="compile the whole model, or each block on its own (llmc's trainer does blocks)")
    ap.add_argument("--malloc", choices=["keep", "default"], default="keep",
                    help="keep freed memory in the process, as llmc's trainer does (runtime/allocator.py), "
                         "or glibc's default; applies to both models alike")
    args = ap.parse_args()
    if args.malloc == "keep":
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # transformers' decoder layers specialise on their layer_idx: one graph per layer, not per model
    torch._dynamo.config.recompile_limit = 64

    cfg = ModelSpec(**CONFIG)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    labels = torch.cat((tokens[:, 1:], torch.full((args.batch, 1), -100)), dim=1)
    n_tokens = args.batch * args.seq

    llmc_model = Transformer(cfg)
    llmc_model.init_weights()
    n_params = sum(p.numel() for p in llmc_model.parameters())
    non_embedding = n_params - llmc_model.embed.weight.numel()
    flops_per_token = 6 * non_embedding + 12 * cfg.n_layers * cfg.d_model * args.seq

    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    kernel_rates = {p: matmul_rates(torch.float32 if p == "fp32" else torch.bfloat16) for p in precisions}
    peaks = {p: max(r.values()) for p, r in kernel_rates.items()}
    update = adamw_seconds(llmc_model)  # master weights and optimizer states are fp32 in both precisions
    del llmc_model
    variants = [False, True] if args.compile else [False]

    table = Table(title=f"Training step, {n_params / 1e6:.1f}M params, batch {args.batch} x {args.seq} tokens, "
                        f"{args.threads} threads")
    for col in ("precision", "compile", "llmc tok/s", "transformers tok/s", "llmc / hf",
                "step pairs", "llmc GFLOP/s", "% of mm peak", "hf % of peak", "floor ms", "llmc / floor", "hf / floor"):
        table.add_column(col, justify="right")
    for precision in precisions:
        for compiled in variants:
            steps = {}
            torch._dynamo.reset()
            for kind in ("llmc", "hf"):
                torch.manual_seed(0)
                model = Transformer(cfg) if kind == "llmc" else hf_llama(cfg)
                if kind == "llmc":
                    model.init_weights()
                model.train()
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
                run = model
                if compiled and args.compile_scope == "blocks":  # as llmc's trainer does (apply_compile)
                    for block in (model.layers.values() if kind == "llmc" else model.model.layers):
                        block.compile()
                elif compiled:  # the whole forward: embedding, blocks, head and loss in one graph
                    run = torch.compile(model)
                steps[kind] = step_fn(run, kind, tokens, labels, opt, precision)
            times = time_interleaved(steps, args.steps, args.warmup + (2 if compiled else 0))
            seconds = {k: min(v) for k, v in times.items()}  # the least loaded step, like the mm peak
            # hf / llmc step by step: neighbouring steps share the machine's load, so their spread
            # says whether a difference of best times is more than noise
            ratios = sorted(h / l for l, h in zip(times["llmc"], times["hf"]))
            rates = {k: n_tokens / t for k, t in seconds.items()}
            del steps
            flops = rates["llmc"] * flops_per_token
            hf_flops = rates["hf"] * flops_per_token
            floor = n_tokens * flops_per_token / peaks[precision] + update
            table.add_row(precision, "yes" if compiled else "no", f"{rates['llmc']:,.0f}", f"{rates['hf']:,.0f}",
                          f"{rates['llmc'] / rates['hf']:.2f}x",
                          f"{ratios[len(ratios) // 2]:.2f}x ({ratios[0]:.2f} - {ratios[-1]:.2f})", f"{flops / 1e9:,.1f}",
                          f"{100 * flops / peaks[precision]:.0f}%", f"{100 * hf_flops / peaks[precision]:.0f}%",
                          f"{1e3 * floor:,.0f}", f"{seconds['llmc'] / floor:.2f}x", f"{seconds['hf'] / floor:.2f}x")
    Console(width=180).print(table)
    for p, by_kernel in kernel_rates.items():
        measured = ", ".join(f"{rate / 1e9:,.1f} GFLOP/s by {name}" for name, rate in by_kernel.items())
        print(f"measured matmul peak ({p}, 2048^3): {measured}" + ("; the peak is the faster" if len(by_kernel) > 1 else ""))
    print(f"fused AdamW update alone: {1e3 * update:.1f} ms; floor = FLOPs / mm peak + that update")


if __name__ == "__main__":
    main()
