"""Does specs/tiny.toml learn? Validation loss against training time, beside the unigram entropy.

    python bench/bench_learning.py [--out runs/bench-tiny] [--set KEY=VALUE ...]

Trains the tiny spec on the Python standard library (2 CPU threads), then prints a table of
validation loss (nats per token) against wall-clock training time, and the reference every model
must beat: the unigram entropy of the training tokens (the loss of the best model that ignores
context) and the unigram cross entropy on the validation tokens. Ends with a greedy and a
temperature sample from the trained model, which should read as Python.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def unigram_reference(prepared: Path) -> tuple[float, float]:
    """(entropy of the train tokens' unigram distribution, its cross entropy on the val tokens), nats."""
    manifest = json.loads((prepared / "manifest.json").read_text())
    vocab = manifest["vocab_size"]
    counts, val = np.zeros(vocab), np.zeros(vocab)
    for s in manifest["sources"]:
        counts += np.bincount(np.fromfile(prepared / f"{s['train']['name']}.bin", dtype=manifest["dtype"]), minlength=vocab)
        if s["val"]:
            val += np.bincount(np.fromfile(prepared / f"{s['val']['name']}.bin", dtype=manifest["dtype"]), minlength=vocab)
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    smoothed = (counts + 1) / (counts.sum() + vocab)  # add-one, so unseen val tokens have a finite cost
    cross = float(-(val * np.log(smoothed)).sum() / max(val.sum(), 1))
    return entropy, cross


@torch.no_grad()
def sample(model, tokenizer, prompt: str, n: int, temperature: float, context: int, seed: int = 0) -> str:
    """A plain sampler (no cache): greedy at temperature 0."""
    gen = torch.Generator().manual_seed(seed)
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    for _ in range(n):
        logits = model(torch.tensor([ids[-context:]])).logits[0, -1].float()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
        ids.append(nxt)
    return tokenizer.decode(ids)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    from llmc.compiler.spec import load_spec
    from llmc.runtime.data.prepare import prepare
    from llmc.runtime.model.io import load_model
    from llmc.runtime.train import cli

    spec_path = REPO / "specs" / "tiny.toml"
    overrides = list(args.overrides) + ["train.eval_every=25"]
    spec = load_spec(spec_path, overrides)
    t0 = time.perf_counter()
    prepared = prepare(spec)
    prep_time = time.perf_counter() - t0
    entropy, cross = unigram_reference(prepared)
    out = Path(args.out)
    if out.exists():
        import shutil
        shutil.rmtree(out)
    t0 = time.perf_counter()
    cli.main(argparse.Namespace(spec=str(spec_path), overrides=overrides, out=str(out), resume=False, nproc=None))
    wall = time.perf_counter() - t0

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"\nspecs/tiny.toml on {spec.data.sources[0].path}: {spec.train.steps} steps of "
          f"{spec.train.global_batch_size * spec.train.seq_len} tokens, {torch.get_num_threads()} threads "
          f"(data prepared in {prep_time:.0f} s)")
    print(f"{'step':>6} {'train time (s)':>15} {'train loss':>11} {'val loss':>9} {'val / unigram':>14}")
    elapsed = 0.0
    for r in records:
        elapsed += r["step_time"]
        if "val_loss" in r:
            print(f"{r['step']:>6} {elapsed:>15.0f} {r['loss']:>11.3f} {r['val_loss']:>9.3f} {r['val_loss'] / entropy:>14.2f}")
    final = records[-1]["val_loss"]
    print(f"\nunigram entropy of the training tokens: {entropy:.3f} nats/token "
          f"(unigram cross entropy on validation: {cross:.3f})")
    print(f"final validation loss {final:.3f} = {final / entropy:.2f} x the unigram entropy "
          f"({math.exp(final):.1f} vs {math.exp(entropy):.0f} perplexity); "
          f"{elapsed:.0f} s of training steps, {wall:.0f} s wall clock with evaluation and checkpoints")

    model, plan, tokenizer = load_model(out, "cpu", "fp32")
    context = plan["spec"]["model"]["max_seq_len"]
    prompt = "import os\n\n\ndef"  # no trailing space: byte-level BPE attaches a space to the next word
    for temperature in (0.0, 0.8):
        text = sample(model, tokenizer, prompt, 120, temperature, context)
        print(f"\n--- sample, temperature {temperature} ---\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
