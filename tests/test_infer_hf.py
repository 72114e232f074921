"""Generation from checkpoints imported from Hugging Face: llmc's greedy tokens with its KV cache
equal transformers' own `generate` on the same weights (an independent implementation), for a
Llama-style, a Qwen2-style (q/k/v biases, tied embeddings), a Mixtral-style (MoE) and a DeepSeek-V3
model (MLA decoded from the compressed cache with absorbed projections, shared + routed experts)."""

import pytest
import torch

from llmc.compiler.cli import main as llmc
from llmc.runtime.infer.checkpoint import load_for_inference
from llmc.runtime.infer.generate import generate
from llmc.runtime.infer.sampling import SamplingParams
from test_infer_checkpoints import one_thread  # noqa: F401

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=128, tie_word_embeddings=False),
    "qwen2": lambda: transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=128, tie_word_embeddings=True),
    "mixtral": lambda: transformers.MixtralConfig(vocab_size=300, hidden_size=64, intermediate_size=96,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  num_local_experts=4, num_experts_per_tok=2,
                                                  max_position_embeddings=128),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=128, rope_scaling=None),
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_imported_checkpoint_generates_what_transformers_generates(tmp_path, family):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert llmc(["import", "hf", str(tmp_path / "hf"), "-o", str(tmp_path / "llmc")]) == 0
    model, _, _ = load_for_inference(tmp_path / "llmc", dtype=torch.float32)
    prompts = [[5, 17, 200, 2, 9, 41, 7], [88, 3]]
    ours = generate(model, prompts, SamplingParams(max_new_tokens=12))   # one left-padded batch
    for prompt, row in zip(prompts, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        assert row.tokens == theirs[0, len(prompt):].tolist()
