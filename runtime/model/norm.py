"""Normalisation layers: RMSNorm (weight only) and LayerNorm (weight + bias)."""

import torch
from torch import nn

from ..precision import compute_dtype


class _RMSNormFunction(torch.autograd.Function):
    """y = (x / sqrt(mean(x^2) + eps)).to(dtype) * weight.to(dtype), in fp32, y in x's dtype
    (in the autocast's for an fp32 x under fp16 autocast).

    Autograd through these ops would keep x's fp32 copy and the normalised x for the backward
    (with bf16 x: 6 bytes a value beside x itself); this keeps x, in its own dtype, and the fp32
    1 / rms of each row, and recomputes the rest: what the plan's activation memory counts.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        wide = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for a gradcheck
        rstd = torch.rsqrt(x.to(wide).pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight)
        if x.dtype == wide and compute_dtype(x) != wide:
            # an fp32 stream under autocast (fp16): the output only feeds projections, which
            # would each keep their own cast of it; cast it once
            return (x * rstd * weight.to(wide)).to(compute_dtype(x))
        return (x.to(wide) * rstd).to(x.dtype) * weight.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, rstd, weight = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd
        leading = tuple(range(x.dim() - 1))
        grad_weight = (grad_y.to(rstd.dtype) * normed).sum(leading).to(weight.dtype)
        grad_n = (grad_y * weight.to(grad_y.dtype)).to(rstd.dtype)
        grad_x = rstd * (grad_n - normed * (grad_n * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back (as Llama does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """Plain LayerNorm with weight and bias (GPT-2)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__(dim, eps=eps, elementwise_affine=True, bias=True)


def build_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """The spec's norm kind ("rmsnorm" | "layernorm") over `dim` features."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return LayerNorm(dim, eps)
    raise ValueError(f"unknown norm kind {kind!r}")
