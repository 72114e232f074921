"""Decode speed of `llmc generate` against transformers' `generate` on the same weights.

    python bench/bench_generate.py [--target CKPT] [--draft CKPT] [--new-tokens 128] [--threads 1]

Without --target, a pair is trained here in a few minutes on Python's standard library source
(cached in --workdir): a one-layer draft (d_model 256), then a 12-layer target grown from it
(progressive stacking: the draft's layer and embeddings, 11 new layers whose output projections
start at zero, so the target starts as the draft) and trained further; finally the draft is
distilled from the target. The target is ~8x the draft's compute, and close to it in what it
predicts: a well-matched draft. The target is exported
to transformers with `llmc export hf`'s code, so both libraries run the same weights. Both decode
greedily the same held-out prompts with a KV cache (and, as a reference, without one); llmc also
decodes with speculative decoding and with int8 / int4 weights.

Prints a table of tokens/s (new tokens over the whole generate call, prefill included, best of
--repeats interleaved rounds) and each row's ratio to transformers with its KV cache, and whether
each row's tokens equal transformers' greedy tokens.
"""

import argparse
import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

TARGET = ["model.vocab_size=2048", "model.d_model=256", "model.n_layers=12", "model.n_heads=8",
          "model.n_kv_heads=4", "model.ffn_hidden=704", "model.max_seq_len=512"]
DRAFT_LAYERS = 1
CORPUS = ["argparse.py", "textwrap.py", "string.py", "shlex.py", "json/decoder.py", "json/encoder.py",
          "json/__init__.py", "dataclasses.py"]


def corpus() -> str:
    import sysconfig
    lib = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((lib / name).read_text(encoding="utf-8") for name in CORPUS)


def distill(draft, target, ids: list[int], steps: int, seq: int = 128, batch: int = 16, lr: float = 1e-3):
    """Fit the draft to the target's next-token distributions (KL(target || draft)), the usual
    way a draft is matched to its target."""
    g = torch.Generator().manual_seed(2)
    data = torch.tensor(ids)
    opt = torch.optim.AdamW(draft.parameters(), lr=lr)
    draft.train()
    target.eval()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s:s + seq] for s in starts])
        with torch.no_grad():
            teacher = target(x).logits.log_softmax(-1)
        student = draft(x).logits.log_softmax(-1)
        loss = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean") / seq
        opt.zero_grad()
        loss.backward()
        opt.step()
    return draft.eval()


def train_pair(workdir: Path, draft_steps: int, target_steps: int, distill_steps: int) -> tuple[Path, Path]:
    """Train a draft, grow the target from it and train that, then distill the draft from the
    target; saved as llmc checkpoints (workdir/draft0, workdir/target, workdir/draft) and reused."""
    from test_infer_checkpoints import fit

    from llmc.compiler.plan import build_plan
    from llmc.compiler.spec import load_spec
    from llmc.runtime.data.tokenizer import train_tokenizer
    from llmc.runtime.infer.checkpoint import load_for_inference
    from llmc.runtime.model import Transformer
    from llmc.runtime.model.io import save_model

    def saved(name):
        return (workdir / name / "model.safetensors").is_file()

    if saved("target") and saved("draft"):
        return workdir / "target", workdir / "draft"
    text = corpus()
    train_text = text[:int(0.9 * len(text))]
    target_spec = load_spec(REPO / "specs" / "tiny.toml", TARGET)
    draft_spec = load_spec(REPO / "specs" / "tiny.toml", TARGET + [f"model.n_layers={DRAFT_LAYERS}"])
    draft_plan = build_plan(draft_spec).model_dump(mode="json")
    if saved("draft0"):
        draft, _, tok = load_for_inference(workdir / "draft0")
    else:
        tok = train_tokenizer([train_text], 2048)
        torch.manual_seed(0)
        draft = Transformer(draft_spec.model)
        draft.init_weights()
        t0 = time.perf_counter()
        fit(draft, tok.encode(train_text).ids, draft_steps, seq=128, batch=16, lr=3e-3)
        print(f"draft trained: {draft_steps} steps in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        save_model(draft, draft_plan, workdir / "draft0", tok)
    ids = tok.encode(train_text).ids
    if saved("target"):
        target = load_for_inference(workdir / "target")[0]
    else:
        torch.manual_seed(0)
        target = Transformer(target_spec.model)
        target.init_weights()
        with torch.no_grad():
            for name, module in target.named_modules():
                if name.endswith(("attn.wo", "ffn.w2")):
                    module.weight.zero_()           # new layers start as the identity
        target.load_state_dict(draft.state_dict(), strict=False)
        t0 = time.perf_counter()
        fit(target, ids, target_steps, seq=128, batch=16, lr=3e-4, seed=1)
        print(f"target trained: {target_steps} steps in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        save_model(target, build_plan(target_spec).model_dump(mode="json"), workdir / "target", tok)
    t0 = time.perf_counter()
    distill(draft, target, ids, distill_steps)
    print(f"draft distilled: {distill_steps} steps in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    save_model(draft, draft_plan, workdir / "draft", tok)
    return workdir / "target", workdir / "draft"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", help="an llmc checkpoint (default: trained here, see above)")
    ap.add_argument("--draft", help="a draft checkpoint sharing the target's tokenizer")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "llmc-bench-generate"))
    ap.add_argument("--draft-steps", type=int, default=300)
    ap.add_argument("--target-steps", type=int, default=40)
    ap.add_argument("--distill-steps", type=int, default=60)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4], help="draft tokens per speculative round")
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

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.target:
        if not args.draft:
            ap.error("--target needs --draft")
        target_path, draft_path = Path(args.target), Path(args.draft)
    else:
        target_path, draft_path = train_pair(workdir, args.draft_steps, args.target_steps, args.distill_steps)
    target, _, tok = load_for_inference(target_path, dtype=torch.float32)
    draft = load_for_inference(draft_path, dtype=torch.float32)[0]
    shutil.rmtree(workdir / "hf", ignore_errors=True)  # the target's export, from an earlier run of this bench
    export_checkpoint(target_path, workdir / "hf")
    hf = AutoModelForCausalLM.from_pretrained(workdir / "hf", dtype=torch.float32).eval()

    text = corpus() if not args.target else None
    held_out = tok.encode(text[int(0.9 * len(text)):]).ids if text else list(range(args.prompt_len * 50))
    step = len(held_out) // (args.prompts + 1)
    prompts = [held_out[i * step:i * step + args.prompt_len] for i in range(args.prompts)]
    params = SamplingParams(max_new_tokens=args.new_tokens)
    n = args.new_tokens

    @torch.no_grad()
    def hf_generate(prompt, use_cache=True):
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, use_cache=use_cache, eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    acceptance: dict[int, list[float]] = {}

    def speculative(prompt, k):
        r = speculative_generate(target, draft, prompt, params, k=k)
        acceptance.setdefault(k, []).append(r.acceptance_rate)
        return r.tokens

    quantized = {bits: quantize_model(copy.deepcopy(target), QuantConfig(bits, 128)) for bits in (8, 4)}
    methods = {"transformers generate, KV cache": hf_generate,
               "llmc generate, KV cache": lambda p: generate(target, [p], params)[0].tokens}
    if not args.no_uncached:
        methods["transformers generate, no cache"] = lambda p: hf_generate(p, use_cache=False)
        methods["llmc, no cache"] = lambda p: generate_without_cache(target, p, params)
    for k in args.k:
        methods[f"llmc speculative, k={k}"] = lambda p, k=k: speculative(p, k)
    for bits, q in quantized.items():
        methods[f"llmc int{bits} weights"] = lambda p, q=q: generate(q, [p], params)[0].tokens

    # Interleaved rounds, best time per (method, prompt): the machine's load drifts, and each
    # method should meet the same drift.
    best = {(m, i): float("inf") for m in methods for i in range(len(prompts))}
    outs = {m: [None] * len(prompts) for m in methods}
    for _ in range(args.repeats):
        for m, fn in methods.items():
            for i, p in enumerate(prompts):
                t0 = time.perf_counter()
                outs[m][i] = fn(p)
                best[m, i] = min(best[m, i], time.perf_counter() - t0)
    speed = {m: len(prompts) * n / sum(best[m, i] for i in range(len(prompts))) for m in methods}
    reference = outs["transformers generate, KV cache"]
    hf_speed, plain = speed["transformers generate, KV cache"], speed["llmc generate, KV cache"]
    notes = {}
    for k, rates in acceptance.items():
        name = f"llmc speculative, k={k}"
        notes[name] = f"acceptance {sum(rates) / len(rates):.0%}, {speed[name] / plain:.2f}x llmc"
    for bits in quantized:
        o = outs[f"llmc int{bits} weights"]
        prefix = [next((i for i, (a, b) in enumerate(zip(x, r)) if a != b), n) for x, r in zip(o, reference)]
        notes[f"llmc int{bits} weights"] = f"same first {sum(prefix) / len(prefix):.0f}/{n} tokens as fp32"

    n_params = sum(p.numel() for p in target.parameters())
    d_params = sum(p.numel() for p in draft.parameters())
    table = Table(title=f"Decode speed: {n_params / 1e6:.1f}M-parameter target ({d_params / 1e6:.1f}M draft), "
                        f"{len(prompts)} prompts of "
                        f"{args.prompt_len} tokens, {n} new tokens, greedy, fp32, {args.threads} thread(s)")
    for col in ("generation", "tokens/s", "vs HF (cache)", "same tokens", "note"):
        table.add_column(col, justify="left" if col in ("generation", "note") else "right")
    for m in methods:
        same = "yes" if outs[m] == reference else "no"
        table.add_row(m, f"{speed[m]:.1f}", f"{speed[m] / hf_speed:.2f}x", same, notes.get(m, ""))
    Console(width=130).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
