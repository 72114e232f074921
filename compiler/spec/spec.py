"""The root of a spec: one table per concern, and the checks that span tables."""

from pydantic import Field, model_validator

from .base import Invalid, Table
from .data import DataSpec
from .hardware import HardwareSpec
from .job import JobSpec
from .model import ModelSpec
from .parallel import ParallelSpec
from .train import TrainSpec

SCHEMA_VERSION = 1


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

    @property
    def world_size(self) -> int:
        ws = self.parallel.world_size
        return self.hardware.world_size if ws == "auto" else ws

    @model_validator(mode="after")
    def _across_tables(self):
        m, t, p, hw = self.model, self.train, self.parallel, self.hardware
        if t.seq_len > m.max_seq_len:
            raise Invalid("train.seq_len", f"train.seq_len exceeds model.max_seq_len "
                                           f"(expected <= {m.max_seq_len}, found {t.seq_len})")
        ws = self.world_size
        if p.world_size != "auto" and p.world_size != hw.world_size:
            raise Invalid("parallel.world_size", f"parallel.world_size disagrees with the hardware "
                                                 f"(expected nodes x gpus_per_node = {hw.world_size}, found {p.world_size})")
        fixed = {k: getattr(p, k) for k in ("dp", "tp", "pp") if getattr(p, k) != "auto"}
        product = 1
        for v in fixed.values():
            product *= v
        if len(fixed) == 3 and product != ws:
            raise Invalid("parallel.dp", f"dp x tp x pp must equal the world size "
                                         f"(expected {ws}, found {' x '.join(map(str, fixed.values()))} = {product})")
        if ws % product:
            raise Invalid("parallel", f"the fixed degrees ({' x '.join(f'{k}={v}' for k, v in fixed.items())}) "
                                      f"do not divide the world size {ws}")
        if p.tp != "auto":
            if p.tp > hw.gpus_per_node:
                raise Invalid("parallel.tp", f"tensor parallelism stays within a node "
                                             f"(expected <= gpus_per_node = {hw.gpus_per_node}, found {p.tp})")
            heads = m.n_heads
            if heads % p.tp:
                raise Invalid("parallel.tp", f"parallel.tp must divide model.n_heads (expected a divisor of {heads}, found {p.tp})")
            # the runtime's tensor parallelism shards neither (runtime/parallel/tensor.py)
            if p.tp > 1 and m.tie_embeddings:
                raise Invalid("parallel.tp", f"tensor parallelism does not shard tied embeddings "
                                             f"(expected 1 with model.tie_embeddings = true, found {p.tp})")
            if p.tp > 1 and m.attention.sparse:
                raise Invalid("parallel.tp", f"tensor parallelism does not shard the DSA sparse indexer "
                                             f"(expected 1 with model.attention.index_n_heads > 0, found {p.tp})")
        if p.pp != "auto" and p.pp > m.n_layers:
            raise Invalid("parallel.pp", f"more pipeline stages than layers (expected <= {m.n_layers}, found {p.pp})")
        if p.ep != "auto":
            if m.moe is None and p.ep != 1:
                raise Invalid("parallel.ep", f"expert parallelism needs [model.moe] (expected 1, found {p.ep})")
            if m.moe is not None and m.moe.n_experts % p.ep:
                raise Invalid("parallel.ep", f"parallel.ep must divide model.moe.n_experts "
                                             f"(expected a divisor of {m.moe.n_experts}, found {p.ep})")
            if ws % p.ep:
                raise Invalid("parallel.ep", f"parallel.ep must divide the world size (expected a divisor of {ws}, found {p.ep})")
        if p.dp != "auto":
            if t.global_batch_size % p.dp:
                raise Invalid("train.global_batch_size", f"global_batch_size must divide over dp = {p.dp} "
                                                         f"(expected a multiple of {p.dp}, found {t.global_batch_size})")
            if t.micro_batch_size != "auto" and t.global_batch_size % (p.dp * t.micro_batch_size):
                raise Invalid("train.global_batch_size",
                              f"global_batch_size must be a multiple of dp x micro_batch_size = "
                              f"{p.dp * t.micro_batch_size} (found {t.global_batch_size})")
        return self
