"""runtime/model/linear.py: the model's linear layers, fp32 CPU products on oneDNN.

The reference is F.linear in float64: a product and its gradients in fp32 are within fp32's
rounding of it, whichever library multiplies."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from llmc.runtime.model.linear import MIN_MACS, ONEDNN, Linear, linear, on_onednn

needs_onednn = pytest.mark.skipif(not ONEDNN, reason="oneDNN's matmul is used on x86 CPUs only")


def ops_run(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def fp64_reference(x, w, b, grad):
    x, w, b = (t.detach().double().requires_grad_() for t in (x, w, b))
    y = F.linear(x, w, b)
    y.backward(grad.double())
    return y, x.grad, w.grad, b.grad


# (rows, K, N): large enough for oneDNN (MIN_MACS), in 2-D and 3-D inputs, and one that is not
SHAPES = [((64, 512), 512), ((2, 32, 512), 512), ((7, 48), 80)]


@pytest.mark.parametrize("x_shape,n", SHAPES)
def test_linear_and_its_gradients_are_f_linear_in_fp32(x_shape, n):
    torch.manual_seed(0)
    x = torch.randn(*x_shape, requires_grad=True)
    w = torch.randn(n, x_shape[-1], requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    y = linear(x, w, b)
    grad = torch.randn_like(y)
    y.backward(grad)
    for got, ref in zip((y, x.grad, w.grad, b.grad), fp64_reference(x, w, b, grad)):
        assert got.dtype == torch.float32 and got.shape == ref.shape
        # fp32 sums of at most 512 terms of size ~1: within 1e-6 of the largest |value| (~25-35)
        assert (got.double() - ref).abs().max().item() < 1e-6 * max(1.0, ref.abs().max().item())


def test_frozen_inputs_get_no_gradient():
    x = torch.randn(64, 512, requires_grad=True)
    w = torch.randn(512, 512)  # frozen, as a base weight under adapters would be
    linear(x, w).sum().backward()
    assert x.grad is not None and w.grad is None
    assert torch.allclose(x.grad, w.sum(0).expand(64, 512), atol=1e-4)


@needs_onednn
def test_fp32_products_run_on_onednn_and_the_others_do_not():
    x, w = torch.randn(64, 512), torch.randn(512, 512)
    assert x.numel() * w.shape[0] >= MIN_MACS
    assert on_onednn(x, w) and "llmc::matmul_nt" in ops_run(lambda: linear(x, w))
    assert "llmc::matmul_nt" in ops_run(lambda: linear(x, w.t().contiguous().t()))
    # a small product (decode of a small model) stays with MKL: oneDNN's call costs more than it wins
    assert not on_onednn(x[:2, :256], w[:704, :256])
    assert "llmc::matmul_nt" not in ops_run(lambda: linear(x[:2, :256], w[:704, :256]))
    # bf16, and fp32 under autocast (which casts to bf16 first), stay with F.linear
    assert not on_onednn(x.bfloat16(), w.bfloat16())
    assert "llmc::matmul_nt" not in ops_run(lambda: linear(x.bfloat16(), w.bfloat16()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not on_onednn(x, w)
        assert linear(x, w).dtype == torch.bfloat16
    assert not on_onednn(x.double(), w.double())


@needs_onednn
def test_the_backward_runs_on_onednn():
    x, w = torch.randn(64, 512, requires_grad=True), torch.randn(512, 512, requires_grad=True)
    y = linear(x, w)
    names = ops_run(lambda: y.sum().backward())
    assert "llmc::matmul_nt" in names and "aten::mm" not in names


@pytest.mark.parametrize("m,k,n", [(64, 512, 512), (6, 10, 9)])
def test_linear_of_2d_inputs_is_a_times_b_transposed(m, k, n):
    a, b = torch.randn(m, k), torch.randn(n, k)
    assert torch.allclose(linear(a, b).double(), a.double() @ b.double().T, atol=1e-4)
    # a transposed view as b (the loss's input gradient, g @ w)
    w = torch.randn(k, n)
    assert torch.allclose(linear(a, w.t()).double(), a.double() @ w.double(), atol=1e-4)


def test_linear_module_is_an_nn_linear_with_its_state_dict():
    torch.manual_seed(0)
    ours = Linear(12, 5)
    torch.manual_seed(0)
    theirs = nn.Linear(12, 5)
    assert isinstance(ours, nn.Linear) and list(ours.state_dict()) == ["weight", "bias"]
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
    x = torch.randn(3, 12)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)


@needs_onednn
def test_a_compiled_layer_computes_and_trains_as_the_eager_one():
    """torch.compile keeps the op as one call (Inductor's own lowering of the kernel asserts frozen
    weights); the trainer compiles each block."""
    torch.manual_seed(0)
    layer = Linear(512, 512)
    x = torch.randn(64, 512, requires_grad=True)
    assert on_onednn(x, layer.weight)

    def loss(module):
        return (torch.relu(module(x)) ** 2).sum()

    loss(layer).backward()
    eager = [t.grad.clone() for t in (x, layer.weight, layer.bias)]
    x.grad = layer.weight.grad = layer.bias.grad = None
    compiled = torch.compile(layer)
    assert "llmc::matmul_nt" in ops_run(lambda: loss(compiled).backward())
    for got, ref in zip((x.grad, layer.weight.grad, layer.bias.grad), eager):
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4)
