"""The device mesh of a run, built from the plan's layout (never re-derived).

Global ranks are grouped with TP innermost, then data parallel, then pipeline outermost:

    rank = (pp_index * dp + dp_index) * tp + tp_index

which is the order of `init_device_mesh(..., ("pp", "dp_replicate", "dp_shard", "tp"))`.
Data parallelism is one of two named dims, by the ZeRO stage the plan chose: `dp_replicate`
(zero 0, DDP) or `dp_shard` (zero 1-3, FSDP2); the other has size 1.

Expert parallelism is carved out of the data-parallel ranks of a pipeline stage (the plan's
convention: ep divides dp x tp; the runtime supports it with tp = 1). The ranks of one stage,
in their global order, are cut into consecutive blocks of `ep` ranks: a block is one expert-
parallel group (`ep`); the ranks holding the same experts across blocks form the
expert-data-parallel group (`edp`, size dp / ep), over which expert gradients are reduced
(and, under ZeRO >= 1, expert states sharded). That second view is its own DeviceMesh
("pp", "edp", "ep") over the same ranks; with edp > 1 a third one, ("pp", "ep", "edp"), names
the global expert tensors as ep shards of edp shards for checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class Layout:
    """The plan's `layout` section, as the runtime uses it."""

    world_size: int = 1
    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    zero: int = 0
    micro_batch_size: int = 1
    grad_accum: int = 1
    stages: list = field(default_factory=list)   # [[layer indices of stage 0], ...]
    pp_schedule: str = "1f1b"
    pp_virtual_stages: int = 1
    sequence_parallel: bool = False

    @classmethod
    def from_plan(cls, plan: dict) -> "Layout":
        """Read plan["layout"] (and the [parallel] knobs of the resolved spec it carries)."""
        lay = dict(plan["layout"])
        par = plan.get("spec", {}).get("parallel", {})
        for key in ("pp_schedule", "pp_virtual_stages", "sequence_parallel"):
            if key not in lay and key in par:
                lay[key] = par[key]
        known = {k: lay[k] for k in cls.__dataclass_fields__ if k in lay}
        layout = cls(**known)
        layout.check()
        return layout

    def check(self):
        if self.dp * self.tp * self.pp != self.world_size:
            raise ValueError(f"layout dp x tp x pp = {self.dp}x{self.tp}x{self.pp} != world_size {self.world_size}")
        if self.ep > 1 and (self.dp * self.tp) % self.ep:
            raise ValueError(f"ep = {self.ep} must divide dp x tp = {self.dp * self.tp}")
        if self.ep > 1 and self.tp > 1:
            raise ValueError("expert parallelism together with tensor parallelism is not supported by the runtime")
        if self.pp > 1 and len(self.stages) != self.pp * self.pp_virtual_stages:
            raise ValueError(f"layout.stages has {len(self.stages)} stages, expected pp x virtual = "
                             f"{self.pp * self.pp_virtual_stages}")

    @property
    def edp(self) -> int:
        """Expert-data-parallel degree: ranks of a stage holding the same experts."""
        return self.dp * self.tp // self.ep


def rank_grid(layout: Layout) -> torch.Tensor:
    """Global ranks as a [pp, dp, tp] grid (TP innermost): the plan's rank grouping."""
    return torch.arange(layout.world_size).reshape(layout.pp, layout.dp, layout.tp)


@dataclass
class ParallelDims:
    """The meshes of a run and the questions the trainer asks of them."""

    layout: Layout
    world: DeviceMesh | None          # ("pp", "dp_replicate", "dp_shard", "tp"); None on one process
    experts: DeviceMesh | None        # ("pp", "edp", "ep"); None without expert parallelism
    expert_shards: DeviceMesh | None = None  # ("pp", "ep", "edp"), the same ranks; None unless ep, edp > 1

    @property
    def dp_mesh(self) -> DeviceMesh | None:
        """The data-parallel dim (replicate for zero 0, shard otherwise), or None when dp = 1."""
        if self.world is None or self.layout.dp == 1:
            return None
        return self.world["dp_replicate" if self.layout.zero == 0 else "dp_shard"]

    def sub(self, name: str) -> DeviceMesh | None:
        """A named 1-D sub-mesh (pp, tp, dp_replicate, dp_shard, ep, edp) or None when absent."""
        if name in ("ep", "edp"):
            return self.experts[name] if self.experts is not None else None
        return self.world[name] if self.world is not None else None

    def group(self, name: str):
        mesh = self.dp_mesh if name == "dp" else self.sub(name)
        return mesh.get_group() if mesh is not None else None

    def coordinate(self, name: str) -> int:
        """This rank's index along `name` (pp, dp, tp, ep, edp); 0 when the dim is absent."""
        if self.world is None:
            return 0
        rank = dist.get_rank()
        pp_i, rest = divmod(rank, self.layout.dp * self.layout.tp)
        dp_i, tp_i = divmod(rest, self.layout.tp)
        edp_i, ep_i = divmod(rest, self.layout.ep)
        return {"pp": pp_i, "dp": dp_i, "tp": tp_i, "ep": ep_i, "edp": edp_i}[name]

    @property
    def dp_rank(self) -> int:
        """The data shard this rank reads (every rank of a TP group and a PP column reads the same)."""
        return self.coordinate("dp")

    @property
    def dp_size(self) -> int:
        return self.layout.dp


def init_distributed(timeout_s: float = 300.0):
    """init_process_group from torchrun's environment (gloo on CPU, nccl on GPU), with a timeout
    so that a collective failing on one rank does not block the others forever."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def build_mesh(layout: Layout) -> ParallelDims:
    """The meshes of `layout`. Needs an initialised process group of layout.world_size ranks."""
    if layout.world_size == 1:
        return ParallelDims(layout, None, None)
    if not dist.is_initialized() or dist.get_world_size() != layout.world_size:
        found = dist.get_world_size() if dist.is_initialized() else 1
        raise RuntimeError(f"the plan's layout needs {layout.world_size} processes, found {found}; "
                           f"launch with torchrun --nproc-per-node {layout.world_size}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    replicate, shard = (layout.dp, 1) if layout.zero == 0 else (1, layout.dp)
    world = init_device_mesh(device, (layout.pp, replicate, shard, layout.tp),
                             mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp"))
    experts = shards = None
    if layout.ep > 1:
        grid = torch.arange(layout.world_size).reshape(layout.pp, layout.edp, layout.ep)
        experts = DeviceMesh(device, grid, mesh_dim_names=("pp", "edp", "ep"))
        if layout.edp > 1:  # ep outermost: [Shard(0), Shard(0)] on it is an edp shard of an ep shard
            shards = DeviceMesh(device, grid.permute(0, 2, 1), mesh_dim_names=("pp", "ep", "edp"))
    return ParallelDims(layout, world, experts, shards)


def rank_groups(layout: Layout) -> dict[str, list[list[int]]]:
    """The global-rank groups of each dim, as the plan reports them (for tests and the report)."""
    grid = rank_grid(layout)
    groups = {
        "tp": grid.reshape(-1, layout.tp).tolist(),
        "dp": grid.permute(0, 2, 1).reshape(-1, layout.dp).tolist(),
        "pp": grid.permute(1, 2, 0).reshape(-1, layout.pp).tolist(),
    }
    if layout.ep > 1:
        eg = torch.arange(layout.world_size).reshape(layout.pp, layout.edp, layout.ep)
        groups["ep"] = eg.reshape(-1, layout.ep).tolist()
        groups["edp"] = eg.permute(0, 2, 1).reshape(-1, layout.edp).tolist()
    return groups
