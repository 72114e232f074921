"""When no layout fits: say by how much, and which changes would make the spec fit."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .formatting import GiB, gib_pair
from .hardware import CATALOG

if TYPE_CHECKING:
    from ..spec import Spec
    from .layout import Search
    from .params import ParamCount


def _with(spec: Spec, table: str, **changes) -> Spec:
    """A copy of `spec` with some keys of one table changed (no re-validation: used for what-ifs)."""
    return spec.model_copy(update={table: getattr(spec, table).model_copy(update=changes)})


def _fits(spec: Spec, params: ParamCount) -> bool:
    from .layout import LayoutSearch

    search = LayoutSearch(spec, params)
    too_big = set()
    for group in search.candidates():
        deg = group[-1]  # the most sharded ZeRO stage of this layout
        key = (deg.dp, deg.tp, deg.pp, deg.ep)
        if key in too_big:
            continue
        if search.evaluate(deg, timed=False).peak <= search.memory.capacity:
            return True
        too_big.add(key)  # a larger micro-batch of the same layout cannot fit either
    return False


def what_would_fit(spec: Spec, params: ParamCount) -> list[str]:
    """Single changes to the spec under which some layout fits (checked by searching again)."""
    ideas = []
    t, hw, par = spec.train, spec.hardware, spec.parallel
    if t.recompute != "full" and _fits(_with(spec, "train", recompute="full"), params):
        ideas.append('set train.recompute = "full"')
    if t.micro_batch_size not in ("auto", 1) and _fits(_with(spec, "train", micro_batch_size=1), params):
        ideas.append("set train.micro_batch_size = 1")
    fixed = [k for k in ("dp", "tp", "pp", "ep", "zero") if getattr(par, k) != "auto"]
    if fixed:
        released = _with(spec, "parallel", **{k: "auto" for k in fixed})
        if _fits(released, params):
            ideas.append("set " + ", ".join(f"parallel.{k}" for k in fixed) + ' to "auto" (let the planner choose)')
    for factor in (2, 4, 8, 16):
        bigger = _with(spec, "hardware", nodes=hw.nodes * factor)
        if par.world_size != "auto" or par.dp != "auto":
            bigger = _with(bigger, "parallel", world_size="auto", dp="auto")
        if _fits(bigger, params):
            ideas.append(f"use hardware.nodes = {hw.nodes * factor} ({hw.nodes * factor * hw.gpus_per_node} devices)")
            break
    current = CATALOG.get(hw.accelerator)
    for name, device in sorted(CATALOG.items(), key=lambda kv: kv[1].memory_bytes):
        if device.kind != "gpu" or (current and device.memory_bytes <= current.memory_bytes):
            continue
        if _fits(_with(spec, "hardware", accelerator=name, gpus_per_node=min(hw.gpus_per_node, device.max_per_node)),
                 params):
            ideas.append(f'use hardware.accelerator = "{name}"')
            break
    return ideas


def no_fit_message(spec: Spec, params: ParamCount, search: Search, closest) -> str:
    """The explanation printed when nothing fits."""
    world = spec.world_size
    if closest is None:
        reasons = "; ".join(f"{k} ({search.examples[k]})" for k in search.rejected) or "no candidates"
        head = f"no parallel layout satisfies the rules for {world} devices: {reasons}"
    else:
        from .layout import LayoutSearch

        m, d = LayoutSearch(spec, params).memory.as_model(closest.memory_bytes, closest.rank), closest.degrees
        need, capacity = gib_pair(m.peak, m.capacity)
        head = (f"{spec.model.n_layers}-layer model with {params.total / 1e9:,.1f}B parameters does not fit on "
                f"{world} x {spec.hardware.accelerator}: the layout closest to fitting (dp={d.dp} tp={d.tp} pp={d.pp} "
                f"ep={d.ep} zero={d.zero} micro_batch_size={d.micro_batch_size}) needs {need} GiB "
                f"per device (weights {m.weights / GiB:,.1f}, gradients {m.gradients / GiB:,.1f}, optimizer "
                f"{m.optimizer / GiB:,.1f}, activations {m.activations / GiB:,.1f}, temporary "
                f"{m.temporary / GiB:,.1f}, reserve {m.overhead / GiB:,.1f}) of {capacity} GiB")
    ideas = what_would_fit(spec, params)
    tail = ("; any one of these would make it fit: " + "; ".join(ideas)) if ideas else \
        "; no single change tried (full recompute, micro-batch 1, up to 16x the nodes, a larger device) fits it"
    return head + tail
