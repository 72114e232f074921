"""`llmc eval CKPT --text-file F [--json]`: mean next-token loss and perplexity of a text.

The text is tokenized whole (no special tokens added) and cut into consecutive windows of the
model's context (max_seq_len), each overlapping the next by one token, so every token after the
first is predicted exactly once. loss = mean cross entropy (nats) over those predictions;
perplexity = exp(loss); tokens = the number of predictions.
"""

import json
import math
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..compiler.errors import UserError
from .data.tokenizer import encode_text


def read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: file not found")
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: invalid UTF-8 (byte 0x{data[e.start]:02x})") from None


# fp32 logits one forward may hold (bytes): a window's are context x vocab floats, 4 GiB for a
# 128k vocabulary at 8k tokens, and cross entropy takes as much again; at most 8 windows a batch.
LOGITS_BUDGET = 1 << 30


def windows_per_batch(context: int, vocab_size: int) -> int:
    """How many windows one forward takes: up to 8, fewer when their logits outgrow LOGITS_BUDGET."""
    return max(1, min(8, LOGITS_BUDGET // (context * vocab_size * 4)))


@torch.no_grad()
def text_loss(model, ids: list[int], context: int, batch_size: int | None = None, device="cpu",
              on_tokens: Callable[[int], None] | None = None) -> tuple[float, int]:
    """(mean next-token loss in nats, number of predicted tokens) of a token sequence;
    `on_tokens(n)` after each forward, with the n predictions it added (for a progress bar)."""
    if len(ids) < 2:
        raise UserError("the text has fewer than 2 tokens: nothing to predict")
    batch_size = batch_size or windows_per_batch(context, model.cfg.vocab_size)
    tokens = torch.tensor(ids, dtype=torch.long)
    starts = list(range(0, len(ids) - 1, context))
    total, count = 0.0, 0
    model.eval()
    for b in range(0, len(starts), batch_size):
        windows = [tokens[s:s + context + 1] for s in starts[b:b + batch_size]]
        width = max(len(w) for w in windows)
        batch = torch.full((len(windows), width), -100, dtype=torch.long)
        for i, w in enumerate(windows):
            batch[i, :len(w)] = w
        inputs, labels = batch[:, :-1].clamp(min=0).to(device), batch[:, 1:].to(device)
        logits = model(inputs).logits.float()
        losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        predicted = int((labels != -100).sum())
        total += losses.item()
        count += predicted
        if on_tokens is not None:
            on_tokens(predicted)
    return total / count, count


def main(args) -> int:
    """`llmc eval CKPT --text-file F [--json]`."""
    from .infer.checkpoint import load_for_inference
    text = read_text(args.text_file)
    model, plan, tokenizer = load_for_inference(args.checkpoint, "cpu", "fp32")  # plain or quantized
    if tokenizer is None:
        raise UserError(f"{args.checkpoint}: the model folder has no tokenizer.json")
    context = plan["spec"]["model"]["max_seq_len"]
    ids = encode_text(tokenizer, text)
    console = Console(stderr=True, quiet=not sys.stderr.isatty())  # a bar on a terminal, nothing in logs
    columns = [TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
               TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("eval", total=max(len(ids) - 1, 0))
        loss, n = text_loss(model, ids, context, on_tokens=lambda k: progress.advance(task, k))
    ppl = math.exp(min(loss, 700.0))
    if args.json:
        print(json.dumps({"loss": loss, "perplexity": ppl, "tokens": n}))
    else:
        print(f"loss {loss:.4f}  perplexity {ppl:.2f}  ({n:,} tokens, {args.text_file})")
    return 0
