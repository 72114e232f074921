"""Number formatting and the rows every plan report shows (shared by the terminal and markdown reports)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .plan import Plan

GiB = 2**30


def human(n: float, unit: str = "") -> str:
    """8030261248 -> '8.03B'; 5.8e10 FLOPs -> '57.9G' (SI prefixes for counts)."""
    for value, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "B" if not unit else "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= value:
            return f"{n / value:,.3g}{suffix}{unit}" if n / value < 1000 else f"{n / value:,.0f}{suffix}{unit}"
    return f"{n:,.3g}{unit}"


def gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


def gib_pair(a: float, b: float) -> tuple[str, str]:
    """Two byte counts in GiB with as many decimals (1 to 4) as it takes for them to read apart:
    ('80.03', '80.00') where one decimal would print a needless '80.0 GiB > 80.0 GiB'."""
    for digits in range(1, 5):
        x, y = f"{a / GiB:,.{digits}f}", f"{b / GiB:,.{digits}f}"
        if x != y:
            break
    return x, y


def exceeds(need: float, capacity: float) -> str:
    need_s, capacity_s = gib_pair(need, capacity)
    return f"{need_s} GiB > {capacity_s} GiB"


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:,.1f} ms"
    if seconds < 120:
        return f"{seconds:,.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:,.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:,.1f} h"
    return f"{seconds / 86400:,.1f} days"


def ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out) or "-"


def stage_rows(plan: Plan) -> list[tuple[str, str]]:
    """(label, what it holds) for each pipeline chunk of the chosen layout, with the peak memory of
    the pipeline rank it runs on when pp > 1 (chunk i on rank i % pp under the interleaved schedule)."""
    lay, p = plan.layout, plan.params
    copy = lay.pp > 1 and (p.mtp > 0 or p.components["head"] == 0)  # MTP or a tied head reads the embedding
    ranks = plan.memory.train_stages or []
    rows = []
    for i, layers in enumerate(lay.stages):
        text = ranges(layers) + (" + embedding" if i == 0 else "")
        if i == len(lay.stages) - 1:
            text += " + final norm, head" + ", MTP" * (p.mtp > 0) + ", embedding copy" * copy
        if lay.pp > 1 and ranks:
            on = f"rank {i % lay.pp}, " if lay.pp_virtual_stages > 1 else ""
            text += f"  ({on}peak {ranks[i % lay.pp].peak / GiB:,.1f} GiB)"
        rows.append((f"stage {i}" if len(lay.stages) > 1 else "layers", text))
    return rows


def param_rows(plan: Plan) -> list[tuple[str, str, str]]:
    """(name, exact count, share of total) for each nonzero component."""
    p = plan.params
    return [(name, f"{n:,}", f"{100 * n / p.total:.2f}%") for name, n in p.components.items() if n]


def total_rows(plan: Plan) -> list[tuple[str, str, str]]:
    """(name, exact, human) of the totals, with what the stored-with-MTP figure adds."""
    p = plan.params
    rows = [("total (unique, MTP included)", f"{p.total:,}", human(p.total)),
            ("main model (without MTP)", f"{p.main:,}", human(p.main)),
            ("active per token (main)", f"{p.active:,}", human(p.active)),
            ("embedding", f"{p.embedding:,}", human(p.embedding))]
    if p.mtp:
        rows += [("MTP modules (shared embedding/head excluded)", f"{p.mtp:,}", human(p.mtp)),
                 ("as stored: MTP keeps its own embedding + head", f"{p.stored_with_mtp_copies:,}",
                  human(p.stored_with_mtp_copies))]
    for name, n in p.buffers.items():
        rows.append((f"buffer, not a parameter: {name}", f"{n:,}", human(n)))
    return rows


def stored_note(plan: Plan) -> str:
    """What a published 'as stored' figure counts beyond the unique parameters (DeepSeek's 685B)."""
    p = plan.params
    if not p.mtp:
        return ""
    copies = p.stored_with_mtp_copies - p.total
    return (f"Published sizes of models with MTP count the checkpoint as stored: the main model "
            f"({human(p.main)}) plus each MTP module with its own copy of the embedding and the head: "
            f"{human(p.mtp)} + {human(copies)} = {human(p.mtp + copies)} more, {human(p.stored_with_mtp_copies)} "
            f"in all. The unique parameters are {human(p.total)}; training updates those.")


def memory_rows(plan: Plan) -> list[tuple[str, int]]:
    m = plan.memory.train
    if m is None:
        return []
    return [("weights", m.weights), ("gradients", m.gradients), ("optimizer", m.optimizer),
            ("activations", m.activations), ("temporary", m.temporary), ("reserve (overhead)", m.overhead)]


def sci(x: float) -> str:
    return f"{x:.3g}".replace("e+", "e")


def flops_rows(plan: Plan) -> list[tuple[str, str]]:
    f = plan.flops
    rows = [("training FLOPs / token", f"{sci(f.train_per_token)} = 6N {sci(f.train_matmul_per_token)} + attention "
                                       f"{sci(f.train_attention_per_token)} + MTP {sci(f.train_mtp_per_token)}"),
            ("tokens / step", f"{f.tokens_per_step:,}"),
            ("FLOPs / step", sci(f.per_step)),
            ("run", f"{f.steps:,} steps, {human(f.tokens)} tokens, {sci(f.total)} FLOPs"),
            ("peak / device", f"{f.peak_tflops:,.4g} TFLOP/s dense {f.precision}"),
            (f"at MFU {f.mfu:.0%} on {f.world_size:,} devices",
             f"{duration(f.step_time_s)} / step, {human(f.tokens_per_s)} tokens/s, "
             f"{f.gpu_hours:,.4g} device-hours, {f.days:,.3g} days"),
            ("inference prefill FLOPs / token", sci(f.prefill_per_token)),
            ("inference decode FLOPs / token", f"{sci(f.decode_per_token)} at seq_len context, "
                                               f"{sci(f.decode_per_token_max_context)} at max_seq_len")]
    if plan.layout:
        lay = plan.layout
        rows.append(("cost-model step time (chosen layout)",
                     f"{duration(lay.step_time_s)}, {human(lay.tokens_per_s)} tokens/s, bubble "
                     f"{lay.bubble_fraction:.1%}"))
    return rows
