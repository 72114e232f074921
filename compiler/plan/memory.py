"""Training memory per device: model states, activations, buffers (inference: inference.py).

Model states are what llmc's runtime holds at the step's peak (runtime/parallel/data_parallel.py),
per parameter, with `train.optimizer.state_bytes_per_param` of optimizer state (12 for AdamW: fp32
master, m, v). Replicated weights (ZeRO 0: DDP, whose gradients are views into its all-reduce
buckets; or no data parallelism) stay fp32 under mixed precision too, as the master copy: 4 bytes
of weights, 4 of gradients and state - 4 of optimizer state, 16 for AdamW as in the ZeRO paper.
Under a bf16 (or fp16) autocast each micro-batch's forward also saves a 2-byte copy of every
matrix it multiplies with for its backward (`autocast_copies`): those count with the
activations, as many times as micro-batches are in flight. ZeRO 1-3 run on FSDP2, which gathers
weights in the compute precision (2 bytes, 4 in fp32), shards the optimizer states and fp32
master weights over the data-parallel group and reduces gradients in fp32, so their gradients
count 4 bytes: ZeRO 1 accumulates them unsharded until the step's last micro-batch reduces them
once; ZeRO 2 and 3 (and ZeRO 1 over one micro-batch) reduce-scatter them unit by unit in every
micro-batch's backward and keep fp32 shards, plus, as a temporary, the whole gradients that wait for their reduce-scatter.
ZeRO 1 and 2 keep the weights gathered through the step, ZeRO 3 only the units at work. Under
pipeline parallelism torch's schedules defer every FSDP2 stage's reduction to the step's last
micro-batch and keep its weights gathered after their backward: every ZeRO stage holds the
stage's whole weights and fp32 gradients. TP divides the attention's per-head projections, dense
FFNs, the vocab-parallel embedding and the head by tp, and replicates the rest (`tp_split`: norms,
MLA's down-projections, the MoE FFN, row biases; MTP's eh_proj but under sequence parallelism).
PP gives each stage its blocks, the embedding (and learned positions) to the first stage, final
norm + head + MTP to the last, which also keeps one copy of the embedding matrix when pp > 1 and
MTP or a tied head reads it. Expert weights are
divided by ep and replicated (and ZeRO-sharded) over the expert-data-parallel group of dp*tp/ep
ranks (ep is carved out of the dp x tp ranks); without expert parallelism they are replicated over
TP and sharded over dp like the rest of their block (`Degrees.expert_dp`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from .activations import (ACT, FP32, INT64, block_activations, block_bytes, loss_chunk_tokens, recomputed,
                          value_bytes)
from .hardware import lookup
from .params import (ParamCount, attention_matrices, block, ffn_column_biases, ffn_matrices, mla_down_projections,
                     norm, qkv_biases, shapes)

if TYPE_CHECKING:
    from ..spec import Spec


def model_state_bytes(params: float, *, dp: int, zero: int, weight: int = 2, optimizer: int = 12,
                      pipelined: bool = False, deferred: bool = False) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes per rank at the step's peak for `params` replicated
    over a dp group (see the module docstring): `weight` bytes of the weights FSDP2 computes with,
    `optimizer` bytes of optimizer state (with an fp32 master copy when weight < 4); `pipelined`:
    under a pipeline schedule; `deferred`: gradients are reduced once, at the step's last
    micro-batch (Degrees.deferred)."""
    if zero == 0 or dp == 1:  # DDP, or nothing to shard over: the fp32 weights are the master copy
        master = FP32 if weight < FP32 else 0
        return params * FP32, params * FP32, params * (optimizer - master)
    return (params * weight / (dp if zero >= 3 and not pipelined else 1),
            params * FP32 / (1 if deferred else dp),
            params * optimizer / dp)


def tp_split(m, d, moe_layer: bool) -> int:
    """Parameters of one block that tensor parallelism splits (runtime/parallel/tensor.py): the
    attention's per-head projections (q, k, v, o; MLA's up-projections and o) with their column
    biases, and a dense FFN's matrices with their column biases. It replicates the rest: norms,
    qk-norm, MLA's down-projections and latent norms, the row layers' biases (o, w2) and the whole
    MoE FFN, whose routed experts expert parallelism splits instead."""
    down = mla_down_projections(m, d) if m.attention.kind == "mla" else 0
    split = attention_matrices(m, d) - down + qkv_biases(m, d)
    if not moe_layer:
        split += ffn_matrices(m, d, d.F) + ffn_column_biases(m, d, d.F)
    return split


def autocast_copies(m, d, moe_layer: bool, precision: str) -> tuple[int, int, int]:
    """Weights of one block whose copies in the autocast dtype (2 bytes) the block's training
    forward saves for its backward, where the weights stay fp32 under a bf16 or fp16 autocast
    (replicated ones: FSDP2 gives the others in bf16), as (split by TP, replicated over TP, routed
    experts) (runtime/parallel/tensor.py: MLA's down-projections and the whole MoE FFN are
    replicated). Under bf16 and fp16 these are the projection matrices (not norms or biases, nor
    the DSA indexer's, whose inputs are detached: no input gradient reads them); under fp8 only
    the layers that stay bf16 (runtime/float8.py): the router, the shared-expert gate and experts
    with biases."""
    if precision == "fp32":
        return 0, 0, 0
    gates = (d.E * d.D + (d.D if m.moe.shared_expert_gate else 0)) if moe_layer else 0
    experts = d.E * ffn_matrices(m, d, d.F_e) if moe_layer else 0
    if precision == "fp8":
        return 0, gates, experts if m.mlp_bias else 0
    down = mla_down_projections(m, d) if m.attention.kind == "mla" else 0
    split = attention_matrices(m, d) - down + (0 if moe_layer else ffn_matrices(m, d, d.F))
    shared = ffn_matrices(m, d, d.F_s) if moe_layer else 0
    return split, down + shared + gates, experts


@dataclass(frozen=True)
class Degrees:
    """One candidate layout (all integers resolved)."""

    dp: int
    tp: int
    pp: int
    ep: int
    zero: int
    micro_batch_size: int
    grad_accum: int
    sequence_parallel: bool
    schedule: str = "1f1b"
    virtual_stages: int = 1

    @property
    def deferred(self) -> bool:
        """Gradients are reduced once, at the step's last micro-batch (DDP; ZeRO-1 over several
        micro-batches; every ZeRO stage under pipelining), rather than unit by unit in every
        micro-batch's backward (ZeRO-2 and 3, and ZeRO-1 over one micro-batch)."""
        if self.dp == 1 and self.expert_dp == 1:
            return True  # no data parallelism
        return self.zero == 0 or self.pp > 1 or (self.zero == 1 and self.grad_accum > 1)

    @property
    def fp32_dense(self) -> bool:
        """Dense weights stay fp32 in the forward (autocast casts them): replicated ones; FSDP2
        gathers them in bf16."""
        return self.zero == 0 or self.dp == 1

    @property
    def edp(self) -> int:
        """Expert-data-parallel degree: replicas of each expert shard (ep is carved out of dp x tp)."""
        return self.dp * self.tp // self.ep

    @property
    def expert_dp(self) -> int:
        """Ranks over which data parallelism reduces (and ZeRO shards) the routed experts: the edp
        group under expert parallelism; without it the dp group, as for the rest of the block
        (the ranks of a TP group run the same replicated MoE)."""
        return self.edp if self.ep > 1 else self.dp


@dataclass(frozen=True)
class RankShare:
    """What one pipeline rank holds: its model chunks (rank, rank + pp, ...) summed."""

    rank: int
    chunks: tuple[tuple[int, ...], ...]  # layer indices of each chunk
    dense: int                 # non-expert parameters
    expert: int                # routed-expert parameters
    first: bool                # holds the embedding
    last: bool                 # holds final norm, head, MTP (and the embedding copy they read)
    replicated: int            # dense parameters TP replicates (MTP's eh_proj aside: split under SP only)
    unit_dense: int            # the biggest block FSDP gathers at once (its dense part)
    unit_replicated: int       #   of which TP replicates
    unit_expert: int           #   and its routed experts
    root_dense: int            # the chunks' root FSDP units: embedding, final norm, head (and copy)
    root_replicated: int       #   of which TP replicates (the final norm)


def per_tp_rank(params: float, replicated: float, tp: int) -> float:
    """Parameters on one TP rank of `params`, `replicated` of which TP keeps whole."""
    return (params - replicated) / tp + replicated


def loss_temporary_bytes(vocab_size: int, d_model: int, tokens: int, *, chunk: int = 0, act: int = ACT,
                         fp32_weights: bool = True, heads: int = 1, tp: int = 1) -> float:
    """What the loss's backward over a head makes beside what the forward kept (runtime/model/loss.py).

    Whole logits (chunk 0): the gradients of the NLL and of the log-softmax, fp32 [tokens, V]
    each, alive together. Under TP, split over the vocabulary: the fp32 softmax of the rank's
    columns [tokens, ceil(V / tp)] and its cast to act (none in fp32). With MTP heads, the weight
    gradient of one head (of its autocast copy: act) waits for the next's. Chunked: the head's
    fp32 weight gradient and input gradient (act [tokens, d]), a cast of fp32 weights, and one
    chunk's logits (act [chunk, V]) beside the largest of their fp32 softmax, its weight product
    (act [V, d]) or its input product (act [chunk, d]); with MTP heads, the weight gradient of one
    head waits for the next's. Under TP, V is the rank's columns here too (the input gradient is
    over all tokens, a sum the head's input then reduces over the ranks)."""
    V, h = vocab_columns(vocab_size, tp), d_model
    if not chunk:
        logits = 2 * FP32 if tp == 1 else FP32 + (act if act != FP32 else 0)
        return logits * V * tokens + (heads > 1) * act * V * h
    c, cast = min(chunk, tokens), act != FP32
    held = FP32 * V * h + act * tokens * h + (act * V * h if cast and fp32_weights else 0)
    per_chunk = act * c * V + max(FP32 * c * V if cast else 0, act * V * h if cast else 0, act * c * h)
    waiting = (heads > 1) * (FP32 if fp32_weights else act) * V * h
    return held + per_chunk + waiting


def vocab_columns(vocab_size: int, tp: int) -> int:
    """The most logits a TP rank holds per token: the head splits the vocabulary like torch.chunk."""
    return -(-vocab_size // tp)


class TrainMemory(BaseModel):
    """Training memory of the devices of one pipeline rank, in bytes."""

    weights: int
    gradients: int
    optimizer: int
    activations: int = Field(description="Saved activations of all micro-batches in flight on the stage (and "
                                         "autocast's bf16 copies of fp32 weights, which each of them saves).")
    temporary: int = Field(description="Buffers alive at the peak: the loss's fp32 gradients over the logits "
                                       "(one chunk of them under recompute, the rank's columns under TP), gathered FSDP "
                                       "units, the block being recomputed.")
    overhead: int = Field(description="hardware.memory_reserve x capacity: CUDA context, allocator fragmentation.")
    peak: int
    capacity: int
    fits: bool
    stage: int = Field(description="The pipeline rank (its stage; its chunks under the interleaved schedule).")
    in_flight_micro_batches: float


class TrainMemoryModel:
    """Everything about training memory that does not depend on the layout, computed once."""

    def __init__(self, spec: Spec, p: ParamCount):
        self.spec, self.p = spec, p
        m, t = spec.model, spec.train
        self.h, self.s, self.V = m.d_model, t.seq_len, m.vocab_size
        self.rope_dim = m.rope_dim if m.positions == "rope" else 0
        d = shapes(m)
        kinds = {False: block(m, d, False)}
        if m.moe:
            kinds[True] = block(m, d, True)
        self.layer_dense, self.layer_expert, self.layer_replicated, self.layer_act = [], [], [], []
        acts = {k: block_activations(m, k, precision=t.precision) for k in kinds}
        copies = {k: autocast_copies(m, d, k, t.precision) for k in kinds}
        for i in range(m.n_layers):
            moe = m.is_moe_layer(i)
            self.layer_dense.append(sum(kinds[moe].values()) - kinds[moe]["experts"])
            self.layer_expert.append(kinds[moe]["experts"])
            self.layer_replicated.append(self.layer_dense[-1] - tp_split(m, d, moe))
            self.layer_act.append(acts[moe])
        self.mtp_act = [acts[m.is_moe_layer(m.n_layers + k)] for k in range(m.mtp.depth)]
        mtp_expert = sum(kinds[True]["experts"] for k in range(m.mtp.depth) if m.is_moe_layer(m.n_layers + k))
        self.mtp_dense, self.mtp_expert = p.mtp - mtp_expert, mtp_expert
        self.eh_proj = m.mtp.depth * 2 * self.h ** 2
        self.mtp_replicated = self.mtp_dense - self.eh_proj - sum(tp_split(m, d, m.is_moe_layer(m.n_layers + k))
                                                                  for k in range(m.mtp.depth))
        # autocast copies of each block (MTP blocks numbered after the layers), and of the head
        # and MTP's eh_proj (2d -> d), which stay bf16 under fp8 too
        self.block_copies = [copies[m.is_moe_layer(i)] for i in range(m.n_layers + m.mtp.depth)]
        cast = t.precision != "fp32"
        self.head_copy, self.eh_proj_copies = cast * self.V * self.h, cast * self.eh_proj
        self.embedding = p.components["embedding"] + p.components["positions"]
        self.positions = p.components["positions"]
        self.final_norm = norm(m, m.d_model)
        self.head = p.components["head"]
        # what the last stage adds when it is not the first: MTP embeds the next tokens and a tied
        # head projects with the embedding matrix, so that stage keeps one copy of it (not positions)
        self.embedding_copy = p.components["embedding"] if m.mtp.depth or m.tie_embeddings else 0
        precision = t.precision
        state = t.optimizer.state_bytes_per_param
        self.bytes_w, self.bytes_o = (4, state - 4) if precision == "fp32" else (2, state)
        self.capacity = lookup(spec.hardware.accelerator).memory_bytes
        self.reserve = spec.hardware.memory_reserve
        self._cache: dict = {}

    def ranks(self, assignment: list[list[int]], pp: int) -> list[RankShare]:
        """What each pipeline rank holds for a layer assignment of len(assignment) chunks
        (chunk 0: embedding; last chunk: final norm, head, MTP and, when pp > 1, the embedding
        copy MTP or a tied head reads; chunk s on rank s % pp)."""
        n = len(assignment)
        out = []
        for rank in range(pp):
            dense = expert = replicated = unit_e = roots = roots_r = 0
            unit = (0, 0)  # (dense, replicated) of the biggest block
            for i in range(rank, n, pp):
                layers = assignment[i]
                dense += sum(self.layer_dense[j] for j in layers)
                expert += sum(self.layer_expert[j] for j in layers)
                replicated += sum(self.layer_replicated[j] for j in layers)
                unit = max([unit] + [(self.layer_dense[j], self.layer_replicated[j]) for j in layers])
                unit_e = max([unit_e] + [self.layer_expert[j] for j in layers])
                if i == 0:  # the vocabulary-parallel embedding; learned positions replicated
                    dense += self.embedding
                    replicated += self.positions
                    roots += self.embedding
                if i == n - 1:
                    copy = self.embedding_copy if pp > 1 else 0
                    dense += self.final_norm + self.head + copy + self.mtp_dense
                    expert += self.mtp_expert
                    replicated += self.final_norm + self.mtp_replicated
                    roots += self.final_norm + self.head + copy
                    roots_r += self.final_norm
            out.append(RankShare(rank, tuple(tuple(assignment[i]) for i in range(rank, n, pp)), dense, expert,
                                 rank == 0, (n - 1) % pp == rank, replicated, *unit, unit_e, roots, roots_r))
        return out

    def in_flight(self, deg: Degrees, rank: int) -> list[float]:
        """Micro-batches of each of the rank's chunks whose activations it holds at its peak: all
        of them under GPipe; p - rank under 1F1B (its warm-up forwards and one more). Interleaved
        over v chunks, torch's ScheduleInterleaved1F1B runs (v - 1) p + 2 (p - 1 - rank) warm-up
        chunk forwards and one more before its first backward, p micro-batches of a chunk after
        another, so the early chunks hold more of them."""
        p, m, v = deg.pp, deg.grad_accum, deg.virtual_stages
        if deg.schedule == "gpipe":
            return [m]
        if deg.schedule != "interleaved" or p == 1:
            return [min(m, p - rank)]
        forwards = min((v - 1) * p + 2 * (p - 1 - rank) + 1, m * v)
        return [sum(1 for k in range(forwards) if (k // p) % v == c) for c in range(v)]

    def dense_per_tp_rank(self, share: RankShare, tp: int, sequence_parallel: bool) -> float:
        """The rank's dense parameters on one TP rank: TP splits them but those it replicates (MTP's
        eh_proj is split under sequence parallelism only)."""
        replicated = share.replicated + (self.eh_proj if share.last and not sequence_parallel else 0)
        return per_tp_rank(share.dense, replicated, tp)

    def rank_bytes(self, deg: Degrees, share: RankShare) -> tuple[float, ...]:
        """(weights, gradients, optimizer, activations, temporary, overhead, peak, in-flight) of one rank."""
        tp, ep = deg.tp, deg.ep
        dense, expert = self.dense_per_tp_rank(share, tp, deg.sequence_parallel), share.expert / ep
        pipelined = deg.pp > 1
        states = dict(zero=deg.zero, weight=self.bytes_w, optimizer=self.bytes_o,
                      pipelined=pipelined, deferred=deg.deferred)
        wd, gd, od = model_state_bytes(dense, dp=deg.dp, **states)
        we, ge, oe = model_state_bytes(expert, dp=deg.expert_dp, **states)
        chunks, working = self._activations(deg, share)
        counts = self.in_flight(deg, share.rank)
        act = sum(n * saved for n, saved in zip(counts, chunks))
        in_flight = sum(counts) / len(counts)  # in micro-batches of the whole rank
        temporary = working
        if share.last:
            temporary += loss_temporary_bytes(self.V, self.h, deg.micro_batch_size * self.s,
                                              chunk=loss_chunk_tokens(self.spec.train.recompute, self.V),
                                              act=value_bytes(self.spec.train.precision)[0],
                                              fp32_weights=deg.fp32_dense, heads=1 + len(self.mtp_act), tp=tp)
        block = per_tp_rank(share.unit_dense, share.unit_replicated, tp) + share.unit_expert / ep
        root = per_tp_rank(share.root_dense, share.root_replicated, tp)
        if not deg.deferred:
            # whole gradients waiting for their reduce-scatter (in the compute dtype, and an fp32
            # copy to reduce): the root unit's, whose head gradient comes first and is reduced
            # last, and the block's that has just finished its backward
            temporary += (root + block) * (self.bytes_w + (FP32 if self.bytes_w != FP32 else 0))
        elif deg.zero == 0 and tp > 1 and deg.dp > 1 and not pipelined:
            # FSDP2's replicate (ZeRO-0 under TP) all-reduces unit by unit at the step's last
            # micro-batch, into new fp32 gradients beside the ones accumulated
            temporary += (root + block) * FP32
        if deg.zero >= 3 and not pipelined:  # gathered weights: the root (kept), this block and the next
            temporary += (root + 2 * block) * self.bytes_w
        overhead = self.reserve * self.capacity
        peak = wd + we + gd + ge + od + oe + act + temporary + overhead
        return wd + we, gd + ge, od + oe, act, temporary, overhead, peak, in_flight

    def as_model(self, values: tuple[float, ...], rank: int) -> TrainMemory:
        w, g, o, act, temporary, overhead, peak, in_flight = values
        return TrainMemory(weights=int(w), gradients=int(g), optimizer=int(o), activations=int(act),
                           temporary=int(temporary), overhead=int(overhead), peak=int(peak), capacity=self.capacity,
                           fits=peak <= self.capacity, stage=rank, in_flight_micro_batches=in_flight)

    def _activations(self, deg: Degrees, share: RankShare) -> tuple[list[float], float]:
        """(saved bytes of each of the rank's chunks for one micro-batch, the largest working set).
        The last stage's final norm, head and MTP modules belong to its last chunk."""
        # replicated weights stay fp32, and each micro-batch's forward saves autocast's bf16
        # copies of them; FSDP2 gathers bf16 weights (its experts' only where it shards them)
        fp32_dense = deg.fp32_dense
        fp32_experts = fp32_dense or deg.expert_dp == 1
        key = (deg.tp, deg.ep, deg.sequence_parallel, deg.micro_batch_size, share.chunks, share.first, share.last,
               fp32_dense, fp32_experts)
        if key in self._cache:
            return self._cache[key]
        b, s, h, tp, sp = deg.micro_batch_size, self.s, self.h, deg.tp, deg.sequence_parallel and deg.tp > 1

        def copies(j):  # bytes of block j's autocast copies on this rank
            split, replicated, expert = self.block_copies[j]
            return ACT * ((split / tp + replicated) * fp32_dense + expert / deg.ep * fp32_experts)
        recompute, (act, stream) = self.spec.train.recompute, value_bytes(self.spec.train.precision)
        n_layers = len(self.layer_act)
        chunks, working = [], 0.0
        for c, chunk in enumerate(share.chunks):
            tail = share.last and c == len(share.chunks) - 1
            blocks = list(chunk) + ([n_layers + k for k in range(len(self.mtp_act))] if tail else [])
            saved = 0.0
            for j in blocks:
                checkpointed = recomputed(recompute, j)
                kept, work = block_bytes(self.layer_act[j] if j < n_layers else self.mtp_act[j - n_layers], b=b,
                                         s=s, tp=tp, sp=sp, checkpointed=checkpointed, h=h, stream=stream)
                # a checkpointed block casts its weights again when it is rebuilt
                saved += kept + (0 if checkpointed else copies(j))
                working = max(working, work + (copies(j) if checkpointed else 0))
            if self.rope_dim and blocks:  # cos and sin, built once per forward and read by every block
                saved += 2 * act * self.rope_dim * s
            if share.first and c == 0:  # the embedding's token ids
                saved += INT64 * b * s
            if tail:
                shard, depth = tp if sp else 1, len(self.mtp_act)
                chunked = loss_chunk_tokens(recompute, self.V) > 0
                # the final norm's input (the stream), the head's (gathered over the sequence under
                # SP), and what each head's loss keeps: its fp32 log-probabilities over the
                # vocabulary, whose logits are then freed; under TP the rank's logits split over the
                # vocabulary and a log-sum-exp per token; chunked only the log-sum-exp (under TP too)
                kept = FP32 * self.V if tp == 1 else act * vocab_columns(self.V, tp) + FP32
                per_token = stream * h / shard + act * h + (1 + depth) * (FP32 if chunked else kept)
                # per MTP depth: its enorm input (the stream), eh_proj input (2h, gathered under SP),
                # final norm input (the stream) and head input, and its embedding's token ids; the
                # labels of each head
                per_token += depth * (2 * stream * h / shard + 3 * act * h + INT64) + (1 + depth) * INT64
                # the head is split by TP, MTP's eh_proj only under sequence parallelism; the
                # chunked loss casts the head for each chunk (a temporary)
                copied = (0 if chunked else self.head_copy / tp) + self.eh_proj_copies / (tp if sp else 1)
                saved += per_token * b * s + ACT * copied * fp32_dense
            chunks.append(saved)
        self._cache[key] = (chunks, working)
        return self._cache[key]
