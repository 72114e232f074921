"""DCP checkpoints are layout-independent: a run saved under one layout resumes under another,
model and optimizer state included, and continues exactly as an uninterrupted single process.

tiny_moe trains 3 steps under layout A and saves; a fresh run under layout B loads it and trains
steps 4-5; its losses and final weights must equal a 5-step single-process run's (1e-5 relative).
"""

import pytest

from parallel_helpers import relative_error, run_worker

pytestmark = pytest.mark.timeout(900)

ONE = {"world_size": 1, "dp": 1}


@pytest.fixture(scope="module")
def five_steps(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("ref5"), 1, ONE, extra=["--steps", "5"])[0]


@pytest.mark.parametrize("saved, resumed", [
    ((2, {"world_size": 2, "dp": 2, "ep": 2, "zero": 0}), (1, ONE)),            # dp=2 x ep=2 -> one process
    ((1, ONE), (2, {"world_size": 2, "dp": 2, "ep": 2, "zero": 3})),            # one process -> FSDP2 + EP
    ((2, {"world_size": 2, "dp": 1, "pp": 2, "stages": [[0, 1], [2, 3]]}), (2, {"world_size": 2, "dp": 1, "tp": 2})),
    # experts FSDP2-sharded over edp (ZeRO >= 1, edp = 2) on either side
    ((4, {"world_size": 4, "dp": 4, "ep": 2, "zero": 3}), (1, ONE)),
    ((2, {"world_size": 2, "dp": 2, "ep": 2, "zero": 0}), (4, {"world_size": 4, "dp": 4, "ep": 2, "zero": 1})),
], ids=["ep2-to-one", "one-to-ep2-fsdp", "pp2-to-tp2", "edp2-fsdp-to-one", "ep2-to-edp2-zero1"])
def test_resume_across_layouts(saved, resumed, five_steps, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_worker(tmp_path / "a", saved[0], saved[1], extra=["--steps", "3", "--save-dcp", str(ckpt)])
    results = run_worker(tmp_path / "b", resumed[0], resumed[1],
                         extra=["--steps", "2", "--start-step", "3", "--load-dcp", str(ckpt)])
    want = five_steps["losses"][3:]
    for got, w in zip(results[0]["losses"], want):
        assert abs(got - w) <= 1e-5 * abs(w), (results[0]["losses"], want)
    state = {}
    for r in results:
        state.update(r["state"])
    errors = {k: relative_error(state[k], v) for k, v in five_steps["state"].items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, (worst, errors[worst])
