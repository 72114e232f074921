"""The training loop: one loop for every objective.

    plan.json -> data (prepared shards, this rank's slice) -> model (built, or loaded from
    train.init_from; recompute, compile, parallelize) -> optimizer + schedule -> [resume] -> steps:
    micro-batches with gradient accumulation to the global batch, clip, step, MoE bias update,
    metrics, validation, checkpoints -> final checkpoint, RUN_DIR/model/, report.

Reads only the plan: `Spec.model_validate(plan["spec"])` for the settings, `plan["layout"]` for
dp / micro_batch_size / grad_accum.
"""

import json
import math
from pathlib import Path

import torch

from ...compiler.plan.activations import loss_chunk_tokens, recomputed
from ...compiler.spec import Spec
from ..allocator import keep_freed_memory
from ..data.dataset import TrainData
from ..data.prepare import prepare, prepared_dir
from ..folders import check_init_from, init_folder, latest_checkpoint, with_chat_template
from .checkpoint import check_resumable, load_checkpoint, save_checkpoint
from .distributed import DistEnv, all_reduce_sum, layout_of, parallelize, unwrap
from ..parallel.data_parallel import micro_batch, zero_grad
from ..parallel.run import (clip_grad_norm, data_rank, full_state_dict, model_states,  # parallel-runtime hooks
                            pipeline_for_plan)
from ..float8 import apply_float8
from ..precision import autocast
from .metrics import METRICS_FILE, MetricsLog, ProgressDisplay, truncate_metrics
from .objectives import StepShare, build_objective
from .optim import build_optimizer, build_scheduler
from .report import RunClock, flops_per_token, peak_flops, write_report


def build_model(spec: Spec, device: torch.device, seed: int, init_from: str | None = None):
    """The plain Transformer in fp32, initialised identically on every rank (seeded), or holding
    the weights of the model folder `init_from` (of the same model: check_init_from)."""
    from ..model import Transformer
    from ..model.io import load_state, read_weights
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(spec.model)
    model.to_empty(device=device)
    if init_from is None:
        model.init_weights()
        return model
    model.init_buffers()
    weights = init_folder(init_from) / "model.safetensors"
    load_state(model, read_weights(weights), weights)  # copied into the fp32 parameters, whatever the file's dtype
    return model


def apply_recompute(model, mode: str) -> None:
    """Activation checkpointing around blocks, from outside the model: `full` wraps every block,
    `selective` the even ones, by block id over the whole model (layers 0, 2, 4, ..., then MTP
    block k as block n_layers + k), whatever stage a pipeline later puts them in: half the
    activation memory saved for half a forward recomputed: the plan's rule (`recomputed`). Both
    also chunk the loss (`loss_chunk_tokens`)."""
    if mode == "none":
        return
    model.loss_chunk = loss_chunk_tokens(mode, model.cfg.vocab_size)
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    wrap = lambda block: checkpoint_wrapper(block, preserve_rng_state=True)  # noqa: E731
    for i, key in enumerate(list(model.layers.keys())):
        if recomputed(mode, i):
            model.layers[key] = wrap(model.layers[key])
    for k, module in enumerate(model.mtp, start=len(model.layers)):
        if recomputed(mode, k):
            module.block = wrap(module.block)


def apply_compile(model) -> None:
    """torch.compile each block (one compiled graph reused by every layer of the same shape)."""
    for key in list(model.layers.keys()):
        model.layers[key] = torch.compile(model.layers[key])


def apply_train_modes(model, train) -> None:
    """What `[train]` changes in a built model, before parallelisation: fp8 linears, recompute
    around blocks, compiled blocks (in that order: each wraps what the one before left)."""
    if train.precision == "fp8":
        apply_float8(model)
    apply_recompute(model, train.recompute)
    if train.compile:
        apply_compile(model)


class _AgreeingGradScaler(torch.amp.GradScaler):
    """fp16's loss scaler over several processes: each rank's inf/nan finding is all-reduced, so
    all ranks skip a step together (under pp, TP, EP and FSDP each rank checks other gradients; a
    rank that stepped alone would leave the others behind). torch's ShardedGradScaler does the
    same but hands fused AdamW a found-inf tensor of the wrong shape."""

    def unscale_(self, optimizer):
        super().unscale_(optimizer)
        for found in self._found_inf_per_device(optimizer).values():
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)


def _grad_scaler(precision: str, env: DistEnv):
    if precision != "fp16":
        return None
    return (_AgreeingGradScaler if env.world_size > 1 else torch.amp.GradScaler)(env.device.type)


def input_tokens(tokens: torch.Tensor, pad_id: int) -> int:
    """The input tokens of a batch [rows, seq_len] that are not padding. Only a window's end is padded
    (the last window of a shard, runtime/data/dataset.py): the run of pad ids that ends each row,
    not a pad id inside the text (a tokenizer without a pad token pads with its end-of-text)."""
    trailing = (tokens == pad_id).flip(-1).int().cumprod(-1).sum()
    return tokens.numel() - int(trailing)


@torch.no_grad()
def evaluate(model, batches, env: DistEnv, precision: str) -> dict | None:
    """Mean next-token loss and perplexity over the validation batches of every rank."""
    if not batches:
        return None
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=env.device)
    for tokens, labels in batches:
        tokens, labels = tokens.to(env.device), labels.to(env.device)
        with autocast(env.device, precision):
            out = unwrap(model)(tokens, labels)
        n = (labels != -100).sum()
        totals += torch.stack([out.lm_loss.double() * n, n.double()])
    all_reduce_sum(totals, env)
    model.train(was_training)
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


class Trainer:
    """The state of one rank's run; `run()` trains to the end."""

    def __init__(self, plan: dict, run_dir: Path, env: DistEnv, resume: bool = False):
        self.plan, self.run_dir, self.env = plan, Path(run_dir), env
        self.spec = spec = Spec.model_validate(plan["spec"])
        self.t = spec.train
        self.layout = layout = layout_of(plan, env)
        self.total_steps = self.t.steps
        self.objective = build_objective(self.t.objective)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = latest_checkpoint(self.run_dir) if resume else None
        init_from = self.t.init_from if ckpt is None else None  # a resumed run's checkpoint wins
        if ckpt is None:  # (before the folder's tokenizer prepares the data)
            check_init_from(spec)

        if env.is_main:
            self.prepared = prepare(spec)
        if env.distributed:
            torch.distributed.barrier()
        self.prepared = prepared_dir(spec)
        self.data = TrainData(self.prepared, [s.weight for s in spec.data.sources], self.t.seq_len, self.t.seed,
                              self.t.global_batch_size, layout["micro_batch_size"], data_rank(layout, env.rank), layout["dp"])
        self.pad_id = self.data.manifest["special"]["pad"]

        self.raw_model = build_model(spec, env.device, self.t.seed, init_from)
        apply_train_modes(self.raw_model, self.t)
        self.pipe = None
        if layout.get("pp", 1) > 1:  # parallel runtime: this rank's pipeline stage and the schedule
            self.pipe = pipeline_for_plan(self.raw_model, plan, layout["micro_batch_size"], self.t.seq_len)
            self.model = self.pipe.train_module()  # the stage, or the union of its virtual stages
        else:
            self.model = parallelize(self.raw_model, plan, env)
        self.optimizer = build_optimizer(self.model, self.t.optimizer)
        self.scheduler = build_scheduler(self.optimizer, self.t.schedule, self.total_steps)
        self.scaler = _grad_scaler(self.t.precision, env)
        self.step = 0
        if ckpt is not None:
            check_resumable(ckpt, plan, self.total_steps)
            self.step, data_state = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler, env,
                                                    self.scaler)
            self.data.load_state_dict(data_state)
        if env.is_main:  # records past the starting step belong to a run that is being redone
            truncate_metrics(self.run_dir / METRICS_FILE, self.step)
        self.val_batches = self.data.val_batches(self.t.eval_batches)
        self.flops_per_token = flops_per_token(plan)
        self.peak = peak_flops(plan) * env.world_size
        self.clock = RunClock(env.device)

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> dict:
        env, model = self.env, self.model
        micro = self.data.next_step()
        counts = [int((labels != -100).sum()) for _, labels in micro]
        n_local = torch.tensor([sum(counts), sum(input_tokens(x, self.pad_id) for x, _ in micro)],
                               dtype=torch.float64, device=env.device)
        # target and input tokens of the whole global batch; the ranks of one TP group read the same data
        replicas = env.world_size // self.layout["dp"]
        n_global, n_inputs = (all_reduce_sum(n_local, env) / replicas).tolist()
        dp = self.layout["dp"]
        sums = torch.zeros(3, dtype=torch.float64)  # lm loss x targets, aux, mtp
        expert_counts = None
        if self.pipe is not None:  # parallel runtime: the pipeline schedule runs every micro-batch
            parts = self.pipe.step(torch.cat([x for x, _ in micro]).to(env.device),
                                   torch.cat([y for _, y in micro]).to(env.device),
                                   # (scale() of a one also sets the scaler up for unscale_ below)
                                   loss_scale=self.scaler.scale(torch.ones((), device=env.device)).item()
                                   if self.scaler else 1.0, targets=n_global / dp)
            sums += torch.stack([parts["lm_loss"] * sum(counts), parts["aux_loss"], parts["mtp_loss"]]).double()
            expert_counts = self.pipe.expert_counts()
            micro = []  # (mean loss per micro-batch: the token weighting of pretraining)
        for i, (tokens, labels) in enumerate(micro):
            tokens, labels = tokens.to(env.device), labels.to(env.device)
            last = i == len(micro) - 1
            with micro_batch(model, self.layout.get("zero", 0), last):  # when dp gathers and reduces
                with autocast(env.device, self.t.precision):
                    out = model(tokens, labels)
                share = StepShare(token_weight=counts[i] * dp / max(n_global, 1.0), batch_weight=1.0 / len(micro))
                loss = self.objective.loss(out, share)
                out.logits = None  # [tokens, vocab], which the backward does not read (the plan counts it so)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            sums[0] += out.lm_loss.detach().double().cpu() * counts[i]
            sums[1] += (out.aux_loss.detach().double().cpu() if out.aux_loss is not None else 0.0) / len(micro)
            sums[2] += (out.mtp_loss.detach().double().cpu() if out.mtp_loss is not None else 0.0) / len(micro)
            if out.expert_counts is not None:
                c = out.expert_counts.detach().cpu()
                expert_counts = c if expert_counts is None else expert_counts + c
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.t.grad_clip if self.t.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm(model, clip)  # over every parallel dim (TP, EP, PP shards)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if not hasattr(self, "model_states"):  # parallel runtime: measured shard bytes for the report
            self.model_states = model_states(model, self.optimizer)  # (collective; grads still held)
        zero_grad(self.pipe.wrapped if self.pipe else [model], self.optimizer)

        sums = all_reduce_sum(sums.to(env.device), env).cpu() / replicas
        record = {"loss": sums[0].item() / max(n_global, 1.0), "lr": lr, "grad_norm": grad_norm,
                  "tokens": int(n_global), "input_tokens": int(n_inputs)}
        if self.spec.model.moe is not None:
            record["aux_loss"] = sums[1].item() / dp
        if self.spec.model.mtp.depth:
            record["mtp_loss"] = sums[2].item() / dp
        if expert_counts is not None:
            expert_counts = all_reduce_sum(expert_counts.to(env.device), env)
            if hasattr(unwrap(model), "update_router_bias") and self.spec.model.moe.balance == "aux_free":
                unwrap(model).update_router_bias(expert_counts)
            load = expert_counts.double() / expert_counts.sum(dim=1, keepdim=True).clamp(min=1)
            record["expert_load"] = [[round(x, 4) for x in row] for row in load.tolist()]
            record["expert_load_max_over_mean"] = (load.max(dim=1).values * load.shape[1]).mean().item()
        return record

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        env, t = self.env, self.t
        log = MetricsLog(self.run_dir, env.is_main)
        progress = ProgressDisplay(self.total_steps, self.step, t.log_every, env.is_main)
        positions_per_step = t.global_batch_size * t.seq_len  # computed, padding included: what MFU counts
        last_eval, last_saved = None, self.step or None  # (a resumed run's: the one it started from)
        self.model.train()
        try:
            while self.step < self.total_steps:
                self.clock.start()
                record = {"step": self.step + 1, **self.train_step()}
                step_time = self.clock.stop(record["input_tokens"])
                self.step += 1
                record["step_time"] = step_time
                record["tokens_per_s"] = record["input_tokens"] / step_time  # the data's tokens, not padding
                record["mfu"] = self.flops_per_token * positions_per_step / step_time / self.peak
                if t.eval_every and self.step % t.eval_every == 0 or self.step == self.total_steps:
                    last_eval = self.evaluate()
                    if last_eval:
                        record.update(last_eval)
                        progress.note(f"step {self.step}: val_loss {last_eval['val_loss']:.4f} "
                                      f"(perplexity {last_eval['val_perplexity']:.1f})")
                log.write(record)
                progress.step(self.step, record)
                if (t.checkpoint_every and self.step % t.checkpoint_every == 0) or self.step == self.total_steps:
                    save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scheduler,
                                    self.data.state_dict(), self.plan, env, t.keep_checkpoints, self.scaler)
                    last_saved = self.step
        finally:
            progress.close()
            log.close()
        if last_eval is None:  # resumed with no steps left (killed before the final save): the final figures
            last_eval = self.evaluate()
        final_state = full_state_dict(self.model)  # gathered from shards: every rank takes part
        if env.is_main:
            self.save_final_model(final_state)
            report = write_report(self.run_dir, self.plan, self.clock, last_eval, env, last_saved, self.step)
            if getattr(self, "model_states", None):  # parallel runtime: measured vs planned bytes
                report["model_states"] = self.model_states
                (self.run_dir / "report.json").write_text(json.dumps(report, indent=2))
            return report
        return {}

    def evaluate(self) -> dict | None:
        """Validation loss and perplexity over every rank's validation batches (None without any)."""
        if self.pipe is None:
            return evaluate(self.model, self.val_batches, self.env, self.t.precision)
        return self.pipe.evaluate(self.val_batches)  # parallel runtime: the schedule's forward-only pass

    def save_final_model(self, full_state: dict | None = None) -> Path:
        """RUN_DIR/model/: plan.json, model.safetensors (recording its step), tokenizer.json (the model
        folder contract)."""
        from ..model.io import save_model
        model = unwrap(self.model)
        full_state = model.state_dict() if full_state is None else full_state
        state = {k.replace("._checkpoint_wrapped_module", "").replace("._orig_mod", ""): v
                 for k, v in full_state.items()}
        clean = build_model(self.spec, torch.device("cpu"), self.t.seed)
        clean.load_state_dict(state)
        return save_model(clean, with_chat_template(self.plan), self.run_dir / "model",
                          tokenizer=self.prepared / "tokenizer.json", step=self.step)


def train(plan: dict, run_dir: Path, env: DistEnv, resume: bool = False) -> dict:
    """Train a plan into `run_dir` on this rank; return the report (rank 0) or {}."""
    if env.device.type == "cpu":
        keep_freed_memory()
    return Trainer(plan, run_dir, env, resume).run()


def read_plan(path: Path) -> dict:
    return json.loads(Path(path).read_text())
