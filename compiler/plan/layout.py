"""The layout search: enumerate (dp, tp, pp, ep, zero, micro-batch), keep what fits, pick the fastest.

Constraints: dp x tp x pp = world size; tp divides the devices of a node (a TP group never leaves
a node) and meets what the runtime's TP needs of the model (`tensor_parallel_limits`: heads, kv
heads, dense FFN width, seq_len under sequence parallelism; tp = 1 with tied embeddings or the DSA
indexer); pp <= n_layers (x virtual stages); ep divides n_experts and dp x tp (ep is carved out
of the dp x tp ranks of a stage), and ep > 1 only with tp = 1 (the runtime's limit); dp x
micro_batch_size divides global_batch_size; the 1F1B schedule needs grad_accum >= pp, the
interleaved one grad_accum divisible by pp. Degrees the spec fixes are kept; "auto" ones are
searched. Only memory and these rules reject a layout, never its speed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from ..spec.spec import EP_WITH_TP, tensor_parallel_limits
from .activations import loss_chunk_tokens, recomputed
from .cost import Links, RankWork, StepTime, step_time
from .flops import head_params, layer_train_flops, mtp_train_flops
from .formatting import exceeds
from .hardware import lookup, training_peak
from .memory import Degrees, RankShare, TrainMemory, TrainMemoryModel
from .params import ParamCount
from .stages import Group, assign_layers, groups

if TYPE_CHECKING:
    from ..spec import Spec

MAX_MICRO_BATCH = 64
ALTERNATIVES = 5


class Alternative(BaseModel):
    """A layout that fits but was not chosen."""

    dp: int
    tp: int
    pp: int
    ep: int
    zero: int
    micro_batch_size: int
    step_time_s: float
    peak_bytes: int
    slower_by: float = Field(description="Step time relative to the chosen layout, minus one.")


class Layout(BaseModel):
    """The chosen parallel layout: what the runtime builds and the job launches."""

    world_size: int
    nodes: int
    procs_per_node: int
    dp: int
    tp: int
    pp: int
    ep: int
    edp: int = Field(description="Expert-data-parallel degree: dp x tp / ep replicas of each expert shard.")
    zero: int
    micro_batch_size: int
    grad_accum: int = Field(description="Micro-batches per optimizer step on each pipeline.")
    sequence_parallel: bool
    pp_schedule: str
    pp_virtual_stages: int
    stages: list[list[int]] = Field(description="Layer indices of each model chunk; chunk s runs on "
                                                "pipeline rank s % pp. Chunk 0 holds the embedding, the last "
                                                "holds final norm, head and MTP (and, when pp > 1, a copy of the embedding "
                                                "that MTP or a tied head reads).")
    mesh: dict = Field(description="Rank order: dims from outermost to innermost and their sizes.")
    groups: dict[str, Group]
    step_time_s: float = Field(description="Cost-model step time (s).")
    time_breakdown: dict[str, float] = Field(description="compute, bubble, tp/ep/pp comm, exposed dp comm (s).")
    tokens_per_s: float
    bubble_fraction: float


class Search(BaseModel):
    """How the layout was found."""

    considered: int = Field(description="Layouts that satisfy the rules.")
    evaluated: int = Field(description="Layouts whose memory and time were computed (the rest were dominated).")
    fitting: int
    fixed: dict[str, int] = Field(description="Degrees the spec fixed.")
    alternatives: list[Alternative]
    rejected: dict[str, int] = Field(description="Why layouts were dropped: reason -> count.")
    examples: dict[str, str] = Field(description="One example per rejection reason.")
    message: str = Field("", description="Why nothing fits and what would make it fit (when layout is null).")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class _Fit:
    degrees: Degrees
    time: StepTime | None
    memory_bytes: tuple[float, ...]   # TrainMemoryModel.rank_bytes of the most loaded rank
    rank: int
    chunks: list[list[int]]

    @property
    def peak(self) -> float:
        return self.memory_bytes[6]


class LayoutSearch:
    """The search over one spec; build once, `run()` once."""

    def __init__(self, spec: Spec, params: ParamCount):
        self.spec, self.p = spec, params
        m, t, hw = spec.model, spec.train, spec.hardware
        self.memory = TrainMemoryModel(spec, params)
        device = lookup(hw.accelerator)
        self.links = Links(hw.intra_node_gbps or device.intra_node_gbps, hw.inter_node_gbps or device.inter_node_gbps,
                           hw.gpus_per_node)
        self.peak = training_peak(hw, t.precision)[0] * 1e12
        self.layer_flops = [layer_train_flops(m, params, "moe" if m.is_moe_layer(i) else "dense", t.seq_len)
                            for i in range(m.n_layers)]
        self.tail_flops = 6 * head_params(m) + mtp_train_flops(m, params, t.seq_len)
        # a checkpointed block runs its forward twice: a third of its training FLOPs again
        self.block_flops = self.layer_flops + [
            layer_train_flops(m, params, "moe" if m.is_moe_layer(j) else "dense", t.seq_len)
            for j in range(m.n_layers, m.n_layers + m.mtp.depth)]
        self._shares: dict = {}
        self.rejected: dict[str, int] = {}
        self.examples: dict[str, str] = {}

    def _reject(self, reason: str, example: str, count: int = 1) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + count
        self.examples.setdefault(reason, example)

    def shares(self, pp: int, v: int) -> tuple[list[list[int]], list[RankShare], list[RankWork]]:
        """Layer assignment, per-rank holdings and per-rank work for pp ranks of v chunks each (cached)."""
        key = (pp, v)
        if key not in self._shares:
            m = self.spec.model
            layers = assign_layers(self.layer_flops, pp * v, self.tail_flops)
            shares = self.memory.ranks(layers, pp)
            work = []
            for sh in shares:
                mine = [j for chunk in sh.chunks for j in chunk]
                flops = sum(self.layer_flops[j] for j in mine)
                if sh.last:
                    flops += self.tail_flops
                    mine += list(range(m.n_layers, m.n_layers + m.mtp.depth))  # MTP blocks
                again = [j for j in mine if recomputed(self.spec.train.recompute, j)]
                flops += sum(self.block_flops[j] for j in again) / 3
                ends = sh.first + sh.last * (1 + 2 * m.mtp.depth)  # MTP: an embedding and a head a depth
                work.append(RankWork(flops, len(mine), sum(m.is_moe_layer(j) for j in mine),
                                     sh.dense, sh.expert, len(again), ends))  # (dense at tp = 1: see evaluate)
            self._shares[key] = (layers, shares, work)
        return self._shares[key]

    def candidates(self):
        """Yield the layouts that satisfy the rules, as lists that differ only in the ZeRO stage
        (ascending), micro-batch sizes ascending; count the rest by reason."""
        spec, m, t, par = self.spec, self.spec.model, self.spec.train, self.spec.parallel
        world, per_node = spec.world_size, spec.hardware.gpus_per_node
        gb = t.global_batch_size
        v = par.pp_virtual_stages if par.pp_schedule == "interleaved" else 1
        for tp in ([par.tp] if par.tp != "auto" else divisors(world)):
            if tp > per_node or per_node % tp:
                self._reject("tp must stay within a node", f"tp={tp} with {per_node} devices per node")
                continue
            limits = list(tensor_parallel_limits(m, tp, t.seq_len, par.sequence_parallel))
            for rule, name, value in limits:
                self._reject(rule, f"tp={tp}, {name}={value}")
            if limits:
                continue
            for pp in ([par.pp] if par.pp != "auto" else divisors(world // tp)):
                if (world // tp) % pp:
                    self._reject("dp x tp x pp must equal the world size", f"tp={tp}, pp={pp}, world size {world}")
                    continue
                if pp * v > m.n_layers:
                    self._reject("pp x virtual stages must not exceed n_layers", f"pp={pp}, n_layers={m.n_layers}")
                    continue
                dp = world // (tp * pp)
                if par.dp != "auto" and par.dp != dp:
                    continue
                if gb % dp:
                    self._reject("dp must divide global_batch_size", f"dp={dp}, global_batch_size={gb}")
                    continue
                experts = m.moe.n_experts if m.moe else 1
                for ep in ([par.ep] if par.ep != "auto" else divisors(experts)):
                    if (dp * tp) % ep:
                        self._reject("ep must divide dp x tp", f"ep={ep}, dp x tp={dp * tp}")
                        continue
                    if ep > 1 and tp > 1:
                        self._reject(EP_WITH_TP, f"tp={tp}, ep={ep}")
                        continue
                    edp = dp * tp // ep
                    sharded = dp > 1 or (ep > 1 and edp > 1)  # anything for ZeRO to shard (Degrees.expert_dp)
                    zeros = [par.zero] if par.zero != "auto" else ([0, 1, 2, 3] if sharded else [0])
                    per_rank = gb // dp
                    mbs_list = ([t.micro_batch_size] if t.micro_batch_size != "auto"
                                else [b for b in divisors(per_rank) if b <= MAX_MICRO_BATCH])
                    for mbs in mbs_list:
                        if per_rank % mbs:
                            self._reject("dp x micro_batch_size must divide global_batch_size",
                                         f"dp={dp}, micro_batch_size={mbs}, global_batch_size={gb}")
                            continue
                        accum = per_rank // mbs
                        if v > 1 and accum % pp:
                            self._reject("interleaved pipelines need grad_accum divisible by pp",
                                         f"pp={pp}, grad_accum={accum}")
                            continue
                        if pp > 1 and par.pp_schedule == "1f1b" and accum < pp:  # (torch's Schedule1F1B)
                            self._reject("the 1F1B schedule needs grad_accum >= pp (a micro-batch per stage)",
                                         f"pp={pp}, grad_accum={accum}")
                            continue
                        yield [Degrees(dp, tp, pp, ep, zero, mbs, accum, par.sequence_parallel and tp > 1,
                                       par.pp_schedule, v) for zero in zeros]

    def evaluate(self, deg: Degrees, *, timed: bool = True) -> _Fit:
        """Memory of the most loaded rank and the step time of one layout (None when it does not
        fit or `timed` is false: the time of a layout that cannot run is not needed)."""
        layers, shares, work = self.shares(deg.pp, deg.virtual_stages)
        worst, worst_rank = None, 0
        for sh in shares:
            values = self.memory.rank_bytes(deg, sh)
            if worst is None or values[6] > worst[6]:
                worst, worst_rank = values, sh.rank
        if not timed or worst[6] > self.memory.capacity:
            return _Fit(deg, None, worst, worst_rank, layers)
        m, t = self.spec.model, self.spec.train
        precision_bytes = 4 if t.precision == "fp32" else 2
        # the chunked loss runs each head's forward again in the backward (the last stage)
        chunked = loss_chunk_tokens(t.recompute, m.vocab_size)
        head_again = 2 * head_params(m) * (1 + m.mtp.depth) if chunked else 0
        work = [replace(w, dense_params=self.memory.dense_per_tp_rank(sh, deg.tp, deg.sequence_parallel),
                        flops=w.flops + head_again * sh.last) for w, sh in zip(work, shares)]
        time = step_time(work, dp=deg.dp, tp=deg.tp, pp=deg.pp, ep=deg.ep, zero=deg.zero,
                         micro_batch_size=deg.micro_batch_size, grad_accum=deg.grad_accum, seq_len=t.seq_len,
                         d_model=m.d_model, top_k=m.moe.top_k if m.moe else 0, peak_flops=self.peak,
                         mfu=self.spec.hardware.mfu, links=self.links, world=self.spec.world_size,
                         # gradients are reduced in fp32 (DDP's fp32 gradients, FSDP2's reduce dtype)
                         grad_bytes=4, weight_bytes=precision_bytes, activation_bytes=precision_bytes,
                         schedule=deg.schedule, virtual_stages=deg.virtual_stages, deferred=deg.deferred,
                         expert_dp=deg.expert_dp)
        return _Fit(deg, time, worst, worst_rank, layers)

    def run(self) -> tuple[_Fit | None, list[_Fit], Search, _Fit | None]:
        """(chosen, ranked fitting layouts, search summary, the smallest layout that did not fit)."""
        fits, considered, evaluated, closest = [], 0, 0, None
        too_big: set[tuple] = set()   # (dp, tp, pp, ep) whose smaller micro-batch already did not fit
        for group in self.candidates():
            d0 = group[0]
            key = (d0.dp, d0.tp, d0.pp, d0.ep)
            considered += len(group)
            if key in too_big:
                self._reject("does not fit in device memory", f"micro_batch_size={d0.micro_batch_size} of "
                             f"dp={d0.dp} tp={d0.tp} pp={d0.pp} ep={d0.ep}: a smaller one does not fit", len(group))
                continue
            for i, deg in enumerate(group):
                evaluated += 1
                fit = self.evaluate(deg)
                if fit.peak <= self.memory.capacity:
                    fits.append(fit)
                    if len(group) > i + 1:  # more ZeRO only adds communication: never faster
                        self._reject("a lower ZeRO stage fits and is at least as fast",
                                     f"zero={group[i + 1].zero} for dp={deg.dp} tp={deg.tp} pp={deg.pp} "
                                     f"ep={deg.ep} micro_batch_size={deg.micro_batch_size}", len(group) - i - 1)
                    break
                self._reject("does not fit in device memory",
                             f"dp={deg.dp} tp={deg.tp} pp={deg.pp} ep={deg.ep} zero={deg.zero} "
                             f"micro_batch_size={deg.micro_batch_size}: {exceeds(fit.peak, self.memory.capacity)}")
                if closest is None or fit.peak < closest.peak:
                    closest = fit
            else:
                too_big.add(key)
        # fastest first; on a tie the simpler layout (less ZeRO, fewer stages, less TP and EP)
        fits.sort(key=lambda f: (round(f.time.total, 12), f.degrees.zero, f.degrees.pp, f.degrees.tp,
                                 f.degrees.ep, -f.degrees.micro_batch_size))
        par, t = self.spec.parallel, self.spec.train
        fixed = {k: getattr(par, k) for k in ("dp", "tp", "pp", "ep", "zero") if getattr(par, k) != "auto"}
        if t.micro_batch_size != "auto":
            fixed["micro_batch_size"] = t.micro_batch_size
        chosen = fits[0] if fits else None
        alts = [Alternative(dp=f.degrees.dp, tp=f.degrees.tp, pp=f.degrees.pp, ep=f.degrees.ep, zero=f.degrees.zero,
                            micro_batch_size=f.degrees.micro_batch_size, step_time_s=f.time.total,
                            peak_bytes=int(f.peak), slower_by=f.time.total / chosen.time.total - 1)
                for f in fits[1:1 + ALTERNATIVES]]
        if closest is not None:
            d = closest.degrees
            self.examples["does not fit in device memory"] = (
                f"the closest to fitting: dp={d.dp} tp={d.tp} pp={d.pp} ep={d.ep} zero={d.zero} micro_batch_size="
                f"{d.micro_batch_size} needs {exceeds(closest.peak, self.memory.capacity)}")
        search = Search(considered=considered, evaluated=evaluated, fitting=len(fits), fixed=fixed, alternatives=alts,
                        rejected=self.rejected, examples=self.examples)
        return chosen, fits, search, closest

    def train_memory(self, fit: _Fit) -> TrainMemory:
        return self.memory.as_model(fit.memory_bytes, fit.rank)

    def stage_memory(self, fit: _Fit) -> list[TrainMemory]:
        """Training memory of every pipeline rank of a layout (index = pp rank)."""
        _, shares, _ = self.shares(fit.degrees.pp, fit.degrees.virtual_stages)
        return [self.memory.as_model(self.memory.rank_bytes(fit.degrees, sh), sh.rank) for sh in shares]

    def layout(self, fit: _Fit) -> Layout:
        deg, hw = fit.degrees, self.spec.hardware
        world = self.spec.world_size
        tokens = self.spec.train.global_batch_size * self.spec.train.seq_len
        slots = fit.time.compute + fit.time.bubble
        return Layout(
            world_size=world, nodes=world // hw.gpus_per_node, procs_per_node=hw.gpus_per_node,
            dp=deg.dp, tp=deg.tp, pp=deg.pp, ep=deg.ep, edp=deg.edp, zero=deg.zero,
            micro_batch_size=deg.micro_batch_size, grad_accum=deg.grad_accum,
            sequence_parallel=deg.sequence_parallel, pp_schedule=deg.schedule, pp_virtual_stages=deg.virtual_stages,
            stages=fit.chunks,
            mesh={"dims": ["pp", "dp", "tp"], "shape": [deg.pp, deg.dp, deg.tp],
                  "ep_dims": ["pp", "edp", "ep"], "ep_shape": [deg.pp, deg.edp, deg.ep]},
            groups=groups(world, deg.dp, deg.tp, deg.pp, deg.ep, hw.gpus_per_node),
            step_time_s=fit.time.total,
            time_breakdown={"compute": fit.time.compute, "bubble": fit.time.bubble, "tp_comm": fit.time.tp_comm,
                            "ep_comm": fit.time.ep_comm, "pp_comm": fit.time.pp_comm, "dp_comm": fit.time.dp_comm},
            tokens_per_s=tokens / fit.time.total,
            bubble_fraction=fit.time.bubble / slots if slots else 0.0)
