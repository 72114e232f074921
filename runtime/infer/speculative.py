"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes
k tokens, the target scores them all in one forward pass, and the standard acceptance rule keeps
the output distribution exactly the target's.

Rule. Draft token d_i drawn from q_i is accepted with probability min(1, p_i(d_i) / q_i(d_i));
at the first rejection a token is drawn from normalise(max(0, p_i - q_i)) and the round ends; if
all k are accepted one more token is drawn from p_{k+1}. p and q are `next_token_probs` of each
model, so under greedy decoding (one-hot distributions) a draft token is accepted exactly when
it is the target's argmax and a rejection yields the target's argmax: the tokens are those of
the target alone.

Both caches hold every token except the last sampled one, which the next round feeds first.
"""

import time
from dataclasses import dataclass

import torch

from llmc.compiler.errors import UserError

from .cache import build_cache
from .generate import Generation, _accept, check_prompts, seen_tokens
from .sampling import SamplingParams, next_token_probs
from .stream import TextStream


@dataclass
class SpeculativeGeneration(Generation):
    proposed: int = 0
    accepted: int = 0
    draft_len: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Fraction of the draft's proposals the target accepted."""
        return self.accepted / self.proposed if self.proposed else 0.0


def _forward(model, cache, tokens: list[int], device) -> torch.Tensor:
    """Feed tokens (one row) at the cache's end; logits [T, V]."""
    start = cache.length
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    positions = torch.arange(start, start + len(tokens), device=device)
    cache.begin(len(tokens))
    logits = model(ids, positions=positions, cache=cache).logits[0]
    cache.commit()
    return logits


def _draw(probs: torch.Tensor, gen: torch.Generator | None) -> int:
    if gen is None:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=gen))


def accept_prefix(proposals: list[int], q: list[torch.Tensor], p: list[torch.Tensor],
                  gen: torch.Generator | None) -> list[int]:
    """The standard acceptance rule: the accepted draft tokens, then one token from the target.

    proposals d_i were drawn from q_i; p has one more entry than proposals (the bonus token's
    distribution). gen None means greedy (one-hot p and q): accept iff p_i(d_i) >= q_i(d_i).
    """
    out = []
    for i, d in enumerate(proposals):
        ratio = float(p[i][d] / q[i][d]) if q[i][d] > 0 else 0.0
        u = 1.0 if gen is None else float(torch.rand((), generator=gen))
        if (ratio >= 1.0) if gen is None else (u < ratio):
            out.append(d)
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        out.append(_draw(residual / residual.sum() if residual.sum() > 0 else p[i], gen))
        return out
    out.append(_draw(p[len(proposals)], gen))
    return out


@torch.inference_mode()
def speculative_generate(target, draft, prompt: list[int], params: SamplingParams, tokenizer=None, *,
                         k: int = 4, on_text=None, keep_logits: bool = False) -> SpeculativeGeneration:
    """Generate from one prompt with `draft` proposing k tokens per round and `target` verifying."""
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise UserError(f"draft and target vocabularies differ ({draft.cfg.vocab_size} vs {target.cfg.vocab_size})")
    if k < 1:
        raise UserError(f"speculative decoding needs k >= 1 draft tokens (found {k})")
    device = next(target.parameters()).device
    max_new = check_prompts([prompt], target, params.max_new_tokens)  # the target's context: its output
    result = SpeculativeGeneration(tokens=[], draft_len=k)
    if max_new == 0:
        return result
    capacity = len(prompt) + max_new + k + 1
    draft_context = draft.cfg.max_seq_len  # past it the target goes on alone, one token a round
    use_draft = len(prompt) <= draft_context
    t_cache, d_cache = build_cache(target, 1, capacity), build_cache(draft, 1, min(capacity, draft_context))
    gen = None if params.greedy else torch.Generator().manual_seed(params.seed)
    stream = TextStream(tokenizer, params.stop_strings, prompt_ids=prompt) if tokenizer is not None else None
    stop_ids = set(params.stop_tokens)
    seen = seen_tokens(1, target.cfg.vocab_size, device)
    seen[0, torch.tensor(prompt)] = True

    t0 = time.perf_counter()
    # Prefill both with all but the last prompt token; that token is the first one fed.
    if len(prompt) > 1:
        _forward(target, t_cache, prompt[:-1], device)
        if use_draft:
            _forward(draft, d_cache, prompt[:-1], device)
    result.prefill_s = time.perf_counter() - t0
    pending_draft = [prompt[-1]]      # tokens the draft cache has not seen yet
    last = prompt[-1]                 # the token the target cache has not seen yet
    produced = 0

    t0 = time.perf_counter()
    while produced < max_new and result.stop_reason == "length":
        # (the draft feeds pending_draft, then n_draft - 1 proposals: all within its context)
        room = draft_context - d_cache.length - len(pending_draft) + 1 if use_draft else 0
        n_draft = max(0, min(k, max_new - produced - 1, room))
        use_draft = n_draft > 0
        # 1. the draft proposes n_draft tokens
        proposals, q = [], []
        draft_seen = seen.clone()
        if use_draft:
            logits = _forward(draft, d_cache, pending_draft, device)[-1]
        for i in range(n_draft):
            qi = next_token_probs(logits[None], params, draft_seen)[0]
            d = _draw(qi, gen)
            proposals.append(d)
            q.append(qi)
            draft_seen[0, d] = True
            if i < n_draft - 1:
                logits = _forward(draft, d_cache, [d], device)[-1]
        # 2. the target scores last + proposals in one pass: p_1 .. p_{n_draft+1}
        base = t_cache.length
        t_logits = _forward(target, t_cache, [last] + proposals, device)
        # 3. accept a prefix, then one token from the target (residual or bonus). p_i is computed
        #    with d_1 .. d_{i-1} seen: it only matters when they were all accepted.
        p, verify_seen = [], seen.clone()
        for i in range(len(proposals) + 1):
            p.append(next_token_probs(t_logits[i][None], params, verify_seen)[0])
            if i < len(proposals):
                verify_seen[0, proposals[i]] = True
        new_tokens = accept_prefix(proposals, q, p, gen)
        if keep_logits:
            result.logits.extend(t_logits[i].float().cpu() for i in range(len(new_tokens)))
        n_accepted = len(new_tokens) - 1
        result.proposed += len(proposals)
        result.accepted += n_accepted
        # 4. roll both caches back to the accepted prefix
        t_cache.truncate(base + 1 + n_accepted)
        if use_draft:
            kept_in_draft = min(d_cache.length, base + 1 + n_accepted)
            d_cache.truncate(kept_in_draft)
            known = [last] + new_tokens                  # target-cache tokens from `base` on, plus the new last
            pending_draft = known[kept_in_draft - base:]
        last = new_tokens[-1]
        for token in new_tokens:
            produced += 1
            seen[0, token] = True
            _accept(result, token, None, stream, stop_ids, on_text, 0)
            if result.stop_reason != "length" or produced >= max_new:
                break
    result.decode_s = time.perf_counter() - t0
    if stream is not None:
        tail = stream.finish()
        if tail and on_text is not None:
            on_text(0, tail)
        result.text = stream.text
    return result
