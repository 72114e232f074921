"""Invariant 6: every parallel layout trains exactly like one process over the same global batch.

Each layout runs tests/parallel_worker.py through torchrun (gloo, CPU) on tiny_moe (MLA + MoE
with a shared expert + MTP, aux-free routing bias plus balance loss): 3 AdamW steps with
gradient clipping over 4 micro-batches of 2 x 16 tokens. The losses of every step and every
weight (and routing-bias buffer) afterwards must equal the single-process run's to 1e-5
relative in fp32.
"""

import pytest

from parallel_helpers import merged_state, relative_error, run_worker

pytestmark = pytest.mark.timeout(600)

STAGES_2 = [[0, 1], [2, 3]]
LAYOUTS = {
    "dp2_ddp": (2, {"dp": 2, "zero": 0}),
    "dp2_fsdp": (2, {"dp": 2, "zero": 3}),
    "dp2_zero2": (2, {"dp": 2, "zero": 2}),
    "ep2": (2, {"dp": 2, "ep": 2, "zero": 0}),
    "ep2_fsdp": (2, {"dp": 2, "ep": 2, "zero": 3}),
    "pp2_1f1b": (2, {"dp": 1, "pp": 2, "stages": STAGES_2, "pp_schedule": "1f1b"}),
    "pp2_gpipe": (2, {"dp": 1, "pp": 2, "stages": STAGES_2, "pp_schedule": "gpipe"}),
    "pp2_interleaved": (2, {"dp": 1, "pp": 2, "stages": [[0], [1], [2], [3]], "pp_schedule": "interleaved",
                            "pp_virtual_stages": 2}),
    "tp2": (2, {"dp": 1, "tp": 2, "sequence_parallel": False}),
    "tp2_sp": (2, {"dp": 1, "tp": 2, "sequence_parallel": True}),
    "dp2_x_ep2": (4, {"dp": 4, "ep": 2, "zero": 0}),   # ep groups {0,1},{2,3}; expert grads over edp {0,2},{1,3}
    "dp2_x_pp2": (4, {"dp": 2, "pp": 2, "stages": STAGES_2}),
    "dp2_x_pp2_fsdp": (4, {"dp": 2, "pp": 2, "zero": 3, "stages": STAGES_2}),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("ref"), 1, {"world_size": 1, "dp": 1})[0]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, tmp_path):
    nproc, layout = LAYOUTS[name]
    results = run_worker(tmp_path, nproc, {"world_size": nproc, **layout})
    for r in results:
        for got, want in zip(r["losses"], reference["losses"]):
            assert abs(got - want) <= 1e-5 * abs(want), (r["losses"], reference["losses"])
    state = merged_state(results)
    assert set(state) == set(reference["state"])
    errors = {k: relative_error(state[k], v) for k, v in reference["state"].items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, (worst, errors[worst])
    # the run moved the weights (a layout that skipped the update would not pass unnoticed)
    assert reference["losses"][0] != reference["losses"][-1]
