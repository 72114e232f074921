"""DDP over torchrun (gloo, 2 CPU processes) equals one process over the same global batch (fp32)."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import llmc_train, metrics

RUN = ["train.max_steps=4", "train.global_batch_size=8", "train.micro_batch_size=2", "train.precision=fp32",
       "train.eval_every=2", "train.checkpoint_every=2", "train.keep_checkpoints=2",
       "parallel.tp=1", "parallel.pp=1", "parallel.zero=0"]


@pytest.mark.timeout(600)
def test_two_processes_equal_one_process(tmp_path):
    one = llmc_train(tmp_path, "one", *RUN, "parallel.dp=1")
    assert one.returncode == 0, one.stderr[-3000:]
    two = llmc_train(tmp_path, "two", *RUN, "parallel.dp=2", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]

    import json
    assert json.loads((tmp_path / "two" / "plan.json").read_text())["layout"]["dp"] == 2
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"] == 8 * 64
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5, rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    assert b[1]["val_loss"] == pytest.approx(a[1]["val_loss"], abs=1e-5)
    wa = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-5, msg=k)
    # the weights did move: equality is not the trivial one of an untrained model
    assert a[-1]["loss"] < a[0]["loss"]

    # the one-process run's step-2 checkpoint resumes on two processes: steps 3 and 4 are the same
    shutil.copytree(tmp_path / "one", tmp_path / "grown")
    shutil.rmtree(tmp_path / "grown" / "checkpoints" / "step-00000004")
    grown = llmc_train(tmp_path, "grown", *RUN, "parallel.dp=2", nproc=2, resume=True)
    assert grown.returncode == 0, grown.stderr[-3000:]
    c = metrics(tmp_path / "grown")
    assert [m["step"] for m in c] == [1, 2, 3, 4]
    for x, y in zip(a[2:], c[2:]):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5, rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
