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
small beside the chunk's matmul) rather than keep a copy. The training runtime
uses it under `train.recompute` (compiler/plan/activations.loss_chunk_tokens); the plan counts
both (compiler/plan/memory.py).

Under tensor parallelism the head's logits are split over the vocabulary (a DTensor from
runtime/parallel/tensor.py): `cross_entropy` then takes the loss of this rank's columns with
three small all-reduces over the tokens (the max, the sum of exponentials and the target's logit)
instead of gathering [tokens, V], and keeps the local logits in their dtype for the backward.
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE = -100


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross entropy in fp32 over labels != -100 (0 when every label is ignored)."""
    split = _vocabulary_split(logits)
    if split is None:
        losses = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE,
                                 reduction="sum")
    else:
        local, offset, group = split
        losses = _VocabParallelCrossEntropy.apply(local.flatten(0, -2), labels.flatten(), offset, group)
    return losses / (labels != IGNORE).sum().clamp(min=1)


def _vocabulary_split(logits: torch.Tensor):
    """(this rank's logits, the vocabulary index of their first column, the process group) when
    logits is a DTensor split over the vocabulary; None for a plain tensor."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor exists
    if dtensor is None or not isinstance(logits, dtensor.DTensor):
        return None
    mesh, placements, V = logits.device_mesh, logits.placements, logits.shape[-1]
    if mesh.ndim != 1 or placements != (dtensor.Shard(logits.ndim - 1),):
        raise ValueError(f"the loss takes logits split over the vocabulary on one mesh dimension, not {placements}")
    # Shard splits like torch.chunk: ceil(V / n) columns a rank, the last ones fewer
    offset = min(mesh.get_local_rank() * -(-V // mesh.size()), V)
    return logits.to_local(), offset, mesh.get_group()


def chunked_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                          dtype: torch.dtype) -> torch.Tensor:
    """cross_entropy(x @ weight.T, labels), `chunk` tokens of x [..., D] at a time; the logits are
    computed in `dtype` (the autocast's), the loss in fp32. weight [V, D] is a plain tensor."""
    total = _ChunkedCrossEntropy.apply(x.flatten(0, -2).to(dtype), weight, labels.flatten(), chunk)
    return total / (labels != IGNORE).sum().clamp(min=1)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """The summed fp32 cross entropy of x @ weight.T, one chunk of rows at a time in both passes."""

    @staticmethod
    def forward(ctx, x, weight, labels, chunk: int):
        lse = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for rows in _chunks(x.shape[0], chunk):
            total += _chunk_loss(x[rows], weight, labels[rows], lse[rows])
        ctx.save_for_backward(x, weight, labels, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        x, weight, labels, lse = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for rows in _chunks(x.shape[0], ctx.chunk):
            grad_x[rows] = _chunk_gradients(x[rows], weight, labels[rows], lse[rows], grad_total, grad_w)
        return grad_x, grad_w.to(weight.dtype), None, None


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """The summed fp32 cross entropy of logits whose vocabulary is split over `group`: z
    [tokens, V_local] are this rank's columns, from vocabulary index `offset`. The forward makes
    one fp32 copy of z; the backward its softmax (in place) and, under bf16, its cast."""

    @staticmethod
    def forward(ctx, z, labels, offset: int, group):
        top = z.amax(dim=-1).float()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        mine, local = _own_targets(labels, offset, z.shape[-1])
        sums = torch.stack((z.to(torch.float32, copy=True).sub_(top[:, None]).exp_().sum(dim=-1),
                            z.gather(1, local[:, None])[:, 0].float() * mine))
        dist.all_reduce(sums, group=group)  # the sum of exponentials and the target's logit
        lse = sums[0].log().add_(top)
        ctx.save_for_backward(z, labels, lse)
        ctx.offset = offset
        return ((lse - sums[1]) * (labels != IGNORE)).sum()

    @staticmethod
    def backward(ctx, grad_total):
        z, labels, lse = ctx.saved_tensors
        p = z.to(torch.float32, copy=True).sub_(lse[:, None]).exp_()  # softmax over the whole vocabulary
        mine, local = _own_targets(labels, ctx.offset, z.shape[-1])
        rows = mine.nonzero()[:, 0]
        p[rows, local[rows]] -= 1.0                                     # minus the one-hot target
        p.mul_(((labels != IGNORE) * grad_total)[:, None])
        return p.to(z.dtype), None, None, None


def _own_targets(labels, offset: int, columns: int):
    """(which targets are among this rank's columns, their column there; 0 elsewhere). Ignored
    labels (-100) are no rank's."""
    mine = (labels >= offset) & (labels < offset + columns)
    return mine, torch.where(mine, labels - offset, 0)


def _chunks(n: int, chunk: int):
    return (slice(i, min(i + chunk, n)) for i in range(0, n, chunk))


def _chunk_loss(x, weight, y, lse_out) -> torch.Tensor:
    """The chunk's summed loss; its log-sum-exps written to lse_out."""
    z = (x @ weight.to(x.dtype).T).float()
    picked = z.gather(1, y.clamp(min=0)[:, None])[:, 0]
    top = z.amax(dim=-1)  # log-sum-exp in place: no second [chunk, V] tensor beside the logits
    lse_out.copy_(z.sub_(top[:, None]).exp_().sum(dim=-1).log_().add_(top))
    return ((lse_out - picked) * (y != IGNORE)).sum()


def _chunk_gradients(x, weight, y, lse, grad_total, grad_w) -> torch.Tensor:
    """The chunk's input gradient; its weight gradient added to grad_w (fp32)."""
    w = weight.to(x.dtype)
    p = (x @ w.T).float().sub_(lse[:, None]).exp_()  # softmax
    hit = (y != IGNORE).nonzero()[:, 0]
    p[hit, y[hit]] -= 1.0                            # minus the one-hot target
    p.mul_(((y != IGNORE) * grad_total)[:, None])
    g = p.to(x.dtype)
    del p
    if g.dtype == torch.float32:
        grad_w.addmm_(g.T, x)
    else:  # one product per chunk in the compute dtype, summed in fp32
        grad_w += g.T @ x
    return g @ w
