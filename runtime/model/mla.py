"""Multi-head latent attention (DeepSeek-V2/V3), optionally sparse through the DSA indexer (V3.2).

    q  = wq_b(q_norm(wq_a(x)))  (or wq(x) when q_lora_rank = 0)      -> [q_nope | q_rope] per head
    kv_a = wkv_a(x) = [latent (kv_lora_rank) | k_rope (qk_rope_head_dim, one key shared by heads)]
    [k_nope | v] = wkv_b(kv_norm(latent)) per head ;  k = [k_nope | k_rope]
    softmax scale = (nope + rope)^-1/2, times YaRN's mscale_all_dim^2 correction.

KV-cache hook (used by llmc.runtime.infer): with `cache` given, the layer caches only the
compressed latent and the rotated rope key:

    cache.update(latent, k_rope, start_pos) -> (latent_all, k_rope_all)
        latent [B, T, kv_lora_rank] (after kv_norm), k_rope [B, T, qk_rope_head_dim] (RoPE applied);
        returns everything cached for positions 0 .. start_pos+T-1.
    cache.mask (optional attribute): None, or bool [B, 1, T, S] (True = may attend) replacing the
        causal rule (left-padded batches), as in attention.py.
    cache.update_index(k_index, start_pos) -> k_index_all     (only with the DSA indexer)
        the indexer's keys [B, T, index_head_dim].

and attends with the absorbed projections: q_nope is mapped into latent space through wkv_b's key
part, scores are taken against the latent directly, and the value part of wkv_b is applied to
the attention-weighted latent, so no per-head keys or values are ever materialised.
"""

import torch
from torch import nn

from .attention import causal_attention, causal_keep
from .indexer import Indexer, alignment_loss
from .linear import Linear
from .norm import build_norm
from .rope import apply_rope, softmax_scale_factor


class MLA(nn.Module):
    """Multi-head latent attention; q/k/v biases are not part of MLA (qkv_bias is ignored here)."""

    def __init__(self, cfg):
        super().__init__()
        a = cfg.attention
        self.n_heads = cfg.n_heads
        self.q_lora_rank, self.kv_lora_rank = a.q_lora_rank, a.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        d, H = cfg.d_model, cfg.n_heads
        if self.q_lora_rank:
            self.wq_a = Linear(d, self.q_lora_rank, bias=False)
            self.q_norm = build_norm(cfg.norm, self.q_lora_rank, cfg.norm_eps)
            self.wq_b = Linear(self.q_lora_rank, H * self.qk_dim, bias=False)
        else:
            self.wq = Linear(d, H * self.qk_dim, bias=False)
        self.wkv_a = Linear(d, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = build_norm(cfg.norm, self.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.wo = Linear(H * self.v_dim, d, bias=cfg.out_bias)
        self.scale = self.qk_dim ** -0.5 * softmax_scale_factor(cfg.rope)
        if a.sparse:
            self.indexer = Indexer(cfg)
        else:
            self.indexer = None

    def forward(self, x, cos=None, sin=None, cache=None, start_pos: int = 0):
        B, T, _ = x.shape
        q_latent = self.q_norm(self.wq_a(x)) if self.q_lora_rank else None
        q = (self.wq_b(q_latent) if self.q_lora_rank else self.wq(x)).view(B, T, self.n_heads, self.qk_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_norm(latent)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin).squeeze(2)

        keep = score = None  # [B, T, S] keys each query may see and their index scores
        if self.indexer is not None:
            keep, score = self.indexer(x, q_latent, cos, sin, cache=cache, start_pos=start_pos)
            self.indexer.last_loss = None
        if cache is not None:
            out = self._absorbed(q_nope, q_rope, latent, k_rope, cache, start_pos, keep)
        else:
            out = self._dense(q_nope, q_rope, latent, k_rope, keep, score)
        return self.wo(out.reshape(B, T, self.n_heads * self.v_dim))

    def _dense(self, q_nope, q_rope, latent, k_rope, keep, score=None):
        """Training / no-cache path: materialise per-head k, v and run SDPA. Returns [B, T, H, v_dim]."""
        B, T, H, _ = q_nope.shape
        kv = self.wkv_b(latent).view(B, T, H, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rope[:, :, None, :].expand(B, T, H, self.rope_dim)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if keep is None:
            out = causal_attention(q, k, v, self.scale)
        else:
            out = causal_attention(q, k, v, self.scale, mask=keep[:, None])
            if torch.is_grad_enabled():  # train the indexer towards this attention
                self.indexer.last_loss = alignment_loss(q.detach(), k.detach(), self.scale, score, keep)
        return out.transpose(1, 2)

    def _absorbed(self, q_nope, q_rope, latent, k_rope, cache, start_pos, keep):
        """Cached path: attend over the cached latent with wkv_b absorbed. Returns [B, T, H, v_dim]."""
        B, T, H, _ = q_nope.shape
        latent_all, k_rope_all = cache.update(latent, k_rope, start_pos)
        S = latent_all.shape[1]
        w = self.wkv_b.weight.view(H, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_k, w_v = w[:, :self.nope_dim], w[:, self.nope_dim:]
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_k)  # queries in latent space
        scores = (torch.einsum("bthc,bsc->bhts", q_lat, latent_all)
                  + torch.einsum("bthr,bsr->bhts", q_rope, k_rope_all)).float() * self.scale
        if keep is None:
            keep = causal_keep(T, S, start_pos, cache, scores.device)
        scores = scores.masked_fill(~keep[:, None], float("-inf"))
        probs = scores.softmax(dim=-1).to(latent_all.dtype)
        out_latent = torch.einsum("bhts,bsc->bthc", probs, latent_all)
        return torch.einsum("bthc,hdc->bthd", out_latent, w_v)
