"""Processes and model wrapping: the process group from torchrun's environment, and `parallelize`.

`parallelize(model, plan, env)` is the one place where the plain model is wrapped for the plan's
layout. Today it applies DDP when dp > 1; the parallel runtime (`runtime/parallel/`) extends it
with FSDP / EP / PP / TP. The training loop never looks inside.
"""

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ...compiler.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_minutes: float = 30) -> DistEnv:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPU); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return DistEnv(rank, world, local, device)


def finish(env: DistEnv, code: int = 0) -> None:
    """End a rank. With several processes: after success, barrier and destroy the group; then
    leave at once (`os._exit` sidesteps an abort of gloo's teardown at interpreter exit on torch
    2.13). A failed rank leaves without the barrier, which ranks still in a collective would never
    reach: torchrun sees it exit and stops them."""
    if env.distributed and dist.is_initialized():
        if code == 0:
            dist.barrier()
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def layout_of(plan: dict, env: DistEnv) -> dict:
    """dp / micro_batch_size / grad_accum from the plan's layout.

    Plans written before the planner resolved a layout get the plain data-parallel one over the
    processes that were started (no tp/pp/ep).
    """
    train = plan["spec"]["train"]
    layout = plan.get("layout")
    if layout is None:
        dp = env.world_size
        mbs = train["micro_batch_size"]
        per_rank = train["global_batch_size"] // dp
        mbs = per_rank if mbs == "auto" else min(mbs, per_rank)
        layout = {"world_size": dp, "dp": dp, "tp": 1, "pp": 1, "ep": 1, "zero": 0,
                  "micro_batch_size": mbs, "grad_accum": max(1, per_rank // mbs)}
    if layout.get("world_size", env.world_size) != env.world_size:
        raise UserError(f"the plan is laid out for {layout['world_size']} processes but {env.world_size} started")
    if layout["dp"] * layout["micro_batch_size"] * layout["grad_accum"] != train["global_batch_size"]:
        raise UserError(f"layout dp x micro_batch_size x grad_accum = {layout['dp']} x {layout['micro_batch_size']} "
                        f"x {layout['grad_accum']} is not train.global_batch_size = {train['global_batch_size']}")
    return layout


def parallelize(model: torch.nn.Module, plan: dict, env: DistEnv) -> torch.nn.Module:
    """Wrap the model for the plan's layout: DDP over the data-parallel ranks when dp > 1;
    TP / EP / FSDP2 (zero >= 1) through the parallel runtime."""
    layout = layout_of(plan, env)
    if env.world_size > 1 and (layout.get("tp", 1) > 1 or layout.get("ep", 1) > 1 or layout.get("zero", 0) > 0):
        from ..parallel.run import wrap_for_plan
        return wrap_for_plan(model, {**plan, "layout": layout})
    if layout["dp"] > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside whatever `parallelize` wrapped around it."""
    return getattr(model, "module", model)


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
