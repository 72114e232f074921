"""Optimizer and learning-rate schedule from `[train.optimizer]` / `[train.schedule]`.

AdamW (fused kernels where this torch build has them) with decoupled weight decay on matrices
only: norms, biases and other vectors (router correction biases) are not decayed.
"""

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, opt) -> torch.optim.Optimizer:
    """AdamW or SGD per the spec (`opt` is the OptimizerSpec)."""
    groups = param_groups(model, opt.weight_decay)
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.betas[0])
    kwargs = dict(lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)
    # parallel runtime: TP / EP layouts mix DTensor and plain parameters, which the fused and
    # foreach kernels refuse; the per-parameter loop handles both
    if len({type(p).__name__ == "DTensor" for p in model.parameters()}) > 1:
        return torch.optim.AdamW(groups, foreach=False, **kwargs)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # no fused kernel for this device / dtype
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def lr_factor(step: int, total: int, schedule) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based) of `total`.

    Linear warmup over warmup_steps, then cosine (or linear) decay to min_lr_ratio at the last step,
    or constant.
    """
    warmup = schedule.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if schedule.kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    floor = schedule.min_lr_ratio
    if schedule.kind == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, schedule, total_steps: int):
    """A LambdaLR over `lr_factor` (its state is the step count, saved in checkpoints)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, schedule))
