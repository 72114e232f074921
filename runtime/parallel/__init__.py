"""Parallelism applied to a plain Transformer from outside, driven by the plan's layout.

    pdims = build_mesh(Layout.from_plan(plan))          # after init_distributed()
    stage = build_pipeline(model, pdims, ...)           # pp > 1 only: keeps this rank's layers
    model = parallelize(model, pdims, ...)              # TP, EP, then FSDP/DDP

Tensor parallel, expert parallel, then data parallel (FSDP2 or DDP) outermost. Activation
checkpointing and torch.compile wrap the blocks before (runtime/train/loop.py). The model code
knows nothing of any of it.
"""

from __future__ import annotations

import torch
from torch import nn

from .mesh import Layout, ParallelDims, build_mesh, init_distributed, rank_groups
from .state import clip_grad_norm_, measure_state_bytes, reduce_expert_counts

__all__ = ["Layout", "ParallelDims", "build_mesh", "init_distributed", "rank_groups", "parallelize",
           "clip_grad_norm_", "measure_state_bytes", "reduce_expert_counts"]


def parallelize(model: nn.Module, pdims: ParallelDims, *, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Apply the layout's TP, EP and data parallelism to `model` (already
    initialised identically on every rank, and already cut to its pipeline stage when pp > 1).

    Returns the module to train (a DDP wrapper for zero 0 with dp > 1, else `model` itself)."""
    layout = pdims.layout
    if layout.tp > 1:
        from .tensor import apply_tp
        apply_tp(model, pdims.sub("tp"), sequence_parallel=layout.sequence_parallel)
    if layout.ep > 1:
        from .expert import apply_ep
        apply_ep(model, pdims)
    if layout.dp > 1:
        from .data_parallel import apply_ddp, apply_fsdp, apply_replicate
        if layout.zero == 0 and layout.tp > 1:
            return apply_replicate(model, pdims.dp_mesh)
        if layout.zero == 0:
            return apply_ddp(model, pdims.dp_mesh)
        from .expert import shards_experts
        return apply_fsdp(model, pdims.dp_mesh, layout.zero, param_dtype, experts=shards_experts(layout))
    return model
