"""DeepSeek-V3.2 sparse attention (DSA): the lightning indexer picks the keys each query sees.

    index score I[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s])
    q = wq_b(q_latent) (or wq_b(x) without a q latent), H_idx heads of index_head_dim;
    k = k_norm(wk(x)), one key per position shared by the heads (LayerNorm, as in the reference);
    w = weights_proj(x) * H_idx^-1/2 * index_head_dim^-1/2.
The first qk_rope_head_dim dims of q and k carry RoPE (rotate-half layout, as the reference's
indexer uses). Each query keeps its index_topk best causal keys; MLA then attends over those only.

This is a clear reference implementation (dense [B, T, S] scores), not a fast kernel. It is
trained only through what it selects (no gradient flows through top-k); DeepSeek's separate
KL-alignment loss for the indexer is not implemented.
"""

import torch
from torch import nn

from .attention import causal_keep
from .rope import apply_rope


class Indexer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        a = cfg.attention
        self.n_heads, self.head_dim, self.topk = a.index_n_heads, a.index_head_dim, a.index_topk
        self.rope_dim = a.qk_rope_head_dim
        q_in = a.q_lora_rank if a.q_lora_rank else cfg.d_model
        self.wq_b = nn.Linear(q_in, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.d_model, self.n_heads, bias=False)
        self.scale = self.head_dim ** -0.5

    def _rope(self, x, cos, sin):
        x_rope, x_rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat((apply_rope(x_rope, cos, sin), x_rest), dim=-1)

    def scores(self, x, q_latent, cos, sin, cache=None, start_pos: int = 0):
        """Index scores [B, T, S] (float32) of the T queries against all S visible positions."""
        B, T, _ = x.shape
        q = self.wq_b(q_latent if q_latent is not None else x).view(B, T, self.n_heads, self.head_dim)
        q = self._rope(q, cos, sin)
        k = self._rope(self.k_norm(self.wk(x)).unsqueeze(2), cos, sin).squeeze(2)  # [B, T, Dk]
        if cache is not None:
            k = cache.update_index(k, start_pos)
        w = self.weights_proj(x).float() * (self.n_heads ** -0.5 * self.scale)  # [B, T, H]
        dots = torch.einsum("bthd,bsd->bths", q.float(), k.float()).relu()
        return torch.einsum("bths,bth->bts", dots, w)

    def forward(self, x, q_latent, cos, sin, cache=None, start_pos: int = 0):
        """Boolean mask [B, T, S]: True where query t attends key s (causal and in its top-k)."""
        score = self.scores(x, q_latent, cos, sin, cache, start_pos)
        causal = causal_keep(score.shape[1], score.shape[2], start_pos, cache, x.device)
        score = score.masked_fill(~causal, float("-inf"))
        k = min(self.topk, score.shape[-1])
        # a stable sort breaks ties (relu makes many scores exactly 0) by position, the same way
        # for a whole sequence and for one decoded token, which topk does not promise
        top = score.sort(dim=-1, descending=True, stable=True).indices[..., :k]
        keep = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)
        return keep & causal  # top-k may include masked keys when fewer than k are visible
