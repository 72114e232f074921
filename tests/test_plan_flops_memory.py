"""FLOPs and memory against published and hand-derived figures."""

import pytest

from llmc.compiler.plan import build_plan, count_params
from llmc.compiler.plan.activations import block_activations, block_bytes
from llmc.compiler.plan.hardware import lookup
from llmc.compiler.plan.memory import model_state_bytes
from llmc.compiler.spec import ModelSpec, load_spec

LLAMA_P = 8_030_261_248
LLAMA_EMB = 128256 * 4096


# --------------------------------------------------------------------------- FLOPs

def test_llama3_8b_training_flops_are_6n_plus_palm_attention_term():
    plan = build_plan(load_spec("specs/llama3_8b.toml"))
    f = plan.flops
    six_n = 6 * (LLAMA_P - LLAMA_EMB)            # embedding lookup excluded, untied head included
    attention = 12 * 32 * 32 * 128 * 8192        # 12·L·H·Q·T (PaLM, appendix B)
    assert f.train_per_token == six_n + attention
    assert f.per_step == f.train_per_token * 512 * 8192
    steps = -(-15_000_000_000_000 // (512 * 8192))
    assert f.total == f.per_step * steps
    peak = 989.4e12  # H100 SXM dense bf16
    assert f.step_time_s == pytest.approx(f.per_step / (64 * peak * 0.4))
    assert f.gpu_hours == pytest.approx(f.total / (peak * 0.4) / 3600)
    assert f.days == pytest.approx(f.total / (64 * peak * 0.4) / 86400)


@pytest.mark.parametrize("accelerator, rate, tflops", [("H100-80GB", "fp8", 1978.9), ("A100-80GB", "bf16", 312.0)])
def test_fp8_runs_at_the_fp8_rate_only_where_the_device_has_fp8(accelerator, rate, tflops):
    """Datasheet dense peaks: H100 SXM 1,979 TFLOP/s fp8; A100 has no fp8 tensor cores (312 bf16)."""
    spec = load_spec("specs/llama3_8b.toml", ['train.precision="fp8"', f'hardware.accelerator="{accelerator}"'])
    flops = build_plan(spec, strict=False).flops
    assert (flops.precision, flops.peak_tflops) == (rate, tflops)


def test_dsa_attends_top_k_keys_and_its_indexer_scores_all():
    s = load_spec("specs/ds_v32.toml")
    f = build_plan(s, strict=False).flops
    L, H, T = 61, 128, 4096
    per_layer = 2 * H * 2048 * (192 + 128) + 2 * 64 * 128 * T   # top-k = 2048 keys; indexer over T
    assert f.train_attention_per_token == 3 * L * per_layer
    # MLA decode in the absorbed form: scores over kv_lora_rank + rope dims, values over kv_lora_rank
    p = count_params(s.model)
    n = p.active - p.components["embedding"]
    c = 163840
    assert f.decode_per_token_max_context == 2 * n + L * (2 * H * 2048 * (2 * 512 + 64) + 2 * 64 * 128 * c)
    assert f.peak_tflops == 1978.9  # fp8 training uses the H800's fp8 peak


def test_mtp_adds_its_block_and_the_shared_head_in_training_only():
    s = load_spec("specs/tiny_moe.toml")
    f = build_plan(s).flops
    no_mtp = build_plan(load_spec("specs/tiny_moe.toml", ["model.mtp.depth=0"])).flops
    assert f.forward_per_token == no_mtp.forward_per_token
    assert f.train_per_token > no_mtp.train_per_token


# --------------------------------------------------------------------------- model states

def test_zero_paper_7_5b_on_64_gpus_without_sharding():
    """ZeRO (Rajbhandari et al. 2020), Figure 1: the baseline's 16 bytes per parameter (GB = 1e9)."""
    assert round(sum(model_state_bytes(7.5e9, dp=64, zero=0)) / 1e9, 1) == 120


# What FSDP2 holds at the step's peak, where it differs from the paper's fp16 gradients: it
# reduces gradients in fp32 (4 bytes), and ZeRO 1 over several micro-batches accumulates them
# unsharded until the step's last one, as every stage does under torch's pipeline schedules.
@pytest.mark.parametrize("zero, pipelined, deferred, per_param", [
    (1, False, True, 2 + 4 + 12 / 64),         # gathered bf16 weights, whole fp32 gradients, sharded optimizer
    (1, False, False, 2 + 4 / 64 + 12 / 64),   # one micro-batch: reduce-scattered as it goes, fp32 shards
    (2, False, False, 2 + 4 / 64 + 12 / 64),
    (3, False, False, (2 + 4 + 12) / 64),      # weights sharded too
    (2, True, True, 2 + 4 + 12 / 64),          # a pipeline stage keeps weights and gradients whole
    (3, True, True, 2 + 4 + 12 / 64),
])
def test_fsdp2_model_states_7_5b_on_64_gpus(zero, pipelined, deferred, per_param):
    w, g, o = model_state_bytes(7.5e9, dp=64, zero=zero, pipelined=pipelined, deferred=deferred)
    assert w + g + o == pytest.approx(7.5e9 * per_param)


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_llama_model_states_follow_zero_sharding(zero):
    s = load_spec("specs/llama3_8b.toml", ["parallel.dp=64", "parallel.tp=1", "parallel.pp=1",
                                           f"parallel.zero={zero}", "train.recompute=full",
                                           "train.micro_batch_size=1", 'hardware.accelerator="B200-180GB"'])
    plan = build_plan(s)
    mem = plan.memory.train
    assert plan.layout.grad_accum > 1  # so that ZeRO-1 accumulates whole gradients
    if zero == 0:  # DDP: fp32 weights (AdamW's master copy), fp32 gradients, the two moments
        assert (mem.weights, mem.gradients, mem.optimizer) == (4 * LLAMA_P, 4 * LLAMA_P, 8 * LLAMA_P)
        return
    shard = lambda stage: 64 if zero >= stage else 1  # noqa: E731
    assert mem.weights == int(2 * LLAMA_P / shard(3))  # FSDP2 gathers bf16 weights
    assert mem.gradients == int(4 * LLAMA_P / shard(2))  # and reduces in fp32
    assert mem.optimizer == int(12 * LLAMA_P / shard(1))


def test_experts_shard_over_ep_and_replicate_over_expert_data_parallel():
    s = load_spec("specs/mixtral_8x7b.toml", ["parallel.dp=128", "parallel.tp=1", "parallel.pp=1",
                                              "parallel.ep=8", "parallel.zero=1", "train.recompute=full"])
    plan = build_plan(s)
    p = plan.params
    experts = p.components["experts"]
    dense = p.total - experts
    # weights: all dense + 1/8 of the experts; optimizer: dense over dp=128, experts over edp=128*1/8=16
    assert plan.layout.edp == 16
    assert plan.memory.train.weights == int(2 * dense + 2 * experts / 8)
    assert plan.memory.train.optimizer == int(12 * dense / 128 + 12 * experts / 8 / 16)



# tiny.toml by hand: D 256, 4 heads of 64 (2 KV heads), SwiGLU 704, RMSNorm, V 4096, no biases
TINY_BLOCK = 256 * 256 + 2 * 256 * 128 + 256 * 256 + 3 * 256 * 704 + 2 * 256   # attention, mlp, 2 norms
TINY_MTP = TINY_BLOCK + 2 * 256 * 256 + 3 * 256        # block, eh_proj, enorm + hnorm + its final norm
TINY_EMB = 4096 * 256


@pytest.mark.parametrize("sets, first, last", [
    # MTP reads the embedding on the last stage: one copy there beside the untied head
    ([], 2 * TINY_BLOCK + TINY_EMB, 2 * TINY_BLOCK + 256 + TINY_EMB + TINY_EMB + TINY_MTP),
    # a tied head and MTP share that one copy
    (["model.tie_embeddings=true"], 2 * TINY_BLOCK + TINY_EMB, 2 * TINY_BLOCK + 256 + TINY_EMB + TINY_MTP),
    # learned positions stay on the first stage (nothing on the last reads them)
    (['model.positions="learned"'], 2 * TINY_BLOCK + TINY_EMB + 256 * 256,
     2 * TINY_BLOCK + 256 + TINY_EMB + TINY_EMB + TINY_MTP),
    # no MTP, untied: the last stage needs no embedding
    (["model.mtp.depth=0"], 2 * TINY_BLOCK + TINY_EMB, 2 * TINY_BLOCK + 256 + TINY_EMB),
], ids=["mtp", "mtp_tied", "mtp_learned_positions", "no_mtp"])
def test_last_pipeline_stage_counts_the_embedding_copy_it_keeps(sets, first, last):
    """pp = 2 over layers [0, 1] | [2, 3]: the runtime's last stage keeps the embedding matrix
    when MTP or a tied head reads it (pipeline.py `_cut_to_stage`); the plan counts the same."""
    from llmc.compiler.plan.memory import TrainMemoryModel
    s = load_spec("specs/tiny.toml", ["model.mtp.depth=1", *sets])
    memory = TrainMemoryModel(s, count_params(s.model))
    shares = memory.ranks([[0, 1], [2, 3]], pp=2)
    assert [sh.dense for sh in shares] == [first, last]
    assert [sh.expert for sh in shares] == [0, 0]
    one = memory.ranks([[0, 1, 2, 3]], pp=1)[0]   # one stage holds the one embedding
    assert one.dense == count_params(s.model).total


def test_plan_states_every_pipeline_stage_and_names_the_most_loaded():
    """plan.json carries each pipeline rank's memory: without data parallelism, fp32 weights (Adam's
    master copy) and gradients (4 bytes each), Adam's m and v (8 bytes) of the blocks it holds,
    the embedding on the first, the final norm and the untied head on the last; `train` is the
    stage with the highest peak."""
    s = load_spec("specs/tiny.toml", ["parallel.pp=2", "hardware.gpus_per_node=2", "model.mtp.depth=0",
                                      "train.micro_batch_size=4"])
    plan = build_plan(s)
    stages = plan.memory.train_stages
    assert len(stages) == 2 and [m.stage for m in stages] == [0, 1]
    first, last = plan.layout.stages
    held = [len(first) * TINY_BLOCK + TINY_EMB, len(last) * TINY_BLOCK + 256 + TINY_EMB]
    assert [(m.weights, m.gradients, m.optimizer) for m in stages] == [(4 * n, 4 * n, 8 * n) for n in held]
    most = max(stages, key=lambda m: m.peak)
    assert plan.memory.train == most


# --------------------------------------------------------------------------- activations (Korthikanti et al.)

GPT = dict(vocab_size=51200, d_model=2048, n_layers=4, n_heads=16, ffn_hidden=8192, max_seq_len=2048,
           norm="layernorm", activation="gelu", attention={"kind": "mha"})


@pytest.mark.parametrize("tp, sp, checkpointed", [(1, False, False), (8, False, False), (8, True, False),
                                                  (8, True, True), (1, False, True)])
def test_korthikanti_per_layer_activations(tp, sp, checkpointed):
    """Table 2 of "Reducing Activation Recomputation in Large Transformer Models" (2022): no
    recompute and full recompute (llmc's selective checkpoints whole blocks, not the paper's
    attention core); one departure under sequence parallelism, below."""
    m = ModelSpec.model_validate(GPT)
    s, b, h, a, t = 2048, 4, 2048, 16, tp
    act = block_activations(m, False, flash=False, dropout=True)  # 2-byte values, as the paper
    saved, _ = block_bytes(act, b=b, s=s, tp=t, sp=sp, checkpointed=checkpointed, h=h)
    sbh = s * b * h
    if checkpointed:
        expected = 2 * sbh / (t if sp else 1)
    elif sp:  # llmc keeps the two LayerNorm outputs (4sbh of the 34) whole: its projections keep
        # their all-gathered input, where Megatron keeps the shard and gathers again in the backward
        expected = sbh / t * (34 - 4 + 5 * a * s / h) + 4 * sbh
    else:
        expected = sbh * (10 + 24 / t + 5 * a * s / (h * t))
    assert saved == pytest.approx(expected)


def test_flash_attention_keeps_no_score_matrix():
    m = ModelSpec.model_validate(GPT)
    act = block_activations(m, False, flash=True, dropout=False)
    assert act.split_per_key == 0 and act.indexer_per_key == 0


def test_1f1b_first_stage_holds_p_micro_batches():
    """Korthikanti §4.2.3: under 1F1B the first stage keeps p micro-batches of its layers in flight,
    so its activations are p x (its layers) x (one layer's), whatever p is; beside the layers,
    each micro-batch keeps the bf16 RoPE tables its blocks share (cos and sin, seq_len x 128) and
    the embedding's int64 token ids."""
    from llmc.compiler.plan.layout import LayoutSearch
    from llmc.compiler.plan.memory import Degrees
    s = load_spec("specs/llama3_8b.toml", ["train.recompute=none"])
    search = LayoutSearch(s, count_params(s.model))
    per_layer = set()
    beside_layers = 2 * 2 * 8192 * 128 + 8 * 8192
    for pp in (2, 4, 8):
        _, shares, _ = search.shares(pp, 1)
        deg = Degrees(64 // pp, 1, pp, 1, 3, 1, 8 * pp, False)
        first = shares[0]
        activations, in_flight = search.memory.rank_bytes(deg, first)[3], search.memory.rank_bytes(deg, first)[7]
        assert in_flight == pp
        per_layer.add((activations / pp - beside_layers) / len(first.chunks[0]))
        last = search.memory.rank_bytes(deg, shares[-1])[7]
        assert last == 1  # the last stage runs each micro-batch's backward at once
    assert len(per_layer) == 1


# --------------------------------------------------------------------------- inference

def test_llama3_8b_kv_cache_is_131072_bytes_per_token():
    assert build_plan(load_spec("specs/llama3_8b.toml")).memory.inference.kv_cache_bytes_per_token == 131_072


def test_mla_caches_latent_and_rope_key_and_dsa_its_fp8_keys():
    s = load_spec("specs/ds_v32.toml")
    inf = build_plan(s, strict=False).memory.inference
    assert inf.kv_cache_breakdown["attention"] == 61 * (512 + 64) * 2
    assert inf.kv_cache_breakdown["indexer_keys"] == 61 * (128 + 4)   # fp8 key + one fp32 scale per 128
    assert inf.kv_cache_bytes_per_token == 61 * (512 + 64) * 2 + 61 * 132


def test_quantized_weights_count_block_scales():
    s = load_spec("specs/llama3_8b.toml")
    inf = build_plan(s).memory.inference
    norms = 32 * 2 * 4096 + 4096
    linear = LLAMA_P - LLAMA_EMB - norms
    assert inf.weights["bf16"] == 2 * LLAMA_P
    assert inf.weights["int8"] == 2 * (LLAMA_EMB + norms) + linear + 2 * (-(-linear // 128))
    assert inf.weights["int4"] == 2 * (LLAMA_EMB + norms) + linear // 2 + 2 * (-(-linear // 128))
    usable = int(8 * lookup("H100-80GB").memory_bytes * 0.9)
    assert inf.max_cached_tokens["bf16"] == (usable - 2 * LLAMA_P) // 131_072


@pytest.mark.parametrize("recompute, recomputed_layers", [("full", 4), ("selective", 2)])
def test_recomputed_blocks_cost_their_forward_again(recompute, recomputed_layers):
    """A checkpointed block runs its forward again in the backward: per token 2 x its parameters
    plus its attention forward, 4 x H x Q x T (a third of the PaLM training count). tiny: 4 blocks;
    `selective` checkpoints blocks 0 and 2. Both chunk the loss, which runs the head's forward
    again: 2 x V x d per token."""
    sets = ["hardware.gpus_per_node=1", "hardware.peak_tflops=1", "hardware.mfu=0.5"]
    base = build_plan(load_spec("specs/tiny.toml", sets + ["train.recompute=none"]))
    plan = build_plan(load_spec("specs/tiny.toml", sets + [f"train.recompute={recompute}"]))
    d, f, H, Q, kv, T, V = 256, 704, 4, 64, 2, 256, 4096
    # q, k, v, o; w1, w2, w3; and the two norms, which 6N counts too
    block_params = d * (H * Q + 2 * kv * Q) + H * Q * d + 3 * d * f + 2 * d
    again = recomputed_layers * (2 * block_params + 4 * H * Q * T) + 2 * V * d
    tokens_per_step = 8 * 256
    extra = plan.layout.time_breakdown["compute"] - base.layout.time_breakdown["compute"]
    assert extra == pytest.approx(tokens_per_step * again / (1e12 * 0.5))


def test_tensor_parallel_all_reduces_of_recomputed_blocks_and_fp32():
    """tp = 2 on tiny (4 blocks): 4 all-reduces per block (2 forward, 2 backward), 2 more for each
    checkpointed block (its forward again), and one each for the embedding's output and the head's
    input gradient: 18, 22 under selective (blocks 0 and 2), 26 under full; each one of the
    micro-batch's [tokens, d_model] activations, twice the bytes in fp32."""
    def tp_seconds(*sets):
        spec = load_spec("specs/tiny.toml", ["hardware.gpus_per_node=2", "hardware.intra_node_gbps=100",
                                             "parallel.tp=2", "parallel.dp=1", *sets])
        plan = build_plan(spec)
        assert (plan.layout.micro_batch_size, plan.layout.grad_accum) == (8, 1)
        return plan.layout.time_breakdown["tp_comm"]
    none = tp_seconds("train.recompute=none")
    # a ring all-reduce over 2 ranks sends and receives the bf16 [8 x 256 tokens, 256] once
    assert none == pytest.approx(18 * 8 * 256 * 256 * 2 / 100e9)
    assert tp_seconds("train.recompute=selective") == pytest.approx(none * 22 / 18)
    assert tp_seconds("train.recompute=full") == pytest.approx(none * 26 / 18)
    assert tp_seconds("train.recompute=none", 'train.precision="fp32"') == pytest.approx(2 * none)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_data_parallel_all_reduce_moves_the_gradients_a_tensor_parallel_rank_holds(moe):
    """Under ZeRO-0 the cost model's all-reduce over dp carries the fp32 gradients the plan says a
    rank holds (test_parallel_equivalence measures those): under TP the split parameters' shards
    and whole what TP replicates (norms, a MoE FFN, MTP's eh_proj without SP). It divided every
    dense parameter by tp. With no compute to hide behind (an unbounded peak), all of it shows."""
    from llmc.compiler.plan.cost import ring_all_reduce_s
    from llmc.compiler.plan.layout import LayoutSearch
    from llmc.compiler.plan.memory import Degrees
    spec = load_spec(f"specs/{'tiny_moe' if moe else 'tiny'}.toml",
                     ["hardware.gpus_per_node=4", "parallel.dp=2", "parallel.tp=2", "parallel.zero=0",
                      "parallel.sequence_parallel=false", "train.global_batch_size=16"])
    plan = build_plan(spec)
    lay = plan.layout
    search = LayoutSearch(spec, count_params(spec.model))
    search.peak = float("inf")
    fit = search.evaluate(Degrees(lay.dp, lay.tp, lay.pp, lay.ep, lay.zero, lay.micro_batch_size, lay.grad_accum,
                                  lay.sequence_parallel))
    assert lay.tp == 2 and plan.memory.train.gradients > 0
    bandwidth = search.links.bandwidth(2, 2)
    assert fit.time.dp_comm == pytest.approx(ring_all_reduce_s(plan.memory.train.gradients, 2, bandwidth), rel=1e-9)


def test_fsdp_gathers_a_tensor_parallel_ranks_share_of_the_root_and_a_block():
    """ZeRO-3 over dp = 2 under tp = 2 (fp32, so FSDP2 gathers fp32 weights and the activations
    are those of ZeRO-2): beyond ZeRO-2, each rank gathers the root unit and two blocks (this one
    and the next), each as one TP rank holds it: the embedding and head split by vocabulary, the
    q/k/v/o and FFN matrices split, the norms whole (they were divided by tp too)."""
    def temporary(zero):
        spec = load_spec("specs/tiny.toml", ["hardware.gpus_per_node=4", "parallel.dp=2", "parallel.tp=2",
                                             f"parallel.zero={zero}", 'train.precision="fp32"',
                                             "train.global_batch_size=16"])
        plan = build_plan(spec)
        assert (plan.layout.tp, plan.layout.dp, plan.layout.pp, plan.layout.zero) == (2, 2, 1, zero)
        return plan.memory.train.temporary
    d, f, H, Q, kv, V = 256, 704, 4, 64, 2, 4096
    split_block = d * (H * Q + 2 * kv * Q) + H * Q * d + 3 * d * f   # q, k, v, o; w1, w2, w3
    block = split_block / 2 + 2 * d                                   # and its two norms
    root = 2 * V * d / 2 + d                                          # embedding, head; the final norm
    assert temporary(3) - temporary(2) == pytest.approx(4 * (root + 2 * block), abs=2)
