"""The plan's activation memory against what llmc's runtime keeps for the backward, measured.

Every tensor autograd saves during a training step (model and loss, as the training loop runs
it) is caught with `saved_tensors_hooks` and counted once per storage while some graph node
holds it, leaving out the parameters themselves (the plan counts those as weights). Their bf16
copies under autocast are counted: these layouts keep fp32 weights (no FSDP2), and each
micro-batch's forward saves its own copies, as it saves its activations. The peak of that sum
is what the device holds for the backward; the plan's `activations` must equal it, for each
precision (fp8's linear layers keeping their inputs in fp8), recompute mode, tensor parallelism
and pipeline schedule (the micro-batches in flight on each stage).
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from llmc.compiler.plan import build_plan
from llmc.compiler.plan.memory import loss_temporary_bytes
from llmc.compiler.spec import load_spec
from llmc.runtime.model import Transformer
from llmc.runtime.model.loss import chunked_cross_entropy, cross_entropy
from llmc.runtime.precision import autocast
from llmc.runtime.train.loop import apply_train_modes

torch.set_num_threads(2)

T = 1024  # beyond the CPU's bf16 short-sequence attention (runtime/model/attention.py): flash, as on GPUs
BASE = "vocab_size = 512\nd_model = 256\nn_layers = 4\nn_heads = 4\nffn_hidden = 512\nmax_seq_len = 1024\n"
MOE = "[model.moe]\nn_experts = 4\ntop_k = 2\nexpert_hidden = 128\nn_shared_experts = 1\nfirst_dense_layers = 1\n"
MODELS = {
    "gqa_swiglu": BASE + "n_kv_heads = 2\n",
    "mha_gelu_learned": BASE + 'activation = "gelu"\npositions = "learned"\n',
    "moe_mtp": BASE + MOE + "[model.mtp]\ndepth = 1\n",
    "mla_moe": BASE + MOE + "[model.attention]\nkind = \"mla\"\nq_lora_rank = 64\nkv_lora_rank = 32\n"
                            "qk_nope_head_dim = 32\nqk_rope_head_dim = 16\nv_head_dim = 32\n",
}
MODELS["gqa_qk_norm"] = MODELS["gqa_swiglu"] + "qk_norm = true\n"  # Qwen3
MODELS["moe_shared_gate"] = BASE + MOE + "shared_expert_gate = true\n"  # Qwen2-MoE
MODELS["moe_bias"] = BASE + "mlp_bias = true\n" + MOE  # experts with biases: one product per expert
# DeepSeek-V3.2 sparse attention: its indexer picks 256 of up to 1,024 keys per query
MODELS["mla_dsa"] = MODELS["mla_moe"] + "index_n_heads = 4\nindex_head_dim = 32\nindex_topk = 256\n"



def spec_for(folder, name: str, precision: str, recompute: str, tp: int = 1, sequence_parallel: bool = False,
             pp: int = 1, schedule: str = "1f1b", virtual_stages: int = 1, micro_batches: int = 1):
    path = folder / "spec.toml"
    path.write_text(f"[model]\n{MODELS[name]}\n[train]\nseq_len = {T}\nmicro_batch_size = 1\n"
                    f"global_batch_size = {micro_batches}\nmax_steps = 1\nprecision = \"{precision}\"\n"
                    f"recompute = \"{recompute}\"\n[parallel]\ntp = {tp}\npp = {pp}\npp_schedule = \"{schedule}\"\n"
                    f"pp_virtual_stages = {virtual_stages}\n"
                    f"sequence_parallel = {str(sequence_parallel).lower()}\n"
                    f"[hardware]\naccelerator = \"CPU\"\ngpus_per_node = {tp * pp}\n")
    return load_spec(path)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's tensor behind a DTensor, or behind a collective's not yet awaited result."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor
    from torch.distributed.tensor import DTensor
    t = t._local_tensor if isinstance(t, DTensor) else t
    return t.elem if isinstance(t, AsyncCollectiveTensor) else t


class SavedForBackward:
    """Hooks counting the bytes of the tensors autograd holds for the backward, once per storage,
    while any graph node holds them; `peak` is the most held at once. The parameters of
    `modules` are left out, not their casts."""

    def __init__(self, modules):
        self.weights = {_local(p).untyped_storage().data_ptr() for m in modules for p in m.parameters()}
        self.now = self.peak = 0
        self.holders: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    def _pack(self, t):
        storage = _local(t).untyped_storage()
        if storage.data_ptr() in self.weights:
            return t
        return _Held(self, t, storage.data_ptr(), storage.nbytes())

    @staticmethod
    def _unpack(held):
        return held.tensor if isinstance(held, _Held) else held


class _Held:
    """A saved tensor while a graph node keeps it (released with the node)."""

    def __init__(self, count: SavedForBackward, tensor, key: int, nbytes: int):
        self.count, self.tensor, self.key, self.nbytes = count, tensor, key, nbytes
        count.holders[key] = count.holders.get(key, 0) + 1
        if count.holders[key] == 1:
            count.now += nbytes
            count.peak = max(count.peak, count.now)

    def __del__(self):
        holders = self.count.holders
        holders[self.key] -= 1
        if holders[self.key] == 0:
            del holders[self.key]
            self.count.now -= self.nbytes


class MadeAlive(TorchDispatchMode):
    """The bytes of the tensors that ops make while it is active (new storages, each once; not
    views of their inputs) that are alive at once: the most, `peak`. It sees the outputs of the
    ops called, not temporaries inside one op's kernel (bench/bench_loss.py measures those too,
    as the process's peak resident memory)."""

    def __init__(self):
        super().__init__()
        self.alive: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if plain(t)}
        for t in tree_leaves(out):
            if plain(t) and t.untyped_storage().data_ptr() not in inputs:
                storage = t.untyped_storage()
                self.alive.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.alive = {key: held for key, held in self.alive.items() if not held[0].expired()}
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.alive.values()))
        return out


def plain(t) -> bool:
    """A tensor with its own storage: not a DTensor, whose local tensor's ops are counted."""
    return isinstance(t, torch.Tensor) and not is_traceable_wrapper_subclass(t)


def kept_for_backward(spec, wrap=lambda model: model) -> int:
    """Bytes a one-micro-batch training forward (with its loss) of the runtime keeps for the
    backward, on this rank after `wrap` (the layout's parallelism)."""
    torch.manual_seed(0)
    model = Transformer(spec.model)
    model.init_weights()
    apply_train_modes(model, spec.train)
    model = wrap(model)
    tokens = torch.randint(0, spec.model.vocab_size, (1, T))
    with SavedForBackward([model]) as saved, autocast(torch.device("cpu"), spec.train.precision):
        out = model(tokens, tokens.roll(-1, 1))  # labels, as packing makes them
    out.logits = None  # as the training loop drops them before the backward
    return saved.peak


def cpu_mla_padding(spec, tp: int = 1) -> int:
    """On CPU, MLA's values are padded to the query/key head dim for the flash kernel
    (runtime/model/attention.py), which then keeps its padded output: bf16 bytes of the MLA blocks
    beyond what a CUDA kernel keeps (per TP rank: the heads are split). Under bf16 that output is
    apart from the output projection's input (a CUDA kernel's output is that input); under fp8 it
    replaces the bf16 output the plan counts beside the projection's fp8 copy."""
    a, H = spec.model.attention, spec.model.n_heads
    qk, dv = a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
    output = qk - dv if spec.train.precision == "fp8" else qk
    return 2 * H // tp * ((qk - dv) + output) * T * (spec.model.n_layers + spec.model.mtp.depth)


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("precision", ["bf16", "fp32", "fp8"])
@pytest.mark.parametrize("name", ["gqa_swiglu", "moe_mtp"])
def test_plan_counts_what_the_runtime_keeps(tmp_path, name, precision, recompute):
    spec = spec_for(tmp_path, name, precision, recompute)
    plan = build_plan(spec).memory.train
    assert plan.in_flight_micro_batches == 1
    # within 0.5%: the plan leaves out a few small tensors (index tensors of the MoE routing, counts)
    assert kept_for_backward(spec) == pytest.approx(plan.activations, rel=5e-3)


@pytest.mark.parametrize("name, precision", [("mha_gelu_learned", "bf16"), ("mla_moe", "bf16"),
                                             ("gqa_swiglu", "fp16"),  # fp16: fp16 values, an fp32 stream
                                             ("mha_gelu_learned", "fp8"), ("mla_moe", "fp8"),
                                             ("mla_dsa", "bf16"), ("mla_dsa", "fp8"),
                                             ("gqa_qk_norm", "bf16"), ("moe_shared_gate", "fp8"),
                                             ("moe_bias", "fp8")])
def test_plan_counts_what_other_blocks_keep(tmp_path, name, precision):
    spec = spec_for(tmp_path, name, precision, "none")
    expected = build_plan(spec).memory.train.activations
    if spec.model.attention.kind == "mla":
        expected += cpu_mla_padding(spec)
    assert kept_for_backward(spec) == pytest.approx(expected, rel=5e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_plan_counts_the_gradients_of_the_loss_over_the_logits(dtype):
    """The loss's backward makes the fp32 gradients of the NLL and of the log-softmax over the
    [tokens, vocabulary] logits, alive together (beside the log-probabilities the forward kept,
    which the plan counts as activations); then the logits' own gradient, in their dtype."""
    tokens, vocab = 1024, 512
    logits = torch.randn(1, tokens, vocab, dtype=dtype, requires_grad=True)
    loss = cross_entropy(logits, torch.randint(0, vocab, (1, tokens)))
    with MadeAlive() as made:
        loss.backward()
    assert made.peak == pytest.approx(2 * 4 * tokens * vocab, rel=1e-4)
    assert loss_temporary_bytes(vocab, 256, tokens) == 2 * 4 * tokens * vocab


@pytest.mark.parametrize("chunk", [1024, 256, 100])
@pytest.mark.parametrize("compute, weights", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.bfloat16, torch.bfloat16)], ids=["fp32", "bf16", "bf16-fsdp"])
@pytest.mark.parametrize("vocab, d", [(2048, 64), (512, 256)], ids=["wide-vocab", "wide-model"])
def test_plan_counts_what_the_chunked_loss_makes(compute, weights, chunk, vocab, d):
    """The chunked loss's backward (runtime/model/loss.py), measured, against the plan's rule:
    the fp32 weight gradient, the input gradient, the cast of fp32 weights, one chunk's logits
    and the largest of their fp32 softmax and its products with the weight and the input. The
    forward makes less (one chunk's logits at a time)."""
    tokens = 1024
    weight = torch.randn(vocab, d, dtype=weights, requires_grad=True)
    x = torch.randn(tokens, d, dtype=compute, requires_grad=True)
    with MadeAlive() as forward:
        loss = chunked_cross_entropy(x, weight, torch.randint(0, vocab, (tokens,)), chunk, compute)
    with MadeAlive() as made:
        loss.backward()
    planned = loss_temporary_bytes(vocab, d, tokens, chunk=chunk, act=compute.itemsize,
                                   fp32_weights=weights == torch.float32)
    assert made.peak == pytest.approx(planned, rel=2e-3)
    assert forward.peak < planned


@pytest.mark.parametrize("chunk", [256, 0], ids=["chunked", "whole"])
@pytest.mark.parametrize("compute, weights", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.bfloat16, torch.bfloat16)], ids=["fp32", "bf16", "bf16-fsdp"])
def test_plan_counts_the_weight_gradient_an_mtp_head_leaves_waiting(compute, weights, chunk):
    """Two heads on one weight (the main head and an MTP head): the later head's backward runs
    first and its weight gradient waits for the other's to be added: from the chunked loss in the
    weight's dtype, from whole logits in the compute dtype (the gradient of autocast's one copy of
    the weight, beside the loss's own fp32 gradients over the logits). (Its input gradient, kept
    here as a leaf's, goes on into the MTP block in the model.)"""
    tokens, vocab, d = 1024, 2048, 64
    weight = torch.randn(vocab, d, dtype=weights, requires_grad=True)
    x, later = (torch.randn(tokens, d, dtype=compute, requires_grad=True) for _ in range(2))
    labels = torch.randint(0, vocab, (tokens,))
    if chunk:
        loss = sum(chunked_cross_entropy(h, weight, labels, chunk, compute) for h in (x, later))
    else:  # the model's head under the training loop's autocast
        with autocast(torch.device("cpu"), "fp32" if compute == torch.float32 else "bf16"):
            loss = sum(cross_entropy(F.linear(h, weight), labels) for h in (x, later))
    with MadeAlive() as made:
        loss.backward()
    planned = loss_temporary_bytes(vocab, d, tokens, chunk=chunk, act=compute.itemsize,
                                   fp32_weights=weights == torch.float32, heads=2)
    assert made.peak - later.grad.nbytes == pytest.approx(planned, rel=2e-3)


TENSOR_PARALLEL = {  # name: (model, sequence parallel, recompute, precision)
    f"{name}-{int(sp)}-{recompute}-{precision}": (name, sp, recompute, precision)
    for name, sp, recompute, precision in [
        ("gqa_swiglu", False, "none", "bf16"), ("moe_mtp", True, "none", "bf16"), ("mla_moe", True, "none", "bf16"),
        ("moe_mtp", True, "selective", "bf16"),  # its MTP block checkpointed, then sharded
        ("gqa_swiglu", True, "none", "fp8"), ("moe_mtp", False, "none", "fp8")]}
PIPELINE = {  # name: (schedule, virtual stages, the micro-batches each stage holds at its peak)
    "1f1b": ("1f1b", 1, [2, 1]), "gpipe": ("gpipe", 1, [4, 4]),
    # torch's interleaved 1F1B: (v - 1) p + 2 (p - 1 - rank) warm-up forwards of 1/v of the
    # rank's layers each, and one more
    "interleaved-1": ("interleaved", 1, [3, 1]), "interleaved-2": ("interleaved", 2, [2.5, 1.5])}


CHUNKED_SPLIT = {"fp32": ("float32", "float32"), "bf16": ("bfloat16", "float32"), "bf16-fsdp": ("bfloat16", "bfloat16")}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """tests/activation_worker.py's measurements on two gloo ranks, in one launch; each rank's result."""
    from parallel_helpers import Batch
    runs = {f"tp-{key}": ["tp", name, str(int(sp)), recompute, precision]
            for key, (name, sp, recompute, precision) in TENSOR_PARALLEL.items()}
    runs |= {f"pp-{key}": ["pp", "moe_mtp", schedule, str(virtual), "4"]
             for key, (schedule, virtual, _) in PIPELINE.items()}
    runs |= {f"loss-{dtype}": ["loss", dtype] for dtype in ("float32", "bfloat16")}
    runs |= {f"chunked-loss-{key}": ["chunked-loss", *dtypes] for key, dtypes in CHUNKED_SPLIT.items()}
    return Batch(tmp_path_factory.mktemp("activations"), 2, {name: {"argv": argv} for name, argv in runs.items()},
                 worker=Path(__file__).parent / "activation_worker.py", args=lambda out, argv: [*argv, str(out)],
                 result="rank{}.json", load=lambda f: json.loads(f.read_text()))


@pytest.mark.parametrize("key", list(TENSOR_PARALLEL))
def test_plan_counts_what_each_tensor_parallel_rank_keeps(two_ranks, tmp_path, key):
    """tp = 2 on two gloo processes: attention and dense FFN split by heads and columns, the MoE
    replicated on the whole sequence, and under sequence parallelism the norms' inputs split by
    the sequence while the projections keep their gathered inputs (runtime/parallel/tensor.py)."""
    name, sequence_parallel, _, precision = TENSOR_PARALLEL[key]
    for result in two_ranks[f"tp-{key}"]:
        expected = result["plan"]
        if name.startswith("mla"):
            expected += cpu_mla_padding(spec_for(tmp_path, name, precision, "none"), tp=2)
        if sequence_parallel and "mtp" in name:
            # eh_proj's output goes from its column shard to a sequence shard by an all-to-all,
            # which gloo lacks: DTensor all-gathers and keeps a slice, a view that holds the whole
            # sequence's storage (the other half, bf16) where NCCL's all-to-all would not
            expected += 2 * 256 * T // 2
        assert result["kept"] == pytest.approx(expected, rel=5e-3)


# fp32: exp(logit - log-sum-exp) is exact to about (|logit| + |log-sum-exp|) x 2^-24 relative, 1.6e-6
# for these logits (3 x randn over 8,193 columns; one run measured 1.02e-6 of the largest gradient);
# a wrong gradient is off by O(1)
@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_the_loss_of_logits_split_over_the_vocabulary(two_ranks, dtype, tolerance):
    """tp = 2: the head's logits stay split over the vocabulary, unevenly (4,097 and 4,096 columns),
    and the loss takes them with all-reduces over the tokens. Its loss and gradient equal torch's
    cross entropy over the whole logits, with ignored labels and targets on both sides of the
    split; its backward makes the plan's temporaries on the rank with the most columns: the fp32
    softmax of its columns and, under bf16, the gradient's cast; its forward no more."""
    from activation_worker import LOSS_TOKENS, LOSS_VOCAB
    results = two_ranks[f"loss-{dtype}"]
    assert [r["columns"] for r in results] == [4097, 4096]
    compute = 2 if dtype == "bfloat16" else 4
    planned = loss_temporary_bytes(LOSS_VOCAB, 64, LOSS_TOKENS, act=compute, tp=2)
    for result in results:
        assert result["loss"] == pytest.approx(result["expected"], rel=1e-6)
        assert result["grad_error"] <= tolerance * result["grad_scale"]
        assert result["backward"] == pytest.approx((4 + compute % 4) * result["columns"] * LOSS_TOKENS, rel=2e-3)
        assert result["forward"] <= result["backward"] * 1.002
    assert results[0]["backward"] == pytest.approx(planned, rel=2e-3)


@pytest.mark.parametrize("key", list(CHUNKED_SPLIT))
def test_the_chunked_loss_over_a_head_split_over_the_vocabulary(two_ranks, key):
    """tp = 2 under recompute: the chunked loss makes each rank's logits of its head rows (4,097 and
    4,096), a chunk at a time, and combines the ranks' log-sum-exps. Loss and gradients equal the
    one-process chunked loss over the whole head (tests/test_model_loss.py checks that one against
    torch); its backward makes the plan's temporaries over the rank's rows, its forward less."""
    from activation_worker import LOSS_CHUNK, LOSS_D, LOSS_TOKENS, LOSS_VOCAB
    compute, weights = (getattr(torch, name) for name in CHUNKED_SPLIT[key])
    results = two_ranks[f"chunked-loss-{key}"]
    assert [r["rows"] for r in results] == [4097, 4096]
    planned = loss_temporary_bytes(LOSS_VOCAB, LOSS_D, LOSS_TOKENS, chunk=LOSS_CHUNK, act=compute.itemsize,
                                   fp32_weights=weights == torch.float32, tp=2)
    tolerance = 1e-5 if compute == torch.float32 else 1e-2  # (x: a sum of the ranks' shares)
    for result in results:
        assert result["loss"] == pytest.approx(result["expected"], rel=1e-6)
        for name, (error, scale) in result["errors"].items():
            assert error <= tolerance * scale, name
        assert result["forward"] < result["backward"] <= planned * 1.002
    assert results[0]["backward"] == pytest.approx(planned, rel=2e-3)


@pytest.mark.parametrize("key", list(PIPELINE))
def test_plan_counts_the_micro_batches_each_pipeline_stage_holds(two_ranks, key):
    """pp = 2, 4 micro-batches on two gloo processes, a whole training step through the schedule:
    under 1F1B the first stage holds 2 micro-batches at its peak and the last 1 (Korthikanti et
    al. §4.2.3), under GPipe both hold all 4; the plan's per-stage activations match each peak."""
    in_flight = PIPELINE[key][2]
    for rank, result in enumerate(two_ranks[f"pp-{key}"]):
        assert result["in_flight"] == in_flight[rank]
        assert result["kept"] == pytest.approx(result["plan"], rel=5e-3)
