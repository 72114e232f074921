"""The chunked loss (runtime/model/loss.py) against torch's cross entropy over whole logits."""

import copy

import pytest
import torch
import torch.nn.functional as F

from llmc.compiler.plan.activations import loss_chunk_tokens
from llmc.compiler.spec import load_spec
from llmc.runtime.model import Transformer
from llmc.runtime.model.loss import chunked_cross_entropy
from llmc.runtime.precision import autocast
from llmc.runtime.train.loop import apply_recompute


def case(tokens=37, d=16, vocab=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(vocab, d, generator=g).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[::4] = -100
    return x, weight, labels


def reference(x, weight, labels):
    """torch's mean cross entropy over the whole logits in fp32, and its gradients."""
    x, weight = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    loss = F.cross_entropy(x @ weight.T, labels, ignore_index=-100)
    loss.backward()
    return loss.detach(), x.grad, weight.grad


@pytest.mark.parametrize("chunk", [1, 5, 36, 37, 1000])
def test_chunked_loss_and_gradients_equal_whole_logits(chunk):
    """Any chunk size, an uneven last chunk and ignored labels: torch's values in fp32."""
    x, weight, labels = case()
    loss = chunked_cross_entropy(x, weight, labels, chunk, torch.float32)
    (loss * 3).backward()  # the incoming gradient scales both
    want, want_x, want_w = reference(x, weight, labels)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, 3 * want_x, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, 3 * want_w, rtol=1e-5, atol=1e-7)


def test_every_label_ignored_gives_zero_loss_and_gradients():
    x, weight, labels = case()
    labels[:] = -100
    loss = chunked_cross_entropy(x, weight, labels, 8, torch.float32)
    loss.backward()
    assert loss.item() == 0.0
    assert not x.grad.any() and not weight.grad.any()


def test_chunked_bf16_is_as_close_to_fp32_as_whole_bf16_logits():
    """In bf16 (fp32 weights cast, as under autocast) the chunked gradients are as close to the
    fp32 ones as those of whole bf16 logits through torch's cross entropy."""
    x, weight, labels = case(tokens=256, d=64, vocab=512, dtype=torch.bfloat16)
    _, want_x, want_w = reference(x, weight, labels)
    chunked = [t.clone() for t in _grads(lambda: chunked_cross_entropy(x, weight, labels, 48, torch.bfloat16),
                                         x, weight)]
    whole = _grads(lambda: F.cross_entropy((x @ weight.bfloat16().T).float(), labels, ignore_index=-100), x, weight)
    for got, base, want in zip(chunked, whole, (want_x, want_w)):
        err = lambda t: ((t.float() - want).norm() / want.norm()).item()  # noqa: E731
        assert err(got) <= 1.1 * err(base) + 1e-4


def _grads(loss_fn, x, weight):
    x.grad = weight.grad = None
    loss_fn().backward()
    return x.grad, weight.grad


def test_model_with_a_chunked_loss_trains_like_whole_logits():
    """tiny_moe (MLA, MoE, an MTP head sharing the head): the same losses and gradients with the
    loss 7 tokens at a time, and no logits."""
    spec = load_spec("specs/tiny_moe.toml")
    torch.manual_seed(0)
    whole = Transformer(spec.model)
    whole.init_weights()
    chunked = copy.deepcopy(whole)
    chunked.loss_chunk = 7
    tokens = torch.randint(0, spec.model.vocab_size, (2, 24))
    labels = tokens.roll(-1, 1)
    labels[0, :5] = -100
    outs = []
    for model in (whole, chunked):
        with autocast(torch.device("cpu"), "fp32"):
            out = model(tokens, labels)
        out.loss.backward()
        outs.append(out)
    assert outs[0].logits is not None and outs[1].logits is None
    for key in ("lm_loss", "mtp_loss", "loss"):
        torch.testing.assert_close(getattr(outs[1], key), getattr(outs[0], key), rtol=1e-6, atol=0)
    for (name, p), q in zip(whole.named_parameters(), chunked.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_recompute_chunks_the_loss_by_the_plans_rule():
    spec = load_spec("specs/tiny.toml")
    for mode in ("none", "selective", "full"):
        model = Transformer(spec.model)
        apply_recompute(model, mode)
        assert model.loss_chunk == loss_chunk_tokens(mode, spec.model.vocab_size)
    assert loss_chunk_tokens("none", 128_256) == 0
    assert loss_chunk_tokens("full", 128_256) == 2092  # 2092 x 128,256 fp32 logits: just under 1 GiB
