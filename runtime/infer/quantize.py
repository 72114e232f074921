"""Weight-only block-wise quantization (int8 / int4) with per-group scales, dequantised on the fly.

Format. A weight is flattened (row-major) and cut into groups of `group_size` consecutive values
(the last group padded with zeros). Each group has a scale (bf16) and, when asymmetric, a zero
point (uint8). Values are stored as unsigned codes: `w ~= (code - zero) * scale`, where symmetric
quantization uses the fixed zero 2^(bits-1) (so int8 codes are -127..127 shifted by 128, int4
codes -8..7 shifted by 8). Int4 codes are packed two per byte, the even element in the low nibble.

Bytes of one quantized weight of n values, g = group_size, G = ceil(n / g):
    codes  ceil(G*g * bits / 8)      scales 2*G      zero points G (asymmetric only)
Which weights: every Linear weight and any other parameter of rank >= 2 (routed experts stacked
[E, out, in]). Embeddings (token and learned positions, and so a tied head) stay in bf16, as do
vectors (norms, biases), 2 bytes per value. This is the planner's `memory.inference.weights`
int8/int4 formula (embedding + positions + norms at bf16, the rest at bits/8 plus a bf16 scale per
128 values); the two differ only by biases (bf16 here) and per-tensor padding of the last group.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from llmc.compiler.errors import UserError

from ..model.linear import Linear

SCALE_DTYPE = torch.bfloat16
SCALE_BYTES = 2


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 8
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise UserError(f"--bits must be 8 or 4 (found {self.bits})")
        if self.group_size < 2 or self.group_size % 2:
            raise UserError(f"--group-size must be an even number >= 2 (found {self.group_size})")

    @property
    def levels(self) -> int:
        return 2 ** self.bits


def weight_bytes(numel: int, cfg: QuantConfig) -> int:
    """Bytes one quantized weight of `numel` values takes on disk and in memory."""
    groups = math.ceil(numel / cfg.group_size)
    codes = groups * cfg.group_size * cfg.bits // 8
    return codes + groups * SCALE_BYTES + (0 if cfg.symmetric else groups)


def should_quantize(module: nn.Module, tensor: torch.Tensor) -> bool:
    """Matrices are quantized; vectors (norms, biases) are too small to be worth it, and an
    embedding is a lookup table read a row at a time (its bytes are not the decode bottleneck)."""
    return tensor.dim() >= 2 and tensor.is_floating_point() and not isinstance(module, nn.Embedding)


def _round_up_to_bf16(scale: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 >= scale, so that w / scale never leaves the code range."""
    s = scale.to(SCALE_DTYPE)
    low = s.float() < scale
    return torch.where(low, (scale * (1 + 2.0 ** -7)).to(SCALE_DTYPE), s)


def quantize_tensor(w: torch.Tensor, cfg: QuantConfig) -> dict[str, torch.Tensor]:
    """{codes (uint8, int4 packed), scales (bf16 [G]), zeros (uint8 [G], asymmetric only)}."""
    flat = w.detach().float().flatten()
    pad = (-flat.numel()) % cfg.group_size
    groups = F.pad(flat, (0, pad)).view(-1, cfg.group_size)
    top = cfg.levels - 1
    if cfg.symmetric:
        half = cfg.levels // 2
        scale = _round_up_to_bf16(groups.abs().amax(1).clamp_min(1e-12) / (half - 1))
        codes = (groups / scale.float()[:, None]).round().clamp(-half, half - 1) + half
        zeros = None
    else:
        lo, hi = groups.amin(1).clamp(max=0), groups.amax(1).clamp(min=0)   # keep 0 exactly representable
        scale = _round_up_to_bf16((hi - lo).clamp_min(1e-12) / top)
        zeros = (-lo / scale.float()).round().clamp(0, top)
        codes = ((groups / scale.float()[:, None]).round() + zeros[:, None]).clamp(0, top)
    codes = codes.to(torch.uint8).flatten()
    if cfg.bits == 4:
        codes = codes[0::2] | (codes[1::2] << 4)
    out = {"codes": codes, "scales": scale}
    if zeros is not None:
        out["zeros"] = zeros.to(torch.uint8)
    return out


def dequantize_tensor(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      shape: tuple[int, ...], cfg: QuantConfig, dtype=torch.float32) -> torch.Tensor:
    """The weight [shape] in `dtype` from its codes, scales and zero points."""
    if cfg.bits == 4:
        codes = torch.stack((codes & 0xF, codes >> 4), dim=-1).flatten()
    groups = codes.view(-1, cfg.group_size).float()
    zero = zeros.float()[:, None] if zeros is not None else float(cfg.levels // 2)
    w = (groups - zero) * scales.float()[:, None]
    return w.flatten()[:math.prod(shape)].view(shape).to(dtype)


class QuantWeight(nn.Module):
    """A quantized tensor kept as buffers; calling it returns the dequantised weight."""

    def __init__(self, shape: tuple[int, ...], cfg: QuantConfig, dtype=torch.float32):
        super().__init__()
        self.shape, self.cfg, self.dtype = tuple(shape), cfg, dtype
        n_groups = math.ceil(math.prod(shape) / cfg.group_size)
        self.register_buffer("codes", torch.zeros(n_groups * cfg.group_size * cfg.bits // 8, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(n_groups, dtype=SCALE_DTYPE))
        self.register_buffer("zeros", None if cfg.symmetric else torch.zeros(n_groups, dtype=torch.uint8))

    @classmethod
    def from_float(cls, w: torch.Tensor, cfg: QuantConfig) -> "QuantWeight":
        q = cls(tuple(w.shape), cfg, w.dtype)
        for name, t in quantize_tensor(w, cfg).items():
            getattr(q, name).copy_(t)
        return q

    def forward(self) -> torch.Tensor:
        return dequantize_tensor(self.codes, self.scales, self.zeros, self.shape, self.cfg, self.dtype)


class QuantLinear(nn.Module):
    """nn.Linear with a quantized weight, dequantised at each call (`.weight` gives it too).

    On CPU, torch's fused int4 matmul (tinygemm layout, bf16 activations, per-group scale and
    zero) runs instead, reading half a byte per weight: its value is `(q - 8) * scale + zero`.
    Int4 codes map onto it directly (zero = (8 - z) * scale; 0 when symmetric). A symmetric int8
    code u = 16 h + l (z = 128) is two int4 planes: h with scale 16 s and zero 0, l with scale s
    and zero 8 s, whose sum is (u - 128) s exactly (powers of two times a bf16 scale stay exact);
    each plane's bf16 product is summed in fp32. Asymmetric int8 dequantises (its zero point would
    not be exact in bf16). The packed planes are built on first use, so a model holds them beside
    its codes (int4: 1 byte per weight in memory, 0.5 on disk; int8: 2 and 1)."""

    KERNEL_GROUPS = (32, 64, 128, 256)

    def __init__(self, in_features: int, out_features: int, bias: bool, cfg: QuantConfig, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qweight = QuantWeight((out_features, in_features), cfg, dtype)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self._kernel = None
        self._register_load_state_dict_pre_hook(lambda *_: setattr(self, "_kernel", None))

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: QuantConfig) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, cfg, linear.weight.dtype)
        q.qweight = QuantWeight.from_float(linear.weight, cfg)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self._int4_planes()
        if kernel is None:
            return F.linear(x, self.qweight().to(x.dtype), self.bias)
        planes, group = kernel
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        parts = [torch._weight_int4pack_mm_for_cpu(x2, packed, group, scale_zero) for packed, scale_zero in planes]
        y = parts[0] if len(parts) == 1 else parts[0].float() + parts[1].float()
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y + self.bias if self.bias is not None else y

    def _int4_planes(self):
        """([(packed codes, scales-and-zeros)] per int4 plane, kernel group) for torch's CPU int4
        matmul, or None where it does not apply. The kernel's groups lie within rows; ours run
        over the flattened weight, so the kernel uses the largest group that divides both a row
        and ours (each of its groups then sits inside one of ours and takes that group's scale).
        The kernel packs output rows in blocks of 16."""
        cfg, qw = self.qweight.cfg, self.qweight
        n, k, g = self.out_features, self.in_features, cfg.group_size
        kernel_group = next((c for c in self.KERNEL_GROUPS[::-1] if k % c == 0 and g % c == 0), None)
        if (kernel_group is None or n % 16 or (cfg.bits == 8 and not cfg.symmetric) or qw.codes.device.type != "cpu"
                or not hasattr(torch, "_weight_int4pack_mm_for_cpu")):
            return None
        if self._kernel is None:
            chunk_start = torch.arange(n)[:, None] * k + torch.arange(k // kernel_group)[None, :] * kernel_group
            scale = qw.scales.float()[chunk_start // g]                       # [n, k / kernel_group]
            if cfg.bits == 4:
                codes = torch.stack((qw.codes & 0xF, qw.codes >> 4), dim=-1).flatten()
                zero = torch.zeros_like(scale) if qw.zeros is None else (8 - qw.zeros.float()[chunk_start // g]) * scale
                planes = [(codes, scale, zero)]
            else:
                planes = [(qw.codes >> 4, 16 * scale, torch.zeros_like(scale)), (qw.codes & 0xF, scale, 8 * scale)]
            self._kernel = ([(torch._convert_weight_to_int4pack_for_cpu(c[:n * k].view(n, k).to(torch.int32), 1),
                              torch.stack((s.t(), z.t()), dim=-1).to(torch.bfloat16).contiguous())
                             for c, s, z in planes], kernel_group)
        return self._kernel

    def extra_repr(self) -> str:
        c = self.qweight.cfg
        return f"in={self.in_features}, out={self.out_features}, int{c.bits}, group={c.group_size}"


class _Dequantize(nn.Module):
    """Parametrization for a non-Linear parameter (embedding, stacked experts): the module sees
    the dequantised weight under its usual name while only the quantized buffers are stored."""

    def __init__(self, qweight: QuantWeight):
        super().__init__()
        self.qweight = qweight

    def forward(self, _placeholder: torch.Tensor) -> torch.Tensor:
        return self.qweight()


def quantize_model(model: nn.Module, cfg: QuantConfig, structure_only: bool = False) -> nn.Module:
    """Replace, in place, every Linear by a QuantLinear and every other matrix parameter by an
    on-the-fly dequantisation of its quantized copy. Returns the model.

    structure_only: build empty quantized buffers (to load a quantized state dict into)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) in (nn.Linear, Linear):
                if structure_only:
                    q = QuantLinear(child.in_features, child.out_features, child.bias is not None, cfg,
                                    child.weight.dtype)
                else:
                    q = QuantLinear.from_linear(child, cfg)
                setattr(parent, child_name, q)
    for module in list(model.modules()):
        if isinstance(module, (QuantLinear, QuantWeight, _Dequantize)):
            continue
        for pname, p in list(module.named_parameters(recurse=False)):
            if should_quantize(module, p):
                qw = QuantWeight(tuple(p.shape), cfg, p.dtype) if structure_only else QuantWeight.from_float(p, cfg)
                _parametrize(module, pname, qw)
    return model.requires_grad_(False)


def set_compute_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Dequantise to `dtype` and keep the remaining float tensors in it (codes stay uint8)."""
    for module in model.modules():
        if isinstance(module, QuantWeight):
            module.dtype = dtype
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def _parametrize(module: nn.Module, pname: str, qweight: QuantWeight) -> None:
    # The placeholder original is an empty tensor: the real storage is qweight's buffers.
    setattr(module, pname, nn.Parameter(torch.empty(0, dtype=qweight.dtype), requires_grad=False))
    parametrize.register_parametrization(module, pname, _Dequantize(qweight), unsafe=True)
