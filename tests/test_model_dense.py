"""Dense Transformer behaviour against independent references (naive attention, hand-derived
RoPE, transformers' Llama), dtype coverage, meta-device building and the checkpoint folder."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from llmc.compiler.errors import UserError
from llmc.compiler.spec import ModelSpec
from llmc.runtime.model import Transformer, component_of
from llmc.runtime.model.attention import Attention, ShortCausalAttention, causal_attention
from llmc.runtime.model.io import load_model, save_model
from llmc.runtime.model.mlp import MLP
from llmc.runtime.model.rope import apply_rope, rope_cos_sin, rope_inv_freq

torch.set_num_threads(2)


def spec(**over) -> ModelSpec:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=64)
    base.update(over)
    return ModelSpec(**base)


def build(**over) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(spec(**over))
    m.init_weights()
    return m


def naive_attention(q, k, v, scale):
    """softmax(q k^T * scale + causal -inf mask) v over [B, H, T, D], with kv heads repeated."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    T, S = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) * scale
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_sdpa_attention_equals_naive_softmax(kv_heads):
    torch.manual_seed(1)
    q = torch.randn(2, 4, 7, 8)
    k, v = torch.randn(2, kv_heads, 7, 8), torch.randn(2, kv_heads, 7, 8)
    out = causal_attention(q, k, v, scale=8 ** -0.5)
    torch.testing.assert_close(out, naive_attention(q, k, v, 8 ** -0.5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_bf16_matmul_attention_equals_fp32_reference_with_gradients(kv_heads):
    """The CPU bf16 path (two matmuls, fp32 softmax) against the naive fp32 formula, forward and
    backward, with a non-contiguous q as the model passes it."""
    torch.manual_seed(3)
    q = torch.randn(2, 9, 4, 16).transpose(1, 2)
    k, v = torch.randn(2, kv_heads, 9, 16), torch.randn(2, kv_heads, 9, 16)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    low_in = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    ref = naive_attention(*ref_in, 0.25)
    low = causal_attention(*low_in, scale=0.25)
    torch.testing.assert_close(low.float(), ref, atol=3e-2, rtol=3e-2)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    low.backward(grad.to(torch.bfloat16))
    for a, b in zip(low_in, ref_in):
        torch.testing.assert_close(a.grad.float(), b.grad, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("kv_heads, v_dim", [(4, 8), (2, 8), (1, 5)])
def test_short_causal_attention_gradients_by_finite_differences(kv_heads, v_dim):
    """Its hand-written backward (dS = P * (dP - rowsum(dO * O))) against float64 finite
    differences, with grouped kv heads and a value width unlike the key width (MLA)."""
    torch.manual_seed(4)
    q = torch.randn(2, 6, 4, 8, dtype=torch.float64).transpose(1, 2).requires_grad_()
    k = torch.randn(2, kv_heads, 6, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, kv_heads, 6, v_dim, dtype=torch.float64, requires_grad=True)
    out = ShortCausalAttention.apply(q, k, v, 0.3)
    torch.testing.assert_close(out, naive_attention(q, k, v, 0.3))
    assert torch.autograd.gradcheck(lambda *t: ShortCausalAttention.apply(*t, 0.3), (q, k, v))


def test_attention_with_cache_offset_equals_naive():
    torch.manual_seed(2)
    q = torch.randn(1, 2, 3, 8)            # 3 new queries after 5 cached keys
    k, v = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    out = causal_attention(q, k, v, scale=0.3, start_pos=5)
    torch.testing.assert_close(out, naive_attention(q, k, v, 0.3), atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_weights():
    torch.manual_seed(3)
    gqa = Attention(spec(n_heads=4, n_kv_heads=2))
    mha = Attention(spec(n_heads=4, n_kv_heads=None, attention={"kind": "mha"}))
    hd = 8
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        # kv head j serves query heads 2j, 2j+1: repeat its rows for MHA
        for name in ("wk", "wv"):
            w = getattr(gqa, name).weight.view(2, hd, -1).repeat_interleave(2, 0).reshape(4 * hd, -1)
            getattr(mha, name).weight.copy_(w)
    x = torch.randn(2, 6, 32)
    cos, sin = rope_cos_sin(torch.arange(6), rope_inv_freq(hd, spec().rope))
    torch.testing.assert_close(gqa(x, cos, sin), mha(x, cos, sin), atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(4)
    inv = rope_inv_freq(16, spec().rope)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([pq]), inv)
        ck, sk = rope_cos_sin(torch.tensor([pk]), inv)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(7, 3), score(7, 4), atol=1e-3)


def test_rope_rotate_half_layout_by_hand():
    # dim i pairs with dim i + D/2, rotated by angle pos * theta^(-2i/D)
    inv = rope_inv_freq(4, spec().rope)
    torch.testing.assert_close(inv, torch.tensor([1.0, 10000 ** -0.5]))
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    cos, sin = rope_cos_sin(torch.tensor([3]), inv)
    a0, a1 = 3 * 1.0, 3 * 10000 ** -0.5
    expect = torch.tensor([1 * math.cos(a0) - 3 * math.sin(a0), 2 * math.cos(a1) - 4 * math.sin(a1),
                           3 * math.cos(a0) + 1 * math.sin(a0), 4 * math.cos(a1) + 2 * math.sin(a1)])
    torch.testing.assert_close(apply_rope(x, cos, sin).view(4), expect, atol=1e-5, rtol=1e-5)


def test_llama3_rope_scaling_by_hand():
    rope = spec(max_seq_len=64, rope={"theta": 500000.0, "scaling": "llama3", "factor": 8.0,
                                      "original_max_seq_len": 32}).rope
    inv = rope_inv_freq(8, rope)
    base = [500000.0 ** (-i / 8) for i in (0, 2, 4, 6)]
    for got, f in zip(inv.tolist(), base):
        wavelen = 2 * math.pi / f
        if wavelen < 32 / 4:            # high frequency: kept
            want = f
        elif wavelen > 32 / 1:          # low frequency: divided by the factor
            want = f / 8
        else:
            s = (32 / wavelen - 1) / (4 - 1)
            want = (1 - s) * f / 8 + s * f
        assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("activation,fn", [
    ("swiglu", lambda g, u: F.silu(g) * u), ("geglu", lambda g, u: F.gelu(g) * u),
    ("gelu", lambda g, u: 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))),
    ("gelu_tanh", lambda g, u: 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))),
    ("relu", lambda g, u: g.clamp(min=0)), ("silu", lambda g, u: g * torch.sigmoid(g))])
def test_mlp_activations_by_formula(activation, fn):
    torch.manual_seed(5)
    mlp = MLP(8, 16, activation, bias=True)
    x = torch.randn(3, 8)
    g = x @ mlp.w1.weight.T + mlp.w1.bias
    u = x @ mlp.w3.weight.T + mlp.w3.bias if mlp.w3 is not None else None
    want = fn(g, u) @ mlp.w2.weight.T + mlp.w2.bias
    torch.testing.assert_close(mlp(x), want, atol=1e-5, rtol=1e-5)
    assert (mlp.w3 is not None) == (activation in ("swiglu", "geglu"))


def saved_for_backward(fn, *inputs):
    """(shape, dtype) of each tensor autograd keeps for the backward of fn(*inputs), inputs included."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t,
                                                  lambda t: t):
        fn(*inputs)
    return saved


@pytest.mark.parametrize("activation, act", [("swiglu", F.silu), ("geglu", F.gelu)])
def test_gated_product_gradients_and_what_it_keeps(activation, act):
    from llmc.runtime.model.mlp import gated
    torch.manual_seed(6)
    a, b = (torch.randn(3, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda a, b: gated(activation, a, b), (a, b))
    a16, b16 = (t.detach().to(torch.bfloat16).requires_grad_() for t in (a, b))
    torch.testing.assert_close(gated(activation, a16, b16), act(a16) * b16, atol=0, rtol=0)
    # the gate's input and the up projection; autograd through act(a) * b also keeps act(a)
    assert saved_for_backward(lambda a, b: gated(activation, a, b), a16, b16) == [((3, 5), torch.bfloat16)] * 2
    assert len(saved_for_backward(lambda a, b: act(a) * b, a16, b16)) == 3


def test_rms_norm_gradients_and_what_it_keeps():
    from llmc.runtime.model.norm import RMSNorm, _RMSNormFunction
    torch.manual_seed(7)
    norm = RMSNorm(6, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-5), (x, norm.weight))
    # bf16 input: computed in fp32 and cast back (Llama's RMSNorm), against the formula with autograd
    norm = norm.float()
    x16 = x.detach().to(torch.bfloat16).requires_grad_()
    ref_x = x16.detach().clone().requires_grad_()
    ref_w = norm.weight.detach().clone().requires_grad_()
    want = (ref_x.float() * torch.rsqrt(ref_x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16() \
        * ref_w.bfloat16()
    got = norm(x16)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    g = torch.randn_like(got)
    want.backward(g)
    got.backward(g)
    torch.testing.assert_close(x16.grad, ref_x.grad, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(norm.weight.grad, ref_w.grad, atol=2e-2, rtol=2e-2)
    # kept for the backward: x in bf16, 1/rms per row in fp32, the weight (no fp32 copy of x)
    assert saved_for_backward(norm, x16) == [((2, 3, 6), torch.bfloat16), ((2, 3, 1), torch.float32),
                                             ((6,), torch.float32)]


def test_loss_is_mean_cross_entropy_over_unmasked_labels():
    m = build()
    tokens = torch.randint(0, 97, (2, 10))
    labels = torch.randint(0, 97, (2, 10))
    labels[0, :4] = -100
    out = m(tokens, labels)
    logp = out.logits.float().log_softmax(-1)
    keep = labels != -100
    want = -logp[keep].gather(-1, labels[keep][:, None]).mean()
    torch.testing.assert_close(out.loss, want)
    assert out.aux_loss is None and out.mtp_loss is None and out.expert_counts is None
    assert m(tokens).loss is None


def test_tied_head_uses_embedding_and_learned_positions_shift_logits():
    m = build(tie_embeddings=True, positions="learned", norm="layernorm", activation="gelu_tanh",
              qkv_bias=True, out_bias=True, mlp_bias=True, attention={"kind": "mha"}, n_kv_heads=None)
    assert m.head is None and m.pos_embed is not None
    h = m.norm(torch.zeros(1, 5, 32) + 1.0)
    torch.testing.assert_close(m.output(torch.zeros(1, 5, 32) + 1.0), h @ m.embed.weight.T)
    # the same token at two positions gets different logits only through pos_embed
    same = torch.full((1, 4), 3)
    logits = m(same).logits
    assert not torch.allclose(logits[0, 0], logits[0, 1])


def test_qk_norm_normalises_each_head():
    m = build(qk_norm=True)
    attn = m.layers["0"].attn
    seen = {}
    attn.q_norm.register_forward_hook(lambda mod, inp, out: seen.setdefault("q", out))
    m(torch.randint(0, 97, (1, 4)))
    rms = seen["q"].pow(2).mean(-1).sqrt()  # weight is ones at init: unit RMS per head
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=1e-3)


def test_depth_scaled_init():
    m = build(n_layers=8, d_model=64, ffn_hidden=256, n_heads=4)
    std = lambda p: p.float().std().item()  # noqa: E731
    assert std(m.layers["0"].attn.wq.weight) == pytest.approx(0.02, rel=0.05)
    assert std(m.layers["0"].attn.wo.weight) == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert std(m.layers["3"].ffn.w2.weight) == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.equal(m.layers["1"].attn_norm.weight, torch.ones(64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_backward_in_dtype(dtype):
    m = build().to(dtype)
    tokens = torch.randint(0, 97, (2, 8))
    out = m(tokens, tokens.roll(-1, 1))
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(math.log(97), abs=0.3)  # near-uniform at init
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_bf16_autocast_matches_fp32():
    m = build()
    tokens = torch.randint(0, 97, (2, 8))
    ref = m(tokens).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(tokens).logits
    torch.testing.assert_close(low.float(), ref, atol=0.05, rtol=0.05)


def test_meta_build_to_empty_init_weights():
    with torch.device("meta"):
        m = Transformer(spec())
    assert all(p.is_meta for p in m.parameters())
    m.to_empty(device="cpu")
    m.init_weights()
    ref = build()
    torch.testing.assert_close(m.inv_freq, ref.inv_freq)
    out = m(torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 6)))
    assert torch.isfinite(out.loss)
    assert m.layers["0"].attn_norm.weight.eq(1).all()


def test_component_of_names():
    assert component_of("embed.weight") == "embedding"
    assert component_of("layers.3.attn.wq.weight") == "attention"
    assert component_of("layers.3.attn.indexer.wk.weight") == "indexer"
    assert component_of("layers.0.ffn.w1.weight") == "mlp"
    assert component_of("layers.0.ffn.experts.w1") == "experts"
    assert component_of("layers.0.ffn.shared.w2.weight") == "shared_experts"
    assert component_of("layers.0.ffn.shared_gate.weight") == "shared_experts"
    assert component_of("layers.0.ffn.router.gate.weight") == "router"
    assert component_of("layers.0.attn_norm.weight") == "norms"
    assert component_of("_orig_mod.norm.weight") == "norms"
    assert component_of("mtp.0.eh_proj.weight") == "mtp"
    assert component_of("head.weight") == "head"
    with pytest.raises(ValueError):
        component_of("layers.0.mystery.weight")


def test_save_load_roundtrip_and_run_dir(tmp_path):
    from tokenizers import Tokenizer, models
    m = build()
    plan = {"version": 1, "spec": {"model": m.cfg.model_dump(mode="json")}}
    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    save_model(m, plan, tmp_path / "run" / "model", tokenizer=tok)
    assert json.loads((tmp_path / "run" / "model" / "plan.json").read_text()) == plan
    for path in (tmp_path / "run" / "model", tmp_path / "run"):
        m2, plan2, tok2 = load_model(path, "cpu")
        tokens = torch.randint(0, 97, (1, 7))
        assert torch.equal(m(tokens).logits, m2(tokens).logits)
        assert tok2.token_to_id("a") == 0
    m3, _, _ = load_model(tmp_path / "run", "cpu", "bf16")
    assert m3.embed.weight.dtype == torch.bfloat16
    with pytest.raises(UserError):
        load_model(tmp_path / "nothing-here")


def test_a_bf16_model_rotates_long_positions_by_the_exact_angles():
    """Casting the model to bf16 keeps RoPE's frequencies fp32: a bf16 inv_freq (2^-9 relative
    error) would turn position 8191 by angles up to 0.8 radians off (theta 1e4, head dim 8)."""
    m = build(max_seq_len=8192).to(torch.bfloat16)
    assert m.inv_freq.dtype == torch.float32
    pos = torch.tensor([4000, 8191])
    cos, sin = m.rope(pos, torch.bfloat16)
    d = m.cfg.rope_dim
    angles = pos.double()[:, None] * m.cfg.rope.theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    torch.testing.assert_close(cos[:, 0, : d // 2].double(), angles.cos(), atol=8e-3, rtol=0)
    torch.testing.assert_close(sin[:, 0, d // 2:].double(), angles.sin(), atol=8e-3, rtol=0)


def test_a_model_folder_loads_into_the_files_tensors_without_initialising(tmp_path, monkeypatch):
    """load_model takes the weights as the model's tensors: no random init of a model the size of
    the checkpoint (bench/bench_load.py measures what that saves), RoPE's buffer still computed."""
    m = build().to(torch.bfloat16)
    save_model(m, {"version": 1, "spec": {"model": m.cfg.model_dump(mode="json")}}, tmp_path)

    def refuse(self):
        raise AssertionError("load_model initialised the weights")
    monkeypatch.setattr(Transformer, "init_weights", refuse)
    m2, _, _ = load_model(tmp_path)
    assert m2.embed.weight.dtype == torch.bfloat16 and m2.inv_freq.device.type == "cpu"
    torch.testing.assert_close(m2.inv_freq, rope_inv_freq(m.cfg.rope_dim, m.cfg.rope))
    tokens = torch.randint(0, 97, (1, 7))
    assert torch.equal(m(tokens).logits, m2(tokens).logits)


def test_logits_equal_transformers_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    m = build()
    sd = hf.state_dict()
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}
    for i in range(2):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        names.update({p + "attn_norm.weight": q + "input_layernorm.weight",
                      p + "ffn_norm.weight": q + "post_attention_layernorm.weight"})
        for a, b in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            names[p + f"attn.{a}.weight"] = q + f"self_attn.{b}.weight"
        for a, b in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            names[p + f"ffn.{a}.weight"] = q + f"mlp.{b}.weight"
    m.load_state_dict({k: sd[v] for k, v in names.items()})
    tokens = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(m(tokens).logits, hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_save_model_strips_wrapper_prefixes(tmp_path):
    m = build()

    class Wrapper(torch.nn.Module):  # what DDP / torch.compile put around a model
        def __init__(self, inner):
            super().__init__()
            self.module = inner
            self.cfg = inner.cfg

    save_model(Wrapper(m), {"version": 1, "spec": {"model": m.cfg.model_dump(mode="json")}}, tmp_path)
    m2, _, tok = load_model(tmp_path)
    assert tok is None
    assert torch.equal(m2.embed.weight, m.embed.weight)


def test_last_only_logits_are_the_last_position_of_the_full_forward():
    m = build()
    tokens = torch.randint(0, 97, (2, 9))
    last = m(tokens, last_only=True).logits
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last, m(tokens).logits[:, -1:])
    with pytest.raises(ValueError, match="last_only"):
        m(tokens, tokens, last_only=True)
