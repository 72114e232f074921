"""The model's linear layers: `F.linear`, but fp32 products on an x86 CPU run on oneDNN.

PyTorch multiplies fp32 matrices on the CPU with MKL's sgemm. On an AMD CPU with AVX-512 (this
project's test machine, an EPYC) MKL runs at about half the rate the cores reach:
bench/bench_model_step.py measured 210 GFLOP/s for a 2048^3 product on 2 cores, where oneDNN
(Intel's deep-learning library, which torch ships for its bf16 products) reaches 450-480. The
model's products and their gradients gain as much: 512 training rows of any layer, or a row of a
4096 x 4096 layer, take oneDNN 0.45x - 0.55x as long. Both compute in fp32 (no reduced-precision
accumulation: about 1e-6 relative error against fp64, like MKL's).

So `linear` sends an fp32 product on an x86 CPU of at least MIN_MACS multiply-adds to oneDNN's
matmul (`torch.ops.mkldnn._linear_pointwise`, the kernel Inductor itself uses on CPUs), wrapped
as the custom op `llmc::matmul_nt` with its own backward: the input gradient g @ W and the weight
gradient g^T @ x are oneDNN products too, of transposed views (no copies). As a custom op it is
one opaque call to torch.compile, which would otherwise lower the kernel only for frozen weights.

Everything else is `F.linear` as before: CUDA, bf16 and fp16 (and fp32 under autocast, which casts
to bf16 first), tensor subclasses (DTensor under tensor or expert parallelism, fp8 weights), CPUs
of other architectures, and small products. A oneDNN call costs some 15-25 us more than MKL's (its
primitive's lookup, the custom op's dispatch), which a product below about 8M multiply-adds does
not win back: decoding 2 sequences of bench/bench_generate.py's 9.9M-parameter model (2 rows x
256 x 704) runs faster on MKL, while 8 rows x 256 x 8192 take oneDNN 0.65x as long.
"""

import platform
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
          and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
_PLAIN = (torch.Tensor, nn.Parameter)
MIN_MACS = 1 << 23  # multiply-adds of a product worth oneDNN's call (see the module docstring)


@torch.library.custom_op("llmc::matmul_nt", mutates_args=())
def matmul_nt(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b.T (+ bias) on oneDNN, in fp32: a [M, K], b [N, K], bias [N]; any strides."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


@matmul_nt.register_fake
def _(a, b, bias=None):
    return a.new_empty(a.shape[0], b.shape[0])


def _save(ctx, inputs, output):
    a, b, bias = inputs
    ctx.save_for_backward(a, b)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    a, b = ctx.saved_tensors
    grad_a = matmul_nt(grad, b.t()) if ctx.needs_input_grad[0] else None     # grad @ b
    grad_b = matmul_nt(grad.t(), a.t()) if ctx.needs_input_grad[1] else None  # grad^T @ a
    grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_a, grad_b, grad_bias


matmul_nt.register_autograd(_backward, setup_context=_save)


def on_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight.T (x [..., K], weight [N, K]) runs on oneDNN here (see the module docstring)."""
    return (ONEDNN and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.device.type == "cpu" and weight.device.type == "cpu"
            and type(x) in _PLAIN and type(weight) in _PLAIN and not torch.is_autocast_enabled("cpu")
            and x.numel() * weight.shape[0] >= MIN_MACS)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias), its fp32 CPU products on oneDNN."""
    if not on_onednn(x, weight) or (bias is not None and type(bias) not in _PLAIN):
        return F.linear(x, weight, bias)
    y = matmul_nt(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters, state-dict names and initialisation) whose forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
