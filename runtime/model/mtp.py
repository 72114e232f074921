"""DeepSeek-V3 multi-token prediction: one module per extra predicted token.

Module k (1-based) at position t combines the previous depth's hidden state h^{k-1}_t (the main
model's last hidden state for k = 1) with the embedding of token t+k:
    h^k_t = Block(eh_proj([hnorm(h^{k-1}_t) ; enorm(emb(token_{t+k}))]))
and predicts token t+k+1 through its own final norm and the model's shared head. The embedding
and head are the main model's (shared, not parameters of the module).
"""

import torch
from torch import nn

from .linear import Linear
from .norm import build_norm


class MTPModule(nn.Module):
    def __init__(self, cfg, depth: int):
        super().__init__()
        from .transformer import Block
        self.depth = depth
        self.enorm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.hnorm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.eh_proj = Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        # the block sits after the main stack: block index n_layers + depth - 1 decides MoE or dense
        self.block = Block(cfg, cfg.n_layers + depth - 1)
        self.norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)

    def forward(self, h, next_emb, cos=None, sin=None):
        """h [B, T, D] previous depth's hidden state, next_emb [B, T, D] embedding of token t+k."""
        x = self.eh_proj(torch.cat((self.hnorm(h), self.enorm(next_emb)), dim=-1))
        return self.block(x, cos, sin)
