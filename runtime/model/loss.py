"""The next-token loss over the head's logits: whole, or a chunk of tokens at a time.

`cross_entropy` takes logits the caller made, [tokens, V]: the loss keeps their fp32
log-probabilities for the backward, whose gradient over them is two more fp32 [tokens, V]
tensors. For a large vocabulary and a long sequence that is most of a device's temporary memory
(llama3_8b at 8,192 tokens: 3.9 GiB per copy).

`chunked_cross_entropy` never makes them whole: it is given the head's input x and weight and
makes the logits of `chunk` tokens at a time, in the forward for the loss (keeping a log-sum-exp
per token) and again in the backward for the gradient, which it writes into the head's input
gradient and an fp32 weight gradient chunk by chunk. It keeps x and its log-sum-exps for one more
forward of the head, and casts fp32 weights to the compute dtype for each chunk (the cast is
small beside the chunk's matmul) rather than keep a copy; its products are `linear.linear`'s
(oneDNN for fp32 on x86 CPUs). The training runtime uses it under `train.recompute`
(compiler/plan/activations.loss_chunk_tokens); the plan counts both (compiler/plan/memory.py).

Under tensor parallelism the head is split over the vocabulary (runtime/parallel/tensor.py) and
neither loss gathers [tokens, V]. `cross_entropy` is given the logits of this rank's columns (a
DTensor) and keeps them in their dtype for the backward; `chunked_cross_entropy` is given the
head's weight rows (a DTensor) and makes their logits a chunk at a time. Each rank's log-sum-exps
over its columns and the targets' logits among them are combined by all-reduces over the tokens;
the input gradient, a sum over the ranks' columns, is reduced by the head's input (DTensor).
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .linear import linear

IGNORE = -100


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross entropy in fp32 over labels != -100 (0 when every label is ignored)."""
    split = _vocabulary_split(logits, logits.ndim - 1)
    if split is None:
        losses = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE,
                                 reduction="sum")
    else:
        local, offset, mesh = split
        losses = _VocabParallelCrossEntropy.apply(local.flatten(0, -2), labels.flatten(), offset, mesh.get_group())
    return losses / (labels != IGNORE).sum().clamp(min=1)


def _vocabulary_split(t: torch.Tensor, dim: int):
    """(this rank's part, the vocabulary index it starts at, the mesh) when t is a DTensor split
    over the vocabulary along `dim`; None for a plain tensor."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor exists
    if dtensor is None or not isinstance(t, dtensor.DTensor):
        return None
    mesh, placements, V = t.device_mesh, t.placements, t.shape[dim]
    if mesh.ndim != 1 or placements != (dtensor.Shard(dim),):
        raise ValueError(f"the loss takes a head split over the vocabulary on one mesh dimension, not {placements}")
    # Shard splits like torch.chunk: ceil(V / n) a rank, the last ones fewer
    return t.to_local(), min(mesh.get_local_rank() * -(-V // mesh.size()), V), mesh


def _replicated(x: torch.Tensor, mesh) -> torch.Tensor:
    """The head's whole input on this rank (gathered when x is split over the sequence); its
    gradient, this rank's columns' share, is summed over the ranks in the backward."""
    from torch.distributed.tensor import DTensor, Partial, Replicate
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
    return x.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])


def chunked_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                          dtype: torch.dtype) -> torch.Tensor:
    """cross_entropy(x @ weight.T, labels), `chunk` tokens of x [..., D] at a time; the logits are
    computed in `dtype` (the autocast's), the loss in fp32. weight [V, D] is a plain tensor, or
    under TP a DTensor of this rank's rows (x then as the final norm leaves it)."""
    split = _vocabulary_split(weight, 0)
    if split is None:
        offset, group = 0, None
    else:
        weight, offset, mesh = split
        x, group = _replicated(x, mesh), mesh.get_group()
    total = _ChunkedCrossEntropy.apply(x.flatten(0, -2).to(dtype), weight, labels.flatten(), chunk, offset, group)
    return total / (labels != IGNORE).sum().clamp(min=1)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """The summed fp32 cross entropy of x @ weight.T, one chunk of rows at a time in both passes;
    weight's rows are the vocabulary's from `offset`, the others' on the ranks of `group` (None:
    all of them)."""

    @staticmethod
    def forward(ctx, x, weight, labels, chunk: int, offset: int, group):
        lse = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        picked = torch.empty_like(lse)
        for rows in _chunks(x.shape[0], chunk):
            logits = linear(x[rows], weight.to(x.dtype)).float()
            _log_sum_exp_and_target(logits, labels[rows], offset, lse[rows], picked[rows])
            del logits
        lse, picked = _over_the_vocabulary(lse, picked, group)
        ctx.save_for_backward(x, weight, labels, lse)
        ctx.chunk, ctx.offset = chunk, offset
        return ((lse - picked) * (labels != IGNORE)).sum()

    @staticmethod
    def backward(ctx, grad_total):
        x, weight, labels, lse = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for rows in _chunks(x.shape[0], ctx.chunk):
            grad_x[rows] = _chunk_gradients(x[rows], weight, labels[rows], ctx.offset, lse[rows], grad_total, grad_w)
        return grad_x, grad_w.to(weight.dtype), None, None, None, None


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """The summed fp32 cross entropy of logits whose vocabulary is split over `group`: z
    [tokens, V_local] are this rank's columns, from vocabulary index `offset`. The forward makes
    one fp32 copy of z; the backward its softmax (in place) and, under bf16, its cast."""

    @staticmethod
    def forward(ctx, z, labels, offset: int, group):
        lse = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
        picked = torch.empty_like(lse)
        _log_sum_exp_and_target(z.to(torch.float32, copy=True), labels, offset, lse, picked)
        lse, picked = _over_the_vocabulary(lse, picked, group)
        ctx.save_for_backward(z, labels, lse)
        ctx.offset = offset
        return ((lse - picked) * (labels != IGNORE)).sum()

    @staticmethod
    def backward(ctx, grad_total):
        z, labels, lse = ctx.saved_tensors
        p = z.to(torch.float32, copy=True).sub_(lse[:, None]).exp_()  # softmax over the whole vocabulary
        p[_targets_here(labels, ctx.offset, z.shape[-1])] -= 1.0        # minus the one-hot target
        p.mul_(((labels != IGNORE) * grad_total)[:, None])
        return p.to(z.dtype), None, None, None


def _targets_here(labels, offset: int, columns: int):
    """(the rows whose target is among the columns from vocabulary index `offset`, its column
    there). Ignored labels (-100) are no rank's."""
    rows = ((labels >= offset) & (labels < offset + columns)).nonzero()[:, 0]
    cols = labels[rows]
    if offset:
        cols -= offset
    return rows, cols


def _chunks(n: int, chunk: int):
    return (slice(i, min(i + chunk, n)) for i in range(0, n, chunk))


def _log_sum_exp_and_target(logits, y, offset: int, lse_out, picked_out) -> None:
    """The log-sum-exps of fp32 logits [rows, columns] (consumed: computed in place, with no second
    [rows, columns] tensor), and the logits of the targets among the columns (0 for the others),
    written to lse_out and picked_out."""
    rows, cols = _targets_here(y, offset, logits.shape[-1])
    picked_out.zero_()[rows] = logits[rows, cols]
    top = logits.amax(dim=-1)
    lse_out.copy_(logits.sub_(top[:, None]).exp_().sum(dim=-1).log_().add_(top))


def _over_the_vocabulary(lse, picked, group):
    """The ranks' log-sum-exps over their columns, combined into one over the whole vocabulary, and
    the targets' logits (each on the one rank that holds it); as given without a group."""
    if group is None:
        return lse, picked
    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    sums = torch.stack((lse.sub_(top).exp_(), picked))
    dist.all_reduce(sums, group=group)
    return sums[0].log().add_(top), sums[1]


def _chunk_gradients(x, weight, y, offset: int, lse, grad_total, grad_w) -> torch.Tensor:
    """The chunk's input gradient (through weight's columns); its weight gradient added to grad_w (fp32)."""
    w = weight.to(x.dtype)
    p = linear(x, w).float().sub_(lse[:, None]).exp_()  # softmax
    p[_targets_here(y, offset, weight.shape[0])] -= 1.0  # minus the one-hot target (its indices then freed)
    p.mul_(((y != IGNORE) * grad_total)[:, None])
    g = p.to(x.dtype)
    del p
    if g.dtype == torch.float32:
        grad_w.addmm_(g.T, x)
    else:  # one product per chunk in the compute dtype, summed in fp32
        grad_w += g.T @ x
    return linear(g, w.t())
