"""`[train]`: the objective, batch, budget, precision, optimizer and schedule of a run."""

from typing import Literal

from pydantic import Field, field_validator

from .base import Table, positive_or_auto


class OptimizerSpec(Table):
    """`[train.optimizer]`."""

    name: Literal["adamw", "sgd"] = Field("adamw", description="Optimizer.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    betas: list[float] = Field([0.9, 0.95], min_length=2, max_length=2, description="AdamW [beta1, beta2].")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay (not applied to norms and biases).")
    state_bytes_per_param: int = Field(12, ge=0, description="Optimizer-state bytes per parameter under mixed "
                                                              "precision (fp32 master + m + v = 12 for AdamW).")


class ScheduleSpec(Table):
    """`[train.schedule]`: learning-rate schedule."""

    kind: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup (optimizer steps).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of the peak.")


def _one_budget(max_steps, tokens):
    if max_steps is None and tokens is None:
        yield "max_steps", "give train.max_steps or train.tokens (expected one, found neither)"
    if max_steps is not None and tokens is not None:
        yield "tokens", "give train.max_steps or train.tokens, not both"


def _micro_batch_fits(micro_batch_size, global_batch_size):
    if micro_batch_size != "auto" and micro_batch_size > global_batch_size:
        yield "micro_batch_size", (f"micro_batch_size exceeds global_batch_size "
                                   f"(expected <= {global_batch_size}, found {micro_batch_size})")


class TrainSpec(Table):
    """`[train]`."""

    # DPO and GRPO are to come: a spec names only what the runtime trains (and the plan sizes)
    objective: Literal["pretrain", "sft"] = Field(
        "pretrain", description="Training objective: \"pretrain\" (next-token loss on every token) or \"sft\" "
                                "(on the assistant's tokens of chat data only).")
    seq_len: int = Field(..., ge=1, description="Tokens per sample.")
    micro_batch_size: int | Literal["auto"] = Field("auto", description="Samples per device per forward (count) or auto.")
    global_batch_size: int = Field(..., ge=1, description="Samples per optimizer step over all data-parallel ranks.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; or give `tokens`.")
    tokens: int | None = Field(None, ge=1, description="Token budget of the run (tokens); sets max_steps.")
    precision: Literal["fp32", "bf16", "fp16", "fp8"] = Field("bf16", description="Compute precision "
                                                                                   "(bf16/fp16/fp8 with fp32 master weights).")
    recompute: Literal["none", "selective", "full"] = Field(
        "none", description="Activation checkpointing: \"full\" recomputes every block's forward in the backward, "
                            "keeping only its input; \"selective\" every other block (the even ones, MTP blocks "
                            "numbered after the layers): about half the activations for half a forward more. "
                            "Both also compute the loss a chunk of tokens at a time, never keeping "
                            "the fp32 log-probabilities over the vocabulary, for one more forward of the head.")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip (0 = off).")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="Optimizer settings.")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="Learning-rate schedule.")
    checkpoint_every: int = Field(0, ge=0, description="Save a checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Complete checkpoints kept on disk (count).")
    eval_every: int = Field(0, ge=0, description="Validation loss every N steps (0 = only at the end).")
    eval_batches: int = Field(8, ge=1, description="Micro-batches per validation (count).")
    log_every: int = Field(1, ge=1, description="Print a progress line every N steps.")
    seed: int = Field(0, ge=0, description="Seed of initialisation, data order and dropout.")
    compile: bool = Field(False, description="torch.compile the model.")
    init_from: str | None = Field(
        None, min_length=1,
        description="A model folder to start from instead of a fresh initialisation (relative to the spec): "
                    "one `llmc import hf` writes, or a finished run's RUN_DIR/model (or RUN_DIR). Its model must be "
                    "this spec's model; its tokenizer.json tokenizes the data unless data.tokenizer.path is given. "
                    "A resumed run continues from its checkpoint instead.")

    _checks = (_one_budget, _micro_batch_fits)

    @field_validator("micro_batch_size")
    @classmethod
    def _positive(cls, v):
        return positive_or_auto(v)

    @property
    def steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        per_step = self.global_batch_size * self.seq_len
        return max(1, -(-self.tokens // per_step))
