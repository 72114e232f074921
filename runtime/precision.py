"""`train.precision` as the runtime computes it: the autocast a training forward runs under.

One table for every path that runs a training or validation forward: the training loop's model
and the pipeline's stages (runtime/parallel/pipeline.py), so that a layout never changes the
precision a spec asked for. Weights stay fp32 (the master copy); FSDP2's param_dtype, where the
layout has it, is applied on top by runtime/parallel and does not replace the autocast.
"""

import contextlib

import torch

# fp8 computes as bf16 here: there are no fp8 matmuls in this runtime yet (the plan still sizes
# fp8's activation memory); fp32 runs without autocast
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The autocast context of `precision` on `device`'s type (a no-op one for fp32)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
