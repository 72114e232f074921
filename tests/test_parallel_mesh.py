"""The runtime's rank grouping is the plan's: for layouts the planner lays out, the groups that
runtime/parallel/mesh.py builds (TP innermost, then dp, then pp; ep blocks carved from the ranks
of a stage) have the sizes, strides and first members the plan reports."""

import pytest

from llmc.compiler.plan import build_plan
from llmc.compiler.spec import load_spec
from llmc.runtime.parallel.mesh import Layout, rank_groups

from parallel_helpers import SPEC


def planned(world, **degrees):
    sets = [f"hardware.gpus_per_node={world}", "train.global_batch_size=16", "train.micro_batch_size=1"]
    sets += [f"parallel.{k}={v}" for k, v in degrees.items()]
    return build_plan(load_spec(SPEC, sets)).model_dump(mode="json")


@pytest.mark.parametrize("world, degrees", [
    (8, dict(dp=2, tp=2, pp=2, ep=1, zero=1)),  # tp x dp runs with zero >= 1
    (8, dict(dp=4, tp=1, pp=2, ep=2)),
    (4, dict(dp=4, tp=1, pp=1, ep=4)),
    (8, dict(dp=2, tp=4, pp=1, ep=1, zero=3)),
])
def test_groups_equal_the_plan(world, degrees):
    plan = planned(world, **degrees)
    layout = Layout.from_plan(plan)
    mine = rank_groups(layout)
    for dim, group in plan["layout"]["groups"].items():
        if group["size"] == 1 or dim not in mine:
            continue
        groups = mine[dim]
        assert len(groups) == group["count"], dim
        assert groups[0][:16] == group["first"], dim
        assert all(g[1] - g[0] == group["stride"] for g in groups), dim
        # every rank in exactly one group of the dim
        assert sorted(r for g in groups for r in g) == list(range(world)), dim


def test_rank_order_is_tp_innermost():
    layout = Layout(world_size=8, dp=2, tp=2, pp=2)
    groups = rank_groups(layout)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_expert_groups_are_carved_from_a_stage():
    groups = rank_groups(Layout(world_size=8, dp=4, pp=2, ep=2, stages=[[0], [1]]))
    assert groups["ep"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["edp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]


@pytest.mark.parametrize("layout, message", [
    (dict(world_size=4, dp=3), "world_size"),
    (dict(world_size=4, dp=4, ep=3), "must divide"),
    (dict(world_size=4, dp=2, tp=2, ep=2), "expert parallelism together with tensor"),
    (dict(world_size=2, dp=1, pp=2, stages=[[0, 1, 2, 3]]), "stages"),
])
def test_inconsistent_layouts_are_refused(layout, message):
    with pytest.raises(ValueError, match=message):
        Layout(**layout).check()
