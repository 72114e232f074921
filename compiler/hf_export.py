"""llmc `[model]` -> a Hugging Face config.json: pick the transformers family that has the
architecture, and write its fields (RoPE in both the classic and the transformers 5 layout)."""

from __future__ import annotations

from .errors import UserError
from .spec import ModelSpec

ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM", "gpt2": "GPT2LMHeadModel",
}
_GATED_ACT = {"swiglu": "silu", "geglu": "gelu"}
_PLAIN_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}


def choose_family(m: ModelSpec) -> str:
    """The transformers family whose architecture is `m`'s (UserError naming the obstacles if none)."""
    if m.positions == "learned":
        family = "gpt2"
    elif m.attention.kind == "mla":
        family = "deepseek_v32" if m.attention.sparse else "deepseek_v3"
    elif m.moe is not None:
        family = "qwen2_moe" if m.moe.shared_expert_gate else "qwen3_moe" if m.qk_norm else "mixtral"
        if family == "mixtral" and m.moe.n_shared_experts:
            family = "qwen2_moe"  # only Qwen2-MoE has a shared expert outside DeepSeek; it also gates it
    else:
        family = "qwen3" if m.qk_norm else "qwen2" if m.qkv_bias and not m.out_bias else "llama"
    obstacles = _obstacles(m, family)
    if obstacles:
        raise UserError(f"no Hugging Face family has this model's architecture (closest: {family}): "
                        + "; ".join(obstacles))
    return family


def _obstacles(m: ModelSpec, family: str) -> list[str]:
    """What in `m` the family cannot express."""
    out = []
    moe = m.moe
    if family == "gpt2":
        if m.norm != "layernorm":
            out.append("gpt2 uses layernorm (found norm = %r)" % m.norm)
        if not (m.qkv_bias and m.out_bias and m.mlp_bias):
            out.append("gpt2 has biases everywhere (qkv_bias, out_bias, mlp_bias must be true)")
        if m.activation not in _PLAIN_ACT:
            out.append(f"gpt2 has a plain FFN (found activation = {m.activation!r})")
        if m.kv_heads != m.n_heads or m.dim_per_head * m.n_heads != m.d_model:
            out.append("gpt2 has multi-head attention with head_dim = d_model / n_heads")
        if moe is not None or m.qk_norm:
            out.append("gpt2 has no MoE and no qk_norm")
        return out
    if m.norm != "rmsnorm":
        out.append(f"{family} uses rmsnorm (found norm = {m.norm!r})")
    if m.activation not in _GATED_ACT:
        out.append(f"{family} has a gated FFN (found activation = {m.activation!r})")
    if m.mlp_bias and family != "llama":
        out.append(f"{family} has no FFN biases (found mlp_bias = true)")
    if family.startswith("deepseek"):
        if m.qkv_bias or m.out_bias or m.qk_norm:
            out.append("DeepSeek's MLA has no projection biases and no qk_norm")
        if m.attention.sparse and not m.attention.q_lora_rank:
            out.append("the DSA indexer reads the query latent: q_lora_rank must be positive")
        if m.activation != "swiglu":
            out.append("DeepSeek uses swiglu")
    elif family in ("llama", "qwen3", "qwen3_moe", "mixtral") and m.qkv_bias != m.out_bias:
        out.append(f"{family} has one attention_bias switch: qkv_bias and out_bias must agree")
    if family == "qwen2_moe" and m.out_bias:
        out.append("qwen2_moe has no bias on the attention output")
    if moe is not None:
        if moe.router_bias:
            out.append(f"{family} has no learned router bias")
        if family.startswith("deepseek"):
            if moe.score != "sigmoid":
                out.append("transformers' DeepSeek-V3 scores routers with sigmoid")
            if moe.layer_freq != 1:
                out.append("DeepSeek-V3 makes every layer after first_k_dense_replace MoE (layer_freq must be 1)")
            if moe.shared_expert_gate:
                out.append("DeepSeek has no shared-expert gate")
            if moe.n_groups > 1 and moe.balance != "aux_free":
                out.append("transformers' DeepSeek-V3 ranks expert groups by their best two experts; llmc "
                           "does so with moe.balance = 'aux_free' (and by the best one otherwise)")
            if moe.shared_expert_hidden not in (None, moe.n_shared_experts * moe.expert_hidden):
                out.append("DeepSeek's shared expert is n_shared_experts x expert_hidden wide")
        else:
            if moe.score != "softmax" or moe.n_groups != 1 or moe.routed_scaling != 1.0:
                out.append(f"{family} routes by softmax, without groups or routed_scaling")
            if family == "mixtral" and (not moe.norm_topk or moe.first_dense_layers or moe.layer_freq != 1):
                out.append("mixtral renormalises the top-k weights and makes every layer MoE")
            if family == "qwen2_moe" and not moe.shared_expert_gate:
                out.append("qwen2_moe gates its shared expert (shared_expert_gate must be true)")
    return out


def rope_fields(m: ModelSpec) -> dict:
    """RoPE in the classic layout (rope_theta, rope_scaling) and transformers 5's (rope_parameters)."""
    r = m.rope
    params: dict = {"rope_type": "default" if r.scaling == "none" else r.scaling, "rope_theta": r.theta}
    if r.scaling != "none":
        params["factor"] = r.factor
    if r.scaling in ("llama3", "yarn"):
        params["original_max_position_embeddings"] = r.original_max_seq_len
    if r.scaling == "llama3":
        params.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor)
    if r.scaling == "yarn":
        params.update(beta_fast=r.beta_fast, beta_slow=r.beta_slow, mscale=r.mscale, mscale_all_dim=r.mscale_all_dim)
    scaling = {k: v for k, v in params.items() if k != "rope_theta"} if r.scaling != "none" else None
    return {"rope_theta": r.theta, "rope_scaling": scaling, "rope_parameters": params}


def _llama_fields(m: ModelSpec) -> dict:
    return {
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.ffn_hidden,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.kv_heads,
        "head_dim": m.dim_per_head, "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
        "hidden_act": _GATED_ACT.get(m.activation, "silu"), "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std, "attention_dropout": 0.0, **rope_fields(m),
    }


def _moe_layers_hf(m: ModelSpec) -> tuple[int, list[int]]:
    """Qwen-MoE's decoder_sparse_step and mlp_only_layers reproducing m's MoE layers exactly."""
    return 1, [i for i in range(m.n_layers) if not m.is_moe_layer(i)]


def write_config(m: ModelSpec, family: str) -> dict:
    """The family-specific fields of config.json."""
    moe = m.moe
    if family == "gpt2":
        return {"vocab_size": m.vocab_size, "n_embd": m.d_model, "n_layer": m.n_layers, "n_head": m.n_heads,
                "n_positions": m.max_seq_len, "n_inner": m.ffn_hidden, "activation_function": _PLAIN_ACT[m.activation],
                "layer_norm_epsilon": m.norm_eps, "tie_word_embeddings": m.tie_embeddings,
                "initializer_range": m.init_std, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    config = _llama_fields(m)
    if family.startswith("deepseek"):
        a = m.attention
        config.update(num_key_value_heads=m.n_heads, head_dim=a.qk_rope_head_dim, attention_bias=False,
                      q_lora_rank=a.q_lora_rank or None, kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim,
                      qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim,
                      rope_interleave=True,  # DeepSeek's own layout; the weight converter permutes to it
                      num_nextn_predict_layers=m.mtp.depth)
        if moe is None:  # every layer dense
            config.update(first_k_dense_replace=m.n_layers, n_routed_experts=1, num_experts_per_tok=1,
                          moe_intermediate_size=m.ffn_hidden, n_shared_experts=0, n_group=1, topk_group=1)
        else:
            config.update(first_k_dense_replace=moe.first_dense_layers, n_routed_experts=moe.n_experts,
                          num_experts_per_tok=moe.top_k, moe_intermediate_size=moe.expert_hidden,
                          n_shared_experts=moe.n_shared_experts, n_group=moe.n_groups, topk_group=moe.topk_groups,
                          routed_scaling_factor=moe.routed_scaling, norm_topk_prob=moe.norm_topk,
                          scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1)
        if a.sparse:
            config.update(index_n_heads=a.index_n_heads, index_head_dim=a.index_head_dim, index_topk=a.index_topk)
        return config
    if family in ("llama", "qwen3", "qwen3_moe", "mixtral"):
        config["attention_bias"] = m.qkv_bias
    if family == "llama":
        config["mlp_bias"] = m.mlp_bias
    if family in ("qwen2", "qwen2_moe"):
        config["qkv_bias"] = m.qkv_bias  # read by transformers 5's qwen2_moe; qwen2 always has it
    if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        config.update(use_sliding_window=False, sliding_window=None)
    if family == "mixtral":
        config.update(num_local_experts=moe.n_experts, num_experts_per_tok=moe.top_k, sliding_window=None,
                      router_aux_loss_coef=moe.aux_loss_coef)
        config["intermediate_size"] = moe.expert_hidden
    if family in ("qwen2_moe", "qwen3_moe"):
        step, dense = _moe_layers_hf(m)
        config.update(num_experts=moe.n_experts, num_experts_per_tok=moe.top_k, moe_intermediate_size=moe.expert_hidden,
                      norm_topk_prob=moe.norm_topk, decoder_sparse_step=step, mlp_only_layers=dense,
                      router_aux_loss_coef=moe.aux_loss_coef)
    if family == "qwen2_moe":
        config["shared_expert_intermediate_size"] = moe.shared_hidden
    return config


def export_family(m: ModelSpec, dtype: str = "float32") -> dict:
    """config.json for `m` in the family choose_family picks."""
    family = choose_family(m)
    config = write_config(m, family)
    config.update(model_type=family, architectures=[ARCHITECTURES[family]], dtype=dtype, torch_dtype=dtype)
    return config
