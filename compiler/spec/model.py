"""`[model]`: the architecture. Every count the planner states is a function of these fields."""

from typing import Literal

from pydantic import Field

from .base import Table


# Each check's parameters name the fields it reads (see base.py); it yields (key, message) pairs.

def _scaling_needs_original_length(scaling, original_max_seq_len):
    if scaling != "none" and original_max_seq_len is None:
        yield "original_max_seq_len", (f"rope.scaling = {scaling!r} needs rope.original_max_seq_len "
                                       "(expected the pre-training context length, found nothing)")


class RopeSpec(Table):
    """`[model.rope]`: rotary position embedding and its context-extension scaling."""

    theta: float = Field(10000.0, gt=0, description="RoPE base frequency theta (unitless).")
    scaling: Literal["none", "linear", "yarn", "llama3"] = Field(
        "none", description="Context-extension scaling of the rotary frequencies.")
    factor: float = Field(1.0, ge=1.0, description="Scaling factor: extended context / original context.")
    original_max_seq_len: int | None = Field(
        None, gt=0, description="Context length (tokens) the model was pre-trained with before scaling.")
    beta_fast: float = Field(32.0, gt=0, description="YaRN: rotations above which frequencies are kept (count).")
    beta_slow: float = Field(1.0, gt=0, description="YaRN: rotations below which frequencies are interpolated (count).")
    mscale: float = Field(1.0, ge=0, description="YaRN: attention-temperature coefficient (unitless).")
    mscale_all_dim: float = Field(0.0, ge=0, description="YaRN (DeepSeek): mscale applied to all dims (unitless).")
    low_freq_factor: float = Field(1.0, gt=0, description="llama3 scaling: low-frequency factor (unitless).")
    high_freq_factor: float = Field(4.0, gt=0, description="llama3 scaling: high-frequency factor (unitless).")

    _checks = (_scaling_needs_original_length,)


def _mla_shapes(kind, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim):
    dims = {"kv_lora_rank": kv_lora_rank, "qk_nope_head_dim": qk_nope_head_dim,
            "qk_rope_head_dim": qk_rope_head_dim, "v_head_dim": v_head_dim}
    missing = [k for k, v in dims.items() if v == 0]
    if kind == "mla" and missing:
        yield missing[0], f"attention.kind = 'mla' needs {', '.join(missing)} (expected positive integers, found 0)"


def _indexer_shapes(index_n_heads, index_head_dim, index_topk):
    if index_n_heads > 0 and (index_head_dim == 0 or index_topk == 0):
        yield "index_topk", ("the sparse indexer needs index_n_heads, index_head_dim and index_topk all positive "
                             f"(found index_head_dim = {index_head_dim}, index_topk = {index_topk})")


class AttentionSpec(Table):
    """`[model.attention]`: which attention, and MLA / sparse-indexer shapes where used."""

    kind: Literal["mha", "gqa", "mqa", "mla"] = Field(
        "gqa", description="mha: n_kv_heads = n_heads; gqa: fewer kv heads; mqa: one kv head; "
                           "mla: DeepSeek's multi-head latent attention.")
    q_lora_rank: int = Field(0, ge=0, description="MLA: rank of the low-rank query projection (0 = full-rank query).")
    kv_lora_rank: int = Field(0, ge=0, description="MLA: rank of the compressed key/value latent (dims).")
    qk_nope_head_dim: int = Field(0, ge=0, description="MLA: per-head query/key dims without RoPE.")
    qk_rope_head_dim: int = Field(0, ge=0, description="MLA: per-head query/key dims carrying RoPE (key shared by heads).")
    v_head_dim: int = Field(0, ge=0, description="MLA: per-head value dims.")
    index_n_heads: int = Field(0, ge=0, description="DSA sparse-attention indexer heads (0 = dense attention).")
    index_head_dim: int = Field(0, ge=0, description="DSA indexer head dims.")
    index_topk: int = Field(0, ge=0, description="DSA: keys each query attends to (tokens).")

    @property
    def sparse(self) -> bool:
        return self.index_n_heads > 0

    _checks = (_mla_shapes, _indexer_shapes)


def _top_k_fits(n_experts, top_k):
    if top_k > n_experts:
        yield "top_k", f"moe.top_k must not exceed moe.n_experts (expected <= {n_experts}, found {top_k})"


def _groups_fit(n_experts, n_groups, topk_groups):
    if n_experts % n_groups:
        yield "n_groups", f"moe.n_groups must divide moe.n_experts (expected a divisor of {n_experts}, found {n_groups})"
    if topk_groups > n_groups:
        yield "topk_groups", f"moe.topk_groups must not exceed moe.n_groups (expected <= {n_groups}, found {topk_groups})"


class MoESpec(Table):
    """`[model.moe]`: mixture of experts replacing the dense FFN in some layers."""

    n_experts: int = Field(..., ge=1, description="Routed experts per MoE layer (count).")
    top_k: int = Field(..., ge=1, description="Routed experts activated per token (count).")
    expert_hidden: int = Field(..., ge=1, description="Hidden width of one routed expert's FFN (dims).")
    n_shared_experts: int = Field(0, ge=0, description="Always-active shared experts (count).")
    shared_expert_hidden: int | None = Field(
        None, ge=1, description="Hidden width of the shared-expert FFN (dims); "
                                "default n_shared_experts x expert_hidden, fused into one FFN.")
    shared_expert_gate: bool = Field(False, description="A sigmoid gate on the shared expert output (Qwen2-MoE).")
    first_dense_layers: int = Field(0, ge=0, description="Leading layers that keep the dense FFN (count).")
    layer_freq: int = Field(1, ge=1, description="Every layer_freq-th layer after the dense ones is MoE (count).")
    score: Literal["softmax", "sigmoid"] = Field("softmax", description="Router scoring function.")
    norm_topk: bool = Field(True, description="Renormalise the top-k routing weights to sum to one.")
    n_groups: int = Field(1, ge=1, description="Grouped routing: expert groups (count; 1 = no grouping).")
    topk_groups: int = Field(1, ge=1, description="Grouped routing: groups a token may route into (count).")
    routed_scaling: float = Field(1.0, gt=0, description="Multiplier on the routed experts' output (unitless).")
    router_bias: bool = Field(False, description="A learned bias on the router logits (counts as a parameter).")
    balance: Literal["aux_loss", "aux_free", "none"] = Field(
        "aux_loss", description="Load balancing: Switch-style auxiliary loss, or DeepSeek's bias-based "
                                "aux-loss-free balancing.")
    aux_loss_coef: float = Field(0.01, ge=0, description="Weight of the auxiliary balance loss (unitless).")
    bias_update_speed: float = Field(0.001, ge=0, description="aux_free: step of the routing-bias update per step.")

    _checks = (_top_k_fits, _groups_fit)

    @property
    def shared_hidden(self) -> int:
        if self.shared_expert_hidden is not None:
            return self.shared_expert_hidden if self.n_shared_experts else 0
        return self.n_shared_experts * self.expert_hidden


class MTPSpec(Table):
    """`[model.mtp]`: DeepSeek-V3 multi-token prediction modules (embedding and head shared)."""

    depth: int = Field(0, ge=0, description="Extra future tokens predicted, one module each (count).")
    loss_weight: float = Field(0.3, ge=0, description="Weight of the mean MTP loss added to the main loss.")


def _heads_split(d_model, n_heads, head_dim, attention):
    if head_dim is None and attention.kind != "mla" and d_model % n_heads:
        yield "n_heads", (f"n_heads must divide d_model when head_dim is not given "
                          f"(expected a divisor of {d_model}, found {n_heads})")


def _kv_heads_fit(n_heads, n_kv_heads, attention):
    kind = attention.kind
    if kind == "gqa" and n_kv_heads is not None and n_heads % n_kv_heads:
        yield "n_kv_heads", f"n_kv_heads must divide n_heads (expected a divisor of {n_heads}, found {n_kv_heads})"
    if kind == "mha" and n_kv_heads not in (None, n_heads):
        yield "n_kv_heads", (f"attention.kind = 'mha' needs n_kv_heads = n_heads "
                             f"(expected {n_heads}, found {n_kv_heads}); use kind = 'gqa'")
    if kind == "mqa" and n_kv_heads not in (None, 1):
        yield "n_kv_heads", f"attention.kind = 'mqa' needs n_kv_heads = 1 (found {n_kv_heads})"


def _rope_in_keys(positions, attention):
    if positions == "learned" and attention.kind == "mla":
        yield "positions", "attention.kind = 'mla' carries RoPE in its keys: positions must be 'rope'"


def _indexer_on_mla(attention):
    if attention.sparse and attention.kind != "mla":
        yield "attention.index_n_heads", "the DSA sparse indexer is defined on MLA attention (attention.kind = 'mla')"


def _dense_layers_fit(n_layers, moe):
    if moe is not None and moe.first_dense_layers > n_layers:
        yield "moe.first_dense_layers", (f"moe.first_dense_layers exceeds n_layers "
                                         f"(expected <= {n_layers}, found {moe.first_dense_layers})")


def _rope_length_fits(max_seq_len, rope):
    if rope.original_max_seq_len and rope.original_max_seq_len > max_seq_len:
        yield "rope.original_max_seq_len", (f"rope.original_max_seq_len exceeds max_seq_len "
                                            f"(expected <= {max_seq_len}, found {rope.original_max_seq_len})")


class ModelSpec(Table):
    """`[model]`: a decoder-only Transformer."""

    vocab_size: int = Field(..., ge=2, description="Vocabulary size (tokens).")
    d_model: int = Field(..., ge=1, description="Hidden size of the residual stream (dims).")
    n_layers: int = Field(..., ge=1, description="Transformer blocks (count).")
    n_heads: int = Field(..., ge=1, description="Attention query heads (count).")
    n_kv_heads: int | None = Field(None, ge=1, description="Key/value heads (count); default n_heads "
                                                         "(mha), 1 for mqa.")
    head_dim: int | None = Field(None, ge=1, description="Dims per attention head; default d_model / n_heads.")
    ffn_hidden: int = Field(..., ge=1, description="Hidden width of the dense FFN (dims).")
    max_seq_len: int = Field(..., ge=1, description="Longest context the model supports (tokens).")
    tie_embeddings: bool = Field(False, description="Share the input embedding with the output head.")
    norm: Literal["rmsnorm", "layernorm"] = Field("rmsnorm", description="Normalisation layer kind.")
    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of every norm (unitless).")
    positions: Literal["rope", "learned"] = Field("rope", description="Rotary or learned absolute positions.")
    activation: Literal["swiglu", "geglu", "gelu", "gelu_tanh", "relu", "silu"] = Field(
        "swiglu", description="FFN activation; swiglu/geglu are gated (three matrices), the rest plain (two); "
                              "gelu is exact (erf), gelu_tanh the tanh approximation (GPT-2).")
    qkv_bias: bool = Field(False, description="Bias on the q/k/v projections.")
    out_bias: bool = Field(False, description="Bias on the attention output projection.")
    mlp_bias: bool = Field(False, description="Biases in the FFN.")
    qk_norm: bool = Field(False, description="RMSNorm over each head's queries and keys (Qwen3).")
    init_std: float = Field(0.02, gt=0, description="Std of the normal initialisation (unitless).")
    rope: RopeSpec = Field(default_factory=RopeSpec, description="Rotary embedding settings.")
    attention: AttentionSpec = Field(default_factory=AttentionSpec, description="Attention kind and shapes.")
    moe: MoESpec | None = Field(None, description="Mixture of experts; absent = every layer dense.")
    mtp: MTPSpec = Field(default_factory=MTPSpec, description="Multi-token prediction.")

    @property
    def kv_heads(self) -> int:
        if self.attention.kind == "mqa":
            return 1
        if self.attention.kind in ("mha", "mla"):
            return self.n_heads
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        """Dims per head that carry RoPE: all of them, or MLA's decoupled qk_rope_head_dim."""
        return self.attention.qk_rope_head_dim if self.attention.kind == "mla" else self.dim_per_head

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` (0-based) has an MoE FFN instead of the dense one."""
        m = self.moe
        return m is not None and layer >= m.first_dense_layers and (layer - m.first_dense_layers) % m.layer_freq == 0

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    _checks = (_heads_split, _kv_heads_fit, _rope_in_keys, _indexer_on_mla, _dense_layers_fit, _rope_length_fits)
