"""`llmc plan` and `llmc hardware`: a Plan as rich tables, markdown (templates/plan.md.j2) or JSON.

Exit codes of `llmc plan`: 0 when a layout fits; 1 when none does — the report (parameters,
FLOPs, inference memory) is still printed, followed by why nothing fits and what would.
"""

from __future__ import annotations

import json
import sys

from .plan.formatting import (GiB, duration, flops_rows, gib, human, memory_rows, param_rows, stage_rows,
                              stored_note, total_rows)
from .spec import load_spec, print_warnings

BAR_WIDTH = 40
COLOURS = {"weights": "blue", "gradients": "magenta", "optimizer": "yellow", "activations": "green",
           "temporary": "cyan", "reserve (overhead)": "bright_black"}


def main(args) -> int:
    spec = load_spec(args.spec, args.overrides)
    print_warnings(spec)
    if args.formula:
        print_formulas(spec)
        return 0
    from .plan import build_plan

    plan = build_plan(spec, strict=False)
    if args.format == "json":
        print(json.dumps(plan.model_dump(mode="json"), indent=2))
    elif args.format == "markdown":
        print(render_markdown(plan))
    else:
        print_tables(plan, args.spec)
    if plan.layout is None:
        print(f"error: {plan.search.message}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- markdown

def render_markdown(plan) -> str:
    """The plan through templates/plan.md.j2."""
    from importlib import resources

    import jinja2

    source = resources.files("llmc.templates").joinpath("plan.md.j2").read_text(encoding="utf-8")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters.update(human=human, gib=gib, duration=duration)
    return env.from_string(source).render(
        plan=plan, spec=plan.spec, params=param_rows(plan), totals=total_rows(plan), stored_note=stored_note(plan),
        flops=flops_rows(plan), memory=memory_rows(plan), stages=stage_rows(plan) if plan.layout else [], GiB=GiB)


# --------------------------------------------------------------------------- terminal

def print_tables(plan, path: str) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    m = plan.spec["model"]
    console.print(f"[bold]llmc plan[/bold] {path}  ·  {m['n_layers']} layers, d_model {m['d_model']}, "
                  f"{m['attention']['kind']} attention{', MoE' if m.get('moe') else ''}  ·  spec {plan.spec_hash[:12]}"
                  + (f"  ·  starts from {start}" if (start := plan.spec["train"].get("init_from")) else ""))

    t = Table(title="Parameters", title_justify="left")
    t.add_column("component")
    t.add_column("count", justify="right")
    t.add_column("share", justify="right")
    for row in param_rows(plan):
        t.add_row(*row)
    t.add_section()
    for name, exact, short in total_rows(plan):
        t.add_row(name, exact, short)
    console.print(t)
    kinds = Table(title="Per block kind", title_justify="left")
    for col in ("kind", "blocks", "params / block", "active / block", "attention", "indexer", "ffn / experts"):
        kinds.add_column(col, justify="right" if col != "kind" else "left")
    for name, k in plan.params.layer_kinds.items():
        c = k.per_layer
        ffn = human(c["mlp"]) if name == "dense" else (f"{human(c['experts'])} + shared {human(c['shared_experts'])}"
                                                        f" + router {human(c['router'])}")
        kinds.add_row(name, str(k.layers), human(k.per_layer_total), human(k.active_per_layer),
                      human(c["attention"]), human(c["indexer"]), ffn)
    console.print(kinds)
    note = stored_note(plan)
    if note:
        console.print(Text(note, style="italic"))

    t = Table(title="FLOPs and time", title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for row in flops_rows(plan):
        t.add_row(*row)
    console.print(t)

    _print_memory(console, plan)
    _print_layout(console, plan)


def _print_memory(console, plan) -> None:
    from rich.table import Table
    from rich.text import Text

    train = plan.memory.train
    if train is not None:
        t = Table(title=f"Training memory per device (pipeline stage {train.stage}, the most loaded)",
                  title_justify="left")
        t.add_column("part")
        t.add_column("GiB", justify="right")
        t.add_column(f"of {gib(train.capacity)}")
        bar = Text()
        for name, value in memory_rows(plan):
            cells = round(BAR_WIDTH * value / train.capacity)
            bar.append("█" * cells, style=COLOURS[name])
            t.add_row(name, f"{value / GiB:,.2f}", Text("█" * cells, style=COLOURS[name]))
        t.add_section()
        bar.append("·" * max(0, BAR_WIDTH - len(bar.plain)), style="bright_black")
        t.add_row("peak", f"{train.peak / GiB:,.2f}", bar)
        console.print(t)
        console.print(f"micro-batches in flight on that stage: {train.in_flight_micro_batches:g}; "
                      f"{'fits' if train.fits else 'DOES NOT FIT'} ({train.peak / train.capacity:.0%} of the device)")
    inf = plan.memory.inference
    t = Table(title=f"Inference on one node ({inf.devices} devices, {gib(inf.capacity)} usable)", title_justify="left")
    for col in ("weights", "bytes", "cached tokens that fit", "batch at max_seq_len"):
        t.add_column(col, justify="right" if col != "weights" else "left")
    for name, w in inf.weights.items():
        t.add_row(name, gib(w), f"{inf.max_cached_tokens[name]:,}", f"{inf.max_batch_at_max_seq_len[name]:,}")
    console.print(t)
    parts = ", ".join(f"{k} {v:,}" for k, v in inf.kv_cache_breakdown.items())
    console.print(f"KV cache: {inf.kv_cache_bytes_per_token:,} bytes per token ({parts})")


def _print_layout(console, plan) -> None:
    from rich.table import Table

    lay, search = plan.layout, plan.search
    if lay is not None:
        t = Table(title="Parallel layout", title_justify="left", show_header=False)
        t.add_column(style="bold")
        t.add_column()
        fixed = ", ".join(f"{k}={v}" for k, v in search.fixed.items()) or "none"
        t.add_row("world", f"{lay.world_size:,} = {lay.nodes:,} nodes x {lay.procs_per_node} processes")
        t.add_row("degrees", f"dp {lay.dp} · tp {lay.tp} · pp {lay.pp} · ep {lay.ep}"
                             f"{f' (edp {lay.edp})' if lay.ep > 1 else ''} · "
                             f"ZeRO-{lay.zero}  (fixed by the spec: {fixed})")
        t.add_row("batch", f"micro-batch {lay.micro_batch_size} x {lay.grad_accum} accumulation x dp {lay.dp}; "
                           f"sequence parallel {'on' if lay.sequence_parallel else 'off'}; {lay.pp_schedule}")
        for dim, g in lay.groups.items():
            if g.size > 1 and (dim != "edp" or lay.ep > 1):
                where = "inside a node" if g.within_node else "across nodes"
                first = ", ".join(map(str, g.first)) + (", ..." if g.size > len(g.first) else "")
                t.add_row(f"{dim} groups", f"{g.count:,} of {g.size}, stride {g.stride}, {where}; first: [{first}]")
        for label, text in stage_rows(plan):
            t.add_row(label, text)
        b = lay.time_breakdown
        t.add_row("step time", f"{duration(lay.step_time_s)} = compute {duration(b['compute'])} + bubble "
                               f"{duration(b['bubble'])} + tp {duration(b['tp_comm'])} + ep {duration(b['ep_comm'])} + "
                               f"pp {duration(b['pp_comm'])} + exposed dp {duration(b['dp_comm'])}")
        console.print(t)
    if search.alternatives:
        t = Table(title="Next best layouts", title_justify="left")
        for col in ("dp", "tp", "pp", "ep", "zero", "micro-batch", "step", "slower", "peak"):
            t.add_column(col, justify="right")
        for a in search.alternatives:
            t.add_row(str(a.dp), str(a.tp), str(a.pp), str(a.ep), str(a.zero), str(a.micro_batch_size),
                      duration(a.step_time_s), f"+{a.slower_by:.1%}", gib(a.peak_bytes))
        console.print(t)
    if search.rejected:
        t = Table(title=f"Rejected ({search.considered:,} layouts follow the rules, {search.evaluated:,} evaluated, "
                        f"{search.fitting:,} fit)",
                  title_justify="left")
        t.add_column("reason")
        t.add_column("count", justify="right")
        t.add_column("example")
        for reason, count in search.rejected.items():
            t.add_row(reason, f"{count:,}", search.examples[reason])
        console.print(t)


# --------------------------------------------------------------------------- --formula

def print_formulas(spec) -> None:
    """The closed-form parameter counts in the spec's symbols (sympy), with the symbols' values."""
    from rich.console import Console
    from rich.table import Table

    from .plan.params import SYMBOLS, formulas

    m = spec.model
    f = formulas(m)
    subs = f["values"]
    values = {sym.name: v for sym, v in subs.items()}
    console = Console()
    t = Table(title="Parameters in closed form", title_justify="left")
    t.add_column("count")
    t.add_column("formula")
    t.add_column("value", justify="right")
    rows = [(k, v) for k, v in f["components"].items() if v != 0] + [("total", f["total"]), ("active", f["active"])]
    for name, expr in rows:
        t.add_row(name, str(readable(expr)), f"{int(expr.subs(subs)):,}")
    console.print(t)
    legend = Table(title="Symbols", title_justify="left")
    legend.add_column("symbol")
    legend.add_column("spec")
    legend.add_column("value", justify="right")
    used = set().union(*(e.free_symbols for _, e in rows))
    for sym, field in SYMBOLS.items():
        if any(s.name == sym for s in used):
            legend.add_row(sym, field, f"{values[sym]:,}")
    console.print(legend)


def readable(expr):
    """Group a polynomial by the layer counts, each coefficient factored: L_moe*(...) + L_dense*(...) + ..."""
    import sympy

    layers = sorted((s for s in expr.free_symbols if s.name == "L" or s.name.startswith("L_")), key=lambda s: s.name)
    if not layers:
        return sympy.factor(expr)
    return sympy.collect(sympy.expand(expr), layers, func=sympy.factor)


def hardware_main(args) -> int:
    """`llmc hardware`: the accelerator catalog."""
    from rich.console import Console
    from rich.table import Table

    from .plan.hardware import ALIASES, CATALOG

    t = Table(title="Accelerator catalog: dense peak TFLOP/s; node / net: GB/s per device, one direction", title_justify="left")
    for col in ("name", "GiB", "bf16", "fp8", "tf32", "node", "net", "per node", "aliases"):
        t.add_column(col, justify="left" if col in ("name", "aliases") else "right", no_wrap=col == "name")
    for name, a in CATALOG.items():
        aliases = ", ".join(k for k, v in ALIASES.items() if v == name)
        t.add_row(name, f"{a.memory_bytes / GiB:,.0f}", f"{a.peak_tflops_bf16:,.4g}",
                  f"{a.peak_tflops_fp8:,.4g}" if a.peak_tflops_fp8 else "-", f"{a.peak_tflops('fp32'):,.4g}",
                  f"{a.intra_node_gbps:,.0f}", f"{a.inter_node_gbps:,.1f}", str(a.max_per_node), aliases)
    console = Console()
    console.print(t)
    for name, a in CATALOG.items():
        if a.note:
            console.print(f"  {name}: {a.note}", style="bright_black")
    return 0
