"""Turning logits into the next token: greedy, temperature, top-k, top-p, repetition penalty.

Every function works on a batch of rows `[B, V]`. `next_token_probs` is the one place that says
which distribution a token is drawn from; speculative decoding uses it for both models, so the
acceptance rule compares exactly the distributions plain sampling would draw from.
"""

from dataclasses import dataclass

import torch

from llmc.compiler.errors import UserError


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy (argmax)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0                      # 0 = no top-k filter
    top_p: float = 1.0                  # 1 = no nucleus filter
    repetition_penalty: float = 1.0     # 1 = none; >1 discourages tokens already seen (CTRL rule)
    stop_tokens: tuple[int, ...] = ()   # generation of a row ends after one of these
    stop_strings: tuple[str, ...] = ()  # ... or once its text contains one of these (cut before it)
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise UserError(f"max new tokens must be >= 0 (found {self.max_new_tokens})")
        if not 0 <= self.temperature < float("inf"):  # (NaN fails every comparison)
            raise UserError(f"temperature must be a finite number >= 0 (found {self.temperature}); 0 is greedy")
        if self.top_k < 0:
            raise UserError(f"top-k must be >= 0 (found {self.top_k}); 0 disables it")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top-p must be in (0, 1] (found {self.top_p})")
        if not 0 < self.repetition_penalty < float("inf"):
            raise UserError(f"repetition penalty must be a finite number > 0 (found {self.repetition_penalty})")
        self.stop_tokens = tuple(int(t) for t in self.stop_tokens)
        self.stop_strings = tuple(s for s in self.stop_strings if s)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): seen tokens' positive logits are divided by `penalty`,
    negative ones multiplied, so a penalty > 1 always makes them less likely. `seen` is bool [B, V]."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are kept), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probability reaches p (the most likely token always stays)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs          # probability of the strictly more likely tokens
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token_probs(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution [B, V] (float32) the next token is drawn from. Greedy is the one-hot of the
    argmax (after the repetition penalty), so greedy is a special case of sampling everywhere."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = filter_top_p(filter_top_k(logits / params.temperature, params.top_k), params.top_p)
    return logits.softmax(-1)


def draw(probs: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    """One token per row from probs [B, V]. Each row has its own generator, so a prompt's sample
    does not depend on which other prompts share its batch."""
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(row[None], 1, generator=g).view(1) for row, g in zip(probs, generators)])


def sample(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
           generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """The next token [B] for each row of logits [B, V]."""
    probs = next_token_probs(logits, params, seen)
    if params.greedy:
        return probs.argmax(-1)
    return draw(probs, generators)


def make_generators(batch: int, seed: int) -> list[torch.Generator]:
    """One generator per row, all seeded alike: row i of a batch samples as that prompt alone."""
    return [torch.Generator().manual_seed(seed) for _ in range(batch)]
