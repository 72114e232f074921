"""Feed-forward networks: gated (SwiGLU, GeGLU: three matrices) and plain (two)."""

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear

ACTIVATIONS = {
    "swiglu": F.silu,
    "silu": F.silu,
    "geglu": F.gelu,  # exact GELU, as in Shazeer's "GLU Variants Improve Transformer"
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
GATED = ("swiglu", "geglu")
_GATE_BACKWARD = {  # d act(a) / da applied to a gradient
    "swiglu": torch.ops.aten.silu_backward,
    "geglu": lambda grad, a: torch.ops.aten.gelu_backward(grad, a),
}


class _GatedProduct(torch.autograd.Function):
    """act(a) * b keeping a and b for the backward and recomputing act(a) there; autograd would
    keep act(a) too: a third [tokens, hidden] tensor per gated FFN, which the plan does not count."""

    @staticmethod
    def forward(ctx, a, b, activation: str):
        ctx.save_for_backward(a, b)
        ctx.activation = activation
        return ACTIVATIONS[activation](a) * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = _GATE_BACKWARD[ctx.activation](grad * b, a)
        return grad_a, grad * ACTIVATIONS[ctx.activation](a), None


def gated(activation: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """act(a) * b of a gated FFN (`activation` in GATED), w1 x = a the gate, w3 x = b the up projection."""
    return _GatedProduct.apply(a, b, activation)


class MLP(nn.Module):
    """Gated: w2(act(w1 x) * w3 x). Plain: w2(act(w1 x)). w1 = gate (or up), w3 = up, w2 = down."""

    def __init__(self, d_model: int, hidden: int, activation: str, bias: bool = False):
        super().__init__()
        self.activation, self.act = activation, ACTIVATIONS[activation]
        self.w1 = Linear(d_model, hidden, bias=bias)
        self.w3 = Linear(d_model, hidden, bias=bias) if activation in GATED else None
        self.w2 = Linear(hidden, d_model, bias=bias)

    def forward(self, x):
        h = gated(self.activation, self.w1(x), self.w3(x)) if self.w3 is not None else self.act(self.w1(x))
        return self.w2(h)
