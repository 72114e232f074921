"""Invariant 6: every parallel layout trains exactly like one process over the same global batch,
and holds exactly the model-state bytes the plan says.

Each layout is planned by `build_plan` (degrees fixed with --set parallel.X=N, as a user would)
and run by tests/parallel_worker.py through torchrun (gloo, CPU) on tiny_moe (MLA + MoE with a
shared expert + MTP, aux-free routing bias plus balance loss): 3 AdamW steps with gradient
clipping over a global batch of 4 micro-batches of 2 x 16 tokens. The losses of every step and
every weight (and routing-bias buffer) afterwards must equal the single-process run's to 1e-5
relative in fp32. The weights / gradients / optimizer bytes each rank holds, counted from its
local shards, must equal the plan's figures for its pipeline stage (and the most loaded device's
the plan reports).

The runs of one world size share one launch of the worker (`RUNS`, parallel_helpers.Batches):
a rank's start costs more than its training, so selecting one layout still runs its world size's.
"""

import pytest

from parallel_helpers import Batches, merged_state, relative_error

pytestmark = pytest.mark.timeout(900)


def degrees(dp=1, tp=1, pp=1, ep=1, zero=0, **extra) -> list[str]:
    sets = [f"parallel.dp={dp}", f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.ep={ep}", f"parallel.zero={zero}"]
    return sets + [f"parallel.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in extra.items()]


NO_SP = {"sequence_parallel": False}
LAYOUTS = {
    "dp2_ddp": (2, degrees(dp=2, zero=0)),
    "dp2_fsdp": (2, degrees(dp=2, zero=3)),
    "dp2_zero1": (2, degrees(dp=2, zero=1)),
    "dp2_zero2": (2, degrees(dp=2, zero=2)),
    "ep2": (2, degrees(dp=2, ep=2)),
    "ep2_fsdp": (2, degrees(dp=2, ep=2, zero=3)),
    "pp2_1f1b": (2, degrees(pp=2, pp_schedule="1f1b")),
    "pp2_gpipe": (2, degrees(pp=2, pp_schedule="gpipe")),
    "pp2_interleaved": (2, degrees(pp=2, pp_schedule="interleaved", pp_virtual_stages=2)),
    "tp2": (2, degrees(tp=2, sequence_parallel=False)),
    "tp2_sp": (2, degrees(tp=2, sequence_parallel=True)),
    "dp2_x_ep2": (4, degrees(dp=4, ep=2)),   # ep groups {0,1},{2,3}; expert gradients over edp {0,2},{1,3}
    "dp2_x_ep2_zero1": (4, degrees(dp=4, ep=2, zero=1)),  # experts: FSDP2 over edp {0,2},{1,3}
    "dp2_x_ep2_zero2": (4, degrees(dp=4, ep=2, zero=2)),
    "dp2_x_ep2_fsdp": (4, degrees(dp=4, ep=2, zero=3)),
    "dp2_x_pp2": (4, degrees(dp=2, pp=2)),
    "dp2_x_pp2_fsdp": (4, degrees(dp=2, pp=2, zero=3)),
    "dp2_x_tp2": (4, degrees(dp=2, tp=2, zero=0, sequence_parallel=True)),       # FSDP2's replicate over DTensors
    "dp2_x_tp2_fsdp": (4, degrees(dp=2, tp=2, zero=3, sequence_parallel=True)),  # 2-D: FSDP2 x TP
    "pp2_x_tp2_sp": (4, degrees(pp=2, tp=2, sequence_parallel=True)),  # stages pass sequence slices
}

# Layouts whose measured model states are not all the plan's figures: which differ, and why.
STATES = ("weights", "gradients", "optimizer")
MEMORY_DIFFERS = {
    # the plan states the step's peak. FSDP2 keeps weights sharded at rest, which zero 1/2 hold
    # gathered through the step; and zero 1 (and every stage under pipelining) holds whole
    # gradients until the step's last micro-batch reduce-scatters them (dense and experts alike)
    "dp2_zero1": {"weights", "gradients"},
    "dp2_zero2": {"weights"},
    "dp2_x_ep2_zero1": {"weights", "gradients"},
    "dp2_x_ep2_zero2": {"weights"},
    "dp2_x_pp2_fsdp": {"weights", "gradients"},
}


# GQA with learned absolute positions (MLA carries RoPE): under sequence parallelism pos_embed's
# output is sliced over the sequence like the embedding's (on the first stage with pp)
LEARNED_POSITIONS = ['model.attention.kind="gqa"', "model.n_kv_heads=2", 'model.positions="learned"']
SEQUENCE_PARALLEL_LEARNED = {"tp2_sp": (2, degrees(tp=2, sequence_parallel=True)),
                             "pp2_x_tp2_sp": (4, degrees(pp=2, tp=2, sequence_parallel=True))}

# 8 ranks: pp 2 x dp 4 with ep 2, so each stage's experts are sharded over ep {0,1},{2,3} and
# replicated (ZeRO-1: FSDP2-sharded) over edp {0,2},{1,3}; a global batch of 8 micro-batches of 1
# gives each pipeline the 2 micro-batches 1F1B needs.
EIGHT = ["--micro", "1", "--n-micro", "8"]

# the loss 5 tokens at a time (runtime/model/loss.py; training uses it under train.recompute): on
# FSDP2's gathered weights, on a pipeline's last stage with the MTP head, and over TP's rows of the
# head (its input replicated, or gathered from sequence slices; with FSDP2 over them)
CHUNKED_LOSS = ["--loss-chunk", "5"]
CHUNKED_LOSS_LAYOUTS = ("dp2_fsdp", "pp2_1f1b", "tp2", "tp2_sp", "dp2_x_tp2_fsdp")

RUNS = {  # name: (ranks, the worker's arguments)
    "reference": (1, {"sets": degrees()}),
    "reference_learned": (1, {"sets": degrees() + LEARNED_POSITIONS}),
    "reference_eight": (1, {"sets": degrees(), "extra": EIGHT}),
    **{name: (nproc, {"sets": sets}) for name, (nproc, sets) in LAYOUTS.items()},
    "pp2_without_mtp": (2, {"sets": degrees(pp=2) + ["model.mtp.depth=0"]}),
    **{f"{name}_learned": (nproc, {"sets": sets + LEARNED_POSITIONS})
       for name, (nproc, sets) in SEQUENCE_PARALLEL_LEARNED.items()},
    **{f"pp2_dp4_ep2_zero{zero}": (8, {"sets": degrees(dp=4, pp=2, ep=2, zero=zero), "extra": EIGHT})
       for zero in (0, 1)},
    **{f"{name}_chunked_loss": (LAYOUTS[name][0], {"sets": LAYOUTS[name][1], "extra": CHUNKED_LOSS})
       for name in CHUNKED_LOSS_LAYOUTS},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Batches(tmp_path_factory.mktemp("equivalence"), RUNS)


@pytest.fixture(scope="module")
def reference(runs):
    return runs["reference"][0]


def assert_same_training(results, reference):
    for r in results:
        for got, want in zip(r["losses"], reference["losses"]):
            assert abs(got - want) <= 1e-5 * abs(want), (r["losses"], reference["losses"])
        if r["val_loss"] is not None:  # pipelines: 5 samples padded to the stages' shapes and schedule calls
            assert abs(r["val_loss"] - reference["val_loss"]) <= 1e-5 * reference["val_loss"], (r["val_loss"],
                                                                                              reference["val_loss"])
    state = merged_state(results)
    assert set(state) == set(reference["state"])
    errors = {k: relative_error(state[k], v) for k, v in reference["state"].items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, (worst, errors[worst])


def assert_states_match_plan(results, keys=STATES):
    """Every rank measures its stage's planned bytes; the most loaded one, the plan's headline."""
    for rank, r in enumerate(results):
        assert {k: r["bytes"][k] for k in keys} == {k: r["plan_bytes"][k] for k in keys}, (rank, r["bytes"],
                                                                                           r["plan_bytes"])
    plan = results[0]["plan_memory"]
    assert {k: max(r["bytes"][k] for r in results) for k in keys} == {k: plan[k] for k in keys}


def assert_peak_gradients_match_plan(results):
    """The most gradient bytes a rank held during the steps (sampled before each block's forward
    and backward) is the plan's figure. Where gradients are reduce-scattered every micro-batch
    (zero 2/3 without pipelining, zero 1 over one micro-batch), some whole gradients also wait
    for their reduce-scatter, which the plan counts as a temporary: the root unit's (its head's
    gradient comes first, its reduce-scatter last) and the block's that just finished. The
    samples see part of them. So too FSDP2's replicate (zero 0 under TP), whose all-reduce of a
    unit writes new gradients beside the accumulated ones."""
    for rank, r in enumerate(results):
        lay, planned = r["layout"], r["plan_bytes"]["gradients"]
        by_unit = lay["zero"] >= 2 or lay["zero"] == 1 and lay["grad_accum"] == 1 or lay["zero"] == 0 and lay["tp"] > 1
        if lay["pp"] == 1 and lay["dp"] > 1 and by_unit:
            root, block = r["unit_gradient_bytes"]
            assert planned <= r["peak_gradients"] <= planned + root + block, (rank, r["peak_gradients"], planned,
                                                                             root, block)
        else:
            assert r["peak_gradients"] == planned, (rank, r["peak_gradients"], planned)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, runs, reference):
    results = runs[name]
    assert results[0]["layout"]["world_size"] == LAYOUTS[name][0]
    assert_same_training(results, reference)
    assert_states_match_plan(results, [k for k in STATES if k not in MEMORY_DIFFERS.get(name, ())])
    assert_peak_gradients_match_plan(results)


@pytest.mark.parametrize("name", CHUNKED_LOSS_LAYOUTS)
def test_chunked_loss_trains_like_whole_logits(name, runs, reference):
    assert_same_training(runs[f"{name}_chunked_loss"], reference)


def test_pipeline_model_states_match_plan_without_mtp(runs):
    """With no MTP (and an untied head) the last stage keeps no embedding copy."""
    assert_states_match_plan(runs["pp2_without_mtp"])


@pytest.mark.parametrize("name", list(SEQUENCE_PARALLEL_LEARNED))
def test_sequence_parallel_with_learned_positions(name, runs):
    results, reference = runs[f"{name}_learned"], runs["reference_learned"][0]
    assert results[0]["layout"]["tp"] == 2 and results[0]["layout"]["sequence_parallel"]
    assert "pos_embed.weight" in reference["state"]
    assert_same_training(results, reference)


@pytest.mark.parametrize("zero", [0, 1])
def test_pipeline_with_experts_over_expert_data_parallel(zero, runs):
    results = runs[f"pp2_dp4_ep2_zero{zero}"]
    assert (results[0]["layout"]["edp"], results[0]["layout"]["grad_accum"]) == (2, 2)
    assert_same_training(results, runs["reference_eight"][0])
    # as dp2_x_pp2_fsdp: weights and gradients are whole at the peak, sharded at rest
    assert_states_match_plan(results, ["optimizer"] if zero else STATES)
    assert_peak_gradients_match_plan(results)


def test_reference_trains(reference):
    """The single-process reference itself moves: its loss changes from step to step."""
    losses = reference["losses"]
    assert len(set(losses)) == len(losses)
