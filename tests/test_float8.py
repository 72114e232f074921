"""fp8 training (runtime/float8.py) against torch's own fp8 matmul, and a run of it.

The reference casts here are written from the recipe (one scale per tensor, amax over the
format's largest value; e4m3 forward, e5m2 gradients) and multiplied by torch._scaled_mm, which
runs on CPU too: llmc's CPU path widens the fp8 operands to bf16 instead, so the two agree to
bf16's rounding, while both differ from the bf16 product by fp8's.
"""

import pytest
import torch
from torch import nn

from llmc.compiler.spec import load_spec
from llmc.runtime.float8 import Float8GroupedExperts, Float8Linear, apply_float8
from llmc.runtime.model import Transformer
from llmc.runtime.model.linear import Linear
from llmc.runtime.model.moe import GroupedExperts

from train_helpers import llmc_train, metrics

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def cast(t: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    fmax = torch.finfo(dtype).max
    scale = t.detach().abs().max().float() / fmax
    return (t.detach().float() / scale).clamp(-fmax, fmax).to(dtype), scale


def scaled_mm(a, b, a_dtype=E4M3, b_dtype=E4M3) -> torch.Tensor:
    """a @ b (fp32 in) through fp8 casts and torch's fp8 kernel, in fp32."""
    (a8, sa), (b8, sb) = cast(a, a_dtype), cast(b, b_dtype)
    return torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=torch.float32)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_linear_forward_and_both_gradients_are_fp8_products():
    torch.manual_seed(0)
    layer = nn.Linear(256, 384, bias=False)
    weight = layer.weight.detach().clone()
    layer.__class__ = Float8Linear
    x = torch.randn(2, 64, 256).bfloat16().requires_grad_()
    grad = torch.randn(2, 64, 384).bfloat16()
    y = layer(x)
    y.backward(grad)

    x2, g2 = x.detach().reshape(-1, 256).float(), grad.reshape(-1, 384).float()
    expect_y = scaled_mm(x2, weight.t())
    expect_dx = scaled_mm(g2, weight, E5M2)
    expect_dw = scaled_mm(g2.t(), x2, E5M2)
    assert y.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.float32
    assert rel(y.reshape(-1, 384), expect_y) < 1e-2
    assert rel(x.grad.reshape(-1, 256), expect_dx) < 1e-2
    assert rel(layer.weight.grad, expect_dw) < 1e-2
    # and it is fp8, not bf16: e4m3 keeps 3 mantissa bits (relative rounding up to 2^-4)
    assert 1e-2 < rel(y.reshape(-1, 384), x2 @ weight.t()) < 0.1


def test_grouped_experts_are_fp8_products_per_expert_with_one_scale_per_expert():
    torch.manual_seed(0)
    E, D, H = 4, 64, 96
    experts = GroupedExperts(E, D, H, "swiglu")
    experts.init_extra(0.02, 0.02)
    with torch.no_grad():
        experts.w1[1] *= 50  # one expert's weights far larger: a per-tensor scale would flush the others
    w1, w2, w3 = (p.detach().clone() for p in (experts.w1, experts.w2, experts.w3))
    experts.__class__ = Float8GroupedExperts
    counts = torch.tensor([5, 0, 7, 4])  # expert 1 gets no token
    x = torch.randn(int(counts.sum()), D).bfloat16().requires_grad_()
    y = experts(x, counts)
    y.float().sum().backward()

    def grouped(inputs, w):  # one scale over all rows (the sorted input), one per expert's weights
        x8, sx = cast(inputs, E4M3)
        out = [torch._scaled_mm(rows, w8.t(), scale_a=sx, scale_b=sw, out_dtype=torch.float32)
               for rows, (w8, sw) in zip(torch.split(x8, counts.tolist()), (cast(we, E4M3) for we in w))]
        return torch.cat(out)

    xf = x.detach().float()
    h = torch.nn.functional.silu(grouped(xf, w1)) * grouped(xf, w3)
    expect = grouped(h, w2)
    assert rel(y, expect) < 2e-2
    assert experts.w1.grad[1].abs().sum() == 0 and experts.w1.grad[0].abs().sum() > 0
    assert x.grad is not None and x.grad.shape == x.shape


def test_apply_float8_converts_the_blocks_linear_layers_and_keeps_gates_head_and_names():
    spec = load_spec("specs/tiny_moe.toml", ["model.mtp.depth=1"])
    model = Transformer(spec.model)
    names = list(model.state_dict())
    changed = apply_float8(model)
    assert list(model.state_dict()) == names
    kinds = {name: type(m) for name, m in model.named_modules()}
    fp8 = [n for n, k in kinds.items() if k in (Float8Linear, Float8GroupedExperts)]
    assert changed == len(fp8) > 0
    assert all(kinds[n] is Linear for n in kinds if n.endswith("router.gate"))
    assert kinds["head"] is Linear and kinds["mtp.0.eh_proj"] is Linear
    assert any(n.startswith("mtp.0.block.") for n in fp8)
    assert any(k is Float8GroupedExperts for k in kinds.values())


def test_an_fp8_run_learns_as_the_bf16_run_does(tmp_path):
    """The same 40 steps in bf16 and fp8: fp8's rounding moves the loss by a little, not the run."""
    final = {}
    for precision in ("bf16", "fp8"):
        done = llmc_train(tmp_path, precision, f'train.precision="{precision}"', "train.max_steps=40",
                          "train.eval_every=0", "train.checkpoint_every=0", "train.log_every=40")
        assert done.returncode == 0, done.stderr[-3000:]
        losses = [m["loss"] for m in metrics(tmp_path / precision) if "loss" in m]
        final[precision] = losses[-1]
        assert losses[-1] < losses[0] - 0.5
    assert final["fp8"] == pytest.approx(final["bf16"], rel=0.03)
