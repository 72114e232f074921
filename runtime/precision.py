"""`train.precision` as the runtime computes it: the autocast a training forward runs under,
and the dtype of the residual stream.

One table for every path that runs a training or validation forward: the training loop's model
and the pipeline's stages (runtime/parallel/pipeline.py), so that a layout never changes the
precision a spec asked for. Weights stay fp32 (the master copy); FSDP2's param_dtype, where the
layout has it, is applied on top by runtime/parallel and does not replace the autocast.

Under bf16 the residual stream is bf16 in every layout, as FSDP2's bf16 param_dtype makes it
and as Megatron keeps it: the model casts its embeddings to bf16 under a bf16 autocast
(`autocast_stream_dtype`), and pipeline stages exchange bf16 (`stream_dtype`). Otherwise, with
fp32 weights, autocast would leave the stream in fp32, and each block would keep fp32 norm
inputs and a bf16 copy of a norm's output per projection reading it (q, k and v; gate and up):
1.5x the activations of the same block under FSDP2, and pipeline stages would send fp32. fp16
keeps an fp32 stream (fp16's range is too narrow for it).
"""

import contextlib

import torch

# fp8 runs under a bf16 autocast; its blocks' linear layers multiply in fp8 (runtime/float8.py).
# fp32 runs without autocast
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.bfloat16, "fp16": torch.float16}
STREAM_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.bfloat16}


def stream_dtype(precision: str) -> torch.dtype:
    """The residual stream's dtype under `precision` (what pipeline stages send each other)."""
    return STREAM_DTYPES.get(precision, torch.float32)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `t` run in now: the autocast's on `t`'s device, else `t`'s own."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def autocast_stream_dtype(t: torch.Tensor) -> torch.dtype:
    """The residual stream's dtype for a forward running now on `t`'s device: bf16 under a bf16
    autocast (however the weights are stored), else `t`'s own dtype."""
    return torch.bfloat16 if compute_dtype(t) == torch.bfloat16 else t.dtype


def autocast(device: torch.device, precision: str):
    """The autocast context of `precision` on `device`'s type (a no-op one for fp32)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class Fp32Buffers:
    """Mixin for an nn.Module whose buffers named in `fp32_buffers` stay fp32 when the module is
    cast (`model.to(torch.bfloat16)`); they still move with it. For values bf16 cannot hold: RoPE's
    inverse frequencies (in bf16, Llama-3's (head dim 128, theta 5e5) would turn position 1000 by
    angles up to 1.8 radians off) and the router's correction bias (its ~1e-3 updates are below
    bf16's resolution near 1)."""

    fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {name: getattr(self, name) for name in self.fp32_buffers if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype != torch.float32:
                setattr(self, name, before.to(after.device))
        return self
