"""DCP checkpoints are layout-independent: a run saved under one layout resumes under another,
model and optimizer state included, and continues exactly as an uninterrupted single process.

tiny_moe trains 3 steps under layout A and saves; a fresh run under layout B loads it and trains
steps 4-5; its losses and final weights must equal a 5-step single-process run's (1e-5 relative).
"""

import pytest

from parallel_helpers import Batches, relative_error

pytestmark = pytest.mark.timeout(900)

ONE = {"world_size": 1, "dp": 1}
CASES = {  # name: (ranks and layout that save, ranks and layout that resume)
    "ep2-to-one": ((2, {"world_size": 2, "dp": 2, "ep": 2, "zero": 0}), (1, ONE)),
    "one-to-ep2-fsdp": ((1, ONE), (2, {"world_size": 2, "dp": 2, "ep": 2, "zero": 3})),  # FSDP2 + EP
    "pp2-to-tp2": ((2, {"world_size": 2, "dp": 1, "pp": 2, "stages": [[0, 1], [2, 3]]}),
                   (2, {"world_size": 2, "dp": 1, "tp": 2})),
    # experts FSDP2-sharded over edp (ZeRO >= 1, edp = 2) on either side
    "edp2-fsdp-to-one": ((4, {"world_size": 4, "dp": 4, "ep": 2, "zero": 3}), (1, ONE)),
    "ep2-to-edp2-zero1": ((2, {"world_size": 2, "dp": 2, "ep": 2, "zero": 0}),
                          (4, {"world_size": 4, "dp": 4, "ep": 2, "zero": 1})),
}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """The resumed runs: every case's saving run is done first (the runs of one world size share a
    launch of the worker), then its resuming run, which loads that DCP checkpoint."""
    root = tmp_path_factory.mktemp("checkpoints")
    ckpt = {name: root / "dcp" / name for name in CASES}
    saves = {name: (nproc, {"layout": layout, "extra": ["--steps", "3", "--save-dcp", str(ckpt[name])]})
             for name, ((nproc, layout), _) in CASES.items()}
    loads = {name: (nproc, {"layout": layout, "extra": ["--steps", "2", "--start-step", "3",
                                                          "--load-dcp", str(ckpt[name])]})
             for name, (_, (nproc, layout)) in CASES.items()}
    loads["five_steps"] = (1, {"layout": ONE, "extra": ["--steps", "5"]})  # the uninterrupted run
    return Batches(root / "resume", loads, after=Batches(root / "save", saves))


@pytest.mark.parametrize("name", list(CASES))
def test_resume_across_layouts(name, resumed):
    results, five_steps = resumed[name], resumed["five_steps"][0]
    want = five_steps["losses"][3:]
    for got, w in zip(results[0]["losses"], want):
        assert abs(got - w) <= 1e-5 * abs(w), (results[0]["losses"], want)
    state = {}
    for r in results:
        state.update(r["state"])
    errors = {k: relative_error(state[k], v) for k, v in five_steps["state"].items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, (worst, errors[worst])
