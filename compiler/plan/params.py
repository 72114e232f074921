"""Exact parameter counts of a ModelSpec, per component and per layer kind.

Every formula is written once, over a namespace of shapes `d` whose fields are ints (to count)
or sympy symbols (for `llmc plan --formula`). Structure that is a yes/no in the spec (biases,
gating, attention kind, tying) is decided from the ModelSpec `m` itself.

Conventions (the runtime model builds exactly these tensors; `component_of` maps them):
- Linear layers have a bias only where the spec asks (`qkv_bias`, `out_bias`, `mlp_bias`,
  `router_bias`); `mlp_bias` applies to every FFN: dense, routed experts and shared experts.
- A norm is `d` weights (RMSNorm) or `2d` (LayerNorm, weight + bias); MLA's q/kv latent norms
  and MTP's norms follow `model.norm`. The DSA indexer's key norm is a LayerNorm with bias,
  as in DeepSeek-V3.2's reference model.
- The aux-loss-free routing bias (`moe.balance = "aux_free"`) is a buffer updated by a rule,
  not a gradient-trained parameter: it is not counted (DeepSeek-V3's published 671,026,404,352
  excludes it; Hugging Face registers it as a buffer). It is reported in `buffers`.
- An MTP module is: enorm + hnorm (norms on the hidden state and on the next token's
  embedding), eh_proj (2d -> d, no bias), one Transformer block (MoE if block index
  n_layers + k would be), and its own final norm; embedding and head are shared with the model.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from ..spec.model import ModelSpec

COMPONENTS = ("embedding", "positions", "attention", "indexer", "mlp", "experts", "shared_experts",
              "router", "norms", "mtp", "head")

# Symbol names of --formula, and the ModelSpec value each stands for.
SYMBOLS = {
    "V": "vocab_size", "D": "d_model", "H": "n_heads", "H_kv": "kv_heads", "d_h": "head_dim",
    "F": "ffn_hidden", "T_max": "max_seq_len", "r_q": "q_lora_rank", "r_kv": "kv_lora_rank",
    "d_nope": "qk_nope_head_dim", "d_rope": "qk_rope_head_dim", "d_v": "v_head_dim",
    "H_idx": "index_n_heads", "d_idx": "index_head_dim", "E": "n_experts", "k": "top_k",
    "F_e": "expert_hidden", "F_s": "shared_hidden", "L_dense": "n_dense_layers",
    "L_moe": "n_moe_layers", "L": "n_layers",
}


def shapes(m: ModelSpec) -> SimpleNamespace:
    """The numeric shapes of `m` as plain ints, under the symbol names of SYMBOLS."""
    a, moe = m.attention, m.moe
    n_moe = m.n_moe_layers
    values = {
        "V": m.vocab_size, "D": m.d_model, "H": m.n_heads, "H_kv": m.kv_heads, "d_h": m.dim_per_head,
        "F": m.ffn_hidden, "T_max": m.max_seq_len, "r_q": a.q_lora_rank, "r_kv": a.kv_lora_rank,
        "d_nope": a.qk_nope_head_dim, "d_rope": a.qk_rope_head_dim, "d_v": a.v_head_dim,
        "H_idx": a.index_n_heads, "d_idx": a.index_head_dim,
        "E": moe.n_experts if moe else 0, "k": moe.top_k if moe else 0,
        "F_e": moe.expert_hidden if moe else 0, "F_s": moe.shared_hidden if moe else 0,
        "L_dense": m.n_layers - n_moe, "L_moe": n_moe,
    }
    return SimpleNamespace(**values)


def symbols(m: ModelSpec) -> SimpleNamespace:
    """The same namespace with sympy symbols (imported here only: --formula is the one user)."""
    import sympy

    return SimpleNamespace(**{k: sympy.Symbol(k, positive=True, integer=True) for k in shapes(m).__dict__})


# --------------------------------------------------------------------------- building blocks

def norm(m: ModelSpec, width):
    """One normalisation layer over `width` features."""
    return 2 * width if m.norm == "layernorm" else width


def ffn_matrices(m: ModelSpec, d, hidden):
    """The weight matrices of one FFN d_model -> hidden -> d_model: gated (three) or plain (two)."""
    return (3 if m.gated else 2) * d.D * hidden


def ffn_column_biases(m: ModelSpec, d, hidden):
    """With `mlp_bias`, the biases of an FFN's layers into its hidden width (w1, and w3 when gated)."""
    return (2 if m.gated else 1) * hidden if m.mlp_bias else 0


def ffn(m: ModelSpec, d, hidden):
    """One FFN: its matrices and, with `mlp_bias`, a bias on each (w2's of d_model)."""
    return ffn_matrices(m, d, hidden) + ffn_column_biases(m, d, hidden) + (d.D if m.mlp_bias else 0)


def qkv_biases(m: ModelSpec, d):
    """With `qkv_bias`, the biases of MHA/GQA's q, k and v projections (MLA has none)."""
    return (d.H + 2 * d.H_kv) * d.d_h if m.qkv_bias and m.attention.kind != "mla" else 0


def mla_down_projections(m: ModelSpec, d):
    """MLA's down-projections to its q latent (with q_lora_rank) and to its kv latent + rope key."""
    return (d.D * d.r_q if m.attention.q_lora_rank else 0) + d.D * (d.r_kv + d.d_rope)


def attention_matrices(m: ModelSpec, d):
    """The projection matrices of one block's attention (MHA/GQA: q, k, v, o; MLA: its low-rank pairs)."""
    if m.attention.kind == "mla":
        q_in = d.r_q if m.attention.q_lora_rank else d.D
        up = q_in * d.H * (d.d_nope + d.d_rope) + d.r_kv * d.H * (d.d_nope + d.d_v)
        return mla_down_projections(m, d) + up + d.H * d.d_v * d.D
    return 2 * d.D * d.H * d.d_h + 2 * d.D * d.H_kv * d.d_h


def attention(m: ModelSpec, d):
    """All attention projections of one block, their biases, MLA latent norms, qk-norm weights."""
    out_bias = d.D if m.out_bias else 0
    if m.attention.kind == "mla":
        latent_norms = (norm(m, d.r_q) if m.attention.q_lora_rank else 0) + norm(m, d.r_kv)
        return attention_matrices(m, d) + latent_norms + out_bias
    qk_norm = 2 * d.d_h if m.qk_norm else 0  # one RMSNorm weight each for q and k, shared by heads
    return attention_matrices(m, d) + qkv_biases(m, d) + out_bias + qk_norm


def indexer(m: ModelSpec, d):
    """DSA lightning indexer of one block: wq_b (from the q latent), wk, k_norm (LayerNorm), weights_proj."""
    if not m.attention.sparse:
        return 0
    q_in = d.r_q if m.attention.q_lora_rank else d.D
    return q_in * d.H_idx * d.d_idx + d.D * d.d_idx + 2 * d.d_idx + d.D * d.H_idx


def block(m: ModelSpec, d, moe_layer: bool) -> dict:
    """Parameters of one Transformer block by component."""
    counts = {"attention": attention(m, d), "indexer": indexer(m, d), "norms": 2 * norm(m, d.D),
              "mlp": 0, "experts": 0, "shared_experts": 0, "router": 0}
    if moe_layer:
        counts["experts"] = d.E * ffn(m, d, d.F_e)
        shared = ffn(m, d, d.F_s) if m.moe.shared_hidden else 0
        counts["shared_experts"] = shared + (d.D if m.moe.shared_expert_gate else 0)
        counts["router"] = d.E * d.D + (d.E if m.moe.router_bias else 0)
    else:
        counts["mlp"] = ffn(m, d, d.F)
    return counts


def mtp_module(m: ModelSpec, d, k: int):
    """One MTP module (k = 0, 1, ...), without the shared embedding and head."""
    return sum(block(m, d, m.is_moe_layer(m.n_layers + k)).values()) + 2 * d.D * d.D + 3 * norm(m, d.D)


def components(m: ModelSpec, d) -> dict:
    """Parameters by component (COMPONENTS), for ints or symbols in `d`."""
    dense, moe = block(m, d, False), block(m, d, True) if m.moe else None
    out = {c: 0 for c in COMPONENTS}
    out["embedding"] = d.V * d.D
    out["positions"] = d.T_max * d.D if m.positions == "learned" else 0
    for name in dense:
        out[name] = d.L_dense * dense[name] + (d.L_moe * moe[name] if moe else 0)
    out["norms"] += norm(m, d.D)  # the final norm
    out["mtp"] = sum(mtp_module(m, d, k) for k in range(m.mtp.depth))
    out["head"] = 0 if m.tie_embeddings else d.V * d.D
    return out


# --------------------------------------------------------------------------- the counted result

class LayerKind(BaseModel):
    """Parameters of one block of a kind (dense, moe), and how many blocks there are."""

    layers: int = Field(description="Blocks of this kind (count).")
    per_layer: dict[str, int] = Field(description="Parameters of one block by component.")
    per_layer_total: int = Field(description="Parameters of one block.")
    active_per_layer: int = Field(description="Parameters one token uses in one block.")


class ParamCount(BaseModel):
    """Exact parameter counts of a model."""

    total: int = Field(description="Unique parameters, MTP included (count).")
    active: int = Field(description="Parameters one token uses in the main model: dense parts, top-k routed "
                                    "and shared experts, embedding and head (count; MTP excluded).")
    embedding: int = Field(description="Token embedding (count).")
    mtp: int = Field(description="MTP modules without the shared embedding and head (count).")
    mtp_active: int = Field(description="Parameters one token uses in the MTP modules (count).")
    main: int = Field(description="total - mtp: the model that serves tokens (count).")
    components: dict[str, int] = Field(description="Parameters by component (count).")
    layer_kinds: dict[str, LayerKind] = Field(description="Per block kind: dense, moe.")
    buffers: dict[str, int] = Field(description="Non-trained state stored with the weights (count), "
                                                "e.g. aux-free routing biases.")
    stored_with_mtp_copies: int = Field(description="Tensors as DeepSeek stores them: each MTP module keeps "
                                                    "its own copy of the embedding and head (count).")


def _active_in_block(m: ModelSpec, counts: dict) -> int:
    routed = counts["experts"] * m.moe.top_k // m.moe.n_experts if counts["experts"] else 0
    return sum(v for k, v in counts.items() if k != "experts") + routed


def count_params(m: ModelSpec) -> ParamCount:
    """Count the parameters of `m` exactly (the same numbers the runtime model has)."""
    d = shapes(m)
    comps = components(m, d)
    kinds = {"dense": (d.L_dense, block(m, d, False))}
    if m.moe:
        kinds["moe"] = (d.L_moe, block(m, d, True))
    layer_kinds = {name: LayerKind(layers=n, per_layer=c, per_layer_total=sum(c.values()),
                                   active_per_layer=_active_in_block(m, c))
                   for name, (n, c) in kinds.items() if n}
    total = sum(comps.values())
    inactive = 0
    if m.moe:
        inactive = comps["experts"] - comps["experts"] * m.moe.top_k // m.moe.n_experts
    mtp_inactive = 0
    for k in range(m.mtp.depth):
        if m.is_moe_layer(m.n_layers + k):
            e = block(m, d, True)["experts"]
            mtp_inactive += e - e * m.moe.top_k // m.moe.n_experts
    buffers = {}
    if m.moe and m.moe.balance == "aux_free":
        n_router_layers = d.L_moe + sum(m.is_moe_layer(m.n_layers + k) for k in range(m.mtp.depth))
        buffers["router_correction_bias"] = n_router_layers * d.E
    return ParamCount(
        total=total, active=total - comps["mtp"] - inactive, embedding=comps["embedding"], mtp=comps["mtp"],
        mtp_active=comps["mtp"] - mtp_inactive, main=total - comps["mtp"], components=comps,
        layer_kinds=layer_kinds, buffers=buffers,
        stored_with_mtp_copies=total + m.mtp.depth * (d.V * d.D * (1 if m.tie_embeddings else 2)))


def formulas(m: ModelSpec) -> dict:
    """Closed forms (sympy expressions) of each component and of the totals, in the SYMBOLS of `m`,
    and `values`: each symbol's value in `m`. A dense model's block count is written L."""
    import sympy

    s = symbols(m)
    values = dict(shapes(m).__dict__)
    comps = {k: sympy.expand(v) for k, v in components(m, s).items()}
    total = sympy.expand(sum(comps.values()))
    active = total - comps["mtp"]
    if m.moe:
        active = sympy.expand(active - comps["experts"] + comps["experts"] * s.k / s.E)
    else:
        layers = sympy.Symbol("L", positive=True, integer=True)
        rename = {s.L_dense: layers}
        comps = {k: v.subs(rename) for k, v in comps.items()}
        total, active = total.subs(rename), active.subs(rename)
        values["L"] = m.n_layers
    return {"components": comps, "total": total, "active": active,
            "values": {sympy.Symbol(k, positive=True, integer=True): v for k, v in values.items()}}
