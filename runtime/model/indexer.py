"""DeepSeek-V3.2 sparse attention (DSA): the lightning indexer picks the keys each query sees.

    index score I[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s])
    q = wq_b(q_latent) (or wq_b(x) without a q latent), H_idx heads of index_head_dim;
    k = k_norm(wk(x)), one key per position shared by the heads (LayerNorm, as in the reference);
    w = weights_proj(x) * H_idx^-1/2 * index_head_dim^-1/2.
The first qk_rope_head_dim dims of q and k carry RoPE (rotate-half layout, as the reference's
indexer uses). Each query keeps its index_topk best causal keys; MLA then attends over those only.

This is a clear reference implementation over dense [B, T, S] scores, not a fast kernel, but it
keeps what a fused one would for the backward: per key only the selection mask and the
alignment loss's gradient over the scores (`_IndexScore` and `_AlignmentLoss` rebuild the rest,
head by head, so no [B, T, H, S] tensor is ever kept or built). No gradient flows through top-k;
as in DeepSeek-V3.2's sparse training stage, the indexer learns from its own loss
(`alignment_loss`): KL(p || softmax(I)) over the selected keys, p the main attention
distribution summed over heads and renormalised. Its inputs are detached, so that loss trains
only the indexer and the language-model loss trains everything else.
"""

import torch
from torch import nn

from .attention import causal_keep
from .linear import Linear
from .rope import apply_rope


class Indexer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        a = cfg.attention
        self.n_heads, self.head_dim, self.topk = a.index_n_heads, a.index_head_dim, a.index_topk
        self.rope_dim = a.qk_rope_head_dim
        q_in = a.q_lora_rank if a.q_lora_rank else cfg.d_model
        self.wq_b = Linear(q_in, self.n_heads * self.head_dim, bias=False)
        self.wk = Linear(cfg.d_model, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = Linear(cfg.d_model, self.n_heads, bias=False)
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
        w = self.weights_proj(x)  # [B, T, H], scaled by H^-1/2 * index_head_dim^-1/2 below
        return _IndexScore.apply(q, k, w, self.n_heads ** -0.5 * self.scale)

    def forward(self, x, q_latent, cos, sin, cache=None, start_pos: int = 0):
        """(keep, score): bool [B, T, S], True where query t attends key s (causal and in its
        top-k), and the index scores [B, T, S]. Inputs are detached (see the module docstring)."""
        q_latent = q_latent.detach() if q_latent is not None else None
        score = self.scores(x.detach(), q_latent, cos, sin, cache, start_pos)
        with torch.no_grad():
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


def fp32(t: torch.Tensor):
    """No autocast on `t`'s device: the index scores and the attention target stay fp32."""
    return torch.autocast(t.device.type, enabled=False)


class _IndexScore(torch.autograd.Function):
    """I[b, t, s] = c * sum_h w[b, t, h] relu(q[b, t, h] . k[b, s]) in fp32, one head at a time;
    keeps q, k and w (no per-key tensor) and rebuilds each head's dot products in the backward."""

    @staticmethod
    def forward(ctx, q, k, w, c: float):
        ctx.save_for_backward(q, k, w)
        ctx.c = c
        with fp32(q):
            kf = k.float().transpose(1, 2)  # [B, D, S]
            score = None
            for h in range(q.shape[2]):
                term = (q[:, :, h].float() @ kf).relu_().mul_(w[:, :, h, None].float() * c)
                score = term if score is None else score.add_(term)
        return score

    @staticmethod
    def backward(ctx, grad):
        q, k, w = ctx.saved_tensors
        with fp32(q):
            kf = k.float()
            grad_q, grad_w, grad_k = torch.empty_like(q), torch.empty_like(w), torch.zeros_like(kf)
            for h in range(q.shape[2]):
                qh = q[:, :, h].float()
                dots = (qh @ kf.transpose(1, 2)).relu_()                       # [B, T, S]
                grad_w[:, :, h] = (grad * dots).sum(-1).mul_(ctx.c)
                grad_dots = grad * (w[:, :, h, None].float() * ctx.c) * (dots > 0)
                grad_q[:, :, h] = grad_dots @ kf
                grad_k += grad_dots.transpose(1, 2) @ qh
        return grad_q, grad_k.to(k.dtype), grad_w, None


class _AlignmentLoss(torch.autograd.Function):
    """Mean over queries of KL(p || softmax of `score` over the keys not in `drop`); its gradient
    over the scores, (softmax - p) / queries on those keys, is worked out in the forward and kept
    (the one per-key tensor the loss holds)."""

    @staticmethod
    def forward(ctx, score, p, drop):
        log_q = score.masked_fill(drop, float("-inf")).log_softmax(dim=-1)
        kl = (p * (p.clamp_min(1e-30).log() - log_q)).masked_fill_(drop, 0.0).sum(dim=-1)
        queries = kl.numel()
        ctx.save_for_backward(log_q.exp_().sub_(p).masked_fill_(drop, 0.0).div_(queries))
        return kl.mean()

    @staticmethod
    def backward(ctx, grad):
        (grad_score,) = ctx.saved_tensors
        return grad_score * grad, None, None


def alignment_loss(q, k, scale: float, score, keep):
    """Mean over queries of KL(p || softmax(score)) on the kept keys (DeepSeek-V3.2, eq. 4).

    q [B, H, T, D], k [B, H, S, D]: the main attention's queries and keys (detached: p is a
    target); score [B, T, S] index scores; keep [B, T, S] the selected keys."""
    with torch.no_grad(), fp32(q):  # p head by head: one [B, T, S] at a time
        drop = ~keep
        p = None
        for h in range(q.shape[1]):
            attn = (q[:, h].float() @ k[:, h].float().transpose(-1, -2)).mul_(scale)
            probs = attn.masked_fill_(drop, float("-inf")).softmax(dim=-1)
            p = probs if p is None else p.add_(probs)
        p = p / p.sum(dim=-1, keepdim=True)
    return _AlignmentLoss.apply(score, p, drop)
