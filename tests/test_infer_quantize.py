"""Weight-only int8/int4 quantization: error bounds derived by hand, int4 packing, checkpoint size,
and perplexity on a real text (int8 within 1% of fp32, int4 within 5% — the documented bound)."""

import copy
import json
import math

import pytest
import torch
from safetensors import safe_open

from llmc.compiler.cli import main as llmc
from llmc.compiler.errors import UserError
from llmc.runtime.infer.checkpoint import load_for_inference
from llmc.runtime.infer.quantize import QuantConfig, QuantLinear, dequantize_tensor, quantize_model, quantize_tensor
from test_infer_checkpoints import (one_thread, DENSE, REAL_TEXT, checkpoint, fit,  # noqa: F401
                                    random_model, spec_with, tokenizer)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rounding_error_is_at_most_half_a_step(bits, symmetric):
    cfg = QuantConfig(bits, group_size=32, symmetric=symmetric)
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(0)) * 0.02
    q = quantize_tensor(w, cfg)
    back = dequantize_tensor(q["codes"], q["scales"], q.get("zeros"), w.shape, cfg)
    groups = torch.nn.functional.pad(w.flatten(), (0, (-w.numel()) % 32)).view(-1, 32)
    if symmetric:   # step = absmax / (2^(bits-1) - 1)
        step = groups.abs().amax(1) / (2 ** (bits - 1) - 1)
    else:           # step = range / (2^bits - 1), the range always containing 0
        step = (groups.amax(1).clamp(min=0) - groups.amin(1).clamp(max=0)) / (2 ** bits - 1)
    err = torch.nn.functional.pad((back - w).flatten(), (0, (-w.numel()) % 32)).view(-1, 32).abs().amax(1)
    # half a step, plus the bf16 rounding of the scale (up to 2^-7 relative, times at most 2^(bits-1) steps)
    assert bool((err <= step * (0.5 + 2 ** (bits - 1) * 2 ** -7) + 1e-9).all())
    assert q["codes"].numel() == math.ceil(w.numel() / 32) * 32 * bits // 8


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    cfg = QuantConfig(4, group_size=4, symmetric=True)
    # absmax 7 -> scale 1: codes are value + 8
    w = torch.tensor([[-7.0, 0.0, 1.0, 7.0]])
    q = quantize_tensor(w, cfg)
    assert q["scales"].float().tolist() == [1.0]
    assert q["codes"].tolist() == [1 | (8 << 4), 9 | (15 << 4)]


def test_quant_linear_matches_linear_with_dequantised_weight():
    lin = torch.nn.Linear(40, 24, bias=True)
    cfg = QuantConfig(8, 16)
    ql = QuantLinear.from_linear(lin, cfg)
    x = torch.randn(3, 40)
    w = dequantize_tensor(*[quantize_tensor(lin.weight, cfg)[k] for k in ("codes", "scales")], None, (24, 40), cfg)
    assert torch.allclose(ql(x), x @ w.T + lin.bias, atol=1e-5)
    assert torch.allclose(ql(x), lin(x), atol=0.02)


def test_bad_quantization_settings_are_user_errors():
    with pytest.raises(UserError):
        QuantConfig(bits=3)
    with pytest.raises(UserError):
        QuantConfig(bits=4, group_size=7)


def _perplexity(model, ids):
    x = torch.tensor(ids)
    n = (len(x) - 1) // 128 * 128
    with torch.no_grad():
        loss = model(x[:n].view(-1, 128), labels=x[1:n + 1].view(-1, 128)).lm_loss
    return math.exp(loss.item())


def test_quantized_perplexity_stays_close_on_a_real_text():
    tok = tokenizer()
    ids = tok.encode(REAL_TEXT).ids
    split = int(0.9 * len(ids))
    model = fit(random_model(spec_with(DENSE)), ids[:split], steps=60, lr=1e-2)
    held_out = ids[split:]
    fp32 = _perplexity(model, held_out)
    assert fp32 < 400          # it has learned something (uniform would be ~512)
    int8 = _perplexity(quantize_model(copy.deepcopy(model), QuantConfig(8, 128)), held_out)
    int4 = _perplexity(quantize_model(copy.deepcopy(model), QuantConfig(4, 128)), held_out)
    int4_asym = _perplexity(quantize_model(copy.deepcopy(model), QuantConfig(4, 64, symmetric=False)), held_out)
    assert abs(int8 / fp32 - 1) < 0.01
    assert abs(int4 / fp32 - 1) < 0.05
    assert abs(int4_asym / fp32 - 1) < 0.05


def hand_bytes(state: dict, bits: int, group: int, symmetric: bool) -> int:
    """Matrices: ceil(n/g)*g*bits/8 code bytes + 2 bytes of scale (+1 zero point) per group;
    embeddings and vectors (norms): bf16. MTP modules are not stored."""
    total = 0
    for name, t in state.items():
        n, groups = t.numel(), math.ceil(t.numel() / group)
        if name.startswith("mtp."):
            continue
        if t.dim() >= 2 and not name.startswith(("embed.", "pos_embed.")):
            total += groups * group * bits // 8 + groups * (2 + (0 if symmetric else 1))
        else:
            total += 2 * n
    return total


def stored_bytes(path) -> int:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())


@pytest.mark.parametrize("bits,symmetric,group", [(8, True, 128), (4, True, 128), (4, False, 64)])
def test_quantized_checkpoint_size_and_round_trip(tmp_path, bits, symmetric, group, capsys):
    src = checkpoint(tmp_path)
    out = tmp_path / f"int{bits}"
    args = ["quantize", str(src), "--bits", str(bits), "--group-size", str(group), "-o", str(out)]
    assert llmc(args + ([] if symmetric else ["--asymmetric"])) == 0
    assert f"int{bits}" in capsys.readouterr().out
    reference, plan, _ = load_for_inference(src)
    stored = stored_bytes(out)
    assert stored == hand_bytes(reference.state_dict(), bits, group, symmetric)
    if group == 128 and symmetric:
        # the planner's figure (same formula, up to biases and per-tensor padding)
        assert abs(stored / plan["memory"]["inference"]["weights"][f"int{bits}"] - 1) < 0.01
    # the quantized checkpoint generates like any other, with logits close to the original's
    qmodel, _, _ = load_for_inference(out)
    x = torch.tensor([[5, 17, 300, 2, 9]])
    with torch.no_grad():
        diff = (qmodel(x).logits - reference(x).logits).abs().max().item()
    assert diff < (0.05 if bits == 8 else 0.3)
    assert llmc(["generate", str(out), "--prompt", "def", "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] <= 4
    assert llmc(["quantize", str(out), "--bits", "8", "-o", str(tmp_path / "again")]) == 1
    # export hf takes the original: it refused the quantized folder as "does not match its plan.json"
    assert llmc(["export", "hf", str(out), "-o", str(tmp_path / "hf")]) == 1
    assert "quantized checkpoint" in capsys.readouterr().err and not (tmp_path / "hf").exists()


def test_a_bf16_checkpoint_quantizes_from_its_exact_values(tmp_path):
    """quantize reads a bf16 checkpoint as stored (not as an fp32 copy of the whole model, twice its
    memory: bench/bench_load.py) and loses nothing by it: each matrix's codes and scales are those
    of its values in fp32, and the embedding is kept bit for bit."""
    from llmc.runtime.model.io import load_model, save_model
    src = checkpoint(tmp_path)
    model, plan, tok = load_model(src)
    save_model(model.to(torch.bfloat16), plan, tmp_path / "bf16", tok)
    assert llmc(["quantize", str(tmp_path / "bf16"), "--bits", "4", "-o", str(tmp_path / "int4")]) == 0
    with safe_open(str(tmp_path / "int4" / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    cfg = QuantConfig(bits=4)
    layer = model.layers["0"]
    for name, w in (("layers.0.attn.wq", layer.attn.wq.weight), ("layers.0.ffn.w2", layer.ffn.w2.weight),
                    ("head", model.head.weight)):
        expected = quantize_tensor(w.float(), cfg)
        assert torch.equal(stored[f"{name}.qweight.codes"], expected["codes"]), name
        assert torch.equal(stored[f"{name}.qweight.scales"], expected["scales"]), name
    assert torch.equal(stored["embed.weight"], model.embed.weight)


@pytest.mark.parametrize("bits,symmetric,in_features", [(4, True, 256), (4, False, 256), (4, True, 704),
                                                       (4, False, 96), (8, True, 256), (8, True, 704)])
def test_fused_int4_kernel_matches_the_dequantised_weight(bits, symmetric, in_features):
    # 704 = 5.5 groups of 128 per row (groups straddle rows): the kernel runs with groups of 64;
    # int8 runs as two int4 planes (high and low nibbles)
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_features, 96, bias=True)
    cfg = QuantConfig(bits, 128, symmetric=symmetric)
    ql = QuantLinear.from_linear(lin, cfg)
    assert ql._int4_planes() is not None and len(ql._int4_planes()[0]) == bits // 4
    x = torch.randn(2, 3, in_features)
    q = quantize_tensor(lin.weight, cfg)
    w = dequantize_tensor(q["codes"], q["scales"], q.get("zeros"), (96, in_features), cfg)
    expected = x @ w.T + lin.bias
    # bf16 activations and bf16 zero points: about 2^-8 relative error on each product
    assert torch.allclose(ql(x), expected, atol=0.02 * expected.abs().max().item())


def test_asymmetric_int8_dequantises_exactly():
    lin = torch.nn.Linear(256, 64, bias=False)
    cfg = QuantConfig(8, 128, symmetric=False)
    ql = QuantLinear.from_linear(lin, cfg)
    assert ql._int4_planes() is None
    x = torch.randn(3, 256)
    q = quantize_tensor(lin.weight, cfg)
    w = dequantize_tensor(q["codes"], q["scales"], q["zeros"], (64, 256), cfg)
    torch.testing.assert_close(ql(x), x @ w.T, atol=1e-5, rtol=1e-5)
