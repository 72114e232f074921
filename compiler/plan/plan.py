"""The Plan: everything resolved from a spec, as one versioned document (plan.json)."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from .params import ParamCount, count_params

if TYPE_CHECKING:
    from ..spec import Spec

PLAN_VERSION = 1


class Plan(BaseModel):
    """A resolved spec. `model_dump(mode="json")` is plan.json; the runtime reads nothing else."""

    version: int = Field(PLAN_VERSION, description="Version of this document's layout.")
    spec: dict[str, Any] = Field(description="The fully resolved spec (Spec.model_validate(plan['spec']) rebuilds it).")
    spec_hash: str = Field(description="sha256 of the resolved spec's canonical JSON.")
    params: ParamCount


def spec_hash(spec_json: dict) -> str:
    """A stable hash of a spec document (sorted keys, no whitespace)."""
    canonical = json.dumps(spec_json, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def build_plan(spec: Spec) -> Plan:
    """Resolve `spec` into a Plan: parameters, FLOPs, memory per device and the parallel layout."""
    spec_json = spec.model_dump(mode="json")
    return Plan(spec=spec_json, spec_hash=spec_hash(spec_json), params=count_params(spec.model))
