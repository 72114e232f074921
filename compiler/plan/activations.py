"""Activation memory of one Transformer block, after Korthikanti et al. (2022), with real shapes.

"Reducing Activation Recomputation in Large Transformer Models" counts, per block and micro-batch
of b sequences of s tokens, 34·s·b·h + 5·a·s²·b bytes for a GPT block (fp16, dropout, 4h GeLU FFN,
no flash attention). We count the same tensors for the actual block (GQA / MLA / DSA indexer,
gated FFNs, MoE top-k routed copies) and sort them into three kinds:

- *block-level* tensors (norm inputs, residual dropout masks): replicated over the TP group
  unless sequence parallelism shards them;
- *whole* tensors, kept in full on every TP rank: the norm outputs the projections read (under
  sequence parallelism they are all-gathered first and the projections keep the gathered copy,
  where Megatron keeps the shard and gathers again in the backward), MLA's low-rank latents (its
  down-projections are replicated), and the MoE's (the runtime replicates it over TP and runs it
  on the whole sequence);
- *split* tensors (q/k/v, attention output, dense FFN hidden states, score matrices): sharded by TP.

These are the tensors llmc's runtime keeps (tests/test_plan_activations.py measures them):
its RMSNorm keeps its input and 1/rms, a gated FFN its gate and up outputs, flash attention no
score matrix, only a float32 log-sum-exp per head. Bytes per value follow `train.precision`
(`value_bytes`): bf16 (and fp8's bf16 compute) 2, fp32 4; under fp16 the residual stream, and so
each norm's input, stays fp32. fp8 keeps the inputs of the blocks' linear layers in 1 byte (one
copy per input, runtime/float8.py); where something else also keeps such an input, it keeps it
in bf16 beside: flash attention its output (the output projection's input), the MoE router and
the DSA indexer, which stay bf16, the tensors they read. Masks: 1 byte.

Recompute, as the runtime checkpoints blocks (runtime/train/loop.py): `none` keeps everything;
`full` keeps each block's input only and rebuilds one block at a time in the backward (that
block's working set is a temporary); `selective` does so for every other block, the even block
ids (`recomputed`), which halves the activations for half a forward more. (Korthikanti's
selective recompute of the attention core alone would keep almost as much as `none` under flash
attention, which keeps no score matrix.)
`selective` and `full` also chunk the loss (`loss_chunk_tokens`, runtime/model/loss.py): the head
and its cross entropy run a chunk of tokens at a time, in the forward for the loss and again in
the backward for its gradient, so the fp32 log-probabilities over the vocabulary are not kept and
one chunk's logits exist at a time, for one more forward of the head. Under TP each rank does so
over its columns of the vocabulary (runtime/model/loss.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..spec.model import ModelSpec

ACT = 2     # bytes per activation value (bf16/fp16)
MASK = 1    # bytes per dropout-mask value
FP32 = 4
INT64 = 8


def value_bytes(precision: str) -> tuple[int, int]:
    """(bytes per activation, bytes per value of the residual stream) under `precision`."""
    return {"fp32": (FP32, FP32), "fp16": (ACT, FP32)}.get(precision, (ACT, ACT))


LOSS_CHUNK_BYTES = 2 ** 30  # fp32 logits of one chunk of the loss, at most (at least one token a chunk)


def loss_chunk_tokens(recompute: str, vocab_size: int) -> int:
    """Tokens per chunk of the loss under `recompute` (0: the logits are made whole): at most
    LOSS_CHUNK_BYTES of fp32 logits over the vocabulary (a TP rank's columns: fewer)."""
    return 0 if recompute == "none" else max(1, LOSS_CHUNK_BYTES // (FP32 * vocab_size))


def recomputed(recompute: str, block_id: int) -> bool:
    """Whether block `block_id` (MTP block k is n_layers + k) is checkpointed under `recompute`."""
    return recompute == "full" or (recompute == "selective" and block_id % 2 == 0)


@dataclass(frozen=True)
class BlockActivations:
    """Bytes per token of one block, by kind; score terms are per token *and* per key (x s)."""

    block_level: float       # replicated over TP unless sequence parallel
    whole: float             # in full on every TP rank, with or without sequence parallelism
    split: float             # sharded over TP
    split_per_key: float     # attention score matrices: bytes per token per key (x s), sharded over TP
    indexer_per_key: float   # DSA indexer score matrix: bytes per token per key (x s), replicated


def block_activations(m: ModelSpec, moe_layer: bool, *, flash: bool = True, dropout: bool = False,
                      precision: str = "bf16") -> BlockActivations:
    """What one block of `m` saves for its backward, per token (see the module docstring).

    fp8 training keeps the inputs of linear layers in fp8 (1 byte) for the weight-gradient GEMM,
    as DeepSeek-V3 does; everything else stays bf16.
    """
    h = m.d_model
    a = m.attention
    H = m.n_heads
    act, stream = value_bytes(precision)
    lin = 1 if precision == "fp8" else act
    # under fp8 some tensors are kept twice: an fp8 copy beside a bf16 tensor kept anyway, or a bf16
    # copy beside the fp8 one (in the other precisions both are the one tensor)
    fp8_copy, bf16_copy = (lin, act) if lin != act else (0, 0)
    mask = MASK * h if dropout else 0
    block_level = 2 * stream * h + 2 * mask  # two norm inputs (the residual stream), residual dropout masks
    # the two norm outputs that feed attention and FFN; the MoE router reads its norm's in bf16
    whole = lin * h + ((act + (fp8_copy if m.moe.shared_hidden else 0)) if moe_layer else lin) * h
    attention_out = act + fp8_copy if flash else lin    # flash attention keeps its output for its backward
    if a.kind == "mla":
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        q_latent = (act + lin) * a.q_lora_rank                                # q_norm input and output
        kv_latent = act * (a.kv_lora_rank + a.qk_rope_head_dim) + lin * a.kv_lora_rank
        whole += q_latent + kv_latent
        split = act * H * (2 * qk + a.v_head_dim) + attention_out * H * a.v_head_dim  # q, k, v; output
    else:
        dh, kv = m.dim_per_head, m.kv_heads
        split = act * (H * dh + 2 * kv * dh) + attention_out * H * dh
        if m.qk_norm:  # each head's query and key norm keeps its input and 1/rms (Qwen3)
            split += (act * dh + FP32) * (H + kv)
    split_per_key = 0.0
    if flash:
        split += FP32 * H                                                   # log-sum-exp per head
    else:
        split_per_key = act * H + (MASK * H + act * H if dropout else 0)    # softmax (+ dropout mask, output)
    indexer_per_key = 0.0
    if a.sparse:
        # the indexer's q, k (and its LayerNorm's input, mean and 1/std) and head weights; it stays
        # bf16, so under fp8 it keeps the block's input and q latent in bf16 too. Per key: the
        # chosen keys as the attention's additive mask, and the gradient of the indexer's loss over
        # its fp32 scores (runtime/model/indexer.py)
        whole += act * (a.index_n_heads * a.index_head_dim + 2 * a.index_head_dim + a.index_n_heads) + 2 * FP32
        whole += bf16_copy * (h + a.q_lora_rank)
        indexer_per_key = act + FP32

    def ffn(hidden: int, lin: float = lin) -> float:  # gated: w1, w3 outputs + w2 input; plain: act input + w2 input
        return ((2 * act) if m.gated else act) * hidden + lin * hidden

    if moe_layer:
        e = m.moe
        # router scores (fp32); per routed copy: its input, its FFN, its output (kept to weight the
        # combine), and its routing: expert id, sort position and its inverse (int64), weight (fp32);
        # the shared experts
        x = act if m.mlp_bias else lin  # experts with biases stay bf16 under fp8 (runtime/float8.py)
        whole += FP32 * e.n_experts + e.top_k * (x * h + ffn(e.expert_hidden, x) + act * h + 3 * INT64 + FP32)
        if e.shared_hidden:
            whole += ffn(e.shared_hidden)
            if e.shared_expert_gate:  # sigmoid(gate) * shared: both factors kept (Qwen2-MoE)
                whole += act * (h + 1)
    else:
        split += ffn(m.ffn_hidden)
    return BlockActivations(block_level, whole, split, split_per_key, indexer_per_key)


def block_bytes(act: BlockActivations, *, b: int, s: int, tp: int, sp: bool, checkpointed: bool,
                h: int, stream: int = ACT) -> tuple[float, float]:
    """(saved, working) bytes of one block for a micro-batch of b x s tokens on one TP rank.

    `saved` stays until the block's backward; `working` is what the backward of this block
    needs at once beyond `saved` (nonzero when checkpointed: the rebuilt block). A checkpointed
    block keeps its input only, `stream` bytes a value.
    """
    tokens = b * s
    shard = tp if sp else 1
    full = (act.block_level / shard + act.whole + act.split / tp
            + s * (act.split_per_key / tp + act.indexer_per_key)) * tokens
    if not checkpointed:
        return full, 0.0
    return stream * h * tokens / shard, full   # rebuilt one block at a time in the backward
