"""Pieces of the training loop against hand-derived expectations: schedule, decay groups, loss
weighting over micro-batches, activation checkpointing, resume compatibility, an MoE run."""

import json
import math

import pytest
import torch

from llmc.compiler.spec import load_spec
from llmc.compiler.spec.train import ScheduleSpec
from llmc.runtime.model import Transformer
from llmc.runtime.train.checkpoint import spec_differences
from llmc.runtime.train.loop import apply_recompute
from llmc.runtime.train.objectives import NextToken, StepShare
from llmc.runtime.train.optim import build_optimizer, lr_factor

from train_helpers import REPO

torch.set_num_threads(2)


def tiny_model(**changes):
    spec = load_spec(REPO / "specs" / "tiny.toml", [f"model.{k}={v}" for k, v in {
        "vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_hidden": 48,
        "max_seq_len": 16, **changes}.items()] + ["train.seq_len=16"])
    torch.manual_seed(0)
    model = Transformer(spec.model)
    model.init_weights()
    return model, spec


def test_warmup_then_cosine_to_the_floor():
    s = ScheduleSpec(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 111, s) == pytest.approx(0.1)       # 1/10 of the way up
    assert lr_factor(9, 111, s) == pytest.approx(1.0)
    assert lr_factor(10, 111, s) == pytest.approx(1.0)      # decay starts at the peak
    assert lr_factor(60, 111, s) == pytest.approx(0.55)     # halfway: (1 + 0.1) / 2
    assert lr_factor(110, 111, s) == pytest.approx(0.1)     # last step at the floor
    linear = ScheduleSpec(kind="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_factor(50, 101, linear) == pytest.approx(0.5)
    assert lr_factor(7, 101, ScheduleSpec(kind="constant", warmup_steps=0)) == 1.0


def test_no_weight_decay_on_norms_and_biases():
    model, spec = tiny_model(qkv_bias="true")
    opt = build_optimizer(model, spec.train.optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | plain == set(names.values())
    assert any("bias" in n for n in plain) and any("norm" in n for n in plain)
    assert all("norm" not in n and "bias" not in n for n in decayed)
    assert {"embed.weight", "head.weight"} <= decayed


def test_micro_batch_weighting_equals_the_mean_over_all_target_tokens():
    """Two micro-batches with different numbers of SFT targets: the accumulated gradient is the
    gradient of the mean loss over every target token of the whole batch."""
    model, _ = tiny_model()
    torch.manual_seed(1)
    tokens = torch.randint(0, 64, (4, 16))
    labels = torch.randint(0, 64, (4, 16))
    labels[0, :12] = -100   # micro-batch 1 has few targets
    labels[3, 5:] = -100
    model.zero_grad()
    model(tokens, labels).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    total = int((labels != -100).sum())
    for part in (slice(0, 2), slice(2, 4)):
        out = model(tokens[part], labels[part])
        n = int((labels[part] != -100).sum())
        NextToken().loss(out, StepShare(token_weight=n / total, batch_weight=0.5)).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_the_gradients(mode):
    model, _ = tiny_model()
    tokens = torch.randint(0, 64, (2, 16))
    model(tokens, tokens).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    apply_recompute(model, mode)
    wrapped = sum(type(m).__name__ == "CheckpointWrapper" for m in model.layers.values())
    assert wrapped == (2 if mode == "full" else 1)
    model(tokens, tokens).loss.backward()
    grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()}
    for name, g in expected.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_spec_differences_name_what_blocks_a_resume():
    old = {"model": {"d_model": 64, "n_layers": 2}, "train": {"max_steps": 10, "lr": 1e-3}, "job": {"name": "a"}}
    new = {"model": {"d_model": 96, "n_layers": 2}, "train": {"max_steps": 20, "lr": 2e-3}, "job": {"name": "b"}}
    assert spec_differences(old, new) == ["model.d_model: 64 -> 96", "train.lr: 0.001 -> 0.002"]
    assert spec_differences(old, old) == []


@pytest.mark.timeout(300)
def test_moe_run_logs_expert_load_and_moves_the_routing_bias(tmp_path):
    """tiny_moe (MLA + MoE with aux-free balancing + MTP) trains through the same loop."""
    from llmc.compiler.plan import build_plan
    from llmc.runtime.train.distributed import DistEnv
    from llmc.runtime.train.loop import Trainer
    spec = load_spec(REPO / "specs" / "tiny_moe.toml", [
        "model.vocab_size=512", "model.d_model=64", "model.max_seq_len=32", "train.seq_len=32",
        "train.max_steps=3", "train.global_batch_size=4", "train.micro_batch_size=2", "data.max_bytes=100000",
        f"data.cache_dir={tmp_path / 'cache'}", "train.eval_batches=1"])
    plan = build_plan(spec).model_dump(mode="json")
    trainer = Trainer(plan, tmp_path / "run", DistEnv())
    biases = {n: b.clone() for n, b in trainer.raw_model.named_buffers() if "bias" in n}
    report = trainer.run()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for r in records:
        assert math.isfinite(r["loss"]) and r["aux_loss"] >= 0 and r["mtp_loss"] > 0
        load = r["expert_load"]
        # a row per MoE layer, then one for the MTP block (an MoE layer too)
        assert len(load) == spec.model.n_moe_layers + 1 and all(len(row) == 4 for row in load)
        assert all(sum(row) == pytest.approx(1.0, abs=1e-3) for row in load)
    moved = [n for n, b in trainer.raw_model.named_buffers() if n in biases and not torch.equal(b, biases[n])]
    assert moved, "aux-free balancing should update the routing bias after each step"
    assert "mtp.0.block.ffn.router.e_score_correction_bias" in moved
    assert report["validation"]["val_loss"] > 0


def _fp16_step_worker(rank: int, world: int, init_file: str, out: str):
    import torch.distributed as dist

    from llmc.runtime.train.loop import _grad_scaler
    from llmc.runtime.train.distributed import DistEnv

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    scaler = _grad_scaler("fp16", DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu")))
    loss = (p * (float("inf") if rank == 1 else 1.0)).sum()   # only rank 1 overflows
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    torch.save({"p": p.detach().clone(), "scale": scaler.get_scale()}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_fp16_ranks_skip_an_overflowing_step_together(tmp_path):
    """Under pp / TP / EP / FSDP each rank holds other gradients: when one overflows, every rank
    must skip the step and back the scale off, or the model replicas drift apart."""
    torch.multiprocessing.spawn(_fp16_step_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for r in results:
        assert torch.equal(r["p"], torch.ones(4))      # no update on either rank
        assert r["scale"] == 2.0 ** 15                  # 2^16 backed off by half on both
