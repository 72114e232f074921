"""The parallel layout of a training run, as the training loop uses it.

    par = ParallelRun(plan)                      # after init_process_group (torchrun)
    model = par.wrap(model)                      # TP, EP, FSDP2 / DDP (pp = 1)
    data = TrainData(..., rank=par.data_rank, world=par.data_world)
    ...backward over the micro-batches...
    norm = par.clip_grad_norm_(model, max_norm)  # the global norm over every parallel dim
    counts = par.sum_expert_counts(counts)       # per-expert tokens over the data ranks
    report["model_states"] = par.model_states(model, optimizer)

With pp > 1 the step is the pipeline schedule's (`par.pipeline(...)`, then `pipe.step(tokens,
labels)` replaces the micro-batch loop; see pipeline.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..precision import stream_dtype
from . import parallelize
from .mesh import Layout, build_mesh
from .state import clip_grad_norm_, measure_state_bytes, reduce_expert_counts


class ParallelRun:
    """The meshes of the plan's layout and the cross-rank operations of a training step."""

    def __init__(self, plan: dict):
        self.plan = plan
        self.layout = Layout.from_plan(plan)
        self.pdims = build_mesh(self.layout)
        self.precision = plan["spec"]["train"]["precision"]

    @property
    def data_rank(self) -> int:
        """The data shard this rank reads: ranks of one TP group or one pipeline read the same."""
        return self.pdims.dp_rank

    @property
    def data_world(self) -> int:
        return self.layout.dp

    @property
    def param_dtype(self) -> torch.dtype | None:
        """FSDP2 computes in bf16 with fp32 master weights under bf16 / fp8 training."""
        fsdp = self.layout.zero > 0 and self.layout.dp > 1
        return torch.bfloat16 if self.precision in ("bf16", "fp8") and fsdp else None

    def wrap(self, model: nn.Module) -> nn.Module:
        """Apply the layout (pp = 1) to an initialised model; returns the module to train."""
        if self.layout.pp > 1:
            raise ValueError("pipeline parallelism runs through ParallelRun.pipeline, not wrap")
        return parallelize(model, self.pdims, param_dtype=self.param_dtype)

    def pipeline(self, model: nn.Module, micro_batch_size: int, seq_len: int):
        """This rank's pipeline stages (from the plan's stages) and their schedule."""
        from .pipeline import build_pipeline

        return build_pipeline(model, self.pdims, n_microbatches=self.layout.grad_accum,
                              micro_batch_size=micro_batch_size, seq_len=seq_len, schedule=self.layout.pp_schedule,
                              activation_dtype=stream_dtype(self.precision), precision=self.precision,
                              wrap=lambda m: parallelize(m, self.pdims, param_dtype=self.param_dtype))

    def clip_grad_norm_(self, modules, max_norm: float) -> float:
        """Clip to a global norm over every parallel dimension (max_norm <= 0: measure only)."""
        modules = modules if isinstance(modules, (list, tuple)) else [modules]
        params = [p for m in modules for p in m.parameters()]
        return clip_grad_norm_(params, max_norm, self.pdims if dist.is_initialized() else None).item()

    def sum_expert_counts(self, counts: torch.Tensor) -> torch.Tensor:
        return reduce_expert_counts(counts, self.pdims if dist.is_initialized() else None)

    def model_states(self, modules, optimizer) -> dict:
        """This rank's measured weight / gradient / optimizer bytes beside the plan's figures for
        its pipeline stage, and the plan's headline (the most loaded stage)."""
        modules = modules if isinstance(modules, (list, tuple)) else [modules]
        measured = {"weights": 0, "gradients": 0, "optimizer": 0}
        for m in modules:
            for k, v in measure_state_bytes(m, None).items():
                measured[k] += v
        measured["optimizer"] = measure_state_bytes(nn.Module(), optimizer)["optimizer"]
        memory = self.plan.get("memory", {})
        stages = memory.get("train_stages")
        mine = stages[self.pdims.coordinate("pp")] if stages else memory.get("train", {})
        return {"rank": dist.get_rank() if dist.is_initialized() else 0, "measured": measured,
                "plan": {k: mine.get(k) for k in measured}}


# ---------------------------------------------------------------- hooks of the training loop
# runtime/train calls these at its call sites (wrap, data slice, clip, final weights, report);
# the run's ParallelRun is kept here so the loop passes nothing but the model around.

_CURRENT: ParallelRun | None = None


def wrap_for_plan(model: nn.Module, plan: dict) -> nn.Module:
    """Apply the plan's layout (TP, EP, FSDP2 or DDP; not PP) to an initialised model."""
    global _CURRENT
    _CURRENT = ParallelRun(plan)
    return _CURRENT.wrap(model)


def pipeline_for_plan(model: nn.Module, plan: dict, micro_batch_size: int, seq_len: int):
    """This rank's pipeline stage(s) of the plan (pp > 1; several under the interleaved schedule),
    wrapped for the rest of the layout; `pipe.train_module()` is what the trainer holds."""
    global _CURRENT
    _CURRENT = ParallelRun(plan)
    return _CURRENT.pipeline(model, micro_batch_size, seq_len)


def data_rank(layout: dict, rank: int) -> int:
    """The data-parallel index of global `rank` (TP innermost, then dp, then pp)."""
    return (rank // layout.get("tp", 1)) % layout["dp"]


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Global gradient norm over every parallel dimension, clipped to max_norm (inf: measure)."""
    if _CURRENT is None:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
    return _CURRENT.clip_grad_norm_(model, max_norm if max_norm != float("inf") else 0.0)


def full_state_dict(model: nn.Module) -> dict:
    """The whole model's plain tensors (gathered from shards); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if _CURRENT is None:
        return getattr(model, "module", model).state_dict()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if _CURRENT.layout.pp > 1:  # each stage holds its own layers: gather them
        stages = [None] * _CURRENT.layout.pp
        dist.all_gather_object(stages, state, group=_CURRENT.pdims.group("pp"))
        state = {k: v for s in stages for k, v in s.items()}
    return state


def model_states(model: nn.Module, optimizer) -> dict | None:
    """Measured model-state bytes of every rank beside the plan's for its stage ("plan_per_rank"),
    and the plan's headline, the most loaded stage ("plan"); gathered to every rank."""
    run = _CURRENT
    if run is None:
        return None
    mine = run.model_states(model, optimizer)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    headline = run.plan.get("memory", {}).get("train", {})
    return {"plan": {k: headline.get(k) for k in mine["measured"]}, "per_rank": [r["measured"] for r in everyone],
            "plan_per_rank": [r["plan"] for r in everyone]}
