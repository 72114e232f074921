"""The step-time cost model that ranks layouts.

Per micro-batch, the slowest pipeline rank computes its chunks at the assumed MFU (the forward
of its checkpointed blocks twice) and waits for its tensor-parallel all-reduces (4 per block:
2 forward, 2 backward, on the node's links; 2 more for a checkpointed block; one for each
vocabulary-parallel embedding's output and each head's input gradient), its MoE
all-to-alls (dispatch and combine, forward and backward) and its pipeline sends, of
activations in the training precision. A step is (m + p - 1) such micro-batch slots for
1F1B / GPipe, (m + (p - 1)/v) interleaved: the bubble is
(p - 1)/(m + p - 1). Data-parallel gradient synchronisation (ring all-reduce, or reduce-scatter +
all-gather under ZeRO) overlaps with the backward of the last micro-batch; only the excess is
exposed. That is once per step for DDP, ZeRO-1 and every ZeRO stage under pipelining, which
reduce at the step's last micro-batch (memory.py); ZeRO-2 and 3 without pipelining
reduce-scatter every micro-batch, each overlapped with that micro-batch's backward. Gradients
travel in fp32, weights in the compute precision. ZeRO-1 and 2 all-gather the weights once per
step, overlapped with the first forward; ZeRO-3 twice per micro-batch (forward and backward),
overlapped with that micro-batch's compute. A group whose ranks fit in one node uses the node's
links, otherwise the inter-node links (the slower path bounds the collective).
"""

from __future__ import annotations

from dataclasses import dataclass


def ring_all_reduce_s(nbytes: float, n: int, gbps: float) -> float:
    """Seconds of a ring all-reduce of `nbytes` over n ranks at `gbps` GB/s per rank."""
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes / (gbps * 1e9)


def ring_gather_s(nbytes: float, n: int, gbps: float) -> float:
    """Seconds of an all-gather (or reduce-scatter) whose full result is `nbytes`."""
    return 0.0 if n <= 1 else (n - 1) / n * nbytes / (gbps * 1e9)


@dataclass(frozen=True)
class Links:
    intra_gbps: float
    inter_gbps: float
    per_node: int

    def bandwidth(self, size: int, stride: int = 1) -> float:
        """Bandwidth of a group of `size` ranks at `stride`: the node's links if it stays inside one."""
        span = size * stride
        inside = size == 1 or (span <= self.per_node and self.per_node % span == 0)
        return self.intra_gbps if inside else self.inter_gbps


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step, and where they go."""

    total: float
    compute: float       # all micro-batches' compute on the slowest rank, no bubble
    bubble: float        # pipeline fill and drain
    tp_comm: float
    ep_comm: float
    pp_comm: float
    dp_comm: float       # exposed part only


@dataclass(frozen=True)
class RankWork:
    """Per-token work of one pipeline rank (all its chunks)."""

    flops: float          # training FLOPs per token, the checkpointed blocks' second forward included
    blocks: int           # Transformer blocks (MTP blocks included)
    moe_blocks: int
    dense_params: float   # dense parameters one TP rank synchronises over dp (its shards, what TP replicates)
    expert_params: float  # routed-expert parameters (before EP division)
    recomputed: int = 0   # checkpointed blocks: their forward's 2 TP all-reduces run again
    ends: int = 0         # embeddings and heads (MTP's included): a TP all-reduce each (the head's
                          #   loss reduces only [tokens] values: runtime/model/loss.py)


def step_time(work: list[RankWork], *, dp: int, tp: int, pp: int, ep: int, zero: int, micro_batch_size: int,
              grad_accum: int, seq_len: int, d_model: int, top_k: int, peak_flops: float, mfu: float,
              links: Links, world: int, grad_bytes: int, weight_bytes: int, activation_bytes: int = 2,
              schedule: str = "1f1b", virtual_stages: int = 1, deferred: bool = True,
              expert_dp: int | None = None) -> StepTime:
    """Estimated seconds per step of one layout (see the module docstring); `deferred`: gradients
    are reduced once per step, else every micro-batch (memory.Degrees.deferred); `expert_dp`: the
    ranks the routed experts' gradients are reduced over (memory.Degrees.expert_dp; default dp)."""
    tokens = micro_batch_size * seq_len
    activation = tokens * d_model * activation_bytes
    bw_tp, bw_ep = links.bandwidth(tp), links.bandwidth(ep)
    bw_dp = links.bandwidth(dp, tp)
    bw_pp = links.bandwidth(2, world // pp)
    slot = comp_slot = tp_s = ep_s = pp_s = 0.0
    dp_s = 0.0
    for w in work:
        compute = w.flops * tokens / (tp * peak_flops * mfu)
        t_tp = (4 * w.blocks + 2 * w.recomputed + w.ends) * ring_all_reduce_s(activation, tp, bw_tp)
        a2a_bytes = tokens / tp * top_k * d_model * activation_bytes * (ep - 1) / ep
        t_ep = w.moe_blocks * 4 * a2a_bytes / (bw_ep * 1e9) if ep > 1 else 0.0
        t_pp = 2 * activation / tp / (bw_pp * 1e9) if pp > 1 else 0.0
        if compute + t_tp + t_ep + t_pp > slot:
            slot, comp_slot, tp_s, ep_s, pp_s = compute + t_tp + t_ep + t_pp, compute, t_tp, t_ep, t_pp
        grads = w.dense_params * grad_bytes
        expert_grads = (w.expert_params / ep) * grad_bytes
        edp = expert_dp or dp
        sync = ring_all_reduce_s(grads, dp, bw_dp) + ring_all_reduce_s(expert_grads, edp, bw_dp)
        reduce = (1 if deferred else grad_accum) * max(0.0, (sync / 2 if zero else sync) - 2 / 3 * compute)
        gather = (ring_gather_s(grads / grad_bytes * weight_bytes, dp, bw_dp)
                  + ring_gather_s(expert_grads / grad_bytes * weight_bytes, edp, bw_dp))
        if zero == 0:
            exposed = reduce
        elif zero <= 2:
            exposed = reduce + max(0.0, gather - compute / 3)
        else:
            exposed = reduce + grad_accum * max(0.0, 2 * gather - compute)
        dp_s = max(dp_s, exposed)
    slots = grad_accum + ((pp - 1) / virtual_stages if schedule == "interleaved" else pp - 1)
    total = slots * slot + dp_s
    m = grad_accum
    return StepTime(total=total, compute=m * comp_slot, bubble=(slots - m) * slot, tp_comm=m * tp_s,
                    ep_comm=m * ep_s, pp_comm=m * pp_s, dp_comm=dp_s)
