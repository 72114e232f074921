"""Pipeline parallelism with torch.distributed.pipelining, from the plan's layer-to-stage table.

Each pipeline rank keeps a copy of the model cut to its stage(s): the layers the plan gives the
stage (the others are deleted from `model.layers`, so parameter names stay those of the full
model and checkpoints stay layout-independent), the embedding on the first stage, the final
norm, head and MTP modules on the last. A stage's forward (set on the instance) runs

    first stage   tokens -> embed -> its layers -> hidden
    middle        hidden -> its layers -> hidden
    last          hidden -> its layers -> norm/head (+ MTP) -> loss of the micro-batch

Tokens and labels reach every stage as keyword arguments of `schedule.step` (the schedule chunks
them into micro-batches): the last stage needs the labels, and the MTP modules the tokens.

Two losses live outside the last stage and are carried by autograd instead of activations:
  - MoE balance losses of earlier stages: attached to the stage output by `_AttachAux`, whose
    backward feeds d(loss)/d(aux) = 1 (Megatron's aux-loss scaler does the same);
  - the embedding is shared with MTP (and with a tied head): the last stage keeps a copy, and
    after backward the two copies' gradients are summed over a {first, last} group.
"""

from __future__ import annotations

import copy
import math
import types

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from ..precision import autocast, compute_dtype

SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe, "interleaved": ScheduleInterleaved1F1B}


class _AttachAux(torch.autograd.Function):
    """Identity on `h`; in backward gives `aux` the gradient 1, as if added to the final loss."""

    @staticmethod
    def forward(ctx, h, aux):
        return h

    @staticmethod
    def backward(ctx, grad_h):
        return grad_h, torch.ones((), dtype=torch.float32, device=grad_h.device)


def _moe_aux_and_counts(stage: nn.Module, blocks, counts: torch.Tensor):
    """Sum of the balance losses of `blocks`' MoE FFNs in the last forward; their expert counts
    are added into `counts` ([n_moe_layers, E], rows by the model's moe_layer_ids)."""
    aux = None
    for block in blocks:
        moe = block.ffn if getattr(block, "is_moe", False) else None
        if moe is None:
            continue
        if moe.last_aux_loss is not None:
            aux = moe.last_aux_loss if aux is None else aux + moe.last_aux_loss
        if block.layer_id in stage.moe_layer_ids and moe.last_counts is not None:
            counts[stage.moe_layer_ids.index(block.layer_id)] += moe.last_counts
    return aux


def _stage_forward(self, x, tokens=None, labels=None):
    """The forward of one pipeline stage (bound to the stage's pruned Transformer), under the
    training loop's autocast for the run's precision: in training steps and, through the schedule's
    forward-only pass, in validation. The schedule runs backward outside it, as the loop does."""
    with autocast(x.device, self._llmc_precision):
        return _stage_compute(self, x, tokens, labels)


def _stage_compute(self, x, tokens, labels):
    """Embed (first stage), the stage's layers, then norm/head/MTP and the loss (last stage).

    Appends (lm loss, mtp loss, balance loss, expert counts) of the micro-batch to
    self._llmc_stats; Pipeline.step keeps the entries of the real micro-batches (the schedule
    also runs one forward on placeholder tensors to infer shapes)."""
    T = tokens.shape[1]
    positions = torch.arange(T, device=tokens.device)
    if self._llmc_first:
        h = self.embed_tokens(x, positions)
    else:
        h = x
    cos, sin = self.rope(positions, compute_dtype(h))  # cast once, not in every layer
    for layer in self.layers.values():
        h = layer(h, cos, sin)
    # rows: the model's MoE layers, then its MoE MTP blocks (as Transformer.forward returns them)
    counts = torch.zeros(len(self.moe_layer_ids) + len(self.mtp_moe_depths), self._llmc_n_experts,
                         dtype=torch.long)
    aux = _moe_aux_and_counts(self, self.layers.values(), counts)
    zero = torch.zeros((), device=h.device)
    if not self._llmc_last:
        self._llmc_stats.append((zero, zero, aux.detach() if aux is not None else zero, counts))
        return _AttachAux.apply(h, aux) if aux is not None else h
    lm = self.lm_loss(h, labels)
    # in a training step, the micro-batch's share of the step's target tokens (as the loop's
    # StepShare.token_weight), times the micro-batches the schedule averages over
    per_target = self._llmc_lm_per_target
    loss = lm if per_target is None else lm * ((labels != -100).sum() * per_target)
    mtp = zero
    if len(self.mtp):
        mtp = self._mtp_loss(h, tokens, labels, cos, sin)
        loss = loss + self.cfg.mtp.loss_weight * mtp
        mtp_aux = _moe_aux_and_counts(self, [m.block for m in self.mtp], counts)
        aux = mtp_aux if aux is None else (aux if mtp_aux is None else aux + mtp_aux)
        for row, depth in enumerate(self.mtp_moe_depths, start=len(self.moe_layer_ids)):
            counts[row] += self.mtp[depth].block.ffn.last_counts
    self._llmc_stats.append((lm.detach(), mtp.detach(), aux.detach() if aux is not None else zero, counts))
    return loss + aux if aux is not None else loss


def _cut_to_stage(model: nn.Module, layers: list[int], first: bool, last: bool, precision: str) -> nn.Module:
    """A deep copy of `model` holding only what stage needs (names unchanged), computing in
    `precision` (train.precision)."""
    stage = copy.deepcopy(model)
    keep = {str(i) for i in layers}
    for name in list(stage.layers.keys()):
        if name not in keep:
            del stage.layers[name]
    needs_embed = first or (last and (len(stage.mtp) > 0 or stage.head is None))
    if not needs_embed:
        stage.embed = None
    if not first:
        stage.pos_embed = None
    if not last:
        stage.norm, stage.head, stage.mtp = None, None, nn.ModuleList()
    stage._llmc_first, stage._llmc_last = first, last
    stage._llmc_n_experts = model.cfg.moe.n_experts if model.cfg.moe else 0
    stage._llmc_stats = []
    stage._llmc_precision = precision
    stage._llmc_lm_per_target = None  # set by Pipeline.step (None: every micro-batch alike)
    stage.forward = types.MethodType(_stage_forward, stage)
    return stage


class Pipeline:
    """This rank's stages, their schedule, and the per-step bookkeeping the trainer needs."""

    def __init__(self, modules, wrapped, stage_ids, n_stages, schedule, loss_fn, pdims, embed_group, micro_batch_size,
                 device):
        self.modules, self.wrapped, self.stage_ids = modules, wrapped, stage_ids
        self.n_stages, self.schedule, self.pdims, self.embed_group = n_stages, schedule, pdims, embed_group
        self.loss_fn = loss_fn
        self.micro_batch_size, self.device = micro_batch_size, device

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stage_ids

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    def step(self, tokens: torch.Tensor, labels: torch.Tensor, loss_scale: float = 1.0,
             targets: float | None = None) -> dict[str, torch.Tensor]:
        """Forward and backward of this rank's micro-batches (tokens, labels [accum x mb, T]);
        backward starts from loss x loss_scale (fp16's GradScaler factor).

        `targets`: the step's target tokens per data-parallel rank (the global batch's / dp). With
        it each micro-batch's language-model loss counts by its share of them, as the training
        loop weighs micro-batches without pipelining, so SFT's unequal counts weigh alike; without
        it every micro-batch counts alike. MTP and balance losses are means over micro-batches.

        Returns, the same on every rank of the pipeline group: "lm_loss" (the mean over the target
        tokens), "mtp_loss" and "aux_loss" (means over micro-batches), and "loss" (lm + weighted
        mtp + every stage's balance loss)."""
        n = self.schedule._n_microbatches
        for m in self.modules:
            m._llmc_stats.clear()
            m._llmc_lm_per_target = n / targets if targets else None
        args = (tokens,) if self.has_first else ()
        self.loss_fn.scale = loss_scale
        try:
            self.schedule.step(*args, target=labels if self.has_last else None, tokens=tokens, labels=labels,
                               return_outputs=False)
        finally:
            self.loss_fn.scale = 1.0
            for m in self.modules:
                m._llmc_lm_per_target = None
        self._sync_shared_embedding()
        stats = [entry for m in self.modules for entry in m._llmc_stats[-n:]]
        others = torch.stack([torch.stack([mtp, aux]) for _, mtp, aux, _ in stats]).double().sum(0)
        parts = torch.cat([self._lm_totals(labels), others])  # lm x targets, targets, mtp, aux
        self._counts = sum(c for *_, c in stats)
        dist.all_reduce(parts, group=self.pdims.group("pp"))
        lm, mtp, aux = parts[0] / parts[1].clamp(min=1), parts[2] / n, parts[3] / n
        weight = self.modules[0].cfg.mtp.loss_weight
        return {"loss": lm + weight * mtp + aux, "lm_loss": lm, "mtp_loss": mtp, "aux_loss": aux}

    @torch.no_grad()
    def evaluate(self, batches) -> dict | None:
        """Mean next-token loss and perplexity over the validation batches of every rank, by the
        schedule's forward-only pass (the same on every rank, as loop.evaluate for other layouts,
        and under the same autocast: the stages' forward enters it).

        The stages take micro-batches of static shape and the schedule a fixed number of them, so
        short batches and the last schedule call are filled with all-ignored rows (labels -100 add
        no tokens); every rank has as many batches, hence as many calls, and their p2p and FSDP
        collectives meet."""
        if not batches:
            return None
        n, mb = self.schedule._n_microbatches, self.micro_batch_size
        tokens = torch.cat([_pad_rows(x, mb, 0) for x, _ in batches])
        labels = torch.cat([_pad_rows(y, mb, -100) for _, y in batches])
        rows = -(-len(batches) // n) * n * mb
        tokens, labels = _pad_rows(tokens, rows, 0).to(self.device), _pad_rows(labels, rows, -100).to(self.device)
        was_training = [m.training for m in self.wrapped]
        for m in self.wrapped:
            m.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss x tokens, tokens
        for x, y in zip(tokens.split(n * mb), labels.split(n * mb)):
            for m in self.modules:
                m._llmc_stats.clear()
            self.schedule.eval(*((x,) if self.has_first else ()), target=y if self.has_last else None,
                               tokens=x, labels=y, return_outputs=False)
            totals += self._lm_totals(y)
        dist.all_reduce(totals)  # the last stages of every pipeline column; the other ranks add zeros
        for m, training in zip(self.wrapped, was_training):
            m.train(training)
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}

    def _lm_totals(self, labels: torch.Tensor) -> torch.Tensor:
        """(sum of lm loss x target tokens, target tokens) over the micro-batches of the schedule
        call just run, from the last stage's stats (one per micro-batch); zeros on other ranks."""
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        last = [m for m in self.modules if m._llmc_last]
        if last:
            n = self.schedule._n_microbatches
            lm = torch.stack([lm for lm, *_ in last[0]._llmc_stats[-n:]]).double()
            counts = (labels != -100).reshape(n, -1).sum(1).double()  # target tokens per micro-batch
            totals += torch.stack([(lm * counts).sum(), counts.sum()])
        return totals

    def train_module(self) -> nn.Module:
        """The module the trainer holds: the stage (as wrapped) or, with virtual stages, their union."""
        return self.wrapped[0] if len(self.wrapped) == 1 else StageUnion(self.modules)

    def expert_counts(self) -> torch.Tensor | None:
        """Tokens routed per expert in this step, summed over the stages: a row per MoE layer,
        then one per MoE MTP block."""
        if not self.modules[0].cfg.moe:
            return None
        counts = self._counts.clone()
        dist.all_reduce(counts, group=self.pdims.group("pp"))
        return counts

    def _sync_shared_embedding(self):
        """Sum the embedding gradients of the first stage and of the last stage's copy."""
        if self.embed_group is None:
            return
        for m in self.modules:
            if m.embed is not None and not (self.has_first and self.has_last):
                grad = m.embed.weight.grad
                local = grad.to_local() if hasattr(grad, "to_local") else grad
                dist.all_reduce(local, group=self.embed_group)


class StageUnion(nn.Module):
    """This rank's stage modules (virtual stages) seen as one module under the full model's
    parameter names, for what the trainer does with "the model": the optimizer, gradient clipping,
    checkpoints, the gathered final model and the measured bytes.

    The stages keep the model's names and hold disjoint layers; with pp > 1 no rank holds both the
    first stage and the last, so the embedding appears once. The union shares the stages'
    submodules (it registers no copy and runs no forward: the schedule drives the stages)."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.__dict__["_stages"] = list(modules)  # not registered: names stay the model's
        first = modules[0]
        self.cfg, self.moe_layer_ids, self.mtp_moe_depths = first.cfg, first.moe_layer_ids, first.mtp_moe_depths
        for name in ("embed", "pos_embed"):
            holders = [getattr(m, name) for m in modules if getattr(m, name) is not None]
            if len(holders) > 1:
                raise ValueError(f"{len(holders)} stages of one rank hold `{name}`")
            setattr(self, name, holders[0] if holders else None)
        blocks = {k: b for m in modules for k, b in m.layers.items()}
        self.layers = nn.ModuleDict({k: blocks[k] for k in sorted(blocks, key=int)})
        last = [m for m in modules if m.norm is not None]
        self.norm = last[0].norm if last else None
        self.head = last[0].head if last else None
        self.mtp = last[0].mtp if last else nn.ModuleList()

    def train(self, mode: bool = True):
        for m in self._stages:
            m.train(mode)
        return super().train(mode)

    def update_router_bias(self, expert_counts: torch.Tensor):
        """Aux-loss-free balancing: each stage updates the MoE layers it holds."""
        for m in self._stages:
            m.update_router_bias(expert_counts)

    def forward(self, *args, **kwargs):
        raise RuntimeError("the pipeline schedule runs the stages; StageUnion only groups their parameters")


def _pad_rows(x: torch.Tensor, rows: int, value: int) -> torch.Tensor:
    """`x` with rows of `value` appended up to `rows` rows."""
    return torch.cat([x, x.new_full((rows - len(x), *x.shape[1:]), value)])


class _LossIsOutput:
    """The schedule's loss_fn: the last stage's output is the loss already. Under fp16 the trainer's
    GradScaler factor multiplies it before backward (scaler.scale(loss) of the other layouts), so
    the gradients that flow back through the stages are scaled alike and unscale_ finds them so."""

    def __init__(self):
        self.scale = 1.0

    def __call__(self, output, target):
        return output * self.scale if self.scale != 1.0 else output


def _embed_groups(pdims, last_needs_embed: bool):
    """dist groups {first stage rank, last stage rank} per pipeline column; this rank's or None."""
    if not last_needs_embed:
        return None
    lay = pdims.layout
    grid = torch.arange(lay.world_size).reshape(lay.pp, lay.dp * lay.tp)
    mine = None
    for column in range(lay.dp * lay.tp):
        ranks = [int(grid[0, column]), int(grid[-1, column])]
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine


def build_pipeline(model: nn.Module, pdims, n_microbatches: int, micro_batch_size: int, seq_len: int,
                   schedule: str = "1f1b", wrap=None, activation_dtype: torch.dtype = torch.float32,
                   precision: str = "fp32") -> Pipeline:
    """Cut `model` into this rank's stage(s) by layout.stages, wrap each (e.g. parallelize), and
    build the schedule over the pp group. `wrap(stage_module) -> module` runs before the
    PipelineStage is made (FSDP/DDP of the stage). The stages' forwards run under the autocast of
    `precision` (train.precision), as the training loop's forward does without pipelining.

    The stages' input and output shapes are given statically (tokens [mb, T] into the first
    stage, hidden [mb, T, D] of `activation_dtype` between stages (this rank's T / tp slice
    under sequence parallelism), a scalar loss out of the last), so the schedule runs no
    placeholder forward/backward to infer them (that pass corrupts DDP's bucket bookkeeping).
    `activation_dtype` is the residual stream's (runtime/precision.py: bf16 under bf16, else
    fp32); the loss is fp32."""
    lay = pdims.layout
    stages = lay.stages
    n_stages = len(stages)
    pp_rank = pdims.coordinate("pp")
    stage_ids = list(range(pp_rank, n_stages, lay.pp))  # looped placement for virtual stages
    if schedule != "interleaved" and len(stage_ids) > 1:
        raise ValueError(f"{n_stages} stages over pp = {lay.pp} need the interleaved schedule")
    modules = [_cut_to_stage(model, stages[s], s == 0, s == n_stages - 1, precision) for s in stage_ids]
    wrapped = [wrap(m) if wrap is not None else m for m in modules]
    for m, s in zip(modules, stage_ids):
        if s != 0 and m.embed is not None:  # after wrapping: FSDP replaces the Parameter objects
            m.embed.weight._llmc_pp_copy = True  # counted once in the global gradient norm
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    group = pdims.group("pp")
    tokens = torch.zeros(micro_batch_size, seq_len, dtype=torch.long, device=device)
    hidden_len = seq_len // lay.tp if lay.tp > 1 and lay.sequence_parallel else seq_len
    hidden = torch.zeros(micro_batch_size, hidden_len, model.cfg.d_model, dtype=activation_dtype, device=device,
                         requires_grad=True)  # so that stages exchange its gradient
    loss = torch.zeros((), dtype=torch.float32, device=device)
    pipe_stages = [PipelineStage(w, s, n_stages, device, group=group,
                                 input_args=tokens if s == 0 else hidden,
                                 output_args=loss if s == n_stages - 1 else hidden)
                   for w, s in zip(wrapped, stage_ids)]
    cls = SCHEDULES[schedule]
    loss_fn = _LossIsOutput()
    if schedule == "interleaved":
        sched = cls(pipe_stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
    else:
        sched = cls(pipe_stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn)
    last_needs_embed = len(model.mtp) > 0 or model.head is None
    embed_group = _embed_groups(pdims, last_needs_embed)
    return Pipeline(modules, wrapped, stage_ids, n_stages, sched, loss_fn, pdims, embed_group, micro_batch_size,
                    device)
