"""`llmc import hf` (config only): every family maps to a spec that plans to exactly the parameter
count of transformers' own model (instantiated on the meta device), both config layouts read the
same, losses are warned about and the unmappable is an error naming the fields."""

import json
import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmc.compiler.errors import UserError  # noqa: E402
from llmc.compiler.hf import hf_to_model, model_to_hf  # noqa: E402
from llmc.compiler.plan.params import count_params  # noqa: E402
from llmc.compiler.spec import load_spec  # noqa: E402

_BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=64)
_MLA = dict(_BASE, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2,
            topk_group=1, first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5)
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}

# Tiny configs of every family, each exercising the family's particular features.
TINY = {
    "llama": ("LlamaConfig", dict(_BASE, attention_bias=True, mlp_bias=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "mistral": ("MistralConfig", dict(_BASE, sliding_window=None, head_dim=32)),
    "mixtral": ("MixtralConfig", dict(_BASE, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", dict(_BASE, tie_word_embeddings=True)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(_BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, decoder_sparse_step=2)),
    "qwen3": ("Qwen3Config", dict(_BASE, head_dim=32)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         head_dim=32, mlp_only_layers=[0], norm_topk_prob=True)),
    "deepseek_v3": ("DeepseekV3Config", dict(_MLA, rope_parameters=_YARN)),
    "deepseek_v32": ("DeepseekV32Config", dict(_MLA, index_n_heads=2, index_head_dim=16, index_topk=8)),
    "gpt2": ("GPT2Config", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                bos_token_id=0, eos_token_id=0)),
}


def tiny_config(family: str):
    """A transformers config object of the family's tiny test model."""
    name, kwargs = TINY[family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, name)(**kwargs)


def config_json(config) -> dict:
    """What save_pretrained would write to config.json."""
    return json.loads(config.to_json_string())


def hf_param_count(config) -> int:
    """transformers' own count: the model built on the meta device (tied weights counted once)."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", list(TINY))
def test_tiny_family_plans_to_transformers_count(family):
    config = tiny_config(family)
    imported = hf_to_model(config_json(config))
    assert imported.family == family
    # transformers builds no MTP modules: compare the model that serves tokens
    assert count_params(imported.model).main == hf_param_count(config)


# Real config.json files, written in the classic layout (rope_theta + rope_scaling), with the
# published parameter counts where one is exact.
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256}
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000}
GPT2_SMALL = {
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1, "bos_token_id": 50256,
    "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
    "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
    "summary_type": "cls_index", "summary_use_proj": True, "vocab_size": 50257}
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 129280}


@pytest.mark.parametrize("config, published", [
    (LLAMA_31_8B, 8_030_261_248),    # Meta's model card: 8.03B
    (MIXTRAL_8X7B, 46_702_792_704),  # Mistral AI: 46.7B
    (GPT2_SMALL, 124_439_808),       # the 124M GPT-2
])
def test_real_configs_match_published_counts(config, published):
    model = hf_to_model(config).model
    assert count_params(model).main == published
    assert count_params(model).main == hf_param_count(transformers.AutoConfig.for_model(**config))


def test_deepseek_v3_classic_layout():
    imported = hf_to_model(DEEPSEEK_V3)
    m = imported.model
    assert (m.rope.scaling, m.rope.factor, m.rope.original_max_seq_len, m.rope.mscale_all_dim) == ("yarn", 40.0, 4096, 1.0)
    assert (m.moe.n_groups, m.moe.topk_groups, m.moe.routed_scaling, m.moe.balance) == (8, 4, 2.5, "aux_free")
    assert m.mtp.depth == 1 and m.moe.first_dense_layers == 3
    # the fp8 release is dequantised by the weight import; other quantisations are warned about
    assert not any("quantization_config" in w for w in imported.warnings)
    gptq = dict(DEEPSEEK_V3, quantization_config={"quant_method": "gptq", "bits": 4})
    assert any("quantization_config" in w for w in hf_to_model(gptq).warnings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = hf_param_count(transformers.DeepseekV3Config(**{k: v for k, v in DEEPSEEK_V3.items()
                                                                      if k != "quantization_config"}))
    assert count_params(m).main == reference == 671_026_404_352  # DeepSeek's 671B (MTP excluded)


def test_classic_and_new_rope_layouts_agree():
    classic = hf_to_model(LLAMA_31_8B).model
    new = dict(LLAMA_31_8B)
    del new["rope_theta"], new["rope_scaling"]
    new["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert hf_to_model(new).model == classic
    assert classic.rope.scaling == "llama3" and classic.rope.theta == 500000.0
    assert classic.rope.original_max_seq_len == 8192 and classic.rope.factor == 8.0


def test_family_features_are_mapped():
    qwen2_moe = hf_to_model(config_json(tiny_config("qwen2_moe"))).model
    assert qwen2_moe.moe.shared_expert_gate and qwen2_moe.moe.shared_hidden == 48 and qwen2_moe.qkv_bias
    assert [qwen2_moe.is_moe_layer(i) for i in range(3)] == [False, True, False]  # (i + 1) % 2 == 0
    qwen3_moe = hf_to_model(config_json(tiny_config("qwen3_moe"))).model
    assert qwen3_moe.qk_norm and qwen3_moe.head_dim == 32 and qwen3_moe.moe.first_dense_layers == 1
    gpt2 = hf_to_model(config_json(tiny_config("gpt2"))).model
    assert (gpt2.positions, gpt2.norm, gpt2.activation, gpt2.tie_embeddings) == ("learned", "layernorm", "gelu_tanh", True)
    ds32 = hf_to_model(config_json(tiny_config("deepseek_v32"))).model
    assert (ds32.attention.index_n_heads, ds32.attention.index_head_dim, ds32.attention.index_topk) == (2, 16, 8)


def test_lossy_fields_are_warned():
    config = config_json(tiny_config("mistral"))
    config["sliding_window"] = 16
    config["some_new_switch"] = True
    warned = " ".join(hf_to_model(config).warnings)
    assert "sliding_window = 16" in warned and "some_new_switch" in warned


@pytest.mark.parametrize("change, named", [
    ({"model_type": "falcon", "new_decoder_architecture": True}, ["falcon", "new_decoder_architecture"]),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, ["dynamic"]),
    ({"partial_rotary_factor": 0.5}, ["partial_rotary_factor"]),
    ({"hidden_act": "relu2"}, ["hidden_act"]),
])
def test_unmappable_fields_are_errors_naming_them(change, named):
    config = config_json(tiny_config("llama"))
    config.update(change)
    with pytest.raises(UserError) as e:
        hf_to_model(config)
    for name in named:
        assert name in str(e.value)


def test_irregular_moe_layers_are_an_error():
    config = config_json(tiny_config("qwen3_moe"))
    config["mlp_only_layers"] = [2]  # MoE at 0 and 1 only: not "leading dense layers, then every k-th"
    with pytest.raises(UserError, match="mlp_only_layers"):
        hf_to_model(config)


@pytest.mark.parametrize("family", list(TINY))
def test_export_config_round_trips_and_transformers_builds_it(family):
    model = hf_to_model(config_json(tiny_config(family))).model
    exported = model_to_hf(model)
    assert exported["model_type"] == family or (family == "mistral" and exported["model_type"] == "llama")
    again = hf_to_model(json.loads(json.dumps(exported))).model
    assert again == model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.AutoConfig.for_model(**exported)
    assert hf_param_count(config) == count_params(model).main


def test_export_refuses_what_no_family_expresses():
    model = hf_to_model(config_json(tiny_config("llama"))).model.model_copy(update={"norm": "layernorm"})
    with pytest.raises(UserError, match="rmsnorm"):
        model_to_hf(model)


def test_cli_prints_a_loadable_spec(tmp_path):
    folder = tmp_path / "hf"
    tiny_config("qwen3").save_pretrained(folder)
    (folder / "tokenizer.json").write_text("{}")
    run = subprocess.run([sys.executable, "-m", "llmc.compiler.cli", "import", "hf", str(folder)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    (tmp_path / "printed.toml").write_text(run.stdout)
    spec = load_spec(tmp_path / "printed.toml")
    assert spec.model == hf_to_model(config_json(tiny_config("qwen3"))).model
    out = tmp_path / "specs" / "qwen3.toml"
    run = subprocess.run([sys.executable, "-m", "llmc.compiler.cli", "import", "hf", str(folder / "config.json"),
                          "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert load_spec(out).model == spec.model


def test_cli_errors_without_traceback(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bloom", "n_embed": 64}))
    run = subprocess.run([sys.executable, "-m", "llmc.compiler.cli", "import", "hf", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "bloom" in run.stderr and "n_embed" in run.stderr


def test_compiler_side_imports_no_torch():
    code = ("import sys, llmc.compiler.hf, llmc.compiler.hf_export, llmc.compiler.hf_families;"
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_imported_spec_plans_at_once():
    """The placeholder run around an imported model fits somewhere, so `llmc plan` works on it:
    one CPU for a tiny model, the fewest 8 x H100 nodes for a large one."""
    from llmc.compiler.hf import import_spec
    from llmc.compiler.plan import build_plan
    from llmc.compiler.spec import Spec

    tiny, note = import_spec(hf_to_model(config_json(tiny_config("llama"))))
    assert note is None and "hardware" not in tiny
    assert build_plan(Spec.model_validate(tiny)).layout is not None
    large, note = import_spec(hf_to_model(LLAMA_31_8B))
    assert large["hardware"]["accelerator"] == "H100" and "H100" in note
    assert build_plan(Spec.model_validate(large)).layout is not None


def test_deepseek_v32_adds_the_indexer():
    """DeepSeek-V3.2-Exp is V3 plus the DSA indexer in every layer (its config.json adds index_*)."""
    v32 = {**DEEPSEEK_V3, "model_type": "deepseek_v32", "architectures": ["DeepseekV32ForCausalLM"],
           "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}
    del v32["quantization_config"]
    m = hf_to_model(v32).model
    assert (m.attention.index_n_heads, m.attention.index_head_dim, m.attention.index_topk) == (64, 128, 2048)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = hf_param_count(transformers.AutoConfig.for_model(**v32))
    assert count_params(m).main == reference
    # wq_b (q_lora_rank -> 64 x 128), wk, k_norm (LayerNorm), weights_proj, in each of 61 layers
    per_layer = 1536 * 64 * 128 + 7168 * 128 + 2 * 128 + 7168 * 64
    assert count_params(m).main - count_params(hf_to_model(DEEPSEEK_V3).model).main == 61 * per_layer


def test_config_only_import_refuses_a_folder_output_written_with_a_slash(tmp_path, capsys):
    """`-o ckpt/` names a folder (a checkpoint), which a config.json without weights cannot fill:
    refused as an existing folder is (it wrote the spec into a file called `ckpt`)."""
    from llmc.compiler.cli import main as llmc
    config = tmp_path / "config.json"
    config.write_text(json.dumps(config_json(tiny_config("llama"))))
    assert llmc(["import", "hf", str(config), "-o", f"{tmp_path / 'ckpt'}/"]) == 1
    assert "give -o a spec file (.toml)" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()
