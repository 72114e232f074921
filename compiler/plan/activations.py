"""Activation memory of one Transformer block, after Korthikanti et al. (2022), with real shapes.

"Reducing Activation Recomputation in Large Transformer Models" counts, per block and micro-batch
of b sequences of s tokens, 34·s·b·h + 5·a·s²·b bytes for a GPT block (fp16, dropout, 4h GeLU FFN,
no flash attention). We count the same tensors for the actual block (GQA / MLA / DSA indexer,
gated FFNs, MoE top-k routed copies) and sort them into two kinds:

- *block-level* tensors (norm inputs, norm outputs feeding the projections, MLA latents, residual
  dropout masks): replicated over the TP group unless sequence parallelism shards them;
- *split* tensors (q/k/v, attention output, FFN hidden states, score matrices): sharded by TP.

Recompute: `none` keeps everything; `selective` recomputes the attention core (score matrices,
softmax, attention dropout, the DSA indexer's score matrix), as in the paper; `full` keeps each
block's input only and rebuilds one block at a time in the backward (that block's working set is
a temporary). Flash attention keeps no score matrix, only a float32 log-sum-exp per head.
Bytes are those of bf16 activations (2 per value); masks 1 byte; fp32 statistics 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..spec.model import ModelSpec

ACT = 2     # bytes per activation value (bf16/fp16)
MASK = 1    # bytes per dropout-mask value
FP32 = 4


@dataclass(frozen=True)
class BlockActivations:
    """Bytes per token of one block, by kind; score terms are per token *and* per key (x s)."""

    block_level: float       # replicated over TP unless sequence parallel
    split: float             # sharded over TP
    split_per_key: float     # attention score matrices: bytes per token per key (x s), sharded over TP
    indexer_per_key: float   # DSA indexer score matrix: bytes per token per key (x s), replicated
    moe: float               # routed-expert tensors: token-sharded by SP (tokens are split), else replicated


def block_activations(m: ModelSpec, moe_layer: bool, *, flash: bool = True, dropout: bool = False,
                      fp8_linear_inputs: bool = False) -> BlockActivations:
    """What one block of `m` saves for its backward, per token (see the module docstring).

    fp8 training keeps the inputs of linear layers in fp8 (1 byte) for the weight-gradient GEMM,
    as DeepSeek-V3 and torchao's float8 linears do; everything else stays bf16.
    """
    h = m.d_model
    a = m.attention
    H = m.n_heads
    lin = 1 if fp8_linear_inputs else ACT
    mask = MASK * h if dropout else 0
    # two norm inputs + the two norm outputs that feed attention and FFN + residual dropout masks
    block_level = 2 * ACT * h + 2 * lin * h + 2 * mask
    if a.kind == "mla":
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        q_latent = (ACT + lin) * a.q_lora_rank                                # q_norm input and output
        kv_latent = ACT * (a.kv_lora_rank + a.qk_rope_head_dim) + lin * a.kv_lora_rank
        block_level += q_latent + kv_latent
        split = ACT * H * (2 * qk + a.v_head_dim) + lin * H * a.v_head_dim    # q, k, v; attention output
    else:
        dh, kv = m.dim_per_head, m.kv_heads
        split = ACT * (H * dh + 2 * kv * dh) + lin * H * dh
    split_per_key = 0.0
    if flash:
        split += FP32 * H                                                   # log-sum-exp per head
    else:
        split_per_key = ACT * H + (MASK * H + ACT * H if dropout else 0)    # softmax (+ dropout mask, output)
    indexer_per_key = 0.0
    if a.sparse:
        # q, k, head weights, and the chosen top-k key positions (int32); the fp32 score matrix
        # over all keys is kept for the indexer's loss unless the attention core is recomputed
        block_level += ACT * (a.index_n_heads * a.index_head_dim + a.index_head_dim + a.index_n_heads)
        block_level += FP32 * a.index_topk
        indexer_per_key = FP32

    def ffn(hidden: int) -> float:  # gated: w1 and w3 outputs + w2 input; plain: activation input + w2 input
        return ((2 * ACT) if m.gated else ACT) * hidden + lin * hidden

    moe = 0.0
    if moe_layer:
        e = m.moe
        # router scores (fp32); per routed copy: its input, its FFN, its output (kept to weight the combine)
        moe = FP32 * e.n_experts + e.top_k * (lin * h + ffn(e.expert_hidden) + ACT * h)
        if e.shared_hidden:
            split += ffn(e.shared_hidden)
    else:
        split += ffn(m.ffn_hidden)
    return BlockActivations(block_level, split, split_per_key, indexer_per_key, moe)


def block_bytes(act: BlockActivations, *, b: int, s: int, tp: int, sp: bool, recompute: str,
                h: int) -> tuple[float, float]:
    """(saved, working) bytes of one block for a micro-batch of b x s tokens on one TP rank.

    `saved` stays until the block's backward; `working` is what the backward of this block
    needs at once beyond `saved` (nonzero under full recompute: the rebuilt block).
    """
    tokens = b * s
    shard = tp if sp else 1
    full = (act.block_level / shard + act.split / tp + act.moe / shard
            + s * (act.split_per_key / tp + act.indexer_per_key / shard)) * tokens
    if recompute == "none":
        return full, 0.0
    if recompute == "selective":
        core = s * (act.split_per_key / tp + act.indexer_per_key / shard) * tokens
        return full - core, core
    return ACT * h * tokens / shard, full   # full: the block input only; rebuild one block at a time
