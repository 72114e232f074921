"""Speculative decoding: greedy output is the target's own, the acceptance rule reproduces the
target's distribution exactly, and the `--draft` option of `llmc generate`."""

import json

import torch

from llmc.compiler.cli import main as llmc
from llmc.runtime.infer.generate import generate
from llmc.runtime.infer.sampling import SamplingParams
from llmc.runtime.infer.speculative import accept_prefix, speculative_generate
from test_infer_checkpoints import (one_thread, DENSE, DRAFT, checkpoint, random_model,  # noqa: F401
                                    spec_with, tokenizer)



def test_greedy_speculative_equals_the_target_alone():
    target = random_model(spec_with(DENSE), seed=1)
    draft = random_model(spec_with(DRAFT), seed=2)
    params = SamplingParams(max_new_tokens=20)
    for prompt in ([5, 17, 300, 2, 9], [77]):
        alone = generate(target, [prompt], params)[0].tokens
        for k in (1, 4):
            spec = speculative_generate(target, draft, prompt, params, k=k)
            assert spec.tokens == alone
            assert spec.proposed > 0


def test_a_draft_with_a_shorter_context_still_gives_the_targets_tokens():
    """Past the draft's context the target goes on alone: the output is the target's, as long as
    the target's context allows (it was cut at the draft's context, 11 of 40 tokens here, with
    stop_reason 'length'; a prompt longer than the draft's context was refused)."""
    target = random_model(spec_with(DENSE), seed=1)
    draft = random_model(spec_with(DRAFT[:-1] + ["model.max_seq_len=16", "train.seq_len=16"]), seed=2)
    params = SamplingParams(max_new_tokens=40)
    for prompt in ([5, 17, 300, 2, 9], list(range(3, 23))):   # 5 tokens, then 20: past the draft's 16
        alone = generate(target, [prompt], params)[0].tokens
        assert len(alone) == 40
        spec = speculative_generate(target, draft, prompt, params, k=4)
        assert spec.tokens == alone
    assert speculative_generate(target, draft, [5, 17, 300, 2, 9], params, k=4).proposed > 0


def test_a_draft_identical_to_the_target_is_always_accepted():
    target = random_model(spec_with(DENSE), seed=1)
    out = speculative_generate(target, target, [4, 5, 6], SamplingParams(max_new_tokens=21), k=4)
    assert out.acceptance_rate == 1.0 and len(out.tokens) == 21
    # 21 tokens in rounds of k + 1 = 5: four full rounds and a last one without proposals
    assert out.proposed == 16


def test_acceptance_rule_reproduces_the_target_distribution():
    # One position, V = 4: draw d ~ q, apply the rule; the first output token must follow p.
    p = torch.tensor([0.1, 0.4, 0.3, 0.2])
    q = torch.tensor([0.4, 0.1, 0.1, 0.4])
    bonus = torch.tensor([0.25, 0.25, 0.25, 0.25])
    gen = torch.Generator().manual_seed(0)
    n = 10000
    counts = torch.zeros(4)
    accepted = 0
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=gen))
        out = accept_prefix([d], [q], [p, bonus], gen)
        counts[out[0]] += 1
        accepted += len(out) == 2
    assert torch.allclose(counts / n, p, atol=0.02)          # 4 standard deviations
    # expected acceptance: sum_x min(p(x), q(x)) = 0.1 + 0.1 + 0.1 + 0.2
    assert abs(accepted / n - 0.5) < 0.02


def test_sampled_speculative_matches_target_sampling_statistics():
    # First generated token of a sampled run: speculative and plain generation agree in distribution.
    target = random_model(spec_with(DENSE), seed=1)
    draft = random_model(spec_with(DRAFT), seed=2)
    prompt = [5, 17, 300]
    logits = target(torch.tensor([prompt])).logits[0, -1]
    params = SamplingParams(max_new_tokens=2, temperature=1.0, top_k=3)   # one proposal, then the bonus
    p = torch.softmax(logits.topk(3).values, -1)
    top = logits.topk(3).indices.tolist()
    n = 200
    counts = torch.zeros(3)
    for seed in range(n):
        params.seed = seed
        first = speculative_generate(target, draft, prompt, params, k=1).tokens[0]
        counts[top.index(first)] += 1
    assert torch.allclose(counts / n, p, atol=4 * (0.25 / n) ** 0.5)


def test_generate_verb_with_a_draft_reports_acceptance(tmp_path, capsys):
    tok = tokenizer()
    target = checkpoint(tmp_path, DENSE, name="target", tok=tok)
    draft = checkpoint(tmp_path, DRAFT, name="draft", tok=tok, seed=3)
    assert llmc(["generate", str(target), "--prompt", "def f(", "--max-new-tokens", "10", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert llmc(["generate", str(target), "--prompt", "def f(", "--max-new-tokens", "10", "--json",
                 "--draft", str(draft)]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["token_ids"] == plain["token_ids"] and spec["text"] == plain["text"]
    assert 0.0 <= spec["acceptance_rate"] <= 1.0


def test_greedy_speculative_with_an_mla_moe_target_equals_the_target_alone():
    target = random_model(spec_with(["model.vocab_size=512", "model.max_seq_len=128"], "tiny_moe.toml"), seed=1)
    draft = random_model(spec_with(DRAFT), seed=2)
    params = SamplingParams(max_new_tokens=16)
    prompt = [5, 17, 300, 2, 9]
    alone = generate(target, [prompt], params)[0].tokens
    assert speculative_generate(target, draft, prompt, params, k=3).tokens == alone
