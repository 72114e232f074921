"""Data parallelism: DDP for zero 0, FSDP2 `fully_shard` for zero 1-3.

ZeRO stages map onto FSDP2 as follows (compiler/plan/memory.py plans the same):
  zero 0  DDP: weights, gradients and optimizer state replicated; gradients all-reduced once
          per step. With tensor parallelism (DTensor weights, which DDP does not take) FSDP2's
          `replicate` does the same per block.
  zero 1  FSDP2: weights gathered at the step's first forward and kept; gradients accumulate
          unsharded (in fp32 under mixed precision) and are reduce-scattered once, at the
          step's last micro-batch; optimizer state (and the fp32 master weights) sharded.
  zero 2  as zero 1, but gradients are reduce-scattered every micro-batch and live sharded.
  zero 3  FSDP2 with reshard_after_forward=True: weights gathered per unit in forward and again
          in backward; gradients reduce-scattered every micro-batch.
`micro_batch` sets this per micro-batch of a step. Under pipeline parallelism torch's schedules
set it themselves: every stage defers its reduction to the last micro-batch and keeps its
weights gathered after backward, whatever the stage. At rest (between steps) FSDP2 keeps
weights sharded in every mode, so measured weight bytes at rest are 1/dp of the model for zero 1-3.

Expert parameters under expert parallelism follow the same mapping over their own group, the
expert-data-parallel (edp) ranks that hold the same experts (torchtitan's layout): for zero 1-3
with edp > 1 each MoE layer's experts are one FSDP2 unit over the edp mesh, inside their block's
unit. Otherwise (zero 0, or edp = 1) they are left alone here and expert.py's hook reduces their
gradients over edp.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from .expert import expert_param_names, moe_modules


def apply_ddp(model: nn.Module, dp_mesh) -> nn.Module:
    """Wrap `model` in DDP over the data-parallel mesh (expert-parallel params excluded).

    Buffers are not broadcast: the only trained buffers (aux-free routing biases) are updated
    on every rank from counts summed over ranks, so they stay equal without a broadcast.
    Gradients are views into DDP's all-reduce buckets from the start (DDP makes the gradients it
    finds at construction views, and `zero_grad` keeps them): otherwise the buckets are a second
    fp32 copy of every gradient, 4 bytes per parameter the plan does not count."""
    ignored = expert_param_names(model)
    if ignored:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    for name, p in model.named_parameters():
        if p.requires_grad and name not in ignored:
            p.grad = torch.zeros_like(p)
    return DistributedDataParallel(model, process_group=dp_mesh.get_group(), forward_sync_buffers=False,
                                   init_sync=True, gradient_as_bucket_view=True)


def apply_replicate(model: nn.Module, dp_mesh) -> nn.Module:
    """zero 0 over tensor-parallel (DTensor) weights, where DDP does not apply: FSDP2's
    `replicate` keeps full replicas over the dp mesh and all-reduces gradients, per block."""
    from torch.distributed._composable.replicate_with_fsdp import replicate

    ignored = {p for p in model.parameters() if getattr(p, "_llmc_expert_local", False)} or None
    blocks = list(model.layers.values()) + [m.block for m in getattr(model, "mtp", [])]
    for block in blocks:
        replicate(block, mesh=dp_mesh, ignored_params=ignored)
    replicate(model, mesh=dp_mesh, ignored_params=ignored)
    return model


def shard_experts(model: nn.Module, dp: int, mp: MixedPrecisionPolicy, reshard: bool) -> None:
    """fully_shard each MoE layer's local experts over the edp mesh (before their block).

    Their reduce-scatter sums over edp and divides by dp: the ep all-to-all already brought the
    gradients of the whole ep group's tokens, and the step averages the dp ranks' mean losses."""
    for moe in moe_modules(model):
        experts = moe.experts
        fully_shard(experts, mesh=experts._llmc_edp_mesh, mp_policy=mp, reshard_after_forward=reshard)
        experts.set_gradient_divide_factor(dp)
        if dist.get_backend(experts._llmc_edp_mesh.get_group()) == "gloo":  # no pre-multiplied sum there
            experts.set_force_sum_reduction_for_comms(True)
        for p in experts.parameters(recurse=False):  # FSDP2 made new Parameters (DTensor shards)
            p._llmc_expert_local = True


def apply_fsdp(model: nn.Module, dp_mesh, zero: int, param_dtype: torch.dtype | None = None,
               experts: bool = False) -> nn.Module:
    """fully_shard every block, the MTP modules, and the root (torchtitan's grouping); with
    `experts`, each MoE layer's experts over the edp mesh first (else they are ignored).

    param_dtype=torch.bfloat16 computes in bf16 with fp32 sharded master weights and fp32
    gradient reduction (MixedPrecisionPolicy)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    reshard = zero >= 3
    ignored = set()
    if experts:
        shard_experts(model, dp_mesh.size(), mp, reshard)
    else:
        ignored = {p for p in model.parameters() if getattr(p, "_llmc_expert_local", False)}
    kwargs = dict(mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard,
                  ignored_params=ignored or None)
    blocks = list(model.layers.values()) + [m.block for m in getattr(model, "mtp", [])]
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})  # root: used again at once
    return model


def zero_grad(wrapped: list[nn.Module], optimizer: torch.optim.Optimizer) -> None:
    """Clear the gradients after a step of the `wrapped` modules (the model, or the pipeline
    stages, as parallelized): DDP's in place, as they are views into its all-reduce buckets (set
    to None, the next step would accumulate new tensors beside the buckets and copy them in);
    every other layout's set to None, which frees them."""
    optimizer.zero_grad(set_to_none=not any(isinstance(m, DistributedDataParallel) for m in wrapped))


def micro_batch(model: nn.Module, zero: int, last: bool):
    """Context for one micro-batch's forward and backward (`last`: the step's last), setting when
    data parallelism gathers weights and reduces gradients, by ZeRO stage (see the module
    docstring). Not for pipeline stages: their schedule sets it."""
    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if last else model.no_sync()
    if isinstance(model, FSDPModule):
        if zero <= 1:  # replicate (zero 0 under TP) and zero 1: one reduction per step
            model.set_requires_gradient_sync(last)
        if zero in (1, 2):  # keep the weights gathered until the step's last backward
            model.set_reshard_after_backward(last)
    return contextlib.nullcontext()
