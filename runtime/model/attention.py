"""Multi-head attention with grouped / multi-query key-value heads (MHA, GQA, MQA).

q, k, v are separate linear layers (tensor parallel splits them by heads from outside);
attention itself is F.scaled_dot_product_attention.

KV-cache hook (used by llmc.runtime.infer): `forward(x, cos, sin, cache=None, start_pos=0)`.
When `cache` is given it is this layer's cache object with one method

    cache.update(k, v, start_pos) -> (k_all, v_all)

k, v are the new keys/values [B, n_kv_heads, T, head_dim] (SDPA's layout, RoPE already applied)
for positions start_pos .. start_pos+T-1; it stores them and returns every cached key/value for
positions 0 .. start_pos+T-1, same layout. Queries then attend causally with that offset,
unless the cache carries `cache.mask` (bool [B, 1, T, S], True = may attend): batched generation
left-pads prompts of different lengths and that mask hides the padding (llmc.runtime.infer.cache).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear
from .norm import RMSNorm
from .rope import apply_rope


# On CPU in bf16, torch's flash-attention kernel takes 1.6-2x as long (forward + backward) as
# ShortCausalAttention below while the scores are short: 128-512 keys, measured on the 2-core
# AVX-512 machine this was tuned on (bench/bench_model_step.py). Up to 1024 keys it stays 10-20%
# faster, but the [B, H, T, S] bf16 probabilities it keeps for backward grow as T^2 while flash
# attention keeps none; the limits hold them to 16 MB a layer. In fp32 the two are even.
MATMUL_ATTENTION_MAX_KEYS = 512
MATMUL_ATTENTION_MAX_SCORES = 1 << 23


def _use_matmul_attention(q, k) -> bool:
    B, H, T, _ = q.shape
    S = k.shape[2]
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and S <= MATMUL_ATTENTION_MAX_KEYS
            and B * H * T * S <= MATMUL_ATTENTION_MAX_SCORES)


class ShortCausalAttention(torch.autograd.Function):
    """Causal self-attention (T == S) as two batched matmuls around a softmax, for short sequences.

    Each kv head serves its group of query heads as one taller matmul (heads h = kv * rep + r, as
    SDPA's enable_gqa). The softmax reads the scores in their dtype and accumulates in fp32. Forward
    keeps the probabilities P and the output O; backward uses dS = P * (dP - rowsum(dO * O)), since
    rowsum(P * dP) = rowsum(dO * O), as flash attention does: four elementwise passes over the
    [T, T] scores instead of autograd's ten through casts, scale, mask and softmax.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        B, H, T, D = q.shape
        Hk = k.shape[1]
        q = (q * scale).reshape(B, Hk, H // Hk * T, D)   # the scale on q: T x D values, not T x T
        scores = (q @ k.transpose(-1, -2)).view(B, Hk, H // Hk, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        probs = scores.masked_fill_(future, float("-inf")).softmax(-1).view(B, Hk, -1, T)
        out = probs @ v
        ctx.save_for_backward(q, k, v, probs, out)
        ctx.scale = scale
        return out.view(B, H, T, v.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs, out = ctx.saved_tensors
        grad_out = grad_out.reshape(out.shape)
        grad_v = probs.transpose(-1, -2) @ grad_out
        row = (grad_out.float() * out.float()).sum(-1, keepdim=True).to(probs.dtype)
        grad_scores = (grad_out @ v.transpose(-1, -2)).sub_(row).mul_(probs)
        grad_q = (grad_scores @ k).mul_(ctx.scale).view(q.shape[0], -1, k.shape[2], q.shape[-1])
        grad_k = grad_scores.transpose(-1, -2) @ q
        return grad_q, grad_k, grad_v, None


def causal_attention(q, k, v, scale: float, start_pos: int = 0, mask=None):
    """softmax(q k^T * scale + causal mask) v, SDPA layout [B, H, T, D]; kv may have fewer heads.

    Query i sits at position start_pos + i and sees keys 0 .. start_pos + i; an explicit bool
    `mask` (broadcastable to [B, H, T, S]) replaces that rule.
    """
    gqa = q.shape[1] != k.shape[1]  # SDPA shares each kv head over its query heads, no copies
    t_q, t_k = q.shape[2], k.shape[2]
    if mask is None and t_q == t_k and _use_matmul_attention(q, k):
        return ShortCausalAttention.apply(q, k, v, scale)
    dv = v.shape[-1]
    if dv < q.shape[-1] and q.device.type == "cpu":
        # MLA's narrower values: the CPU flash kernel wants one head dim, and SDPA's fallback
        # keeps the [T, S] fp32 scores (CUDA's memory-efficient kernel takes the two dims)
        v = F.pad(v, (0, q.shape[-1] - dv))
    if mask is None and t_q == t_k:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    elif mask is None and t_q == 1:  # one new query sees every cached key
        out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    else:
        if mask is None:
            qpos = torch.arange(t_q, device=q.device) + start_pos
            mask = torch.arange(t_k, device=q.device)[None, :] <= qpos[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[..., :dv]


def causal_keep(T: int, S: int, start_pos: int, cache, device) -> torch.Tensor:
    """Bool [B or 1, T, S]: the cache's mask when it has one, else causal with offset start_pos."""
    mask = getattr(cache, "mask", None)
    if mask is not None:
        return mask[:, 0]
    qpos = torch.arange(T, device=device) + start_pos
    return (torch.arange(S, device=device)[None, :] <= qpos[:, None])[None]


class Attention(nn.Module):
    """MHA / GQA / MQA: n_heads query heads share n_kv_heads key/value heads."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        d, hd = cfg.d_model, self.head_dim
        self.wq = Linear(d, self.n_heads * hd, bias=cfg.qkv_bias)
        self.wk = Linear(d, self.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wv = Linear(d, self.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wo = Linear(self.n_heads * hd, d, bias=cfg.out_bias)
        # Qwen3: RMSNorm over each head's query and key, before RoPE
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.use_rope = cfg.positions == "rope"
        self.scale = hd ** -0.5

    def forward(self, x, cos=None, sin=None, cache=None, start_pos: int = 0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask = None
        if cache is not None:
            k, v = cache.update(k, v, start_pos)
            mask = getattr(cache, "mask", None)
        out = causal_attention(q, k, v, self.scale, start_pos, mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))
