"""The layout search: rules, fixed degrees, CPU layouts the parallel runtime runs, no-fit messages."""

import subprocess
import sys

import pytest

from llmc.compiler.errors import UserError
from llmc.compiler.plan import build_plan
from llmc.compiler.plan.stages import assign_layers
from llmc.compiler.spec import load_spec


def layout_of(path, *overrides):
    return build_plan(load_spec(path, list(overrides))).layout


def degrees(layout):
    return (layout.dp, layout.tp, layout.pp, layout.ep, layout.zero)


@pytest.mark.parametrize("path", ["specs/tiny.toml", "specs/tiny_moe.toml"])
def test_cpu_specs_plan_to_one_process(path):
    layout = layout_of(path)
    assert degrees(layout) == (1, 1, 1, 1, 0)
    assert (layout.world_size, layout.nodes, layout.procs_per_node) == (1, 1, 1)
    spec = load_spec(path)
    assert layout.micro_batch_size == spec.train.micro_batch_size
    assert layout.grad_accum == spec.train.global_batch_size // spec.train.micro_batch_size
    assert layout.stages == [list(range(spec.model.n_layers))]


@pytest.mark.parametrize("overrides, expected", [
    (["parallel.dp=2"], (2, 1, 1, 1, 0)),
    (["parallel.dp=2", "parallel.zero=3"], (2, 1, 1, 1, 3)),
    (["parallel.ep=2"], (2, 1, 1, 2, 0)),
    (["parallel.ep=2", "parallel.zero=3"], (2, 1, 1, 2, 3)),
    (["parallel.pp=2"], (1, 1, 2, 1, 0)),
    (["parallel.tp=2"], (1, 2, 1, 1, 0)),
])
def test_fixed_cpu_layouts_of_the_parallel_runtime(overrides, expected):
    layout = layout_of("specs/tiny_moe.toml", "hardware.gpus_per_node=2", *overrides)
    assert degrees(layout) == expected
    assert layout.world_size == 2 and layout.procs_per_node == 2 and layout.nodes == 1
    assert layout.dp * layout.tp * layout.pp == layout.world_size
    assert (layout.dp * layout.tp) % layout.ep == 0
    assert layout.micro_batch_size * layout.grad_accum * layout.dp == 8


def test_expert_parallelism_is_planned_with_tp_1_only(write_spec):
    """The runtime refuses ep > 1 under tp > 1 (Layout.check raised in every rank of a job of such
    a plan, which `llmc plan` had chosen or accepted): the search keeps ep = 1 where tp > 1, and a
    spec that fixes both is an error at its line."""
    from llmc.compiler.spec import SpecError
    plan = build_plan(load_spec("specs/tiny_moe.toml", ["hardware.gpus_per_node=2", "parallel.tp=2"]))
    assert (plan.layout.tp, plan.layout.ep) == (2, 1)
    reason = rejected_for(plan.search, "expert parallelism needs tp = 1")
    assert plan.search.examples[reason] == "tp=2, ep=2"
    assert all(a.ep == 1 for a in plan.search.alternatives)
    plan = build_plan(load_spec("specs/tiny_moe.toml", ["hardware.gpus_per_node=2", "parallel.ep=2"]))
    assert (plan.layout.tp, plan.layout.ep) == (1, 2) and all(a.tp == 1 for a in plan.search.alternatives)

    text = SMALL.replace("[train]", "[model.moe]\nn_experts = 4\ntop_k = 2\nexpert_hidden = 32\n\n[train]")
    text += "\n[parallel]\ntp = 2\nep = 2\n"
    with pytest.raises(SpecError) as e:
        load_spec(write_spec(text))
    (problem,) = e.value.problems
    assert problem.key == "parallel.ep" and problem.line == text.splitlines().index("ep = 2") + 1
    assert "expert parallelism needs tp = 1" in problem.message and "found tp = 2 with ep = 2" in problem.message


def test_fixed_four_process_combination():
    layout = layout_of("specs/tiny_moe.toml", "hardware.gpus_per_node=4", "parallel.dp=2", "parallel.pp=2",
                       "parallel.ep=2", "parallel.zero=3", "train.micro_batch_size=2")  # 2 micro-batches for 1F1B
    assert degrees(layout) == (2, 1, 2, 2, 3)
    assert layout.groups["pp"].first == [0, 2]   # (pp, dp, tp) order: pp outermost
    assert layout.groups["dp"].first == [0, 1]


def test_pipeline_stages_are_contiguous_and_cover_every_layer():
    layout = layout_of("specs/tiny_moe.toml", "hardware.gpus_per_node=2", "parallel.pp=2")
    assert layout.stages == [[0, 1], [2, 3]] or sorted(sum(layout.stages, [])) == [0, 1, 2, 3]
    assert all(layout.stages)
    assert sum(layout.stages, []) == [0, 1, 2, 3]


def test_assign_layers_balances_with_the_head_on_the_last_stage():
    # 8 equal layers and a head worth 2 layers over 2 stages: 5 + (3 + head)
    assert assign_layers([1.0] * 8, 2, 2.0) == [[0, 1, 2, 3, 4], [5, 6, 7]]
    assert assign_layers([1.0] * 8, 4, 0.0) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    runs = assign_layers([1.0] * 61, 16, 1.5)
    assert sum(runs, []) == list(range(61)) and all(runs)


def test_tp_stays_inside_a_node_and_groups_are_ordered_tp_innermost():
    layout = layout_of("specs/llama3_8b.toml", "parallel.tp=8", "parallel.pp=2")
    assert layout.groups["tp"].first == list(range(8)) and layout.groups["tp"].within_node
    assert layout.groups["dp"].stride == 8 and not layout.groups["dp"].within_node
    assert layout.groups["pp"].stride == 8 * layout.dp
    assert layout.mesh["dims"] == ["pp", "dp", "tp"]


def test_1f1b_pipelines_get_a_micro_batch_per_stage():
    """torch's 1F1B schedule needs at least as many micro-batches as stages: the search keeps
    grad_accum >= pp (a smaller micro-batch when it is auto) and explains a spec that fixes less."""
    sets = ["hardware.gpus_per_node=2", "parallel.pp=2", 'train.micro_batch_size="auto"']
    lay = layout_of("specs/tiny.toml", *sets)
    assert lay.pp == 2 and lay.grad_accum >= 2 and lay.micro_batch_size * lay.grad_accum == 8
    with pytest.raises(UserError, match=r"1F1B schedule needs grad_accum >= pp .*\(pp=2, grad_accum=1\)"):
        build_plan(load_spec("specs/tiny.toml", [*sets[:2], "train.micro_batch_size=8"]))
    gpipe = layout_of("specs/tiny.toml", *sets[:2], "train.micro_batch_size=8", 'parallel.pp_schedule="gpipe"')
    assert (gpipe.pp, gpipe.grad_accum) == (2, 1)   # GPipe runs any number of micro-batches


def test_search_honours_rules():
    plan = build_plan(load_spec("specs/mixtral_8x7b.toml"))
    lay = plan.layout
    assert lay.tp <= 8 and 32 % lay.tp == 0 and 8 % lay.ep == 0 and lay.pp <= 32
    assert lay.dp * lay.tp * lay.pp == 128
    assert 1024 % (lay.dp * lay.micro_batch_size) == 0
    assert plan.memory.train.peak <= plan.memory.train.capacity
    assert all(a.step_time_s >= lay.step_time_s for a in plan.search.alternatives)


def test_bubble_is_p_minus_1_over_m_plus_p_minus_1_when_links_are_free():
    layout = layout_of("specs/tiny_moe.toml", "hardware.gpus_per_node=2", "parallel.pp=2",
                       "hardware.intra_node_gbps=1e12", "hardware.inter_node_gbps=1e12")
    p, m = layout.pp, layout.grad_accum
    assert layout.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), rel=1e-6)


def test_search_for_16384_gpus_finds_a_layout():
    # 8x the devices of the shipped run and twice its batch: 1F1B pipelines need grad_accum >= pp
    plan = build_plan(load_spec("specs/ds_v32.toml", ["hardware.nodes=2048", 'parallel.tp="auto"',
                                                      "train.global_batch_size=30720"]))
    assert plan.layout.world_size == 16384
    assert plan.memory.train.fits


def test_nothing_fits_explains_and_suggests():
    spec = load_spec("specs/llama3_8b.toml", ['hardware.accelerator="RTX3060-12GB"', "hardware.nodes=1",
                                              "hardware.gpus_per_node=1", "train.global_batch_size=8"])
    with pytest.raises(UserError) as e:
        build_plan(spec)
    message = str(e.value)
    assert "does not fit" in message and "GiB" in message
    assert "would make it fit" in message or "no single change" in message
    plan = build_plan(spec, strict=False)
    assert plan.layout is None and plan.memory.train is None and plan.search.message == message


def test_cli_plan_exit_codes_and_json():
    run = lambda *a: subprocess.run([sys.executable, "-m", "llmc.compiler.cli", "plan", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    ok = run("specs/tiny.toml", "--json")
    assert ok.returncode == 0, ok.stderr
    import json
    doc = json.loads(ok.stdout)
    for key in ("weights", "gradients", "optimizer", "activations", "peak"):
        assert doc["memory"]["train"][key] > 0
    assert doc["layout"]["world_size"] == 1
    bad = run("specs/llama3_8b.toml", "--set", 'hardware.accelerator="RTX3060-12GB"', "--set", "hardware.nodes=1",
              "--set", "hardware.gpus_per_node=1", "--set", "train.global_batch_size=8")
    assert bad.returncode == 1
    assert "does not fit" in bad.stdout + bad.stderr and "Traceback" not in bad.stderr


def test_plan_needs_neither_torch_nor_sympy():
    code = ("import sys; from llmc.compiler.spec import load_spec; from llmc.compiler.plan import build_plan; "
            "build_plan(load_spec('specs/ds_v32.toml'), strict=False); "
            "assert 'torch' not in sys.modules and 'sympy' not in sys.modules, 'heavy import'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# A small dense model on one node of 4 CPU devices: with 4 heads, tp = 1, 2 and 4 follow the
# other rules. The runtime's TP shards neither tied embeddings nor the DSA indexer.
SMALL = """\
[model]
vocab_size = 512
d_model = 64
n_layers = 2
n_heads = 4
ffn_hidden = 128
max_seq_len = 64

[train]
seq_len = 64
global_batch_size = 8
max_steps = 10

[hardware]
accelerator = "CPU"
gpus_per_node = 4
"""
TIED = ["model.tie_embeddings=true"]
SPARSE = ['model.attention.kind="mla"', "model.attention.kv_lora_rank=32", "model.attention.qk_nope_head_dim=16",
          "model.attention.qk_rope_head_dim=8", "model.attention.v_head_dim=16", "model.attention.index_n_heads=2",
          "model.attention.index_head_dim=16", "model.attention.index_topk=8"]
UNSHARDED = pytest.mark.parametrize("feature, words", [(TIED, "tied embeddings"), (SPARSE, "sparse indexer")],
                                    ids=["tied", "sparse"])


def rejected_for(search, words):
    reasons = [r for r in search.rejected if words in r]
    assert len(reasons) == 1, search.rejected
    return reasons[0]


@UNSHARDED
def test_auto_tp_is_1_for_what_tp_does_not_shard(feature, words, write_spec):
    path = write_spec(SMALL)
    assert build_plan(load_spec(path, ["parallel.tp=2"])).layout.tp == 2  # without the feature tp = 2 plans
    plan = build_plan(load_spec(path, feature))
    reason = rejected_for(plan.search, words)
    assert reason.startswith("tp must be 1")
    assert plan.search.rejected[reason] == 2 and plan.search.examples[reason].startswith("tp=2")  # tp = 2 and 4
    assert plan.layout.tp == 1 and all(a.tp == 1 for a in plan.search.alternatives)


@UNSHARDED
def test_no_layout_without_tp_says_why(feature, words, write_spec):
    # dp = pp = 1 fixed on 4 devices leaves only tp = 4
    spec = load_spec(write_spec(SMALL), [*feature, "parallel.dp=1", "parallel.pp=1"])
    with pytest.raises(UserError) as e:
        build_plan(spec)
    assert "no parallel layout satisfies the rules for 4 devices" in str(e.value) and words in str(e.value)


@UNSHARDED
def test_fixed_tp_for_what_tp_does_not_shard_is_a_spec_error(feature, words, write_spec):
    from llmc.compiler.spec import SpecError
    text = SMALL + "\n[parallel]\ntp = 2\n"
    with pytest.raises(SpecError) as e:
        load_spec(write_spec(text), feature)
    (problem,) = e.value.problems
    assert problem.key == "parallel.tp" and problem.line == text.splitlines().index("tp = 2") + 1
    assert words in problem.message and "tp must be 1" in problem.message and "found tp = 2" in problem.message


def test_cli_plan_refuses_fixed_tp_with_tied_embeddings(write_spec):
    path = write_spec(SMALL)
    out = subprocess.run([sys.executable, "-m", "llmc.compiler.cli", "plan", str(path), "--set", "parallel.tp=2",
                          *[a for s in TIED for a in ("--set", s)]], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "parallel.tp" in out.stderr and "tied embeddings" in out.stderr and "Traceback" not in out.stderr


def test_sequence_parallel_stays_on_with_learned_positions(write_spec):
    # the runtime slices pos_embed's output over the sequence (test_parallel_equivalence.py)
    layout = layout_of(write_spec(SMALL), 'model.positions="learned"', "parallel.tp=2")
    assert layout.tp == 2 and layout.sequence_parallel


@pytest.mark.parametrize("sets, rule, example", [
    (["model.n_kv_heads=1"], "tp must divide the key/value heads", "tp=2, n_kv_heads=1"),   # MQA: one head to share
    (["model.ffn_hidden=130"], "tp must divide ffn_hidden", "tp=4, ffn_hidden=130"),     # 130 = 2 x 65
    (["train.seq_len=63"], "sequence parallelism needs tp to divide seq_len", "tp=2, seq_len=63"),
], ids=["kv_heads", "ffn_hidden", "seq_len"])
def test_tp_divides_what_the_runtime_splits(sets, rule, example, write_spec):
    """The runtime's TP gives each rank whole kv heads and equal column slices of the dense FFN,
    and sequence parallelism equal slices of the sequence: the planner keeps to such tp, and a
    spec that fixes another is an error at its line (llmc train died in every rank)."""
    from llmc.compiler.spec import SpecError
    path = write_spec(SMALL)
    plan = build_plan(load_spec(path, sets))
    reason = rejected_for(plan.search, rule)
    assert plan.search.examples[reason] == example
    bad = int(example.split(",")[0].removeprefix("tp="))
    assert all(a.tp != bad for a in plan.search.alternatives) and plan.layout.tp != bad
    with pytest.raises(SpecError) as e:
        load_spec(path, [*sets, f"parallel.tp={bad}"])
    (problem,) = e.value.problems
    assert problem.key == "parallel.tp" and rule in problem.message and f"found tp = {bad}" in problem.message
