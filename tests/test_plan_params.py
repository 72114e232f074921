"""Parameter counts against published figures and against transformers models on the meta device."""

import pytest

from llmc.compiler.plan import build_plan, count_params
from llmc.compiler.plan.params import COMPONENTS
from llmc.compiler.spec import ModelSpec, load_spec

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

DEEPSEEK_V3 = ["model.attention.index_n_heads=0", "model.attention.index_head_dim=0",
               "model.attention.index_topk=0", "model.mtp.depth=0"]


def hf_count(config_cls, model_cls, **config) -> int:
    """Parameters of a transformers model built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = model_cls(config_cls(**config))
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- published figures

def test_llama3_8b_published():
    assert count_params(load_spec("specs/llama3_8b.toml").model).total == 8_030_261_248


def test_mixtral_8x7b_published():
    p = count_params(load_spec("specs/mixtral_8x7b.toml").model)
    assert p.total == 46_702_792_704
    assert round(p.active / 1e9, 1) == 12.9  # "12.9B active parameters" (Mistral AI)


def test_deepseek_v3_published():
    p = count_params(load_spec("specs/ds_v32.toml", DEEPSEEK_V3).model)
    assert p.total == 671_026_404_352
    assert 37e9 <= p.active < 38e9  # "37B activated for each token" (DeepSeek-V3 report)


def test_deepseek_v3_readme_weights_figures():
    """DeepSeek-V3's README_WEIGHTS.md: main model 36.6B activated "including 0.9B for the output head"
    (the input embedding is not counted there); the MTP module "11.5B unique" and 1.5B activated
    including the head. Its MTP figures leave out eh_proj (2 x 7168 x 7168 = 0.1B), which the
    checkpoint does hold (model.layers.61.eh_proj.weight)."""
    overrides = [o for o in DEEPSEEK_V3 if not o.startswith("model.mtp")]
    p = count_params(load_spec("specs/ds_v32.toml", overrides).model)
    head, eh_proj = 129280 * 7168, 2 * 7168 * 7168
    assert round((p.active - p.embedding) / 1e9, 1) == 36.6
    assert round((p.mtp - eh_proj) / 1e9, 1) == 11.5
    assert round((p.mtp_active - eh_proj + head) / 1e9, 1) == 1.5
    assert round(p.stored_with_mtp_copies / 1e9, 1) == 684.5  # the model card's "685B" (671B + "14B")


def test_ds_v32_685b_is_main_plus_mtp_with_its_own_embedding_and_head():
    """DeepSeek-V3.2's model card: 685B = 671B main + the MTP module as stored (with copies of
    embedding and head). The main model is what transformers' DeepseekV32 (no MTP) counts."""
    m = load_spec("specs/ds_v32.toml").model
    p = count_params(m)
    from transformers.models.deepseek_v32 import DeepseekV32Config, DeepseekV32ForCausalLM
    assert p.main == hf_count(DeepseekV32Config, DeepseekV32ForCausalLM)  # its defaults are V3.2's
    assert round(p.main / 1e9) == 672 and round(p.stored_with_mtp_copies / 1e9) == 685
    # hand-derived MTP module: eh_proj 2D^2, enorm + hnorm + final norm 3D, one MoE block
    D = 7168
    moe_block = p.layer_kinds["moe"].per_layer_total
    assert p.mtp == 2 * D * D + 3 * D + moe_block
    assert p.stored_with_mtp_copies == p.total + 2 * 129280 * D


def test_deepseek_v3_matches_transformers():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    p = count_params(load_spec("specs/ds_v32.toml", DEEPSEEK_V3).model)
    assert p.total == hf_count(DeepseekV3Config, DeepseekV3ForCausalLM)  # defaults are V3's shapes


# --------------------------------------------------------------------------- other architectures

def spec(**fields) -> ModelSpec:
    return ModelSpec.model_validate({"max_seq_len": 512, **fields})


def test_gpt2_layernorm_learned_positions_biases_tied():
    from transformers import GPT2Config, GPT2LMHeadModel
    m = spec(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, ffn_hidden=3072, max_seq_len=1024,
             norm="layernorm", positions="learned", activation="gelu_tanh", qkv_bias=True, out_bias=True,
             mlp_bias=True, tie_embeddings=True, attention={"kind": "mha"})
    p = count_params(m)
    assert p.total == hf_count(GPT2Config, GPT2LMHeadModel) == 124_439_808  # GPT-2 small, published
    assert p.components["head"] == 0 and p.components["positions"] == 1024 * 768


def test_qwen2_qkv_bias():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = dict(vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=3, num_attention_heads=8,
               num_key_value_heads=2, tie_word_embeddings=False)
    m = spec(vocab_size=1000, d_model=256, n_layers=3, n_heads=8, n_kv_heads=2, ffn_hidden=704, qkv_bias=True)
    assert count_params(m).total == hf_count(Qwen2Config, Qwen2ForCausalLM, **cfg)


def test_qwen3_qk_norm_explicit_head_dim_tied():
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=4, head_dim=64, tie_word_embeddings=True)
    m = spec(vocab_size=1000, d_model=256, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=64, ffn_hidden=512,
             qk_norm=True, tie_embeddings=True)
    assert count_params(m).total == hf_count(Qwen3Config, Qwen3ForCausalLM, **cfg)


def test_qwen2_moe_shared_expert_gate():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    cfg = dict(vocab_size=1000, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, moe_intermediate_size=64, shared_expert_intermediate_size=256,
               num_experts=6, num_experts_per_tok=2, qkv_bias=True)
    m = spec(vocab_size=1000, d_model=128, n_layers=2, n_heads=4, ffn_hidden=384, qkv_bias=True,
             moe={"n_experts": 6, "top_k": 2, "expert_hidden": 64, "n_shared_experts": 1,
                  "shared_expert_hidden": 256, "shared_expert_gate": True})
    p = count_params(m)
    assert p.total == hf_count(Qwen2MoeConfig, Qwen2MoeForCausalLM, **cfg)
    assert p.components["shared_experts"] == 2 * (3 * 128 * 256 + 128)


def test_mixtral_small_matches_transformers_and_active_is_top_k():
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
    m = spec(vocab_size=1000, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=256,
             moe={"n_experts": 8, "top_k": 2, "expert_hidden": 256})
    p = count_params(m)
    assert p.total == hf_count(MixtralConfig, MixtralForCausalLM, **cfg)
    expert = 3 * 128 * 256
    assert p.total - p.active == 2 * (8 - 2) * expert  # six idle experts per layer


def test_tiny_moe_without_mtp_matches_deepseek_v3():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    m = load_spec("specs/tiny_moe.toml", ["model.mtp.depth=0"]).model
    cfg = dict(vocab_size=4096, hidden_size=128, intermediate_size=384, moe_intermediate_size=128,
               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
               n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1,
               q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
               tie_word_embeddings=False)
    assert count_params(m).total == hf_count(DeepseekV3Config, DeepseekV3ForCausalLM, **cfg)


def test_small_indexer_matches_deepseek_v32():
    from transformers.models.deepseek_v32 import DeepseekV32Config, DeepseekV32ForCausalLM
    m = load_spec("specs/tiny_moe.toml", ["model.mtp.depth=0", "model.attention.index_n_heads=4",
                                          "model.attention.index_head_dim=32", "model.attention.index_topk=16"]).model
    cfg = dict(vocab_size=4096, hidden_size=128, intermediate_size=384, moe_intermediate_size=128,
               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
               n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1,
               q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
               index_n_heads=4, index_head_dim=32, index_topk=16, tie_word_embeddings=False)
    p = count_params(m)
    assert p.total == hf_count(DeepseekV32Config, DeepseekV32ForCausalLM, **cfg)
    # by hand per layer: wq_b 64*4*32 + wk 128*32 + k_norm (LayerNorm) 2*32 + weights_proj 128*4
    assert p.components["indexer"] == 4 * (64 * 4 * 32 + 128 * 32 + 2 * 32 + 128 * 4)


# --------------------------------------------------------------------------- shape of the result

def test_components_are_the_contract_names_and_sum_to_total():
    p = count_params(load_spec("specs/tiny_moe.toml").model)
    assert set(p.components) == set(COMPONENTS) == {
        "embedding", "positions", "attention", "indexer", "mlp", "experts", "shared_experts", "router",
        "norms", "mtp", "head"}
    assert sum(p.components.values()) == p.total
    assert p.buffers == {"router_correction_bias": 4 * 4}  # 3 MoE layers + the MTP block, 4 experts each


def test_plan_document_carries_params_and_spec():
    s = load_spec("specs/llama3_8b.toml")
    doc = build_plan(s).model_dump(mode="json")
    assert doc["version"] == 1
    assert doc["params"]["total"] == 8_030_261_248
    assert doc["params"]["embedding"] == 128256 * 4096
    assert type(s).model_validate(doc["spec"]) == s
    assert len(doc["spec_hash"]) == 64


def test_formula_evaluates_to_the_published_count():
    from llmc.compiler.plan.params import formulas
    for path, published in (("specs/llama3_8b.toml", 8_030_261_248), ("specs/mixtral_8x7b.toml", 46_702_792_704)):
        f = formulas(load_spec(path).model)
        assert f["total"].subs(f["values"]) == published
    f = formulas(load_spec("specs/llama3_8b.toml").model)
    assert {s.name for s in f["total"].free_symbols} == {"V", "D", "L", "H", "H_kv", "d_h", "F"}
