"""What the trainer needs across ranks: the global gradient norm, summed expert counts, and the
per-rank bytes of model states measured from the local shards."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def clip_grad_norm_(params, max_norm: float, pdims) -> torch.Tensor:
    """Clip gradients to a global L2 norm over every parallel dimension; returns the norm.

    DTensor gradients (FSDP, TP) contribute their full norm; expert gradients (rank-local, or
    FSDP2 shards of the rank's experts over edp) are summed over the ep group too; each pipeline
    stage adds its own parameters over the pp group.
    Replicated plain gradients (DDP) count once, as does the last pipeline stage's copy of
    the embedding. max_norm <= 0 only measures."""
    params = [p for p in params if p.grad is not None]
    counted = [p for p in params if not getattr(p, "_llmc_pp_copy", False)]
    sq = torch.zeros((), dtype=torch.float64)
    expert_sq = torch.zeros((), dtype=torch.float64)
    for p in counted:
        g = p.grad
        if isinstance(g, DTensor):
            g_sq = torch.linalg.vector_norm(g.float()).full_tensor().double().square()
        else:
            g_sq = g.double().square().sum()
        if getattr(p, "_llmc_expert_local", False):
            expert_sq += g_sq
        else:
            sq += g_sq
    if pdims is not None and pdims.layout.ep > 1:
        dist.all_reduce(expert_sq, group=pdims.group("ep"))
    sq += expert_sq
    if pdims is not None and pdims.layout.pp > 1:
        dist.all_reduce(sq, group=pdims.group("pp"))
    total = sq.sqrt().float()
    if max_norm > 0:
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(scale.to(p.grad.device))
    return total


def reduce_expert_counts(counts: torch.Tensor, pdims) -> torch.Tensor:
    """Sum per-expert token counts over the data-parallel ranks (each counts its own tokens)."""
    if pdims is not None and pdims.layout.dp > 1:
        counts = counts.clone()
        dist.all_reduce(counts, group=pdims.group("dp"))
    return counts


def measure_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """Bytes of weights, gradients and optimizer state this rank holds, from its local shards.

    Optimizer state counts the per-parameter tensors (AdamW's exp_avg, exp_avg_sq, any master
    copy) and leaves out the scalar `step` counters."""
    weights = sum(_local(p).numel() * _local(p).element_size() for p in model.parameters())
    grads = sum(_local(p.grad).numel() * _local(p.grad).element_size()
                for p in model.parameters() if p.grad is not None)
    opt = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            for key, value in state.items():
                if key != "step" and torch.is_tensor(value):
                    opt += _local(value).numel() * _local(value).element_size()
    return {"weights": weights, "gradients": grads, "optimizer": opt}
