"""One reader per Hugging Face family: config.json -> the `[model]` table of an llmc spec.

Each reader takes what it understands from a ConfigReader; the reader remembers which keys were
used, which values have no llmc equivalent (an error, naming them) and which were dropped with a
loss the user should know about (a warning). Keys no family reads are reported as ignored.
"""

from __future__ import annotations

from typing import Any, Callable

from .errors import UserError

# Keys that change nothing the spec describes: token ids, inference-time switches, dropout,
# bookkeeping of transformers itself.
HARMLESS = {
    "model_type", "architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "attention_dropout", "output_router_logits",
    "pretraining_tp", "return_dict", "output_attentions", "output_hidden_states", "id2label", "label2id",
    "problem_type", "tokenizer_class", "task_specific_params", "chunk_size_feed_forward", "is_encoder_decoder",
    "auto_map", "use_return_dict", "tf_legacy_loss", "use_bfloat16", "layer_types", "ep_size",
}


class ConfigReader:
    """config.json with bookkeeping: used keys, unmappable fields (errors), lossy ones (warnings)."""

    def __init__(self, config: dict):
        self.config = config
        self.used: set[str] = set(HARMLESS)
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def get(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        value = self.config.get(key)
        return default if value is None else value

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise UserError(f"config.json ({self.config.get('model_type')}): missing required field {key!r}")
        return value

    def expect(self, key: str, supported: Any, default: Any, why: str) -> None:
        """A field llmc supports only at one value (e.g. GPT-2's scale_attn_weights = true)."""
        value = self.get(key, default)
        if value != supported:
            self.problems.append(f"{key} = {value!r} ({why})")

    def unmappable(self, key: str, why: str) -> None:
        self.problems.append(f"{key} = {self.config.get(key)!r} ({why})")

    def lossy(self, key: str, why: str) -> None:
        self.warnings.append(f"{key} = {self.config.get(key)!r} is not represented in the llmc spec: {why}")

    def finish(self) -> None:
        """Raise UserError with every unmappable field; warn about keys nobody read."""
        quantisation = self.get("quantization_config")
        if quantisation and quantisation.get("quant_method") != "fp8":
            self.lossy("quantization_config", "the architecture is imported; weights quantised this way are not")
        ignored = sorted(k for k in self.config if k not in self.used)
        if ignored:
            self.warnings.append(f"fields not represented in the llmc spec, ignored: {', '.join(ignored)}")
        if self.problems:
            raise UserError(f"config.json ({self.config.get('model_type')}): these fields cannot be mapped to an "
                            f"llmc spec: {'; '.join(self.problems)}")

    def unrecognised_by_all(self) -> list[str]:
        """Keys that none of the families reads (for the error about an unknown model_type)."""
        unused = set(self.config) - HARMLESS
        for read in FAMILIES.values():
            probe = ConfigReader(self.config)
            try:
                read(probe)
            except (UserError, TypeError, ValueError, KeyError):
                pass
            unused &= set(self.config) - probe.used
        return sorted(unused)


# --------------------------------------------------------------------------- shared pieces

_GATED = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}
_PLAIN = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
          "silu": "silu", "swish": "silu"}
_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "low_freq_factor",
              "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
              "truncate", "partial_rotary_factor"}


def rope(r: ConfigReader, max_seq_len: int, default_theta: float = 10000.0) -> dict:
    """`[model.rope]` from the classic layout (rope_theta + rope_scaling) or transformers 5's rope_parameters."""
    params = dict(r.get("rope_parameters", {}) or {})
    scaling = dict(r.get("rope_scaling", {}) or {})
    if any(isinstance(v, dict) for v in params.values()):
        r.unmappable("rope_parameters", "per-layer-type RoPE is not supported")
        return {}
    merged = {**params, **scaling}  # transformers 5 also lets rope_scaling win
    theta = r.get("rope_theta", merged.get("rope_theta", default_theta))
    partial = merged.get("partial_rotary_factor", r.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        r.unmappable("partial_rotary_factor", "llmc rotates every dim of a head")
    for key in sorted(set(merged) - _ROPE_KEYS):
        r.problems.append(f"rope_parameters.{key} = {merged[key]!r} (unknown RoPE field)")
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    out: dict = {"theta": float(theta)}
    original = merged.get("original_max_position_embeddings")
    factor = merged.get("factor")
    if kind == "default":
        return out
    if kind not in ("linear", "llama3", "yarn"):
        r.problems.append(f"rope type {kind!r} (llmc supports default, linear, llama3, yarn)")
        return out
    if factor is None and kind == "yarn" and original:
        factor = max_seq_len / original
    if factor is None:
        r.problems.append(f"rope {kind} without a factor")
        return out
    out.update(scaling=kind, factor=float(factor))
    if original is None:  # as transformers does: the configured context is the pre-training one
        original = max_seq_len if kind != "linear" else max(1, int(max_seq_len / factor))
    out["original_max_seq_len"] = int(original)
    if kind == "llama3":
        out.update(low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
                   high_freq_factor=float(merged.get("high_freq_factor", 4.0)))
    if kind == "yarn":
        out.update(beta_fast=float(merged.get("beta_fast") or 32.0), beta_slow=float(merged.get("beta_slow") or 1.0))
        if merged.get("mscale") is not None:
            out["mscale"] = float(merged["mscale"])
        if merged.get("mscale_all_dim") is not None:
            out["mscale_all_dim"] = float(merged["mscale_all_dim"])
        if merged.get("attention_factor") is not None:
            r.problems.append(f"rope attention_factor = {merged['attention_factor']!r} "
                              "(llmc derives it from factor, mscale and mscale_all_dim)")
        if merged.get("truncate", True) is not True:
            r.problems.append("rope truncate = false (llmc's YaRN truncates the correction range)")
    return out


def attention_kind(n_heads: int, n_kv_heads: int) -> dict:
    if n_kv_heads == n_heads:
        return {"kind": "mha"}
    return {"kind": "mqa"} if n_kv_heads == 1 else {"kind": "gqa"}


def moe_pattern(r: ConfigReader, field: str, is_moe: list[bool]) -> dict | None:
    """first_dense_layers / layer_freq reproducing a per-layer MoE pattern; None if no MoE layer."""
    layers = [i for i, moe in enumerate(is_moe) if moe]
    if not layers:
        return None
    first = layers[0]
    freq = layers[1] - layers[0] if len(layers) > 1 else max(1, len(is_moe) - first)
    rebuilt = [i >= first and (i - first) % freq == 0 for i in range(len(is_moe))]
    if rebuilt != is_moe:
        r.unmappable(field, "llmc describes MoE layers as leading dense layers then every layer_freq-th; "
                            f"this config puts them at layers {layers}")
    return {"first_dense_layers": first, "layer_freq": freq}


def llama_like(r: ConfigReader, *, eps: float = 1e-6, bias: str | None = "attention_bias") -> dict:
    """The fields every Llama-descended family shares."""
    d, h = r.require("hidden_size"), r.require("num_attention_heads")
    kv = r.get("num_key_value_heads", h)
    max_seq_len = r.require("max_position_embeddings")
    act = r.get("hidden_act", "silu")
    if act not in _GATED:
        r.unmappable("hidden_act", f"gated FFN activations llmc has: {', '.join(sorted(_GATED))}")
    table = {
        "vocab_size": r.require("vocab_size"), "d_model": d, "n_layers": r.require("num_hidden_layers"),
        "n_heads": h, "ffn_hidden": r.require("intermediate_size"), "max_seq_len": max_seq_len,
        "tie_embeddings": bool(r.get("tie_word_embeddings", False)), "norm": "rmsnorm",
        "norm_eps": float(r.get("rms_norm_eps", eps)), "positions": "rope", "activation": _GATED.get(act, "swiglu"),
        "init_std": float(r.get("initializer_range", 0.02)), "rope": rope(r, max_seq_len),
        "attention": attention_kind(h, kv),
    }
    if table["attention"]["kind"] == "gqa":
        table["n_kv_heads"] = kv
    head_dim = r.get("head_dim")
    if head_dim is not None and (d % h or head_dim != d // h):
        table["head_dim"] = head_dim
    if bias:
        table["qkv_bias"] = table["out_bias"] = bool(r.get(bias, False))
    table["mlp_bias"] = bool(r.get("mlp_bias", False))
    return table


def sliding_window(r: ConfigReader, switch: str | None = None) -> None:
    """Sliding-window attention is not in the spec: outputs differ only past the window."""
    r.get("max_window_layers")
    if switch is not None and not r.get(switch, False):
        r.get("sliding_window")
        return
    if r.get("sliding_window"):
        r.lossy("sliding_window", "llmc attends to the whole context; outputs differ beyond the window")


# --------------------------------------------------------------------------- the families

def llama(r: ConfigReader) -> dict:
    return llama_like(r)


def mistral(r: ConfigReader) -> dict:
    table = llama_like(r)
    sliding_window(r)
    return table


def mixtral(r: ConfigReader) -> dict:
    table = llama_like(r, eps=1e-5)
    sliding_window(r)
    if r.get("router_jitter_noise", 0.0):
        r.lossy("router_jitter_noise", "training-time noise on router logits is not applied")
    table["moe"] = {"n_experts": r.require("num_local_experts"), "top_k": r.require("num_experts_per_tok"),
                    "expert_hidden": table["ffn_hidden"], "score": "softmax", "norm_topk": True,
                    "aux_loss_coef": float(r.get("router_aux_loss_coef", 0.001))}
    return table


def qwen2(r: ConfigReader) -> dict:
    table = llama_like(r, bias=None)
    table.update(qkv_bias=True, out_bias=False)  # Qwen2 hard-codes biases on q/k/v only
    sliding_window(r, "use_sliding_window")
    return table


def qwen3(r: ConfigReader) -> dict:
    table = llama_like(r)
    table["qk_norm"] = True
    sliding_window(r, "use_sliding_window")
    return table


def _qwen_moe(r: ConfigReader, table: dict) -> dict:
    n_layers = table["n_layers"]
    experts = r.get("num_experts", r.get("num_local_experts"))
    step = r.get("decoder_sparse_step", 1)
    dense_only = set(r.get("mlp_only_layers", []))
    moe = {"n_experts": experts, "top_k": r.require("num_experts_per_tok"),
           "expert_hidden": r.require("moe_intermediate_size"), "score": "softmax",
           "norm_topk": bool(r.get("norm_topk_prob", False)), "aux_loss_coef": float(r.get("router_aux_loss_coef", 0.001))}
    if not experts:
        return table
    pattern = moe_pattern(r, "mlp_only_layers" if dense_only else "decoder_sparse_step",
                          [i not in dense_only and (i + 1) % step == 0 for i in range(n_layers)])
    score = r.get("scoring_func", "sigmoid")
    if score not in ("sigmoid", "softmax"):
        r.unmappable("scoring_func", "llmc scores routers with sigmoid or softmax")
    if pattern is not None:
        table["moe"] = {**moe, **pattern}
    return table


def qwen2_moe(r: ConfigReader) -> dict:
    table = llama_like(r, bias=None)
    table.update(qkv_bias=bool(r.get("qkv_bias", True)), out_bias=False)
    sliding_window(r, "use_sliding_window")
    table = _qwen_moe(r, table)
    shared = r.get("shared_expert_intermediate_size", 0)
    if "moe" in table:  # Qwen2-MoE always builds the gate, even around a zero-width shared expert
        table["moe"]["shared_expert_gate"] = True
        if shared:
            table["moe"].update(n_shared_experts=1, shared_expert_hidden=shared)
    return table


def qwen3_moe(r: ConfigReader) -> dict:
    table = qwen3(r)
    return _qwen_moe(r, table)


def deepseek_v3(r: ConfigReader) -> dict:
    table = llama_like(r, bias=None)
    table.pop("n_kv_heads", None)
    r.get("num_key_value_heads")
    r.get("head_dim")  # transformers sets it to qk_rope_head_dim
    r.get("qk_head_dim")
    r.get("rope_interleave")  # a layout of the weights: the converter permutes, the spec is unaffected
    table.pop("head_dim", None)
    if r.get("attention_bias", False):
        r.unmappable("attention_bias", "llmc's MLA has no projection biases")
    table["attention"] = {"kind": "mla", "q_lora_rank": r.get("q_lora_rank", 0) or 0,
                          "kv_lora_rank": r.require("kv_lora_rank"),
                          "qk_nope_head_dim": r.require("qk_nope_head_dim"),
                          "qk_rope_head_dim": r.require("qk_rope_head_dim"), "v_head_dim": r.require("v_head_dim")}
    if r.get("index_n_heads"):  # DeepSeek-V3.2's DSA indexer
        table["attention"].update(index_n_heads=r.get("index_n_heads"), index_head_dim=r.require("index_head_dim"),
                                  index_topk=r.require("index_topk"))
    n_layers = table["n_layers"]
    first_dense = r.get("first_k_dense_replace", 0)
    types = r.get("mlp_layer_types")
    freq = r.get("moe_layer_freq", 1)
    if freq != 1:
        r.lossy("moe_layer_freq", "transformers' and DeepSeek's DeepSeek-V3 ignore it (every layer after "
                                  "first_k_dense_replace is MoE); so does the import")
    pattern_from = "mlp_layer_types" if types else "first_k_dense_replace"
    is_moe = [t == "sparse" for t in types] if types else [i >= first_dense for i in range(n_layers)]
    experts = r.get("n_routed_experts", 0)
    pattern = moe_pattern(r, pattern_from, is_moe) if experts else None
    # transformers' DeepSeek-V3 routes one way only: sigmoid scores, a correction bias steering the
    # choice (noaux_tc), groups ranked by their best two experts. A config saying otherwise is not V3.
    if r.get("topk_method", "noaux_tc") != "noaux_tc":
        r.unmappable("topk_method", "DeepSeek-V3 routes with noaux_tc")
    if r.get("scoring_func", "sigmoid") != "sigmoid":
        r.unmappable("scoring_func", "DeepSeek-V3 scores experts with sigmoid")
    if pattern is not None:
        table["moe"] = {
            "n_experts": experts, "top_k": r.require("num_experts_per_tok"),
            "expert_hidden": r.require("moe_intermediate_size"), "n_shared_experts": r.get("n_shared_experts", 0),
            "score": "sigmoid", "norm_topk": bool(r.get("norm_topk_prob", True)),
            "n_groups": r.get("n_group", 1) or 1, "topk_groups": r.get("topk_group", 1) or 1,
            "routed_scaling": float(r.get("routed_scaling_factor", 1.0)),
            "balance": "aux_free",
            "aux_loss_coef": float(r.get("aux_loss_alpha", 0.0001)), **pattern}
        r.get("seq_aux")
    depth = r.get("num_nextn_predict_layers", 0)
    if depth:
        table["mtp"] = {"depth": depth}
    return table


def gpt2(r: ConfigReader) -> dict:
    d, h = r.require("n_embd"), r.require("n_head")
    act = r.get("activation_function", "gelu_new")
    if act not in _PLAIN:
        r.unmappable("activation_function", f"llmc has {', '.join(sorted(_PLAIN))}")
    r.expect("scale_attn_weights", True, True, "llmc always scales attention scores by 1/sqrt(head_dim)")
    r.expect("scale_attn_by_inverse_layer_idx", False, False, "llmc does not scale scores by layer")
    r.expect("add_cross_attention", False, False, "a decoder-only model has no cross-attention")
    r.get("reorder_and_upcast_attn")  # numerics only
    for key in ("n_ctx", "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_type", "summary_use_proj",
                "summary_activation", "summary_proj_to_labels", "summary_first_dropout"):
        r.get(key)
    return {
        "vocab_size": r.require("vocab_size"), "d_model": d, "n_layers": r.require("n_layer"), "n_heads": h,
        "ffn_hidden": r.get("n_inner", 4 * d), "max_seq_len": r.require("n_positions"),
        "tie_embeddings": bool(r.get("tie_word_embeddings", True)), "norm": "layernorm",
        "norm_eps": float(r.get("layer_norm_epsilon", 1e-5)), "positions": "learned",
        "activation": _PLAIN.get(act, "gelu_tanh"), "qkv_bias": True, "out_bias": True, "mlp_bias": True,
        "init_std": float(r.get("initializer_range", 0.02)), "attention": {"kind": "mha"},
    }


FAMILIES: dict[str, Callable[[ConfigReader], dict]] = {
    "llama": llama, "mistral": mistral, "mixtral": mixtral, "qwen2": qwen2, "qwen2_moe": qwen2_moe,
    "qwen3": qwen3, "qwen3_moe": qwen3_moe, "deepseek_v3": deepseek_v3, "deepseek_v32": deepseek_v3, "gpt2": gpt2,
}
