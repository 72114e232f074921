"""Expert parallelism: each rank of an `ep` group holds n_experts / ep of every MoE layer's experts.

The model's MoE sorts its routed token copies by expert id and calls
`experts(x_sorted [M, D], tokens_per_expert [E])`. `apply_ep` wraps that call from outside with
two hooks on the GroupedExperts module:

  dispatch (pre-hook)  exchange the per-expert counts (all_to_all_single of E integers), then
                       send each rank the rows of its experts with `all_to_all_single_autograd`
                       (uneven splits; its backward is the reverse all-to-all), and regroup the
                       received rows by local expert;
  combine (post-hook)  undo the regrouping and send the outputs back with the reverse all-to-all.

Expert weights become the local slice [E/ep, ...] of the stacked weights (plain tensors, so the
optimizer and the trainer see ordinary parameters, marked `_llmc_expert_local`). Their gradients
are reduced over the expert-data-parallel group only: summed over `edp` and divided by the
number of data-parallel ranks whose mean losses the step averages (what DDP / FSDP do for the
other parameters). Under ZeRO 0 (or edp = 1) a gradient hook does it and the slices stay
replicated over edp; under ZeRO >= 1 with edp > 1 data_parallel.py shards them over the edp
mesh with FSDP2 (torchtitan's layout), whose reduce-scatter does it.

For checkpoints, `model.state_dict()` presents them as DTensors of the global stacked tensor
(`global_view`: Shard(0) over ep, then over edp when FSDP2 shards them), so DCP stores the
global tensor and any other layout can load it (`local_view` is the way back).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.tensor import DTensor, Shard, distribute_tensor


def shards_experts(layout) -> bool:
    """Whether FSDP2 shards expert states over the edp group (ZeRO >= 1, edp > 1) rather than
    keeping them replicated there."""
    return layout.ep > 1 and layout.edp > 1 and layout.zero >= 1


def moe_modules(model: nn.Module) -> list[nn.Module]:
    """Every MoE FFN of the model (main layers and MTP blocks)."""
    return [m for m in model.modules() if hasattr(m, "experts") and hasattr(m, "router")]


def expert_param_names(model: nn.Module) -> list[str]:
    """Names of the expert-parallel (rank-local) parameters of `model`."""
    return [n for n, p in model.named_parameters() if getattr(p, "_llmc_expert_local", False)]


class _Dispatch:
    """The all-to-all plan of one forward of one expert module (kept between the two hooks)."""

    def __init__(self, tokens_per_expert: torch.Tensor, group, ep: int):
        n_local = tokens_per_expert.numel() // ep
        send_counts = tokens_per_expert.to(torch.long)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)  # [src, local expert]
        recv = recv_counts.view(ep, n_local)
        self.input_splits = send_counts.view(ep, n_local).sum(1).tolist()
        self.output_splits = recv.sum(1).tolist()
        self.local_counts = recv.sum(0)
        # received rows come ordered (source rank, local expert); regroup by local expert
        segment = torch.repeat_interleave(torch.arange(ep * n_local, device=recv.device), recv.reshape(-1))
        self.order = (segment % n_local).argsort(stable=True)
        self.group = group


def _dispatch_hook(module, args):
    x_sorted, tokens_per_expert = args
    plan = _Dispatch(tokens_per_expert, module._llmc_ep_group, module._llmc_ep)
    module._llmc_dispatch = plan
    x_recv = all_to_all_single_autograd(x_sorted, plan.output_splits, plan.input_splits, plan.group)
    return x_recv[plan.order], plan.local_counts


def _combine_hook(module, args, y_local):
    plan = module._llmc_dispatch
    module._llmc_dispatch = None
    y_recv = torch.empty_like(y_local).index_copy(0, plan.order, y_local)  # inverse of [order]
    return all_to_all_single_autograd(y_recv, plan.input_splits, plan.output_splits, plan.group)


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, step = [], 1
    for n in reversed(shape):
        stride.append(step)
        step *= n
    return tuple(reversed(stride))


def global_view(experts: nn.Module, value: torch.Tensor) -> DTensor:
    """An expert parameter (or its optimizer state) as this rank holds it, as a DTensor of the
    global stacked tensor [E, ...]: a plain slice is Shard(0) over ep; an FSDP2 shard over edp of
    that slice is Shard(0), Shard(0) over (ep, edp), the edp shard of the ep shard."""
    if isinstance(value, DTensor):
        local, mesh, placements = value.to_local(), experts._llmc_shards_mesh, [Shard(0), Shard(0)]
    else:
        local, mesh, placements = value, experts._llmc_ep_mesh, [Shard(0)]
    shape = torch.Size([value.shape[0] * experts._llmc_ep, *value.shape[1:]])
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape,
                              stride=_contiguous_stride(shape))


def local_view(experts: nn.Module, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The way back: `value` (global_view's DTensor as DCP filled it, or a full [E, ...] tensor)
    laid out as `like`, the parameter or state this rank holds (plain slice or FSDP2 shard)."""
    if isinstance(value, DTensor):
        local = value.to_local()
        if isinstance(like, DTensor):
            return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                                      stride=like.stride())
        return local
    n_local = like.shape[0]
    if value.shape[0] == n_local * experts._llmc_ep:  # the full stacked tensor: this rank's experts
        lo = experts._llmc_ep_rank * n_local
        value = value[lo:lo + n_local]
    if isinstance(like, DTensor):  # its edp shard, cut as FSDP2 cuts (no communication)
        return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)
    return value


def _as_global_hook(module, state_dict, prefix, local_metadata):
    """state_dict(): the global stacked tensors, so that checkpoints do not depend on the layout."""
    for name, _ in module.named_parameters(recurse=False):
        key = prefix + name
        if key in state_dict:
            state_dict[key] = global_view(module, state_dict[key])
    return state_dict


def _from_global_hook(module, state_dict, prefix, *args):
    """load_state_dict(): a global (DTensor or full) stacked tensor into this rank's experts."""
    for name, p in module.named_parameters(recurse=False):
        key = prefix + name
        if state_dict.get(key) is not None:
            state_dict[key] = local_view(module, state_dict[key], p)


def _reduce_grad_hook(edp_group, n_data_ranks: int):
    def hook(grad):
        if edp_group is not None:
            grad = grad.clone()
            dist.all_reduce(grad, group=edp_group)
        return grad / n_data_ranks
    return hook


def apply_ep(model: nn.Module, pdims) -> nn.Module:
    """Shard every MoE layer's experts over the ep mesh and route tokens with all-to-all."""
    layout = pdims.layout
    ep, ep_mesh = layout.ep, pdims.sub("ep")
    ep_rank = pdims.coordinate("ep")
    edp_group = pdims.group("edp") if layout.edp > 1 else None
    hook = not shards_experts(layout)  # else FSDP2 reduces the gradients (data_parallel.py)
    for moe in moe_modules(model):
        experts = moe.experts
        n_experts = experts.w1.shape[0]
        if n_experts % ep:
            raise ValueError(f"ep = {ep} must divide n_experts = {n_experts}")
        n_local = n_experts // ep
        for name, p in list(experts.named_parameters(recurse=False)):
            local = nn.Parameter(p.detach()[ep_rank * n_local:(ep_rank + 1) * n_local].clone())
            local._llmc_expert_local = True
            if hook:
                local.register_hook(_reduce_grad_hook(edp_group, layout.dp))
            setattr(experts, name, local)
        experts._llmc_ep, experts._llmc_ep_rank = ep, ep_rank
        experts._llmc_ep_group, experts._llmc_ep_mesh = ep_mesh.get_group(), ep_mesh
        experts._llmc_edp_mesh = pdims.sub("edp")
        experts._llmc_shards_mesh = pdims.expert_shards["ep", "edp"] if pdims.expert_shards is not None else None
        experts.register_forward_pre_hook(_dispatch_hook)
        experts.register_forward_hook(_combine_hook)
        experts._register_state_dict_hook(_as_global_hook)
        experts._register_load_state_dict_pre_hook(_from_global_hook, with_module=True)
    return model
