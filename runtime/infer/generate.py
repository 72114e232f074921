"""Generation: prefill the prompts into a KV cache, then decode one token per step.

A batch of prompts of different lengths is left-padded; each row keeps its own positions
(0 .. len-1 for its prompt) and the cache's mask hides the padding, so a row's tokens are those
of generating its prompt alone. Each row samples with its own generator seeded alike, so even
sampled outputs do not depend on the batch.
"""

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from llmc.compiler.errors import UserError

from .cache import build_cache
from .sampling import SamplingParams, make_generators, next_token_probs, draw
from .stream import TextStream


@dataclass
class Generation:
    """One prompt's result: new token ids, their text (cut at a stop string) and timing."""

    tokens: list[int]
    text: str = ""
    stop_reason: str = "length"       # "length", "stop_token" or "stop_string"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    logits: list[torch.Tensor] = field(default_factory=list, repr=False)   # per step, when asked for

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of decoding (the first token comes from the prefill)."""
        elapsed = self.prefill_s + self.decode_s
        return len(self.tokens) / elapsed if elapsed > 0 else 0.0


def seen_tokens(batch: int, vocab: int, device) -> torch.Tensor:
    return torch.zeros(batch, vocab, dtype=torch.bool, device=device)


def left_pad(prompts: list[list[int]], pad_id: int, device):
    """tokens [B, L], real [B, L] (False on padding), positions [B, L] (0 at each row's first token)."""
    L = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), L), pad_id, dtype=torch.long, device=device)
    real = torch.zeros(len(prompts), L, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        tokens[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
        real[b, L - len(p):] = True
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    return tokens, real, positions


def check_prompts(prompts: list[list[int]], model, max_new_tokens: int) -> int:
    """Refuse empty prompts and prompts longer than the model's context; returns the room left."""
    if not prompts:
        raise UserError("no prompts to generate from")
    for i, p in enumerate(prompts):
        if not p:
            raise UserError(f"prompt {i + 1} is empty (it has no tokens)")
    longest = max(len(p) for p in prompts)
    limit = model.cfg.max_seq_len
    if longest >= limit:
        which = next(i for i, p in enumerate(prompts) if len(p) == longest)
        raise UserError(f"prompt {which + 1} has {longest} tokens; the model's context is {limit} tokens "
                        f"(expected prompts shorter than max_seq_len)")
    return min(max_new_tokens, limit - longest)


@torch.inference_mode()
def generate(model, prompts: list[list[int]], params: SamplingParams, tokenizer=None, *,
             on_text: Callable[[int, str], None] | None = None, pad_id: int = 0,
             cache_dtype: torch.dtype | None = None, index_fp8: bool = True,
             keep_logits: bool = False) -> list[Generation]:
    """Generate for every prompt (token id lists) in one batch with a KV cache.

    tokenizer: needed for text, stop strings and streaming; `on_text(row, chunk)` is called as
    soon as a chunk of a row's text is safe to show. keep_logits: keep each step's logits (tests).
    index_fp8: DSA indexer keys in fp8 (as served) or exact (see cache.build_cache).
    """
    device = next(model.parameters()).device
    B = len(prompts)
    max_new = check_prompts(prompts, model, params.max_new_tokens)
    results = [Generation(tokens=[]) for _ in range(B)]
    if max_new == 0:
        return results
    tokens, real, positions = left_pad(prompts, pad_id, device)
    lengths = real.sum(1)
    cache = build_cache(model, B, tokens.shape[1] + max_new, dtype=cache_dtype, index_fp8=index_fp8)
    seen = seen_tokens(B, model.cfg.vocab_size, device)
    for b, p in enumerate(prompts):       # the prompt's own tokens count as seen, padding does not
        seen[b, torch.tensor(p, device=device)] = True
    generators = None if params.greedy else make_generators(B, params.seed)
    streams = [TextStream(tokenizer, params.stop_strings, prompt_ids=p) if tokenizer is not None else None
               for p in prompts]
    stop_ids = set(params.stop_tokens)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    t0 = time.perf_counter()
    cache.begin(tokens.shape[1], real)
    logits = model(tokens, positions=positions, cache=cache, last_only=True).logits[:, -1]
    cache.commit()
    t_prefill = time.perf_counter() - t0

    t0 = time.perf_counter()
    for step in range(max_new):
        if params.greedy and params.repetition_penalty == 1.0:
            next_tokens = logits.argmax(-1)      # what next_token_probs' one-hot would pick, without it
        else:
            probs = next_token_probs(logits, params, seen)
            next_tokens = probs.argmax(-1) if params.greedy else draw(probs, generators)
        seen[torch.arange(B), next_tokens] = True
        for b in range(B):
            if done[b]:
                continue
            _accept(results[b], int(next_tokens[b]), logits[b] if keep_logits else None,
                    streams[b], stop_ids, on_text, b)
            done[b] = results[b].stop_reason != "length"
        if bool(done.all()) or step == max_new - 1:
            break
        cache.begin(1)
        pos = (lengths + step)[:, None]
        logits = model(next_tokens[:, None], positions=pos, cache=cache).logits[:, -1]
        cache.commit()
    t_decode = time.perf_counter() - t0

    for b, r in enumerate(results):
        r.prefill_s, r.decode_s = t_prefill, t_decode
        if streams[b] is not None:
            tail = streams[b].finish()
            if tail and on_text is not None:
                on_text(b, tail)
            r.text = streams[b].text
    return results


def _accept(result: Generation, token: int, logits, stream, stop_ids: set[int], on_text, row: int) -> None:
    """Record one new token of a row: stop tokens end the row (and are not part of the output)."""
    if logits is not None:
        result.logits.append(logits.float().cpu())
    if token in stop_ids:
        result.stop_reason = "stop_token"
        return
    result.tokens.append(token)
    if stream is not None:
        chunk = stream.push(token)
        if chunk and on_text is not None:
            on_text(row, chunk)
        if stream.stopped:
            result.stop_reason = "stop_string"


@torch.inference_mode()
def generate_without_cache(model, prompt: list[int], params: SamplingParams) -> list[int]:
    """The reference loop: recompute the whole sequence every step (no KV cache). For benchmarks
    and tests; one prompt, greedy or sampled alike."""
    device = next(model.parameters()).device
    max_new = check_prompts([prompt], model, params.max_new_tokens)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    seen = seen_tokens(1, model.cfg.vocab_size, device)
    seen[0, ids[0]] = True
    generators = None if params.greedy else make_generators(1, params.seed)
    out = []
    for _ in range(max_new):
        probs = next_token_probs(model(ids, last_only=True).logits[:, -1], params, seen)
        token = probs.argmax(-1) if params.greedy else draw(probs, generators)
        if int(token) in params.stop_tokens:
            break
        out.append(int(token))
        seen[0, token] = True
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return out
