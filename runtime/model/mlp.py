"""Feed-forward networks: gated (SwiGLU, GeGLU: three matrices) and plain (two)."""

import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "swiglu": F.silu,
    "silu": F.silu,
    "geglu": F.gelu,  # exact GELU, as in Shazeer's "GLU Variants Improve Transformer"
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
GATED = ("swiglu", "geglu")


class MLP(nn.Module):
    """Gated: w2(act(w1 x) * w3 x). Plain: w2(act(w1 x)). w1 = gate (or up), w3 = up, w2 = down."""

    def __init__(self, d_model: int, hidden: int, activation: str, bias: bool = False):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.w1 = nn.Linear(d_model, hidden, bias=bias)
        self.w3 = nn.Linear(d_model, hidden, bias=bias) if activation in GATED else None
        self.w2 = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x):
        h = self.act(self.w1(x))
        if self.w3 is not None:
            h = h * self.w3(x)
        return self.w2(h)
