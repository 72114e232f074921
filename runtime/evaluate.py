"""`llmc eval CKPT --text-file F [--json]`: mean next-token loss and perplexity of a text.

The text is tokenized whole (no special tokens added) and cut into windows of the model's
context (max_seq_len), each starting `--stride` tokens after the one before (default: the context,
consecutive windows); every token after the first is predicted exactly once, in the first window
that holds it with the most tokens before it: a stride below the context gives every prediction
after the first window at least context - stride tokens of history (the sliding-window
perplexity of Hugging Face's "Perplexity of fixed-length models"), for context / stride times the
forwards. loss = mean cross entropy (nats) over those predictions; perplexity = exp(loss);
tokens = the number of predictions.
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
from .data.tokenizer import check_unknown, encode_text, unknown_token


def read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: " + ("a folder, not a text file" if p.is_dir() else "file not found"))
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


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, first, last) of each window over n_tokens: it reads tokens start..last - 1 and
    predicts tokens first..last, those no window before it predicted (each from the window's
    tokens before it)."""
    spans, done, start = [], 0, 0
    while done < n_tokens - 1:
        last = min(start + context, n_tokens - 1)
        spans.append((start, done + 1, last))
        done, start = last, start + stride
    return spans


@torch.no_grad()
def text_loss(model, ids: list[int], context: int, batch_size: int | None = None, device="cpu",
              on_tokens: Callable[[int], None] | None = None, stride: int | None = None) -> tuple[float, int]:
    """(mean next-token loss in nats, number of predicted tokens) of a token sequence, in windows
    of `context` tokens `stride` apart (default: context); `on_tokens(n)` after each forward,
    with the n predictions it added (for a progress bar)."""
    if len(ids) < 2:
        raise UserError("the text has fewer than 2 tokens: nothing to predict")
    stride = stride or context
    if not 1 <= stride <= context:
        raise UserError(f"--stride must be between 1 and the model's context (max_seq_len = {context}), "
                        f"found {stride}: tokens between windows would not be predicted")
    batch_size = batch_size or windows_per_batch(context, model.cfg.vocab_size)
    tokens = torch.tensor(ids, dtype=torch.long)
    spans = windows(len(ids), context, stride)
    total, count = 0.0, 0
    model.eval()
    for b in range(0, len(spans), batch_size):
        rows = spans[b:b + batch_size]
        width = max(last - start for start, _, last in rows)
        inputs = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (start, first, last) in enumerate(rows):  # position p reads token start + p, predicts the next
            inputs[i, :last - start] = tokens[start:last]
            labels[i, first - start - 1:last - start] = tokens[first:last + 1]
        inputs, labels = inputs.to(device), labels.to(device)
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
    unk = unknown_token(tokenizer)
    if unk is not None:
        check_unknown(args.text_file, ids.count(unk[1]), len(ids), unk, f"the model's, {args.checkpoint}",
                      "its loss is lowered by the easy predictions of that one id")
    console = Console(stderr=True, quiet=not sys.stderr.isatty())  # a bar on a terminal, nothing in logs
    columns = [TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
               TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("eval", total=max(len(ids) - 1, 0))
        loss, n = text_loss(model, ids, context, on_tokens=lambda k: progress.advance(task, k), stride=args.stride)
    ppl = math.exp(min(loss, 700.0))
    if args.json:
        print(json.dumps({"loss": loss, "perplexity": ppl, "tokens": n}))
    else:
        print(f"loss {loss:.4f}  perplexity {ppl:.2f}  ({n:,} tokens, {args.text_file})")
    return 0
