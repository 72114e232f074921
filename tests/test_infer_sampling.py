"""Sampling rules against hand-derived expectations, and the streaming detokeniser on multi-byte text."""

import math

import pytest
import torch

from llmc.compiler.errors import UserError
from llmc.runtime.infer.sampling import (SamplingParams, apply_repetition_penalty, filter_top_k, filter_top_p,
                                         make_generators, next_token_probs, sample)
from llmc.runtime.infer.stream import TextStream
from test_infer_checkpoints import one_thread, CHINESE, tokenizer  # noqa: F401


INF = float("-inf")


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    assert filter_top_k(logits, 2).tolist() == [[INF, 5.0, INF, 4.0, INF]]
    assert torch.equal(filter_top_k(logits, 0), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = probs.log()
    # cumulative 0.5, 0.7, 0.85: p = 0.7 keeps the first two, p = 0.71 the first three
    assert torch.isfinite(filter_top_p(logits, 0.7)).tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.71)).tolist() == [[True, True, True, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.3)).tolist() == [[True, False, False, False, False]]
    kept = next_token_probs(logits, SamplingParams(temperature=1.0, top_p=0.71))
    assert torch.allclose(kept, torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)


def test_repetition_penalty_follows_ctrl():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]
    # greedy with the penalty moves off a repeated argmax
    p = SamplingParams(repetition_penalty=3.0)
    assert sample(torch.tensor([[3.0, 2.0]]), p, torch.tensor([[True, False]])).item() == 1


def test_temperature_sampling_matches_softmax_frequencies():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    params = SamplingParams(temperature=0.7, seed=1)
    gen = make_generators(1, seed=1)
    n = 20000
    counts = torch.zeros(4)
    probs = next_token_probs(logits, params)
    draws = torch.multinomial(probs.expand(n, -1), 1, replacement=True, generator=gen[0]).squeeze(1)
    counts = torch.bincount(draws, minlength=4).float() / n
    expected = torch.softmax(logits[0] / 0.7, -1)
    assert torch.allclose(counts, expected, atol=4 * math.sqrt(0.25 / n))
    assert torch.allclose(probs[0], expected)


def test_greedy_is_argmax_and_seeded_sampling_repeats():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, SamplingParams()), logits.argmax(-1))
    p = SamplingParams(temperature=1.0, top_k=10, seed=7)
    a = [sample(logits, p, generators=make_generators(3, 7)).tolist() for _ in range(2)]
    assert a[0] == a[1]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(repetition_penalty=0), dict(max_new_tokens=-1),
                                 # NaN passed every `< 0` check, and then torch.multinomial raised
                                 dict(temperature=float("nan")), dict(temperature=float("inf")),
                                 dict(repetition_penalty=float("nan")), dict(repetition_penalty=float("inf"))])
def test_bad_sampling_parameters_are_user_errors(bad):
    with pytest.raises(UserError):
        SamplingParams(**bad)


# ---------------------------------------------------------------- streaming

def test_stream_multibyte_text_never_splits_a_character():
    tok = tokenizer(300)   # a small vocabulary: Chinese characters are split into byte tokens
    text = "Hi " + CHINESE + " 🙂 naïve café"
    ids = tok.encode(text).ids
    # the test is only meaningful if some token ends inside a character
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    stream = TextStream(tok)
    chunks = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(chunks) == text == stream.text
    assert all("\ufffd" not in c for c in chunks)
    # text arrives as it is produced: many chunks, not one at the end
    assert sum(1 for c in chunks if c) > len(text) // 4


def test_stream_cuts_at_a_stop_string_spanning_tokens():
    tok = tokenizer(300)
    text = "你好，世界！STOP here and more"
    stream = TextStream(tok, stop_strings=("世界！ST",))
    emitted = ""
    for i in tok.encode(text).ids:
        emitted += stream.push(i)
        if stream.stopped:
            break
    emitted += stream.finish()
    assert stream.stopped
    assert emitted == stream.text == "你好，"


def test_stream_after_a_prompt_keeps_sentencepiece_leading_spaces():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(["hello world this is a test of the metaspace tokenizer"] * 20,
                            trainers.BpeTrainer(vocab_size=80, show_progress=False))
    prompt = tok.encode("hello world").ids
    new = tok.encode("hello world this is a test").ids[len(prompt):]
    stream = TextStream(tok, prompt_ids=prompt)
    text = "".join(stream.push(i) for i in new) + stream.finish()
    assert text == " this is a test"
