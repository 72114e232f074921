"""The root of a spec: one table per concern, and the checks that span tables."""

from typing import ClassVar

from pydantic import Field, PrivateAttr

from .base import Check, Table
from .data import DataSpec
from .hardware import HardwareSpec
from .job import JobSpec
from .model import ModelSpec
from .parallel import ParallelSpec
from .train import TrainSpec

SCHEMA_VERSION = 1

# Each check's parameters name the tables it reads (see base.py): when a table fails, the loader
# still runs the checks over the others. Keys are relative to the spec.


def _context_fits(model, train):
    if train.seq_len > model.max_seq_len:
        yield "train.seq_len", (f"train.seq_len exceeds model.max_seq_len "
                                f"(expected <= {model.max_seq_len}, found {train.seq_len})")


def _layout_fits_hardware(parallel, hardware):
    p, hw = parallel, hardware
    if p.tp != "auto" and p.tp > hw.gpus_per_node:
        yield "parallel.tp", (f"tensor parallelism stays within a node "
                              f"(expected <= gpus_per_node = {hw.gpus_per_node}, found {p.tp})")
    if p.world_size != "auto" and p.world_size != hw.world_size:
        yield "parallel.world_size", (f"parallel.world_size disagrees with the hardware "
                                      f"(expected nodes x gpus_per_node = {hw.world_size}, found {p.world_size})")
        return  # the degrees below divide a world size, and which one is meant is unclear
    ws = hw.world_size
    fixed = {k: getattr(p, k) for k in ("dp", "tp", "pp") if getattr(p, k) != "auto"}
    product = 1
    for v in fixed.values():
        product *= v
    if len(fixed) == 3 and product != ws:
        yield "parallel.dp", (f"dp x tp x pp must equal the world size "
                              f"(expected {ws}, found {' x '.join(map(str, fixed.values()))} = {product})")
    elif ws % product:
        yield "parallel", (f"the fixed degrees ({' x '.join(f'{k}={v}' for k, v in fixed.items())}) "
                           f"do not divide the world size {ws}")


def tensor_parallel_limits(model, tp: int, seq_len: int, sequence_parallel: bool):
    """What the runtime's tensor parallelism (runtime/parallel/tensor.py) needs at degree tp:
    (the rule, the setting that breaks it, its value) for each rule broken. The spec checks a
    fixed tp with it, the planner each tp it searches."""
    if tp == 1:
        return
    m = model
    if m.n_heads % tp:
        yield "tp must divide n_heads", "n_heads", m.n_heads
    if m.attention.kind != "mla" and m.kv_heads % tp:   # each rank owns whole key/value heads
        yield "tp must divide the key/value heads", "n_kv_heads", m.kv_heads
    if any(not m.is_moe_layer(i) for i in range(m.n_layers + m.mtp.depth)) and m.ffn_hidden % tp:
        yield "tp must divide ffn_hidden: the dense FFNs split by columns", "ffn_hidden", m.ffn_hidden
    if sequence_parallel and seq_len % tp:
        yield "sequence parallelism needs tp to divide seq_len", "seq_len", seq_len
    if m.tie_embeddings:
        yield "tp must be 1 with tied embeddings: TP does not shard a tied head", "tie_embeddings", "true"
    if m.attention.sparse:
        yield "tp must be 1 with the DSA sparse indexer: TP does not shard it", "index_n_heads", m.attention.index_n_heads


# runtime/parallel/mesh.py's Layout.check: the expert all-to-all and the TP shards are not combined
EP_WITH_TP = "expert parallelism needs tp = 1: the runtime does not combine it with tensor parallelism"


def _tensor_fits_model(parallel, model, train):
    tp = parallel.tp
    if tp == "auto":
        return
    for rule, name, value in tensor_parallel_limits(model, tp, train.seq_len, parallel.sequence_parallel):
        yield "parallel.tp", f"{rule} (found tp = {tp} with {name} = {value})"


def _stages_fit_model(parallel, model):
    pp = parallel.pp
    if pp != "auto" and pp > model.n_layers:
        yield "parallel.pp", f"more pipeline stages than layers (expected <= {model.n_layers}, found {pp})"


def _experts_fit(parallel, model, hardware):
    ep, moe, ws = parallel.ep, model.moe, hardware.world_size
    if ep == "auto":
        return
    if moe is None:
        if ep != 1:
            yield "parallel.ep", f"expert parallelism needs [model.moe] (expected 1, found {ep})"
        return
    if moe.n_experts % ep:
        yield "parallel.ep", (f"parallel.ep must divide model.moe.n_experts "
                              f"(expected a divisor of {moe.n_experts}, found {ep})")
    if ep > 1 and parallel.tp not in ("auto", 1):
        yield "parallel.ep", f"{EP_WITH_TP} (found tp = {parallel.tp} with ep = {ep})"
    # a parallel.world_size that disagrees with the hardware is reported by _layout_fits_hardware
    if parallel.world_size in ("auto", ws) and ws % ep:
        yield "parallel.ep", f"parallel.ep must divide the world size (expected a divisor of {ws}, found {ep})"


def _batch_divides(parallel, train):
    dp, t = parallel.dp, train
    if dp == "auto":
        return
    if t.global_batch_size % dp:
        yield "train.global_batch_size", (f"global_batch_size must divide over dp = {dp} "
                                          f"(expected a multiple of {dp}, found {t.global_batch_size})")
    elif t.micro_batch_size != "auto" and t.global_batch_size % (dp * t.micro_batch_size):
        yield "train.global_batch_size", (f"global_batch_size must be a multiple of dp x micro_batch_size = "
                                          f"{dp * t.micro_batch_size} (found {t.global_batch_size})")


def _warmup_within_run(train):
    warmup, steps = train.schedule.warmup_steps, train.steps
    if warmup and warmup >= steps:
        reached = "reaches train.optimizer.lr on the last step" if warmup == steps else \
            f"ends at {steps / warmup:.0%} of train.optimizer.lr"
        yield "train.schedule.warmup_steps", (f"the run warms up for all of its {steps} steps and never decays: "
                                              f"the learning rate {reached} (expected warmup_steps below the "
                                              f"run's steps, found {warmup})")


def _floor_of_a_decay(train):
    schedule = train.schedule
    if schedule.kind == "constant" and "min_lr_ratio" in schedule.model_fields_set:
        yield "train.schedule.min_lr_ratio", ("a constant schedule does not decay, so the learning rate never "
                                              "reaches min_lr_ratio (expected kind = \"cosine\" or \"linear\" "
                                              "to decay to it, found kind = \"constant\")")


class Spec(Table):
    """An llmc spec: a model and a run."""

    extends: str | list[str] | None = Field(None, description="Spec(s) this one builds on, relative to this file; "
                                                              "tables merge key by key, this file wins.")
    model: ModelSpec = Field(..., description="The architecture.")
    data: DataSpec = Field(default_factory=DataSpec, description="Data sources and tokenizer.")
    train: TrainSpec = Field(..., description="The training run.")
    parallel: ParallelSpec = Field(default_factory=ParallelSpec, description="Parallel layout.")
    hardware: HardwareSpec = Field(default_factory=HardwareSpec, description="Devices.")
    job: JobSpec = Field(default_factory=JobSpec, description="Launch settings.")

    _checks = (_context_fits, _layout_fits_hardware, _tensor_fits_model, _stages_fit_model,
               _experts_fit, _batch_divides)
    # checks of the same form for settings that are valid but most likely not meant: warnings,
    # which do not stop a spec; the loader locates them like mistakes (`warnings`)
    _advice: ClassVar[tuple[Check, ...]] = (_warmup_within_run, _floor_of_a_decay)
    _warnings: list = PrivateAttr(default_factory=list)

    @property
    def warnings(self) -> list:
        """Problems of settings that are valid but most likely not meant, located as load_spec
        found them (empty for a spec not loaded from a file)."""
        return self._warnings

    @property
    def world_size(self) -> int:
        ws = self.parallel.world_size
        return self.hardware.world_size if ws == "auto" else ws
