"""FLOPs per token (training and inference) and the time they take at an assumed MFU.

Conventions, stated once:
- Matmul FLOPs are 2 per parameter per token forward, 6 for training (forward + backward),
  over the *active* parameters that multiply: everything one token uses except the embedding
  lookup (and learned positions), plus the output head's V x d matmul (also when tied).
- Attention adds, per layer and token, 2·H·T·(d_qk + d_v) forward (scores and weighted values,
  PaLM's convention: no discount for the causal mask; training is 3x, i.e. 12·L·H·Q·T when
  d_qk = d_v = Q). DSA attends to min(index_topk, T) keys and its indexer scores all T keys with
  2·H_idx·d_idx·T.
- MTP modules run in training only: their block, eh_proj and the shared head are added to the
  training FLOPs; inference counts the main model.
- Decode with MLA uses the absorbed form of DeepSeek's reference: scores and values in the
  latent space, 2·H·c·(2·r_kv + d_rope) per layer for a context of c tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from .hardware import training_peak
from .params import ParamCount

if TYPE_CHECKING:
    from ..spec import Spec
    from ..spec.model import ModelSpec


def attention_flops_forward(m: ModelSpec, context: int) -> int:
    """Forward attention FLOPs of one layer for one query token over `context` keys (prefill/training)."""
    a = m.attention
    if a.kind == "mla":
        qk, v = a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
    else:
        qk = v = m.dim_per_head
    keys = min(a.index_topk, context) if a.sparse else context
    flops = 2 * m.n_heads * keys * (qk + v)
    if a.sparse:
        flops += 2 * a.index_n_heads * a.index_head_dim * context
    return flops


def attention_flops_decode(m: ModelSpec, context: int) -> int:
    """Attention FLOPs of one layer for one new token over a cache of `context` tokens."""
    a = m.attention
    if a.kind != "mla":
        return attention_flops_forward(m, context)
    keys = min(a.index_topk, context) if a.sparse else context
    flops = 2 * m.n_heads * keys * (2 * a.kv_lora_rank + a.qk_rope_head_dim)
    if a.sparse:
        flops += 2 * a.index_n_heads * a.index_head_dim * context
    return flops


def head_params(m: ModelSpec) -> int:
    """Parameters of the output matmul, whether or not it is tied to the embedding."""
    return m.vocab_size * m.d_model


def matmul_params(m: ModelSpec, p: ParamCount) -> int:
    """Active parameters of the main model that multiply per token (embedding lookup excluded)."""
    c = p.components
    return p.active - c["embedding"] - c["positions"] - c["head"] + head_params(m)


def layer_train_flops(m: ModelSpec, p: ParamCount, kind: str, seq_len: int) -> int:
    """Training FLOPs per token of one block of `kind` ("dense" or "moe")."""
    return 6 * p.layer_kinds[kind].active_per_layer + 3 * attention_flops_forward(m, seq_len)


def mtp_train_flops(m: ModelSpec, p: ParamCount, seq_len: int) -> int:
    """Training FLOPs per token of all MTP modules, their use of the shared head included."""
    depth = m.mtp.depth
    return 6 * (p.mtp_active + depth * head_params(m)) + 3 * depth * attention_flops_forward(m, seq_len)


class Flops(BaseModel):
    """FLOPs and time of the run. FLOPs are counts; times in seconds, hours, days."""

    train_per_token: int = Field(description="Training FLOPs per token: matmuls + attention + MTP.")
    train_matmul_per_token: int = Field(description="6 x active matmul parameters of the main model.")
    train_attention_per_token: int = Field(description="3 x forward attention FLOPs over all layers.")
    train_mtp_per_token: int = Field(description="Training FLOPs per token of the MTP modules.")
    tokens_per_step: int = Field(description="global_batch_size x seq_len (tokens).")
    per_step: int = Field(description="Training FLOPs per optimizer step.")
    steps: int = Field(description="Optimizer steps of the run.")
    tokens: int = Field(description="Tokens of the run.")
    total: int = Field(description="Training FLOPs of the run.")
    precision: str = Field(description="The precision whose peak sets the time: train.precision, but bf16 "
                                       "for fp8 on a device without fp8 tensor cores.")
    peak_tflops: float = Field(description="Dense peak TFLOP/s per device at that precision.")
    mfu: float = Field(description="Assumed model FLOPs utilisation.")
    world_size: int = Field(description="Devices (count).")
    step_time_s: float = Field(description="per_step / (world_size x peak x mfu) (s).")
    tokens_per_s: float = Field(description="Tokens per second over the whole job.")
    gpu_hours: float = Field(description="Device-hours of the run.")
    days: float = Field(description="Wall-clock days of the run.")
    forward_per_token: int = Field(description="Inference forward FLOPs per token at context seq_len (prefill).")
    prefill_per_token: int = Field(description="Same as forward_per_token: prefill of a seq_len-token prompt.")
    decode_per_token: int = Field(description="FLOPs to decode one token with a seq_len-token cache.")
    decode_per_token_max_context: int = Field(description="FLOPs to decode one token with a max_seq_len cache.")


def count_flops(spec: Spec, p: ParamCount) -> Flops:
    """FLOPs per token and per run, and the time at hardware.mfu of the catalog (or overridden) peak."""
    m, t, hw = spec.model, spec.train, spec.hardware
    L, T = m.n_layers, t.seq_len
    n = matmul_params(m, p)
    attention = 3 * L * attention_flops_forward(m, T)
    mtp = mtp_train_flops(m, p, T)
    per_token = 6 * n + attention + mtp
    tokens_per_step = t.global_batch_size * T
    steps = t.steps
    peak, rate = training_peak(hw, t.precision)
    world = spec.world_size
    per_step = per_token * tokens_per_step
    step_time = per_step / (world * peak * 1e12 * hw.mfu)
    total_time = step_time * steps
    forward = 2 * n + L * attention_flops_forward(m, T)
    return Flops(
        train_per_token=per_token, train_matmul_per_token=6 * n, train_attention_per_token=attention,
        train_mtp_per_token=mtp, tokens_per_step=tokens_per_step, per_step=per_step, steps=steps,
        tokens=steps * tokens_per_step, total=per_step * steps, precision=rate, peak_tflops=peak,
        mfu=hw.mfu, world_size=world, step_time_s=step_time, tokens_per_s=tokens_per_step / step_time,
        gpu_hours=total_time * world / 3600, days=total_time / 86400, forward_per_token=forward,
        prefill_per_token=forward, decode_per_token=2 * n + L * attention_flops_decode(m, T),
        decode_per_token_max_context=2 * n + L * attention_flops_decode(m, m.max_seq_len))
