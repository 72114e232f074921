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
are reduced over the expert-data-parallel group only, by a hook: summed over `edp` and divided by
the number of data-parallel ranks whose mean losses the step averages (what DDP / FSDP do for
the other parameters). For checkpoints, `model.state_dict()` presents them as DTensors sharded
on dim 0 over the ep mesh, so DCP stores the global tensor and any other layout can load it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.tensor import DTensor, Shard


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


def _as_dtensor_hook(ep_mesh):
    def hook(module, state_dict, prefix, local_metadata):
        for name, p in module.named_parameters(recurse=False):
            key = prefix + name
            if key in state_dict and not isinstance(state_dict[key], DTensor):
                state_dict[key] = DTensor.from_local(state_dict[key], ep_mesh, [Shard(0)], run_check=False)
        return state_dict
    return hook


def _from_global_hook(module, state_dict, prefix, *args):
    """Loading a full (unsharded) stacked tensor into a local slice: take this rank's experts."""
    for name, p in module.named_parameters(recurse=False):
        key = prefix + name
        value = state_dict.get(key)
        if isinstance(value, DTensor):
            value = value.to_local()  # already this rank's experts (Shard(0) over the ep mesh)
        elif value is not None and value.shape[0] == p.shape[0] * module._llmc_ep:
            lo = module._llmc_ep_rank * p.shape[0]
            value = value[lo:lo + p.shape[0]]
        if value is not None:
            state_dict[key] = value


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
    for moe in moe_modules(model):
        experts = moe.experts
        n_experts = experts.w1.shape[0]
        if n_experts % ep:
            raise ValueError(f"ep = {ep} must divide n_experts = {n_experts}")
        n_local = n_experts // ep
        for name, p in list(experts.named_parameters(recurse=False)):
            local = nn.Parameter(p.detach()[ep_rank * n_local:(ep_rank + 1) * n_local].clone())
            local._llmc_expert_local = True
            local.register_hook(_reduce_grad_hook(edp_group, layout.dp))
            setattr(experts, name, local)
        experts._llmc_ep, experts._llmc_ep_rank = ep, ep_rank
        experts._llmc_ep_group, experts._llmc_ep_mesh = ep_mesh.get_group(), ep_mesh
        experts.register_forward_pre_hook(_dispatch_hook)
        experts.register_forward_hook(_combine_hook)
        experts._register_state_dict_hook(_as_dtensor_hook(ep_mesh))
        experts._register_load_state_dict_pre_hook(_from_global_hook, with_module=True)
    return model
