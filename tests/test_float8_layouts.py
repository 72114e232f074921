"""fp8 training over the parallel layouts: the losses of one fp8 process.

A pipeline runs the same products as one process, so the same losses. FSDP2 hands the fp8 casts
its bf16 unsharded weights (its param_dtype) where one process casts the fp32 master weights,
and tensor parallelism adds its row-parallel layers' partial products in another order: a few
values round to the neighbouring fp8 value, far less than fp8's own rounding moves the loss.
"""

import pytest

from test_parallel_train import llmc_train

pytestmark = pytest.mark.timeout(900)
FP8 = 'train.precision="fp8"'


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp8")
    return tmp, llmc_train(tmp, "one", 1, FP8)[0]


@pytest.mark.parametrize("name, sets, rel", [
    ("ep2_fsdp", ["parallel.dp=2", "parallel.ep=2", "parallel.zero=3"], 1e-3),
    ("tp2", ["parallel.dp=1", "parallel.tp=2", "parallel.sequence_parallel=true"], 1e-3),
    ("pp2", ["parallel.dp=1", "parallel.pp=2"], 1e-5),
])
def test_fp8_layouts_train_as_one_process(one_process, name, sets, rel):
    tmp, reference = one_process
    metrics, _ = llmc_train(tmp, name, 2, FP8, *sets)
    assert len(metrics) == len(reference) == 2
    for got, want in zip(metrics, reference):
        assert got["loss"] == pytest.approx(want["loss"], rel=rel)
