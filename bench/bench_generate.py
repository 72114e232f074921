"""Decode speed of `llmc generate` against transformers' `generate` on the same weights.

    python bench/bench_generate.py [--target CKPT] [--draft CKPT] [--new-tokens 128] [--threads 1]

Without --target, a Llama-style model (~30M parameters, random weights) is built and exported to
transformers with `llmc export hf`'s code, so both libraries run the same weights. Both decode
greedily the same prompts with a KV cache (and, as a reference, without one); llmc also decodes
with speculative decoding and with int8 / int4 weights. Without --draft, the draft is the target's
first layer with its embedding, final norm and head (LayerSkip-style early exit), a well-matched
draft for a model whose later layers refine rather than overturn its predictions.

Prints a table of tokens/s (new tokens over the whole generate call, prefill included, best of
--repeats) and each row's ratio to transformers with its KV cache, and whether each row's tokens
equal transformers' greedy tokens.
"""

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

BENCH_MODEL = ["model.vocab_size=4096", "model.d_model=512", "model.n_layers=8", "model.n_heads=8",
               "model.n_kv_heads=4", "model.ffn_hidden=1408", "model.max_seq_len=1024"]


def build_target(tmp: Path) -> Path:
    from llmc.compiler.plan import build_plan
    from llmc.compiler.spec import load_spec
    from llmc.runtime.model import Transformer
    from llmc.runtime.model.io import save_model
    spec = load_spec(REPO / "specs" / "tiny.toml", BENCH_MODEL)
    torch.manual_seed(0)
    model = Transformer(spec.model)
    model.init_weights()
    return save_model(model, build_plan(spec).model_dump(mode="json"), tmp / "target")


def early_exit_draft(target, n_layers: int = 1):
    """The target's first n_layers with its embedding, final norm and head, as a model of its own."""
    from llmc.runtime.model import Transformer
    cfg = target.cfg.model_copy(update={"n_layers": n_layers})
    draft = Transformer(cfg)
    state = {k: v for k, v in target.state_dict().items()
             if not k.startswith("layers.") or int(k.split(".")[1]) < n_layers}
    draft.load_state_dict({k: v for k, v in state.items() if not k.startswith("mtp.")}, strict=False)
    return draft.eval()


def best_time(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", help="an llmc checkpoint (default: a random ~30M Llama-style model)")
    ap.add_argument("--draft", help="a draft checkpoint for speculative decoding (default: early exit)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--k", type=int, default=4, help="draft tokens per speculative round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-uncached", action="store_true", help="skip the slow rows without a KV cache")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForCausalLM

    from llmc.runtime.hf_weights import export_checkpoint
    from llmc.runtime.infer.checkpoint import load_for_inference
    from llmc.runtime.infer.generate import generate, generate_without_cache
    from llmc.runtime.infer.quantize import QuantConfig, quantize_model
    from llmc.runtime.infer.sampling import SamplingParams
    from llmc.runtime.infer.speculative import speculative_generate

    tmp = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    target_path = Path(args.target) if args.target else build_target(tmp)
    target, _, _ = load_for_inference(target_path, dtype=torch.float32)
    draft = load_for_inference(args.draft, dtype=torch.float32)[0] if args.draft else early_exit_draft(target)
    export_checkpoint(target_path, tmp / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32).eval()

    g = torch.Generator().manual_seed(1)
    vocab = target.cfg.vocab_size
    prompts = [torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    params = SamplingParams(max_new_tokens=args.new_tokens)
    n = args.new_tokens

    def run_all(fn):
        """tokens/s over all prompts (one at a time) and the generated token lists."""
        elapsed, outs = 0.0, []
        for p in prompts:
            t, out = best_time(lambda: fn(p), args.repeats)
            elapsed += t
            outs.append(out)
        return len(prompts) * n / elapsed, outs

    @torch.no_grad()
    def hf_generate(prompt, use_cache=True):
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, use_cache=use_cache, eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    rows = []
    hf_speed, reference = run_all(hf_generate)
    rows.append(("transformers generate, KV cache", hf_speed, reference, ""))
    speed, outs = run_all(lambda p: generate(target, [p], params)[0].tokens)
    rows.append(("llmc generate, KV cache", speed, outs, ""))
    if not args.no_uncached:
        speed, outs = run_all(lambda p: hf_generate(p, use_cache=False))
        rows.append(("transformers generate, no cache", speed, outs, ""))
        speed, outs = run_all(lambda p: generate_without_cache(target, p, params))
        rows.append(("llmc, no cache", speed, outs, ""))
    accepted = []

    def spec_run(p):
        r = speculative_generate(target, draft, p, params, k=args.k)
        accepted.append(r.acceptance_rate)
        return r.tokens
    speed, outs = run_all(spec_run)
    plain = rows[1][1]
    rows.append((f"llmc speculative (k={args.k})", speed, outs,
                 f"acceptance {sum(accepted) / len(accepted):.0%}, {speed / plain:.2f}x llmc"))
    for bits in (8, 4):
        q = quantize_model(copy.deepcopy(target), QuantConfig(bits, 128))
        speed, outs = run_all(lambda p: generate(q, [p], params)[0].tokens)
        agree = sum(a == b for o, r in zip(outs, reference) for a, b in zip(o, r)) / (len(prompts) * n)
        rows.append((f"llmc int{bits} weights", speed, outs, f"{agree:.0%} of tokens as fp32"))

    n_params = sum(p.numel() for p in target.parameters())
    table = Table(title=f"Decode speed: {n_params / 1e6:.1f}M-parameter model, {len(prompts)} prompts of "
                        f"{args.prompt_len} tokens, {n} new tokens, greedy, fp32, {args.threads} thread(s)")
    for col in ("generation", "tokens/s", "vs transformers (cache)", "same tokens as transformers", "note"):
        table.add_column(col, justify="right" if col != "generation" else "left")
    for name, speed, outs, note in rows:
        same = "yes" if outs == reference else "no"
        table.add_row(name, f"{speed:.1f}", f"{speed / hf_speed:.2f}x", same, note)
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
