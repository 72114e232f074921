"""Rotary position embedding in the rotate-half layout (HF Llama / GPT-NeoX), with scaling.

The first half of each head's rotary dims pairs with the second half: dim i rotates with dim
i + d/2 at angle position * inv_freq[i]. Scaling kinds: linear (position interpolation),
llama3 (Llama-3.1's band-wise rescale) and yarn (NTK-by-parts interpolation plus an attention
temperature, as in the YaRN paper and DeepSeek-V2/V3).
"""

import math

import torch


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _yarn_correction_dim(n_rotations: float, dim: int, theta: float, max_pos: int) -> float:
    # the rotary dim index whose wavelength makes `n_rotations` turns over `max_pos` positions
    return (dim * math.log(max_pos / (n_rotations * 2 * math.pi))) / (2 * math.log(theta))


def rope_inv_freq(dim: int, rope) -> torch.Tensor:
    """Inverse frequencies [dim/2] (fp32) for rotary dims `dim` under `rope` (a RopeSpec)."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if rope.scaling == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.scaling == "llama3":
        old_len = rope.original_max_seq_len
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wavelen, inv_freq / rope.factor,
                               torch.where(wavelen < high_wavelen, inv_freq, smoothed))
    elif rope.scaling == "yarn":
        # NTK-by-parts: dims turning fast (> beta_fast rotations over the old context) keep their
        # frequency, slow ones (< beta_slow) are interpolated by 1/factor, a linear ramp between.
        old_len = rope.original_max_seq_len
        low = math.floor(_yarn_correction_dim(rope.beta_fast, dim, rope.theta, old_len))
        high = math.ceil(_yarn_correction_dim(rope.beta_slow, dim, rope.theta, old_len))
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # avoid a division by zero in the ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1 = extrapolate (keep the frequency), 0 = interpolate
        inv_freq = inv_freq / rope.factor * (1 - keep) + inv_freq * keep
    return inv_freq.float()


def rope_attention_factor(rope) -> float:
    """Multiplier on cos/sin (so q.k is scaled by its square): YaRN's temperature, else 1.

    With mscale_all_dim set (DeepSeek), the cos/sin factor is mscale(mscale)/mscale(mscale_all_dim)
    and the remaining temperature goes into the softmax scale instead (`softmax_scale_factor`).
    """
    if rope.scaling != "yarn":
        return 1.0
    if rope.mscale_all_dim:
        return yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    return yarn_mscale(rope.factor, rope.mscale)


def softmax_scale_factor(rope) -> float:
    """Extra factor on the attention softmax scale: DeepSeek's mscale_all_dim^2 under YaRN, else 1."""
    if rope.scaling == "yarn" and rope.mscale_all_dim:
        return yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return 1.0


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0,
                 dtype: torch.dtype = torch.float32):
    """The rotation tables apply_rope takes: cos and a signed sin, each [*positions.shape, 1, D]
    with D = 2 * len(inv_freq) and the 1 broadcasting over heads.

    Rotate-half layout: x' = x cos + rotate_half(x) sin with rotate_half(x) = [-x2 | x1]. That
    equals x cos + swap_halves(x) [-sin | sin], so the tables carry rotate_half's sign and every
    layer's rotation is one copy and one fused multiply-add; the model builds them once per forward.
    """
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device, torch.float32)
    cos, sin = angles.cos() * attention_factor, angles.sin() * attention_factor
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
    return cos.unsqueeze(-2).to(dtype), sin.unsqueeze(-2).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by rope_cos_sin's tables ([T, 1, D] or [B, T, 1, D])."""
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)
