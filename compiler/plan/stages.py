"""Layer-to-stage assignment and the global-rank grouping of each parallel dimension.

Ranks are laid out (pp, dp, tp) from outermost to innermost: global rank
    r = (pp_rank * dp + dp_rank) * tp + tp_rank,
so a TP group is tp consecutive ranks inside one node. Expert parallelism is carved out of the
dp x tp ranks of a stage: the ep group is ep consecutive ranks of that slice, and the
expert-data-parallel (edp) group holds the ranks with the same expert shard (stride ep):
    r = (pp_rank * edp + edp_rank) * ep + ep_rank.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


def assign_layers(costs: list[float], chunks: int, tail: float) -> list[list[int]]:
    """Split layers 0..L-1 into `chunks` contiguous non-empty runs minimising the largest run's cost;
    the last run also carries `tail` (head and MTP). Binary search on the bound, filled from the back."""
    n = len(costs)
    if chunks >= n:
        return [[i] for i in range(n)]

    def fill(bound: float, even: bool = False) -> list[list[int]] | None:
        runs: list[list[int]] = []
        i = n - 1
        for c in reversed(range(chunks)):          # c chunks still to fill before this one
            total, run = (tail if c == chunks - 1 else 0.0), []
            share = (sum(costs[:i + 1]) + total) / (c + 1)  # an even split of what is left
            while i >= c:                           # leave one layer at least for each earlier chunk
                if run and total + costs[i] > bound:
                    break
                if even and run and c > 0 and total + costs[i] / 2 > share:
                    break
                total += costs[i]
                run.append(i)
                i -= 1
            if total > bound or (c == 0 and i >= 0):
                return None
            runs.append(run[::-1])
        return runs[::-1]

    lo, hi = max(costs), sum(costs) + tail
    best = fill(hi)
    for _ in range(60):
        if hi - lo <= 1e-9 * hi:
            break
        mid = (lo + hi) / 2
        runs = fill(mid)
        if runs is None:
            lo = mid
        else:
            hi, best = mid, runs
    return fill(hi, even=True) or best  # as balanced, spread evenly where the bound leaves room


def within_node(size: int, stride: int, per_node: int) -> bool:
    """Whether each group of `size` ranks at `stride` lies inside one node (groups tile the ranks)."""
    span = size * stride
    return size == 1 or (span <= per_node and per_node % span == 0)


class Group(BaseModel):
    """The ranks of one parallel dimension: how many groups, their size, and the first one."""

    size: int
    count: int
    stride: int = Field(description="Distance between consecutive ranks of a group.")
    first: list[int] = Field(description="The ranks of group 0 (up to 16 shown).")
    within_node: bool = Field(description="Whether every group lies inside one node.")


def groups(world: int, dp: int, tp: int, pp: int, ep: int, per_node: int) -> dict[str, Group]:
    """The rank groups of each dimension for the (pp, dp, tp) layout and ep carved from dp x tp."""
    edp = dp * tp // ep

    def group(size: int, stride: int) -> Group:
        return Group(size=size, count=world // size, stride=stride,
                     first=[k * stride for k in range(min(size, 16))],
                     within_node=within_node(size, stride, per_node))

    return {"tp": group(tp, 1), "dp": group(dp, tp), "pp": group(pp, dp * tp),
            "ep": group(ep, 1), "edp": group(edp, ep)}
