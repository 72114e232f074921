"""DeepSeek-style models (MLA + MoE + MTP, with and without the DSA indexer) under generation:
the compressed cache's measured bytes equal the plan's figure, the absorbed cached path decodes
the same tokens as the uncached dense path, batches equal single prompts, and int8 weights agree
with the plan's inference-weights figure."""

import json

import pytest
import torch

from llmc.compiler.cli import main as llmc
from llmc.runtime.infer.cache import build_cache
from llmc.runtime.infer.generate import generate, generate_without_cache
from llmc.runtime.infer.sampling import SamplingParams
from test_infer_checkpoints import one_thread, checkpoint, plan_of, random_model, spec_with  # noqa: F401
from test_infer_quantize import stored_bytes

MLA = ["model.vocab_size=512", "model.max_seq_len=128"]
DSA = MLA + ["model.attention.index_n_heads=2", "model.attention.index_head_dim=32", "model.attention.index_topk=8"]
PROMPTS = [[5, 17, 300, 2, 9, 41, 7], [88, 3], [1] * 12 + [250, 251]]


@pytest.fixture(scope="module", params=["mla", "dsa"])
def spec(request):
    return spec_with(MLA if request.param == "mla" else DSA, "tiny_moe.toml")


def test_compressed_cache_bytes_equal_the_plan(spec):
    m = spec.model
    a = m.attention
    cache = build_cache(random_model(spec), batch=2, max_len=40, dtype=torch.bfloat16)
    # by hand: bf16 latent + rope key per layer; the indexer's fp8 keys with an fp32 scale per 128 dims
    per_token = m.n_layers * 2 * (a.kv_lora_rank + a.qk_rope_head_dim)
    if a.sparse:
        per_token += m.n_layers * (a.index_head_dim + 4)
    assert cache.nbytes() == per_token * 2 * 40
    assert cache.nbytes() == plan_of(spec)["memory"]["inference"]["kv_cache_bytes_per_token"] * 2 * 40
    # what MHA would hold for the same heads: 2 x heads x (qk or v dims) per layer
    mha = m.n_layers * 2 * m.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim)
    assert cache.nbytes() < mha * 2 * 40 / 4


def test_absorbed_cached_decoding_equals_uncached_dense_path(spec):
    # index_fp8=False: the indexer's keys stay exact, so its top-k (8 of up to 26 keys) is the
    # uncached model's; fp8 keys (the served format) may flip near-ties in that selection.
    model = random_model(spec, seed=4)
    params = SamplingParams(max_new_tokens=12)
    for prompt in PROMPTS:
        cached = generate(model, [prompt], params, index_fp8=False)[0].tokens
        assert cached == generate_without_cache(model, prompt, params)


def test_fp8_indexer_keys_select_nearly_the_same_tokens():
    model = random_model(spec_with(DSA, "tiny_moe.toml"), seed=4)
    params = SamplingParams(max_new_tokens=12)
    same = total = 0
    for prompt in PROMPTS:
        fp8 = generate(model, [prompt], params)[0].tokens
        exact = generate(model, [prompt], params, index_fp8=False)[0].tokens
        first_diff = next((i for i, (a, b) in enumerate(zip(fp8, exact)) if a != b), len(exact))
        same, total = same + first_diff, total + len(exact)
    assert same >= total // 2


def test_batch_rows_equal_prompts_alone(spec):
    model = random_model(spec, seed=5)
    params = SamplingParams(max_new_tokens=10)
    batch = generate(model, PROMPTS, params, keep_logits=True)
    for prompt, row in zip(PROMPTS, batch):
        alone = generate(model, [prompt], params, keep_logits=True)[0]
        assert row.tokens == alone.tokens
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(row.logits, alone.logits))


def test_int8_moe_checkpoint_matches_plan_and_generates(tmp_path, capsys):
    src = checkpoint(tmp_path, MLA, base="tiny_moe.toml")
    out = tmp_path / "int8"
    assert llmc(["quantize", str(src), "--bits", "8", "-o", str(out)]) == 0
    plan = json.loads((src / "plan.json").read_text())
    assert abs(stored_bytes(out) / plan["memory"]["inference"]["weights"]["int8"] - 1) < 0.01
    capsys.readouterr()
    assert llmc(["generate", str(out), "--prompt", "def", "--max-new-tokens", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] <= 5
