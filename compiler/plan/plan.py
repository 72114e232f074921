"""The Plan: everything resolved from a spec, as one versioned document (plan.json)."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from ..errors import UserError
from .flops import Flops, count_flops
from .inference import InferenceMemory, inference_memory
from .layout import Layout, LayoutSearch, Search
from .memory import TrainMemory
from .params import ParamCount, count_params
from .suggest import no_fit_message

if TYPE_CHECKING:
    from ..spec import Spec

PLAN_VERSION = 1

CONVENTIONS = (
    "Ranks are ordered (pp, dp, tp), TP innermost: rank = (pp_rank*dp + dp_rank)*tp + tp_rank; "
    "dp*tp*pp = world_size. Expert parallelism is carved out of the dp*tp ranks of a stage: ep "
    "consecutive ranks form an EP group, and each expert shard is replicated (and ZeRO-sharded) over "
    "the edp = dp*tp/ep ranks at stride ep. Chunk s of `stages` runs on pipeline rank s % pp; chunk 0 "
    "holds the embedding, the last chunk the final norm, the head and the MTP modules.")


class Memory(BaseModel):
    train: TrainMemory | None = Field(description="The most loaded device under the chosen layout "
                                                  "(null when nothing fits).")
    train_stages: list[TrainMemory] | None = Field(description="Every pipeline rank under the chosen layout, index = pp "
                                                               "rank (its chunks under the interleaved schedule); "
                                                               "`train` is the most loaded of them.")
    inference: InferenceMemory


class Plan(BaseModel):
    """A resolved spec. `model_dump(mode="json")` is plan.json; the runtime reads nothing else."""

    version: int = Field(PLAN_VERSION, description="Version of this document's layout.")
    spec: dict[str, Any] = Field(description="The fully resolved spec (Spec.model_validate(plan['spec']) rebuilds it).")
    spec_hash: str = Field(description="sha256 of the resolved spec's canonical JSON.")
    params: ParamCount
    flops: Flops
    memory: Memory
    layout: Layout | None = Field(description="The chosen layout; null when nothing fits (see search.message).")
    search: Search
    conventions: str = CONVENTIONS


def spec_hash(spec_json: dict) -> str:
    """A stable hash of a spec document (sorted keys, no whitespace)."""
    canonical = json.dumps(spec_json, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def build_plan(spec: Spec, *, strict: bool = True) -> Plan:
    """Resolve `spec` into a Plan: parameters, FLOPs, memory per device and the parallel layout.

    When no layout fits, strict raises UserError with what would make it fit; otherwise the Plan
    comes back with `layout = None` and the explanation in `search.message`.
    """
    spec_json = spec.model_dump(mode="json")
    params = count_params(spec.model)
    search = LayoutSearch(spec, params)
    chosen, _, summary, closest = search.run()
    if chosen is None:
        summary.message = no_fit_message(spec, params, summary, closest)
        if strict:
            raise UserError(summary.message)
    # `spec` is the spec as loaded (extends and --set applied); its "auto" degrees are resolved in `layout`.
    return Plan(spec=spec_json, spec_hash=spec_hash(spec_json), params=params, flops=count_flops(spec, params),
                memory=Memory(train=search.train_memory(chosen) if chosen else None,
                              train_stages=search.stage_memory(chosen) if chosen else None,
                              inference=inference_memory(spec, params)),
                layout=search.layout(chosen) if chosen else None, search=summary)
