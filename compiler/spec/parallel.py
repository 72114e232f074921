"""`[parallel]`: the layout over the world size. `"auto"` degrees are chosen by the planner."""

from typing import Literal

from pydantic import Field, field_validator

from .base import Degree, Table, positive_or_auto


class ParallelSpec(Table):
    """`[parallel]`: degrees of data, tensor, pipeline and expert parallelism."""

    world_size: int | Literal["auto"] = Field("auto", description="Processes in the job (count); "
                                                                   "auto = hardware.nodes x gpus_per_node.")
    dp: Degree = Field("auto", description="Data-parallel degree (count) or auto.")
    tp: Degree = Field("auto", description="Tensor-parallel degree (count, within a node) or auto.")
    pp: Degree = Field("auto", description="Pipeline-parallel stages (count) or auto.")
    ep: Degree = Field("auto", description="Expert-parallel degree (count, carved out of dp x tp) or auto; "
                                           "above 1 only with tp = 1 (the runtime does not combine them).")
    zero: Literal[0, 1, 2, 3, "auto"] = Field("auto", description="ZeRO stage: 0 DDP, 1 optimizer, 2 +gradients, "
                                                                  "3 +weights (FSDP), or auto. Under pipeline "
                                                                  "parallelism a stage keeps its weights and "
                                                                  "gradients whole through the step at any stage.")
    sequence_parallel: bool = Field(True, description="Shard norm/dropout activations over the TP group.")
    pp_schedule: Literal["1f1b", "gpipe", "interleaved"] = Field("1f1b", description="Pipeline schedule.")
    pp_virtual_stages: int = Field(1, ge=1, description="Model chunks per pipeline rank (interleaved only).")

    @field_validator("dp", "tp", "pp", "ep", "world_size")
    @classmethod
    def _positive(cls, v):
        return positive_or_auto(v)
