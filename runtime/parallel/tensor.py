"""Tensor parallelism (Megatron-style) with `parallelize_module`, plus optional sequence parallelism.

Per block:
  attention  q/k/v (GQA) or wq_b / wkv_b (MLA) column-wise: each rank owns n_heads / tp heads;
             wo row-wise. MLA's low-rank down-projections (wq_a, wkv_a) and their norms stay
             replicated: they are small and feed every head (the gradient of the rope key,
             shared by all heads, is all-reduced over TP).
  dense FFN  w1 / w3 column-wise, w2 row-wise.
  MoE FFN    replicated (router, experts, shared experts): experts are split by expert
             parallelism instead; each TP rank computes the same result.
Model:
  embedding  vocabulary-parallel (row-wise over the vocabulary); head column-wise over the
             vocabulary, its logits left split: a DTensor of this rank's columns, whose loss
             runtime/model/loss.py takes with all-reduces over the tokens, never gathering
             [tokens, V] (`.full_tensor()` gathers them for other uses). The chunked loss
             (under recompute) takes the head's weight rows instead of its logits.
  positions  learned positions stay replicated; with sequence parallelism each rank keeps the
             sequence slice of their output that its embedding slice covers.
With sequence parallelism the residual stream between blocks is split over the sequence:
norms (block, final, MTP) run on their slice (SequenceParallel), attention and FFN inputs are
all-gathered, and row-wise outputs are reduce-scattered back to the slice.

Not sharded (the planner never chooses tp > 1 for them; apply_tp raises ValueError): tied
embeddings (the head is the embedding's matrix, used outside any module) and MLA's DSA indexer
(its training target sums the attention over all heads, which TP splits over ranks).

Attention modules keep their head counts as attributes; they are set to the local counts here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)


class _AllReduceTailGrad(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient of the last columns (from `start`).

    MLA's rope key (the tail of wkv_a's output) is shared by every head: with the heads split
    over TP ranks each rank sees only its heads' share of its gradient. The latent part of
    the same output already gets a full gradient through wkv_b's column-parallel input."""

    @staticmethod
    def forward(ctx, x, start, group):
        ctx.start, ctx.group = start, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        tail = grad[..., ctx.start:].contiguous()
        dist.all_reduce(tail, group=ctx.group)
        grad[..., ctx.start:] = tail
        return grad, None, None


def _reduce_rope_key_grad(attn: nn.Module, group):
    def hook(module, args, out):
        return _AllReduceTailGrad.apply(out, attn.kv_lora_rank, group)
    attn.wkv_a.register_forward_hook(hook)


def _shard_grad_like_param(p):
    if p.grad.placements != p.placements:
        p.grad = p.grad.redistribute(p.device_mesh, p.placements)


def _attention_plan(attn: nn.Module, tp: int, sp: bool) -> dict:
    col, row = ColwiseParallel(), RowwiseParallel(output_layouts=Shard(1) if sp else Replicate())
    if hasattr(attn, "wkv_b"):  # MLA
        plan = {"wkv_b": col, "wo": row}
        plan["wq_b" if getattr(attn, "q_lora_rank", 0) else "wq"] = col
        if getattr(attn, "indexer", None) is not None:
            # its training target sums the attention over all heads, which TP splits over ranks
            raise ValueError("tensor parallelism does not shard the DSA sparse indexer (the planner does not "
                             "choose tp > 1 for model.attention.index_n_heads > 0)")
    else:
        if attn.n_kv_heads % tp:
            raise ValueError(f"tp = {tp} must divide the key/value heads ({attn.n_kv_heads})")
        plan = {"wq": col, "wk": col, "wv": col, "wo": row}
        attn.n_kv_heads //= tp  # qk-norm weights (shared by heads) stay replicated
    if attn.n_heads % tp:
        raise ValueError(f"tp = {tp} must divide n_heads ({attn.n_heads})")
    attn.n_heads //= tp
    return plan


def inner(module: nn.Module) -> nn.Module:
    """The block inside an activation-checkpoint or torch.compile wrapper."""
    for attr in ("_checkpoint_wrapped_module", "_orig_mod"):
        module = getattr(module, attr, module)
    return module


def _block_plan(block: nn.Module, tp: int, sp: bool) -> dict:
    plan = {f"attn.{k}": v for k, v in _attention_plan(block.attn, tp, sp).items()}
    if sp:
        plan["attn_norm"] = SequenceParallel()
        plan["ffn_norm"] = SequenceParallel()
        plan["attn"] = PrepareModuleInput(input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None),
                                          use_local_output=True)
        plan["ffn"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                         use_local_output=True)
    if block.is_moe:
        if sp:  # replicated MoE on the full sequence; each rank keeps its slice of the output
            plan["ffn"] = _MoESequenceParallel()
    else:
        plan["ffn.w1"] = ColwiseParallel()
        plan["ffn.w2"] = RowwiseParallel(output_layouts=Shard(1) if sp else Replicate())
        if block.ffn.w3 is not None:
            plan["ffn.w3"] = ColwiseParallel()
    return plan


def _MoESequenceParallel():
    """Gather the sequence into a replicated MoE and keep this rank's sequence slice of its output."""
    from torch.distributed.tensor.parallel.style import ParallelStyle

    class MoESequenceParallel(ParallelStyle):
        def _apply(self, module, mesh):
            PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                               use_local_output=True)._apply(module, mesh)
            PrepareModuleOutput(output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),),
                                use_local_output=True)._apply(module, mesh)
            return module

    return MoESequenceParallel()


def apply_tp(model: nn.Module, tp_mesh, sequence_parallel: bool = False) -> nn.Module:
    """Shard `model`'s attention, dense FFNs, embedding and head over the tp mesh (in place)."""
    tp, sp = tp_mesh.size(), sequence_parallel
    if model.cfg.tie_embeddings:
        # the head is F.linear over the embedding's weight, which would be a vocabulary-sharded DTensor
        raise ValueError("tensor parallelism does not shard tied embeddings (the planner does not choose "
                         "tp > 1 for model.tie_embeddings = true)")
    top = {}
    if model.embed is not None:
        top["embed"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1) if sp else Replicate())
    if getattr(model, "pos_embed", None) is not None and sp:
        # replicated learned positions [T, D] (or [B, T, D]) are added to the embedding's sequence
        # slice: keep the same slice (backward all-gathers their gradient, full on every rank)
        top["pos_embed"] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(-2),
                                               use_local_output=True)
    if model.norm is not None and sp:
        top["norm"] = SequenceParallel()
    if model.head is not None:
        top["head"] = ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(), output_layouts=Shard(-1),
                                      use_local_output=False)
    parallelize_module(model, tp_mesh, top)
    if model.embed is not None:
        # DTensor's embedding backward yields a replicated (full) gradient for the vocabulary-
        # sharded weight; keep only this rank's rows so gradients are sharded like the weight.
        model.embed.weight.register_post_accumulate_grad_hook(_shard_grad_like_param)
    blocks = [inner(b) for b in model.layers.values()] + [inner(m.block) for m in getattr(model, "mtp", [])]
    for block in blocks:
        if hasattr(block.attn, "wkv_a"):
            _reduce_rope_key_grad(block.attn, tp_mesh.get_group())
    for block in model.layers.values():
        parallelize_module(inner(block), tp_mesh, _block_plan(inner(block), tp, sp))
    for mtp in getattr(model, "mtp", []):
        block = inner(mtp.block)  # recompute may have wrapped it
        parallelize_module(block, tp_mesh, _block_plan(block, tp, sp))
        if sp:
            parallelize_module(mtp, tp_mesh, {"enorm": SequenceParallel(), "hnorm": SequenceParallel(),
                                              "norm": SequenceParallel(),
                                              "eh_proj": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(1))})
    return model
