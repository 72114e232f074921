"""fp8 training (`train.precision = "fp8"`): the blocks' linear layers multiply in float8.

What DeepSeek-V3 trains in fp8 (its report, section 3.3), with torchao's tensorwise scaling in
place of DeepSeek's 128-wide tiles: the input and the weight of each linear layer in a
Transformer block (attention projections, dense FFN, shared experts, and routed experts without
biases) are cast to float8 e4m3 with one scale per tensor, amax / 448 (per expert for the
experts' stacked weights); the gradient flowing back is cast to e5m2, amax / 57344, whose range
suits gradients under one scale. Products accumulate in fp32 and come out in bf16. What a layer
keeps for its weight gradient is its input in fp8: 1 byte a value, as the plan counts it, and one
copy per input tensor even when several projections read it (q, k and v; gate and up). The
embedding, the output head, the MoE router, the DSA indexer, the norms and the attention scores
stay in bf16 (the autocast that fp8 runs under, runtime/precision.py).

Where torch has fp8 matmuls (CUDA devices of compute capability 8.9 and up), `torch._scaled_mm`
does the dense products. Elsewhere, and for the routed experts' grouped products everywhere, the
fp8 operands are widened to bf16 with their scales and multiplied there: the same fp8 rounding
of the operands, no fp8 speed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.weak import WeakTensorKeyDictionary

from .model.linear import Linear
from .model.mlp import gated
from .model.moe import GroupedExperts

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
WIDE = torch.bfloat16
# Stay bf16: gating layers, as in DeepSeek-V3 (the MoE router, Qwen's shared-expert gate), and
# the DSA indexer, which reads detached copies of the block's tensors: fp8 copies of those would
# be kept beside the block's own
WIDE_LAYERS = ("router.gate", "shared_gate")


def to_fp8(t: torch.Tensor, dtype: torch.dtype, per_matrix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` scaled into `dtype`'s range and cast, and the fp32 scale that undoes it (t ~ fp8 * scale):
    one scale for the whole tensor, or one per matrix of a stacked [E, n, k] tensor."""
    t = t.detach()
    amax = t.abs().amax(dim=(-2, -1), keepdim=True) if per_matrix else t.abs().amax()
    fmax = torch.finfo(dtype).max
    scale = amax.float().clamp(min=1e-12) / fmax
    return (t.float() / scale).clamp_(-fmax, fmax).to(dtype), scale


def widen(t8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor back in bf16, scale applied."""
    return (t8.to(torch.float32) * scale).to(WIDE)


# The fp8 copy of each linear input, for the projections that read the same tensor. Keyed weakly
# by the tensor behind the input (under tensor parallelism each projection wraps the same local
# tensor in a DTensor of its own, or a view of it), so an entry lives as long as that tensor does;
# the tag tells apart views, placements and in-place edits (the version).
_inputs: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def input_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    local = x._local_tensor if isinstance(x, DTensor) else x
    root = local if local._base is None else local._base
    tag = (local._version, local.shape, local.stride(), local.storage_offset(), getattr(x, "placements", None))
    hit = _inputs.get(root)
    if hit is not None and hit[0] == tag:
        return hit[1], hit[2]
    x8, scale = to_fp8(x, E4M3)
    _inputs[root] = (tag, x8, scale)
    return x8, scale


def _has_scaled_mm(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.get_device_capability(t.device) >= (8, 9)


def fp8_mm(a8: torch.Tensor, sa: torch.Tensor, b8: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """(a8 * sa) @ (b8 * sb) in bf16, for a [M, K] and b [K, N] in fp8."""
    if _has_scaled_mm(a8) and all(n % 16 == 0 for n in (*a8.shape, b8.shape[1])):
        # the kernel wants a row-major, b column-major, and at most one operand in e5m2
        return torch._scaled_mm(a8.contiguous(), b8.t().contiguous().t(), scale_a=sa, scale_b=sb,
                                out_dtype=WIDE)
    return widen(a8, sa) @ widen(b8, sb)


class _Float8Linear(torch.autograd.Function):
    """x @ w^T with both in e4m3 and the gradient in e5m2; keeps x in fp8 and w (a parameter)."""

    @staticmethod
    def forward(ctx, x, weight):
        x8, sx = input_fp8(x)
        w8, sw = to_fp8(weight, E4M3)
        y = fp8_mm(x8.reshape(-1, x.shape[-1]), sx, w8.t(), sw)
        ctx.save_for_backward(x8, sx, weight)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x8, sx, weight = ctx.saved_tensors
        g8, sg = to_fp8(grad.reshape(-1, grad.shape[-1]), E5M2)
        w8, sw = to_fp8(weight, E4M3)   # cast again rather than keep an fp8 copy of every weight
        grad_x = fp8_mm(g8, sg, w8, sw).view(*x8.shape[:-1], weight.shape[1])
        grad_w = fp8_mm(g8.t(), sg, x8.reshape(-1, x8.shape[-1]), sx)
        return grad_x.to(grad.dtype), grad_w.to(weight.dtype)


class Float8Linear(nn.Linear):
    """nn.Linear whose product runs in fp8 (the same parameters and state-dict names)."""

    def forward(self, x):
        y = _Float8Linear.apply(x.to(WIDE), self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class _Float8Grouped(torch.autograd.Function):
    """Per-expert x @ w_e^T over rows sorted by expert (offs: their cumulative ends), w [E, N, K]."""

    @staticmethod
    def forward(ctx, x, weight, offs):
        x8, sx = input_fp8(x)
        w8, sw = to_fp8(weight, E4M3, per_matrix=True)
        y = torch._grouped_mm(widen(x8, sx), widen(w8, sw).transpose(-2, -1), offs=offs)
        ctx.save_for_backward(x8, sx, weight, offs)
        return y

    @staticmethod
    def backward(ctx, grad):
        x8, sx, weight, offs = ctx.saved_tensors
        g8, sg = to_fp8(grad, E5M2)
        w8, sw = to_fp8(weight, E4M3, per_matrix=True)
        g = widen(g8, sg)
        grad_x = torch._grouped_mm(g, widen(w8, sw), offs=offs)
        grad_w = torch._grouped_mm(g.t(), widen(x8, sx), offs=offs)
        return grad_x.to(grad.dtype), grad_w.to(weight.dtype), None


class Float8GroupedExperts(GroupedExperts):
    """GroupedExperts whose three grouped products run on fp8 operands."""

    def forward(self, x_sorted, tokens_per_expert):
        offs = tokens_per_expert.cumsum(0).to(torch.int32)
        x = x_sorted.to(WIDE)
        h = _Float8Grouped.apply(x, self.w1, offs)
        if self.w3 is not None:
            h = gated(self.activation, h, _Float8Grouped.apply(x, self.w3, offs))
        else:
            h = self.act(h)
        return _Float8Grouped.apply(h, self.w2, offs)


def apply_float8(model: nn.Module) -> int:
    """Make the linear layers of `model`'s blocks (layers and MTP blocks; gates excepted) and its
    routed experts (without biases) multiply in fp8, in place, keeping their parameters; returns
    how many modules changed. Applied before recompute and parallelisation wrap the blocks."""
    changed = 0
    for block in [*model.layers.values(), *(m.block for m in model.mtp)]:
        for name, module in block.named_modules():
            if type(module) in (nn.Linear, Linear) and not name.endswith(WIDE_LAYERS) and ".indexer." not in name:
                module.__class__ = Float8Linear
            elif type(module) is GroupedExperts and module.b1 is None:
                module.__class__ = Float8GroupedExperts
            else:
                continue
            changed += 1
    return changed
