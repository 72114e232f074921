"""One rank of a parallel-equivalence run (launched by tests/test_parallel_*.py through torchrun,
or with plain python for the single-process reference).

Trains a tiny model a few steps on a fixed random global batch under the given layout and writes
`OUT/rank{r}.pt` = {"losses": [per-step global mean loss], "state": this rank's full-size
weights (gathered from shards), "bytes": measured per-rank model-state bytes after the last step,
"peak_gradients": the most gradient bytes the rank held during the steps, "unit_gradient_bytes":
the whole fp32 gradients of the root FSDP2 units and of the largest block, "plan_bytes": the plan's figures for this rank's
pipeline stage}.

Every rank reads the same global batch; data-parallel rank d takes micro-batches
d*accum .. d*accum+accum-1 of it, so one process with accum' = dp*accum sees the same
micro-batches in the same grouping.

With `--batch FILE` the processes do several runs one after another (parallel_helpers.Batch):
each rank's start, torch's import, costs seconds, more than a tiny run's training.
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist


def parse(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default=None,
                    help="a JSON file listing the argument lists of several runs, done one after another "
                         "in these processes (each its own meshes, model and results); the other "
                         "arguments are then not given")
    ap.add_argument("--spec")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--layout", default=None, help="JSON layout (dp, tp, pp, ep, zero, ...) instead of the plan's")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--start-step", type=int, default=0, help="first step of the data stream (after a resume)")
    ap.add_argument("--micro", type=int, default=2, help="micro-batch size")
    ap.add_argument("--n-micro", type=int, default=4, help="micro-batches in the global batch")
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--loss-chunk", type=int, default=0, help="tokens per chunk of the loss (0: whole logits)")
    ap.add_argument("--out")
    ap.add_argument("--save-dcp", default=None, help="save a DCP checkpoint (model + optimizer) here at the end")
    ap.add_argument("--load-dcp", default=None, help="load a DCP checkpoint before training")
    args = ap.parse_args(argv)
    if args.batch is None and not (args.spec and args.out):
        ap.error("--spec and --out are required (or --batch)")
    return args


def _fsdp_group(module):
    """FSDP2's parameter group of `module`, a `fully_shard` or `replicate` unit (else None)."""
    from torch.distributed._composable.replicate_with_fsdp import ReplicateModule, replicate
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not isinstance(module, FSDPModule):
        return None
    state = (replicate if isinstance(module, ReplicateModule) else fully_shard).state(module)
    return state._fsdp_param_group if state is not None else None


def gradient_bytes(modules) -> int:
    """Bytes of every gradient the rank holds now: plain `.grad`s and, of FSDP2's parameters, the
    sharded gradient, the unsharded one and the fp32 accumulator FSDP2 keeps while gradient sync
    is off (FSDP2 internals: a measuring probe of this test, not an API the runtime uses)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for m in modules for p in m.parameters()]
    for group in filter(None, (_fsdp_group(sub) for m in modules for sub in m.modules())):
        for fsdp_param in group.fsdp_params:
            grads += [fsdp_param.sharded_param.grad, fsdp_param.unsharded_accumulated_grad,
                      getattr(getattr(fsdp_param, "_unsharded_param", None), "grad", None)]
    local = {}
    for g in grads:
        if g is not None:
            g = g.to_local() if isinstance(g, DTensor) else g
            local[g.untyped_storage().data_ptr()] = g.untyped_storage().nbytes()
    return sum(local.values())


def ddp_bucket_bytes(wrapped) -> int:
    """Bytes of DDP's all-reduce buckets that are not the gradients themselves (where gradients
    are not views into them), from DDP's logging data: gradient_bytes cannot see them."""
    from torch.nn.parallel import DistributedDataParallel

    total = 0
    for m in wrapped:
        if isinstance(m, DistributedDataParallel):
            info = m._get_ddp_logging_data()
            if not info.get("gradient_as_bucket_view"):
                total += sum(int(b) for b in str(info.get("bucket_sizes", "")).split(",") if b)
    return total


def unit_gradient_bytes(modules) -> tuple[int, int]:
    """fp32 bytes of the whole gradients of the modules' root FSDP2 units (embedding, final norm,
    head: reduced only when the whole backward is done) and of the largest other unit (a block
    with its experts), from their parameters' full shapes; (0, 0) without FSDP2."""
    def size(m):
        group = _fsdp_group(m)
        return 4 * sum(p._orig_size.numel() for p in group.fsdp_params) if group is not None else 0
    roots = sum(size(m) for m in modules)
    blocks = [sum(size(sub) for sub in block.modules()) for m in modules for block in m.layers.values()]
    return roots, max(blocks, default=0)


def track_peak_gradients(modules, wrapped) -> dict:
    """Samples gradient_bytes (and DDP's separate buckets) before every block's forward and
    backward (gradients grow over a step's backwards, and the last micro-batch's reduction frees
    what they had accumulated); returns {"peak": the most seen, "sample": the sampler, for the
    caller to add points}."""
    seen = {"peak": 0}

    def sample(*_):
        seen["peak"] = max(seen["peak"], gradient_bytes(modules) + ddp_bucket_bytes(wrapped))
    for m in modules:
        for block in m.layers.values():
            block.register_forward_pre_hook(sample)
            block.register_full_backward_pre_hook(sample)
    seen["sample"] = sample
    return seen


@torch.no_grad()
def validation_loss(pipe, model, samples, micro: int) -> float:
    """Token-weighted mean loss over `samples` in micro-batches (the last one short), by the pipeline
    (every column evaluating all of them) or by one process. Run after measure_state_bytes: the
    schedule's change of mode clears FSDP gradients."""
    batches = [(s[:, :-1], s[:, 1:]) for s in samples.split(micro)]
    if pipe is not None:  # pads to the stages' shapes and to whole schedule calls
        return pipe.evaluate(batches)["val_loss"]
    model.eval()
    loss_sum = sum(model(tokens, labels).lm_loss.item() * labels.numel() for tokens, labels in batches)
    return loss_sum / sum(labels.numel() for _, labels in batches)


def main():
    args = parse()
    torch.set_num_threads(1)
    from llmc.runtime.parallel import init_distributed

    init_distributed(timeout_s=120)
    if args.batch is None:
        run(args)
    else:  # one process start (torch's import: seconds a rank) for many runs
        from parallel_helpers import run_each
        run_each(args.batch, lambda argv: run(parse(argv)), lambda argv: parse(argv).out)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def run(args):
    """One run: train under its layout, write OUT/rank{r}.pt."""
    from llmc.compiler.spec import load_spec
    from llmc.runtime.model import Transformer
    from llmc.runtime.parallel.data_parallel import micro_batch, zero_grad
    from llmc.runtime.parallel import Layout, build_mesh, clip_grad_norm_, measure_state_bytes, parallelize, \
        reduce_expert_counts

    world = dist.get_world_size() if dist.is_initialized() else 1
    plan_memory = plan_stages = None
    if args.layout is None:  # the planner's layout for these degrees, as a job would run it
        from llmc.compiler.plan import build_plan
        sets = [*args.set, f"hardware.gpus_per_node={world}", "train.precision=fp32",
                f"train.micro_batch_size={args.micro}", f"train.global_batch_size={args.micro * args.n_micro}",
                f"train.seq_len={args.seq}"]
        spec = load_spec(args.spec, sets)
        plan = build_plan(spec).model_dump(mode="json")
        layout, plan_memory = Layout.from_plan(plan), plan["memory"]["train"]
        plan_stages = [{k: m[k] for k in ("weights", "gradients", "optimizer")} for m in plan["memory"]["train_stages"]]
        lay = plan["layout"]
    else:
        spec = load_spec(args.spec, args.set)
        lay = {"world_size": world, "dp": world, **json.loads(args.layout)}
        layout = Layout(**lay)
        layout.check()
    pdims = build_mesh(layout)
    rank = dist.get_rank() if dist.is_initialized() else 0

    torch.manual_seed(0)
    model = Transformer(spec.model)
    model.init_weights()
    model.loss_chunk = args.loss_chunk
    g = torch.Generator().manual_seed(1)
    V = spec.model.vocab_size
    stream = torch.randint(0, V, (args.start_step + args.steps, args.n_micro, args.micro, args.seq + 1), generator=g)
    stream = stream[args.start_step:]

    pipe = None
    if layout.pp > 1:
        from llmc.runtime.parallel.pipeline import build_pipeline
        pipe = build_pipeline(model, pdims, n_microbatches=args.n_micro // layout.dp, micro_batch_size=args.micro,
                              seq_len=args.seq, schedule=layout.pp_schedule, wrap=lambda m: parallelize(m, pdims))
        raw, wrapped = pipe.modules, pipe.wrapped
    else:
        raw, wrapped = [model], [parallelize(model, pdims)]
    params = [p for m in wrapped for p in m.parameters()]
    # eps 1e-6 (not 1e-8): Adam divides by |g| + eps, which turns last-bit noise in a near-zero
    # gradient into a sizeable update; a larger eps keeps the comparison about the gradients.
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1, eps=1e-6, foreach=False)

    if args.load_dcp:
        from llmc.runtime.parallel.checkpoint import load_train_state
        load_train_state(args.load_dcp, wrapped[0], opt)

    accum = args.n_micro // layout.dp
    d = pdims.dp_rank
    peak = track_peak_gradients(raw, wrapped)
    losses = []
    for step in range(args.steps):
        batch = stream[step, d * accum:(d + 1) * accum]
        counts, local = None, torch.zeros(())
        if pipe is not None:
            tokens = batch[..., :-1].reshape(-1, args.seq)
            labels = batch[..., 1:].reshape(-1, args.seq)
            # mean over this column's micro-batches, the same on every stage: count it once
            local = pipe.step(tokens, labels)["loss"].detach() * accum / layout.pp
            counts = pipe.expert_counts()
        else:
            for i, mb in enumerate(batch):
                with micro_batch(wrapped[0], layout.zero, last=i == accum - 1):  # as the training loop
                    out = wrapped[0](mb[:, :-1], mb[:, 1:])
                    (out.loss / accum).backward()
                local += out.loss.detach()
                if out.expert_counts is not None:
                    counts = out.expert_counts if counts is None else counts + out.expert_counts
        peak["sample"]()
        clip_grad_norm_(params, 1.0, pdims)
        opt.step()
        if step < args.steps - 1:  # keep the last gradients: measure_state_bytes counts them
            zero_grad(wrapped, opt)  # as the training loop
        if counts is not None:
            counts = reduce_expert_counts(counts, pdims)
            for m in raw:
                m.update_router_bias(counts)
        if dist.is_initialized():
            dist.all_reduce(local)  # every rank adds its micro-batch losses (only last stages are non-zero)
            local /= layout.tp      # the ranks of a TP group saw the same micro-batches
        losses.append(local.item() / args.n_micro)

    measured = measure_state_bytes(wrapped[0] if len(wrapped) == 1 else torch.nn.ModuleList(raw), opt)
    val_loss = None  # the pipeline's forward-only pass against the one-process forward
    if pipe is not None or world == 1:
        val_loss = validation_loss(pipe, wrapped[0], torch.randint(0, V, (5, args.seq + 1), generator=g), args.micro)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = {}
    for m in raw:
        sd = get_model_state_dict(m, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        state.update({k: v.detach().clone() for k, v in sd.items()})
    if args.save_dcp:
        from llmc.runtime.parallel.checkpoint import save_train_state
        save_train_state(args.save_dcp, wrapped[0], opt)
    os.makedirs(args.out, exist_ok=True)
    plan_bytes = plan_stages[pdims.coordinate("pp")] if plan_stages else None
    torch.save({"losses": losses, "val_loss": val_loss, "state": state, "bytes": measured, "layout": lay,
                "peak_gradients": peak["peak"], "unit_gradient_bytes": unit_gradient_bytes(raw),
                "plan_memory": plan_memory, "plan_bytes": plan_bytes}, os.path.join(args.out, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()  # every rank has written its results before the next run (or the end)


if __name__ == "__main__":
    main()
