"""`[hardware]`: where the job runs. Accelerator names come from the compiler's catalog."""

import difflib

from pydantic import Field, field_validator

from ..plan.hardware import known_names, lookup
from .base import Table


def _node_holds_devices(accelerator, gpus_per_node):
    if accelerator not in known_names():
        return  # reported by the field's own check
    device = lookup(accelerator)
    if gpus_per_node > device.max_per_node:
        yield "gpus_per_node", (f"a node holds at most {device.max_per_node} {device.name} devices "
                                f"(expected <= {device.max_per_node}, found {gpus_per_node})")


class HardwareSpec(Table):
    """`[hardware]`: the devices, how many, and the assumed efficiency."""

    accelerator: str = Field("CPU", description="A device from the catalog (`llmc plan --hardware` lists them).")
    gpus_per_node: int = Field(1, ge=1, le=64, description="Devices (processes) per node (count).")
    nodes: int = Field(1, ge=1, description="Nodes (count).")
    interconnect: str = Field("default", description="Informational name of the inter-node fabric "
                                                     "(e.g. infiniband-400g); bandwidths come from the catalog "
                                                     "unless given below.")
    intra_node_gbps: float | None = Field(None, gt=0, description="Override: GB/s per device inside a node.")
    inter_node_gbps: float | None = Field(None, gt=0, description="Override: GB/s per device across nodes.")
    peak_tflops: float | None = Field(None, gt=0, description="Override: dense peak TFLOP/s per device "
                                                               "at the training precision.")
    mfu: float = Field(0.4, gt=0, le=1, description="Assumed model FLOPs utilisation for time estimates (0-1).")
    memory_reserve: float = Field(0.1, ge=0, lt=1, description="Fraction of device memory kept free "
                                                               "(CUDA context, fragmentation).")

    _checks = (_node_holds_devices,)

    @field_validator("accelerator")
    @classmethod
    def _known(cls, name: str) -> str:
        names = known_names()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown accelerator (expected one of {', '.join(names)}, found {name!r}){hint}")
        return name

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node
