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


def write_word_tokenizer(path, bos_template: bool) -> None:
    """Words w0..w299 (w1 = <s>, w2 = </s>); with `bos_template`, Llama's post-processor: <s> before a text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {f"w{i}": i for i in range(300)} | {"<s>": 1, "</s>": 2}
    del vocab["w1"], vocab["w2"]
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    if bos_template:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(path))


@pytest.mark.parametrize("bos_template", [True, False], ids=["llama_bos", "no_template"])
def test_eval_and_generate_read_a_text_as_its_tokenizer_frames_it(tmp_path, bos_template, capsys):
    """An imported Llama reads a text after its BOS, as transformers' tokenizer gives it (llmc eval
    and generate encoded without it: a perplexity and continuations the model was not trained for);
    a tokenizer without such a template adds nothing. Reference: transformers' tokenizer from the
    same tokenizer.json and its model's own loss and greedy continuation."""
    import json
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"]()).eval()
    hf.save_pretrained(tmp_path / "hf")
    write_word_tokenizer(tmp_path / "hf" / "tokenizer.json", bos_template)
    assert llmc(["import", "hf", str(tmp_path / "hf"), "-o", str(tmp_path / "llmc")]) == 0
    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"))
    text = " ".join(f"w{(7 * i * i + 3) % 297 + 3}" for i in range(40))
    (tmp_path / "text.txt").write_text(text)
    ids = hf_tokenizer(text).input_ids
    assert (ids[0] == 1) == bos_template and len(ids) == 40 + bos_template

    capsys.readouterr()
    assert llmc(["eval", str(tmp_path / "llmc"), "--text-file", str(tmp_path / "text.txt"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        expected = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
        unframed = hf(torch.tensor([ids[bos_template:]]), labels=torch.tensor([ids[bos_template:]])).loss.item()
    assert got["tokens"] == len(ids) - 1 and got["loss"] == pytest.approx(expected, abs=1e-5)
    if bos_template:  # what the BOS changes is more than the tolerance
        assert abs(unframed - expected) > 1e-3

    assert llmc(["generate", str(tmp_path / "llmc"), "--prompt", "w5 w17 w200", "--max-new-tokens", "5",
                 "--json"]) == 0
    new = json.loads(capsys.readouterr().out)["token_ids"]
    prompt = hf_tokenizer("w5 w17 w200").input_ids
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=len(new), do_sample=False, eos_token_id=None, pad_token_id=0)
    assert len(new) >= 1 and new == theirs[0, len(prompt):].tolist()
