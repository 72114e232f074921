"""Inference memory on one node: the main model's weights at bf16 / int8 / int4 and its KV cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from .activations import ACT, FP32
from .hardware import lookup
from .params import ParamCount

if TYPE_CHECKING:
    from ..spec import Spec


class InferenceMemory(BaseModel):
    """Serving the main model on one node (hardware.gpus_per_node devices), bytes."""

    kv_cache_bytes_per_token: int = Field(description="KV cache of one token over all layers, bf16 "
                                                      "(DSA indexer keys in fp8 with fp32 block scales).")
    kv_cache_breakdown: dict[str, int]
    weights: dict[str, int] = Field(description="Weights of the main model at bf16 / int8 / int4; quantized "
                                                "linear weights carry one bf16 scale per block of 128.")
    devices: int
    capacity: int = Field(description="Usable memory of the devices together (after the reserve).")
    max_cached_tokens: dict[str, int] = Field(description="batch x context tokens that fit beside the weights.")
    max_batch_at_max_seq_len: dict[str, int]


QUANT_BLOCK = 128


def kv_cache_breakdown(spec: Spec) -> dict[str, int]:
    """Bytes per token of the KV cache over all layers (the main model)."""
    m = spec.model
    a, L = m.attention, m.n_layers
    if a.kind == "mla":
        kv = L * ACT * (a.kv_lora_rank + a.qk_rope_head_dim)
    else:
        kv = L * ACT * 2 * m.kv_heads * m.dim_per_head
    out = {"attention": kv}
    if a.sparse:
        out["indexer_keys"] = L * (a.index_head_dim + FP32 * -(-a.index_head_dim // QUANT_BLOCK))
    return out


def inference_memory(spec: Spec, p: ParamCount) -> InferenceMemory:
    """Weights at three precisions, KV cache per token, and the tokens that fit on one node."""
    hw = spec.hardware
    device = lookup(hw.accelerator)
    c = p.components
    unquantized = c["embedding"] + c["positions"] + c["norms"]
    linear = p.main - unquantized
    weights = {"bf16": 2 * p.main}
    for name, bits in (("int8", 8), ("int4", 4)):
        scales = -(-linear // QUANT_BLOCK) * 2
        weights[name] = 2 * unquantized + linear * bits // 8 + scales
    kv = kv_cache_breakdown(spec)
    per_token = sum(kv.values())
    devices = hw.gpus_per_node
    capacity = int(devices * device.memory_bytes * (1 - hw.memory_reserve))
    tokens = {k: max(0, (capacity - w) // per_token) for k, w in weights.items()}
    return InferenceMemory(kv_cache_bytes_per_token=per_token, kv_cache_breakdown=kv, weights=weights,
                           devices=devices, capacity=capacity, max_cached_tokens=tokens,
                           max_batch_at_max_seq_len={k: v // spec.model.max_seq_len for k, v in tokens.items()})
