"""MoE against independent references: a per-token loop over the chosen experts, hand-built
router cases (grouped routing, correction bias), the balance loss and bias update by formula."""

import pytest
import torch
import torch.nn.functional as F

from llmc.compiler.spec import ModelSpec
from llmc.runtime.model import Transformer
from llmc.runtime.model.moe import MoE, Router, balance_loss

torch.set_num_threads(2)


def spec(**moe) -> ModelSpec:
    m = dict(n_experts=4, top_k=2, expert_hidden=16)
    m.update(moe)
    return ModelSpec(vocab_size=50, d_model=8, n_layers=2, n_heads=2, ffn_hidden=24, max_seq_len=32, moe=m)


def build_moe(**moe) -> MoE:
    torch.manual_seed(0)
    cfg = spec(**moe)
    model = Transformer(cfg)
    model.init_weights()
    layer = model.layers["0"].ffn
    with torch.no_grad():  # larger weights so routing and outputs are far from ties
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def expert_ref(moe, e, x):
    ex = moe.experts
    h = F.silu(x @ ex.w1[e].T) * (x @ ex.w3[e].T)
    return h @ ex.w2[e].T


@pytest.fixture(params=["grouped_mm", "loop"])
def expert_path(request, monkeypatch):
    """Run a test through both expert computations: torch._grouped_mm and the loop over experts."""
    from llmc.runtime.model.moe import GroupedExperts
    if request.param == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    monkeypatch.setattr(GroupedExperts, "use_grouped_mm", request.param == "grouped_mm")
    return request.param


@pytest.mark.parametrize("moe_cfg", [
    dict(score="softmax", norm_topk=False),
    dict(score="softmax", norm_topk=True, n_shared_experts=1, shared_expert_gate=True),
    dict(score="sigmoid", norm_topk=True, routed_scaling=2.5, balance="aux_free", n_shared_experts=2),
])
def test_dispatch_equals_per_token_loop(moe_cfg, expert_path):
    moe = build_moe(**moe_cfg)
    x = torch.randn(2, 9, 8)
    out = moe(x)
    flat = x.reshape(-1, 8)
    want = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        logits = flat[t] @ moe.router.gate.weight.T
        s = logits.softmax(-1) if moe_cfg["score"] == "softmax" else logits.sigmoid()
        top = s.topk(2).indices
        w = s[top] / s[top].sum() if moe_cfg["norm_topk"] else s[top]
        w = w * moe_cfg.get("routed_scaling", 1.0)
        for e, we in zip(top.tolist(), w):
            want[t] += we * expert_ref(moe, e, flat[t:t + 1])[0]
        if moe.shared is not None:
            sh = moe.shared(flat[t:t + 1])[0]
            if moe.shared_gate is not None:
                sh = torch.sigmoid(flat[t] @ moe.shared_gate.weight[0]) * sh
            want[t] += sh
    torch.testing.assert_close(out.reshape(-1, 8), want, atol=1e-5, rtol=1e-5)
    assert moe.last_counts.sum().item() == 18 * 2


def test_router_counts_match_choices():
    moe = build_moe()
    x = torch.randn(30, 8)
    moe(x)
    _, idx, _ = moe.router(x)
    assert moe.last_counts.tolist() == [int((idx == e).sum()) for e in range(4)]


def router_with_logits(logits, **moe):
    """A Router whose gate returns exactly `logits` for x = identity rows."""
    n, E = logits.shape
    cfg = ModelSpec(vocab_size=50, d_model=n, n_layers=1, n_heads=1, ffn_hidden=8, max_seq_len=8,
                    moe=dict(n_experts=E, expert_hidden=4, **moe))
    r = Router(cfg)
    with torch.no_grad():
        r.gate.weight.copy_(logits.T)
    return r, torch.eye(n)


def test_grouped_routing_by_hand():
    # 8 experts in 4 groups of 2. The single best expert (7) sits in a group whose second expert
    # is poor; with sigmoid+bias routing a group scores its best two, so group {2,3} and {4,5} win.
    logit = torch.tensor([[-4.0, -4.0, 1.0, 1.0, 0.9, 0.9, -4.0, 3.0]])
    r, x = router_with_logits(logit, top_k=2, score="sigmoid", n_groups=4, topk_groups=2, balance="aux_free")
    _, idx, _ = r(x)
    assert sorted(idx[0].tolist()) == [2, 3]
    s = torch.sigmoid(logit[0])
    pair_sums = torch.stack([s[0] + s[1], s[2] + s[3], s[4] + s[5], s[6] + s[7]])
    assert set(pair_sums.topk(2).indices.tolist()) == {1, 2}  # hand check of the premise
    # without a correction bias (DeepSeek-V2), a group scores its best expert: group {6,7} wins
    r, x = router_with_logits(logit, top_k=2, score="softmax", n_groups=4, topk_groups=1, norm_topk=False)
    _, idx, _ = r(x)
    assert sorted(idx[0].tolist()) == [6, 7]


def test_correction_bias_steers_choice_not_weights():
    logit = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    r, x = router_with_logits(logit, top_k=1, score="sigmoid", norm_topk=False, balance="aux_free")
    r.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    w, idx, _ = r(x)
    assert idx.tolist() == [[3]]
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[-1.0]])))


def test_balance_loss_by_formula():
    torch.manual_seed(1)
    scores = torch.rand(6, 4)
    counts = torch.tensor([5, 3, 2, 2])
    # f_e = E * c_e / (k N), P_e = mean_t s_te / sum_e' s_te'
    want = sum((4 * counts[e] / (2 * 6)) * (scores[:, e] / scores.sum(1)).mean() for e in range(4))
    torch.testing.assert_close(balance_loss(scores, counts, 2), want)
    # perfectly balanced load and uniform probabilities give 1
    assert balance_loss(torch.full((4, 4), 0.25), torch.tensor([2, 2, 2, 2]), 2).item() == pytest.approx(1.0)


def test_aux_loss_in_model_output_weighted():
    torch.manual_seed(2)
    cfg = spec(aux_loss_coef=0.5)
    model = Transformer(cfg)
    model.init_weights()
    tokens = torch.randint(0, 50, (2, 6))
    out = model(tokens, tokens.roll(-1, 1))
    layers = [model.layers[str(i)].ffn for i in range(2)]
    assert out.expert_counts.shape == (2, 4) and out.expert_counts.dtype == torch.long
    assert out.expert_counts.sum(1).tolist() == [24, 24]
    total = sum(layer.last_aux_loss for layer in layers)
    torch.testing.assert_close(out.aux_loss, total)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    assert 0.5 * 0.9 < layers[0].last_aux_loss.item() < 0.5 * 2.0  # ~1 near balance, times coef
    out.loss.backward()
    assert model.layers["0"].ffn.router.gate.weight.grad.abs().sum() > 0


def test_aux_free_bias_update_rule():
    torch.manual_seed(3)
    model = Transformer(spec(balance="aux_free", bias_update_speed=0.01, aux_loss_coef=0.0))
    model.init_weights()
    assert [n for n, _ in model.named_parameters() if "correction" in n] == []  # a buffer, not trained
    model.update_router_bias(torch.tensor([[5, 1, 3, 3], [0, 0, 0, 12]]))
    torch.testing.assert_close(model.layers["0"].ffn.router.e_score_correction_bias,
                               torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    torch.testing.assert_close(model.layers["1"].ffn.router.e_score_correction_bias,
                               torch.tensor([0.01, 0.01, 0.01, -0.01]))
    assert "layers.0.ffn.router.e_score_correction_bias" in model.state_dict()
    out = model(torch.randint(0, 50, (1, 5)), torch.randint(0, 50, (1, 5)))
    assert out.aux_loss is None


def test_mtp_moe_block_counts_and_bias_update():
    """DeepSeek-V3's MTP block is an MoE layer too: its routing counts follow the main layers'
    rows and aux-free balancing updates its correction bias by the same rule."""
    torch.manual_seed(4)
    base = spec(balance="aux_free", bias_update_speed=0.01, aux_loss_coef=0.0).model_dump()
    cfg = ModelSpec(**{**base, "mtp": {"depth": 1}})
    model = Transformer(cfg)
    model.init_weights()
    assert model.mtp[0].block.is_moe
    tokens = torch.randint(0, 50, (2, 6))
    out = model(tokens, tokens.roll(-1, 1))
    assert out.expert_counts.shape == (3, 4)            # two layers, then the MTP block
    assert out.expert_counts.sum(1).tolist() == [2 * 6 * 2] * 3   # every position routes top_k = 2
    assert model(tokens).expert_counts.shape == (2, 4)  # no labels: MTP does not run
    model.update_router_bias(torch.tensor([[3, 3, 3, 3], [3, 3, 3, 3], [9, 1, 1, 1]]))
    torch.testing.assert_close(model.mtp[0].block.ffn.router.e_score_correction_bias,
                               torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    torch.testing.assert_close(model.layers["0"].ffn.router.e_score_correction_bias, torch.zeros(4))


def test_correction_bias_stays_fp32_when_the_model_is_cast_to_bf16():
    model = Transformer(spec(balance="aux_free", bias_update_speed=0.001, aux_loss_coef=0.0)).to(torch.bfloat16)
    model.init_weights()
    bias = model.layers["0"].ffn.router.e_score_correction_bias
    assert bias.dtype == torch.float32 and model.layers["0"].ffn.router.gate.weight.dtype == torch.bfloat16
    for _ in range(1001):  # 1 + 1000 steps of 0.001: in bf16 the updates would stop near 0.25 .. 1
        model.update_router_bias(torch.tensor([[1, 3, 3, 3], [3, 3, 3, 3]]))
    assert model.layers["0"].ffn.router.e_score_correction_bias[0].item() == pytest.approx(1.001, abs=1e-4)
    out = model(torch.randint(0, 50, (1, 5)))
    assert out.logits.dtype == torch.bfloat16


def test_a_bf16_model_with_an_fp32_correction_bias_loads_as_stored(tmp_path):
    """The fp32 bias beside bf16 weights does not make the stored model load in fp32."""
    from llmc.runtime.model.io import load_model, save_model
    model = Transformer(spec(balance="aux_free")).to(torch.bfloat16)
    model.init_weights()
    model.layers["0"].ffn.router.e_score_correction_bias.copy_(torch.tensor([0.5, -0.25, 0.0, 1e-3]))
    save_model(model, {"version": 1, "spec": {"model": model.cfg.model_dump(mode="json")}}, tmp_path)
    loaded, _, _ = load_model(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    bias = loaded.layers["0"].ffn.router.e_score_correction_bias
    assert bias.dtype == torch.float32 and bias[3].item() == pytest.approx(1e-3, rel=1e-6)
    tokens = torch.randint(0, 50, (2, 7))
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_experts_with_bias_and_plain_activation():
    torch.manual_seed(4)
    cfg = ModelSpec(vocab_size=50, d_model=8, n_layers=1, n_heads=2, ffn_hidden=24, max_seq_len=32,
                    activation="gelu", mlp_bias=True, moe=dict(n_experts=3, top_k=1, expert_hidden=16,
                                                               norm_topk=False))
    model = Transformer(cfg)
    model.init_weights()
    moe = model.layers["0"].ffn
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(7, 8)
    out = moe(x)
    ex = moe.experts
    assert ex.w3 is None
    for t in range(7):
        s = (x[t] @ moe.router.gate.weight.T).softmax(-1)
        e = int(s.argmax())
        want = s[e] * (F.gelu(x[t] @ ex.w1[e].T + ex.b1[e]) @ ex.w2[e].T + ex.b2[e])
        torch.testing.assert_close(out[t], want, atol=1e-5, rtol=1e-5)


def test_moe_bf16_forward_backward(expert_path):
    model = Transformer(spec(n_shared_experts=1)).to(torch.bfloat16)
    model.init_weights()
    tokens = torch.randint(0, 50, (2, 6))
    out = model(tokens, tokens.roll(-1, 1))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert torch.isfinite(model.layers["0"].ffn.experts.w1.grad).all()


def test_expert_gradients_equal_between_paths(monkeypatch):
    from llmc.runtime.model.moe import GroupedExperts
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    moe = build_moe()
    x = torch.randn(12, 8)
    grads = []
    for grouped in (True, False):
        monkeypatch.setattr(GroupedExperts, "use_grouped_mm", grouped)
        moe.zero_grad()
        (moe(x) * torch.linspace(-1, 1, 8)).sum().backward()
        grads.append([p.grad.clone() for p in moe.experts.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
