"""MLA, YaRN, the DSA indexer and MTP against references written out here from the papers."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmc.compiler.spec import ModelSpec
from llmc.runtime.model import Transformer
from llmc.runtime.model.indexer import _IndexScore, alignment_loss
from llmc.runtime.model.rope import apply_rope, rope_cos_sin, rope_inv_freq

torch.set_num_threads(2)

MLA = dict(kind="mla", q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)


def spec(attention=None, **over) -> ModelSpec:
    base = dict(vocab_size=61, d_model=16, n_layers=2, n_heads=3, ffn_hidden=24, max_seq_len=64,
                attention=attention or MLA)
    base.update(over)
    return ModelSpec(**base)


def build(**over) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(spec(**over))
    m.init_weights()
    with torch.no_grad():  # larger attention weights: sharper, position-dependent attention
        for name, p in m.named_parameters():
            if ".attn." in name and p.dim() == 2:
                p.normal_(0, 0.3)
    return m


def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def mla_reference(attn, x, cos, sin, keep=None):
    """DeepSeek-V2 eqs. (37)-(47): per-head [q_nope|q_rope] . [k_nope|k_rope_shared], naive softmax."""
    B, T, _ = x.shape
    H, dn, dr, dv = 3, 6, 4, 5
    cq = rms(x @ attn.wq_a.weight.T, attn.q_norm.weight)
    q = (cq @ attn.wq_b.weight.T).view(B, T, H, dn + dr)
    kv_a = x @ attn.wkv_a.weight.T
    ckv, kr = kv_a[..., :10], kv_a[..., 10:]
    kv = (rms(ckv, attn.kv_norm.weight) @ attn.wkv_b.weight.T).view(B, T, H, dn + dv)
    qr = apply_rope(q[..., dn:], cos, sin)
    kr = apply_rope(kr[:, :, None, :], cos, sin)
    out = torch.zeros(B, T, H, dv)
    for b in range(B):
        for h in range(H):
            s = (q[b, :, h, :dn] @ kv[b, :, h, :dn].T + qr[b, :, h] @ kr[b, :, 0].T) * attn.scale
            allowed = torch.ones(T, T, dtype=torch.bool).tril() if keep is None else keep[b]
            p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
            out[b, :, h] = p @ kv[b, :, h, dn:]
    return out.reshape(B, T, H * dv) @ attn.wo.weight.T


def test_mla_equals_reference_and_scale():
    m = build()
    attn = m.layers["0"].attn
    assert attn.scale == pytest.approx(10 ** -0.5)
    x = torch.randn(2, 7, 16)
    cos, sin = rope_cos_sin(torch.arange(7), m.inv_freq)
    torch.testing.assert_close(attn(x, cos, sin), mla_reference(attn, x, cos, sin), atol=1e-5, rtol=1e-5)


def test_mla_full_rank_query():
    m = build(attention=dict(MLA, q_lora_rank=0))
    attn = m.layers["0"].attn
    assert not hasattr(attn, "wq_a") and attn.wq.weight.shape == (3 * 10, 16)
    assert torch.isfinite(m(torch.randint(0, 61, (1, 5))).logits).all()


class ListCache:
    """A minimal cache honouring the documented hook: append and return everything so far."""

    def __init__(self):
        self.parts, self.index = [], []

    def update(self, a, b, start_pos):  # tokens on dim -2: [B, T, C] (MLA), [B, H, T, D] (GQA)
        assert start_pos == sum(p[0].shape[-2] for p in self.parts)
        self.parts.append((a, b))
        return torch.cat([p[0] for p in self.parts], -2), torch.cat([p[1] for p in self.parts], -2)

    def update_index(self, k, start_pos):
        self.index.append(k)
        return torch.cat(self.index, 1)


@pytest.mark.parametrize("attention", [MLA, dict(kind="gqa"), dict(MLA, index_n_heads=2, index_head_dim=8,
                                                                  index_topk=3)])
def test_cached_decode_equals_full_forward(attention):
    over = {} if attention["kind"] == "mla" else dict(n_heads=4, n_kv_heads=2)
    m = build(attention=attention, **over).eval()
    tokens = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        full = m(tokens).logits
        caches = {i: ListCache() for i in range(2)}
        steps = [m(tokens[:, :5], positions=torch.arange(5), cache=caches).logits]
        for t in range(5, 9):  # MLA decodes with the absorbed projections
            steps.append(m(tokens[:, t:t + 1], positions=torch.tensor([t]), cache=caches).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    if attention["kind"] == "mla":
        latent, k_rope = caches[0].parts[0]
        assert latent.shape == (2, 5, 10) and k_rope.shape == (2, 5, 4)  # only latent + rope key cached


def test_yarn_frequencies_and_mscale_by_hand():
    rope = dict(theta=10000.0, scaling="yarn", factor=40.0, original_max_seq_len=4096, beta_fast=32.0,
                beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
    s = spec(max_seq_len=200000, rope=rope)
    dim = 64
    inv = rope_inv_freq(dim, s.rope)

    # dim index at which a frequency makes `r` turns over the original context (YaRN eq. 17 inverse)
    def corr(r):
        return dim * math.log(4096 / (r * 2 * math.pi)) / (2 * math.log(10000.0))

    low, high = math.floor(corr(32.0)), math.ceil(corr(1.0))
    for i in range(dim // 2):
        f = 10000.0 ** (-2 * i / dim)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)   # 0: keep f, 1: f / factor
        want = f * (1 - ramp) + f / 40.0 * ramp
        assert inv[i].item() == pytest.approx(want, rel=1e-5)
    assert inv[0].item() == pytest.approx(1.0) and inv[-1].item() == pytest.approx(10000.0 ** (-62 / 64) / 40)
    # DeepSeek: softmax scale gets (0.1 ln(factor) + 1)^2, cos/sin unscaled (mscale == mscale_all_dim)
    m = Transformer(spec(max_seq_len=200000, rope=rope))
    assert m.layers["0"].attn.scale == pytest.approx(10 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert m.rope_attention_factor == 1.0
    # plain YaRN (no mscale_all_dim): the temperature goes on cos/sin instead
    rope_plain = dict(rope, mscale_all_dim=0.0)
    m = Transformer(spec(max_seq_len=200000, rope=rope_plain))
    assert m.rope_attention_factor == pytest.approx(0.1 * math.log(40) + 1)
    assert m.layers["0"].attn.scale == pytest.approx(10 ** -0.5)


SPARSE = dict(MLA, index_n_heads=2, index_head_dim=8, index_topk=4)


def test_indexer_with_topk_at_least_T_equals_dense_attention():
    sparse = build(attention=dict(SPARSE, index_topk=8))
    dense = build(attention=MLA)
    missing, unexpected = dense.load_state_dict(sparse.state_dict(), strict=False)
    assert not missing and all(".indexer." in k for k in unexpected)
    tokens = torch.randint(0, 61, (2, 8))
    torch.testing.assert_close(sparse(tokens).logits, dense(tokens).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_indexer_selection_by_hand():
    m = build(attention=SPARSE)
    attn = m.layers["0"].attn
    idx = attn.indexer
    with torch.no_grad():
        for p in idx.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(1, 9, 16)
    cos, sin = rope_cos_sin(torch.arange(9), m.inv_freq)
    q_latent = rms(x @ attn.wq_a.weight.T, attn.q_norm.weight)
    # I[t,s] = sum_h w[t,h] relu(q[t,h] . k[s]), w = weights_proj(x) / sqrt(H_idx * d_idx)
    q = (q_latent @ idx.wq_b.weight.T).view(1, 9, 2, 8)
    q = torch.cat((apply_rope(q[..., :4], cos, sin), q[..., 4:]), -1)
    k = F.layer_norm(x @ idx.wk.weight.T, (8,), idx.k_norm.weight, idx.k_norm.bias, 1e-6)
    k = torch.cat((apply_rope(k[:, :, None, :4], cos, sin)[:, :, 0], k[..., 4:]), -1)
    w = (x @ idx.weights_proj.weight.T) / math.sqrt(2 * 8)
    keep = torch.zeros(1, 9, 9, dtype=torch.bool)
    for t in range(9):
        score = [float(sum(w[0, t, h] * torch.relu(q[0, t, h] @ k[0, s]) for h in range(2))) for s in range(t + 1)]
        for s in sorted(range(t + 1), key=lambda s: -score[s])[:4]:  # ties (relu zeros): earlier key first
            keep[0, t, s] = True
    torch.testing.assert_close(idx(x, q_latent, cos, sin)[0], keep, atol=0, rtol=0)
    assert keep[0, 8].sum() == 4
    torch.testing.assert_close(attn(x, cos, sin), mla_reference(attn, x, cos, sin, keep), atol=1e-5, rtol=1e-5)


def test_mtp_loss_by_hand():
    m = build(mtp=dict(depth=2, loss_weight=0.3))
    tokens = torch.randint(0, 61, (2, 8))
    labels = torch.randint(0, 61, (2, 8))   # any next-token labels; MTP targets come from them
    out = m(tokens, labels)

    cos, sin = rope_cos_sin(torch.arange(8), m.inv_freq)
    h = m.embed(tokens)
    for layer in m.layers.values():
        h = layer(h, cos, sin)
    losses = []
    for k, mod in enumerate(m.mtp, start=1):
        # depth k at position t (t + k < T): input token t+k, target token t+k+1 = labels[t+k]
        emb = m.embed(tokens[:, k:])
        hk = h[:, :8 - k]
        x = mod.eh_proj(torch.cat((rms(hk, mod.hnorm.weight, 1e-5), rms(emb, mod.enorm.weight, 1e-5)), -1))
        c, s_ = cos[:8 - k], sin[:8 - k]
        h = mod.block(x, c, s_)
        logits = rms(h, mod.norm.weight) @ m.head.weight.T
        losses.append(F.cross_entropy(logits.reshape(-1, 61), labels[:, k:].reshape(-1)))
        h = torch.cat((h, torch.zeros(2, k, 16)), 1)  # causal: padding at the end changes nothing before
    torch.testing.assert_close(out.mtp_loss, (losses[0] + losses[1]) / 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.3 * out.mtp_loss)
    out.loss.backward()
    assert m.mtp[1].eh_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deepseek_style_forward_backward(dtype):
    cfg = spec(attention=SPARSE, mtp=dict(depth=1), moe=dict(n_experts=4, top_k=2, expert_hidden=8,
               n_shared_experts=1, score="sigmoid", n_groups=2, topk_groups=1, balance="aux_free",
               first_dense_layers=1))
    with torch.device("meta"):
        m = Transformer(cfg)
    m.to_empty(device="cpu")
    m.init_weights()
    m.to(dtype)
    tokens = torch.randint(0, 61, (2, 8))
    out = m(tokens, tokens.roll(-1, 1))
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    assert out.expert_counts.shape == (2, 4)  # the MoE layer, then the MTP block (MoE too)
    out.loss.backward()
    grads = [p.grad for n, p in m.named_parameters() if ".indexer." not in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_indexer_alignment_loss_by_hand_and_only_trains_the_indexer():
    m = build(attention=SPARSE)
    tokens = torch.randint(0, 61, (1, 7))
    out = m(tokens, tokens.roll(-1, 1))
    assert out.indexer_loss is not None
    torch.testing.assert_close(out.loss, out.lm_loss + out.indexer_loss)

    # layer 0 by hand: p = main attention summed over heads and renormalised on the kept keys,
    # loss = mean_t sum_s p log(p / softmax_kept(I))
    attn = m.layers["0"].attn
    x = m.layers["0"].attn_norm(m.embed(tokens))
    cos, sin = rope_cos_sin(torch.arange(7), m.inv_freq)
    with torch.no_grad():
        q_latent = attn.q_norm(attn.wq_a(x))
        keep, score = attn.indexer(x, q_latent, cos, sin)
        q = attn.wq_b(q_latent).view(1, 7, 3, 10)
        latent, kr = attn.wkv_a(x).split([10, 4], -1)
        kv = attn.wkv_b(attn.kv_norm(latent)).view(1, 7, 3, 11)
        kr = apply_rope(kr[:, :, None], cos, sin)[:, :, 0]
        total = 0.0
        for t in range(7):
            kept = keep[0, t].nonzero().flatten().tolist()
            p = torch.zeros(len(kept))
            for h in range(3):
                qh = torch.cat((q[0, t, h, :6], apply_rope(q[:, t:t + 1, h:h + 1, 6:], cos[t:t + 1], sin[t:t + 1]).flatten()))
                s = torch.stack([qh @ torch.cat((kv[0, j, h, :6], kr[0, j])) for j in kept]) * attn.scale
                p += s.softmax(0)
            p = p / p.sum()
            log_q = score[0, t, kept].log_softmax(0)
            total += (p * (p.log() - log_q)).sum()
    layer0 = m.layers["0"].attn.indexer.last_loss
    torch.testing.assert_close(layer0, total / 7, atol=1e-5, rtol=1e-4)

    m.zero_grad()
    out.indexer_loss.backward()
    for name, p in m.named_parameters():
        if ".indexer." not in name:  # the alignment loss reaches nothing but the indexers
            assert p.grad is None or p.grad.abs().sum() == 0, name
    for layer in m.layers.values():
        assert layer.attn.indexer.wq_b.weight.grad.abs().sum() > 0


def test_indexer_scores_and_loss_have_the_gradients_of_their_dense_formulas():
    """The indexer's scores and alignment loss keep no per-head tensor (runtime/model/indexer.py);
    their gradients equal autograd's through the formulas written out densely here."""
    m = build(attention=SPARSE)
    ix = m.layers["0"].attn.indexer
    torch.manual_seed(1)
    B, T, H, D = 2, 9, ix.n_heads, ix.head_dim
    q = torch.randn(B, T, H, D, requires_grad=True)
    k = torch.randn(B, T, D, requires_grad=True)
    w = torch.randn(B, T, H, requires_grad=True)
    c = 0.37
    score = _IndexScore.apply(q, k, w, c)
    expect = torch.einsum("bths,bth->bts", torch.einsum("bthd,bsd->bths", q, k).relu(), w) * c
    torch.testing.assert_close(score, expect)
    upstream = torch.randn(B, T, T)
    got = torch.autograd.grad(score, (q, k, w), upstream)
    want = torch.autograd.grad(expect, (q, k, w), upstream)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)

    # the loss: KL(p || softmax over the kept keys), p from the main attention's q and k
    keep = ix.select(expect.detach())
    mq, mk = torch.randn(B, 3, T, 10), torch.randn(B, 3, T, 10)
    s = expect.detach().requires_grad_()
    loss = alignment_loss(mq, mk, 0.3, s, keep)
    attn = ((mq @ mk.transpose(-1, -2)) * 0.3).masked_fill(~keep[:, None], float("-inf")).softmax(-1).sum(1)
    p = attn / attn.sum(-1, keepdim=True)
    log_q = s.masked_fill(~keep, float("-inf")).log_softmax(-1)
    dense = torch.where(keep, p * (p.clamp_min(1e-30).log() - log_q), 0.0).sum(-1).mean()
    torch.testing.assert_close(loss, dense)
    torch.testing.assert_close(torch.autograd.grad(loss, s)[0], torch.autograd.grad(dense, s)[0])
