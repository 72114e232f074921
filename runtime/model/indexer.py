"""DeepSeek-V3.2 sparse attention (DSA): the lightning indexer picks the keys each query sees.

    index score I[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s])
    q = wq_b(q_latent) (or wq_b(x) without a q latent), H_idx heads of index_head_dim;
    k = k_norm(wk(x)), one key per position shared by the heads (LayerNorm, as in the reference);
    w = weights_proj(x) * H_idx^-1/2 * index_head_dim^-1/2.
The first qk_rope_head_dim dims of q and k carry RoPE (rotate-half layout, as the reference's
indexer uses). Each query keeps its index_topk best causal keys; MLA then attends over those only.

This is a clear reference implementation (dense [B, T, S] scores), not a fast kernel. No
gradient flows through top-k; as in DeepSeek-V3.2's sparse training stage, the indexer learns
from its own loss (`alignment_loss`): KL(p || softmax(I)) over the selected keys, p the main
attention distribution summed over heads and renormalised. Its inputs are detached, so that loss
trains only the indexer and the language-model loss trains everything else.
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
        self.last_loss = None  # alignment loss of the last training forward (set by MLA)

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
        """(keep, score): bool [B, T, S], True where query t attends key s (causal and in its
        top-k), and the index scores [B, T, S]. Inputs are detached (see the module docstring)."""
        q_latent = q_latent.detach() if q_latent is not None else None
        score = self.scores(x.detach(), q_latent, cos, sin, cache, start_pos)
        return self.select(score, cache, start_pos), score

    def select(self, score, cache=None, start_pos: int = 0):
        """The top-k causal keys of each query as a bool mask [B, T, S]."""
        causal = causal_keep(score.shape[1], score.shape[2], start_pos, cache, score.device)
        score = score.masked_fill(~causal, float("-inf"))
        k = min(self.topk, score.shape[-1])
        # a stable sort breaks ties (relu makes many scores exactly 0) by position, the same way
        # for a whole sequence and for one decoded token, which topk does not promise
        top = score.sort(dim=-1, descending=True, stable=True).indices[..., :k]
        keep = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)
        return keep & causal  # top-k may include masked keys when fewer than k are visible


def alignment_loss(q, k, scale: float, score, keep):
    """Mean over queries of KL(p || softmax(score)) on the kept keys (DeepSeek-V3.2, eq. 4).

    q [B, H, T, D], k [B, H, S, D]: the main attention's queries and keys (detached: p is a
    target); score [B, T, S] index scores; keep [B, T, S] the selected keys."""
    with torch.no_grad():
        attn = (q.float() @ k.float().transpose(-1, -2)) * scale
        p = attn.masked_fill(~keep[:, None], float("-inf")).softmax(dim=-1).sum(dim=1)
        p = p / p.sum(dim=-1, keepdim=True)
    log_q = score.masked_fill(~keep, float("-inf")).log_softmax(dim=-1).masked_fill(~keep, 0.0)
    kl = (p * (p.clamp_min(1e-30).log() - log_q)).masked_fill(~keep, 0.0).sum(dim=-1)
    return kl.mean()
