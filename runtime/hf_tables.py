"""Where each llmc tensor lives in a Hugging Face checkpoint: one table per family.

A table maps an llmc state-dict name template to a HF name template (a plain string) or to a
`Rule` when the tensor also changes shape or layout on the way. Template fields:
    {i}  block index            {p}  weight | bias
    {e}  expert index: the llmc tensor is the stack over experts of the HF per-expert tensors
    {k}  MTP module (0-based)    {m}  n_layers + k: DeepSeek stores MTP modules as extra layers
The tables know nothing of the model and the model knows nothing of them (as torchtitan's
state_dict_adapter); `hf_weights.py` applies them in either direction.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """One llmc tensor from one HF tensor (or its per-expert family, through {e})."""

    hf: str
    split: tuple[int, int, int] | None = None  # (part, parts, dim): equal chunk `part` of the HF tensor
    transpose: bool = False                    # GPT-2's Conv1D stores [in, out]
    rope_rows: str | None = None               # "q" | "kv": DeepSeek's interleaved RoPE rows to permute
    swap_halves: bool = False                  # DeepSeek's eh_proj reads [emb ; h], llmc's [h ; emb]


def _llama_block(prefix: str = "model.layers.{i}") -> dict:
    return {
        "layers.{i}.attn_norm.weight": f"{prefix}.input_layernorm.weight",
        "layers.{i}.ffn_norm.weight": f"{prefix}.post_attention_layernorm.weight",
        "layers.{i}.attn.wq.{p}": f"{prefix}.self_attn.q_proj.{{p}}",
        "layers.{i}.attn.wk.{p}": f"{prefix}.self_attn.k_proj.{{p}}",
        "layers.{i}.attn.wv.{p}": f"{prefix}.self_attn.v_proj.{{p}}",
        "layers.{i}.attn.wo.{p}": f"{prefix}.self_attn.o_proj.{{p}}",
        "layers.{i}.attn.q_norm.weight": f"{prefix}.self_attn.q_norm.weight",
        "layers.{i}.attn.k_norm.weight": f"{prefix}.self_attn.k_norm.weight",
        "layers.{i}.ffn.w1.{p}": f"{prefix}.mlp.gate_proj.{{p}}",
        "layers.{i}.ffn.w3.{p}": f"{prefix}.mlp.up_proj.{{p}}",
        "layers.{i}.ffn.w2.{p}": f"{prefix}.mlp.down_proj.{{p}}",
    }


_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "head.weight": "lm_head.weight"}

_EXPERTS = {  # Qwen-MoE and DeepSeek name the experts alike
    "layers.{i}.ffn.router.gate.weight": "model.layers.{i}.mlp.gate.weight",
    "layers.{i}.ffn.experts.w1": "model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
    "layers.{i}.ffn.experts.w3": "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
    "layers.{i}.ffn.experts.w2": "model.layers.{i}.mlp.experts.{e}.down_proj.weight",
}

LLAMA = {**_TOP, **_llama_block()}

MIXTRAL = {
    **LLAMA,
    "layers.{i}.ffn.router.gate.weight": "model.layers.{i}.block_sparse_moe.gate.weight",
    "layers.{i}.ffn.experts.w1": "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
    "layers.{i}.ffn.experts.w3": "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
    "layers.{i}.ffn.experts.w2": "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
}

QWEN_MOE = {
    **LLAMA, **_EXPERTS,
    "layers.{i}.ffn.shared.w1.weight": "model.layers.{i}.mlp.shared_expert.gate_proj.weight",
    "layers.{i}.ffn.shared.w3.weight": "model.layers.{i}.mlp.shared_expert.up_proj.weight",
    "layers.{i}.ffn.shared.w2.weight": "model.layers.{i}.mlp.shared_expert.down_proj.weight",
    "layers.{i}.ffn.shared_gate.weight": "model.layers.{i}.mlp.shared_expert_gate.weight",
}


def _deepseek_block(prefix: str) -> dict:
    attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
    return {
        "layers.{i}.attn_norm.weight": f"{prefix}.input_layernorm.weight",
        "layers.{i}.ffn_norm.weight": f"{prefix}.post_attention_layernorm.weight",
        "layers.{i}.attn.wq_a.weight": f"{attn}.q_a_proj.weight",
        "layers.{i}.attn.q_norm.weight": f"{attn}.q_a_layernorm.weight",
        "layers.{i}.attn.wq_b.weight": Rule(f"{attn}.q_b_proj.weight", rope_rows="q"),
        "layers.{i}.attn.wq.weight": Rule(f"{attn}.q_proj.weight", rope_rows="q"),
        "layers.{i}.attn.wkv_a.weight": Rule(f"{attn}.kv_a_proj_with_mqa.weight", rope_rows="kv"),
        "layers.{i}.attn.kv_norm.weight": f"{attn}.kv_a_layernorm.weight",
        "layers.{i}.attn.wkv_b.weight": f"{attn}.kv_b_proj.weight",
        "layers.{i}.attn.wo.weight": f"{attn}.o_proj.weight",
        # V3.2's indexer uses rotate-half RoPE already: no permutation
        "layers.{i}.attn.indexer.wq_b.weight": f"{attn}.indexer.wq_b.weight",
        "layers.{i}.attn.indexer.wk.weight": f"{attn}.indexer.wk.weight",
        "layers.{i}.attn.indexer.k_norm.{p}": f"{attn}.indexer.k_norm.{{p}}",
        "layers.{i}.attn.indexer.weights_proj.weight": f"{attn}.indexer.weights_proj.weight",
        "layers.{i}.ffn.w1.weight": f"{mlp}.gate_proj.weight",
        "layers.{i}.ffn.w3.weight": f"{mlp}.up_proj.weight",
        "layers.{i}.ffn.w2.weight": f"{mlp}.down_proj.weight",
        "layers.{i}.ffn.router.gate.weight": f"{mlp}.gate.weight",
        "layers.{i}.ffn.router.e_score_correction_bias": f"{mlp}.gate.e_score_correction_bias",
        "layers.{i}.ffn.experts.w1": f"{mlp}.experts.{{e}}.gate_proj.weight",
        "layers.{i}.ffn.experts.w3": f"{mlp}.experts.{{e}}.up_proj.weight",
        "layers.{i}.ffn.experts.w2": f"{mlp}.experts.{{e}}.down_proj.weight",
        "layers.{i}.ffn.shared.w1.weight": f"{mlp}.shared_experts.gate_proj.weight",
        "layers.{i}.ffn.shared.w3.weight": f"{mlp}.shared_experts.up_proj.weight",
        "layers.{i}.ffn.shared.w2.weight": f"{mlp}.shared_experts.down_proj.weight",
    }


def _mtp(block: dict) -> dict:
    """DeepSeek's MTP module k is checkpoint layer n_layers + k: its block, plus the MTP parts."""
    table = {name.replace("layers.{i}.", "mtp.{k}.block."): rule for name, rule in block.items()}
    table.update({
        "mtp.{k}.enorm.weight": "model.layers.{m}.enorm.weight",
        "mtp.{k}.hnorm.weight": "model.layers.{m}.hnorm.weight",
        "mtp.{k}.eh_proj.weight": Rule("model.layers.{m}.eh_proj.weight", swap_halves=True),
        "mtp.{k}.norm.weight": "model.layers.{m}.shared_head.norm.weight",
    })
    return table


DEEPSEEK = {**_TOP, **_deepseek_block("model.layers.{i}"), **_mtp(_deepseek_block("model.layers.{m}"))}
# DeepSeek also stores a copy of the embedding and head with each MTP layer.
DEEPSEEK_MTP_COPIES = {"embed.weight": "model.layers.{m}.embed_tokens.weight",
                       "head.weight": "model.layers.{m}.shared_head.head.weight"}

_H = "transformer.h.{i}"
GPT2 = {
    "embed.weight": "transformer.wte.weight",
    "pos_embed.weight": "transformer.wpe.weight",
    "norm.{p}": "transformer.ln_f.{p}",
    "head.weight": "lm_head.weight",
    "layers.{i}.attn_norm.{p}": f"{_H}.ln_1.{{p}}",
    "layers.{i}.ffn_norm.{p}": f"{_H}.ln_2.{{p}}",
    # c_attn is one Conv1D [D, 3D] holding q, k, v side by side
    "layers.{i}.attn.wq.weight": Rule(f"{_H}.attn.c_attn.weight", split=(0, 3, 1), transpose=True),
    "layers.{i}.attn.wk.weight": Rule(f"{_H}.attn.c_attn.weight", split=(1, 3, 1), transpose=True),
    "layers.{i}.attn.wv.weight": Rule(f"{_H}.attn.c_attn.weight", split=(2, 3, 1), transpose=True),
    "layers.{i}.attn.wq.bias": Rule(f"{_H}.attn.c_attn.bias", split=(0, 3, 0)),
    "layers.{i}.attn.wk.bias": Rule(f"{_H}.attn.c_attn.bias", split=(1, 3, 0)),
    "layers.{i}.attn.wv.bias": Rule(f"{_H}.attn.c_attn.bias", split=(2, 3, 0)),
    "layers.{i}.attn.wo.weight": Rule(f"{_H}.attn.c_proj.weight", transpose=True),
    "layers.{i}.attn.wo.bias": f"{_H}.attn.c_proj.bias",
    "layers.{i}.ffn.w1.weight": Rule(f"{_H}.mlp.c_fc.weight", transpose=True),
    "layers.{i}.ffn.w1.bias": f"{_H}.mlp.c_fc.bias",
    "layers.{i}.ffn.w2.weight": Rule(f"{_H}.mlp.c_proj.weight", transpose=True),
    "layers.{i}.ffn.w2.bias": f"{_H}.mlp.c_proj.bias",
}

TABLES = {
    "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "mixtral": MIXTRAL,
    "qwen2_moe": QWEN_MOE, "qwen3_moe": QWEN_MOE, "deepseek_v3": DEEPSEEK, "deepseek_v32": DEEPSEEK, "gpt2": GPT2,
}

# HF tensors that are not weights of the architecture (buffers some checkpoints carry).
IGNORED_HF = (r".*rotary_emb\.inv_freq$", r".*\.attn\.(masked_)?bias$")
