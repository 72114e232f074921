"""`llmc train SPEC [--out DIR] [--resume] [--nproc N] [--set ...]`: plan, prepare and train here.

Writes RUN_DIR/plan.json and RUN_DIR/spec.toml (the resolved spec), prepares the data once, then
runs the training entry: in this process for one process, under torchrun for several.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from ...compiler.errors import UserError
from ...compiler.spec import SpecError, load_spec, print_warnings, spec_to_toml


def _spec_for(args):
    """The spec with --set applied; with --nproc N, laid out for N processes on this host."""
    if args.nproc:
        try:
            spec = load_spec(args.spec, args.overrides)
            if spec.world_size == args.nproc:
                return spec
        except SpecError:
            pass  # e.g. parallel.dp = N on a spec written for one process: retry with N processes
        extra = [f"hardware.gpus_per_node={args.nproc}", "hardware.nodes=1", f"parallel.world_size={args.nproc}"]
        return load_spec(args.spec, extra + list(args.overrides))
    return load_spec(args.spec, args.overrides)


def _finished(run_dir: Path, step: int) -> bool:
    """The run's final model and report are of `step` (the report is written last; a run killed
    after its last checkpoint has none, or an earlier session's)."""
    try:
        report = json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        return False
    model = run_dir / "model" / "model.safetensors"
    return isinstance(report, dict) and report.get("steps") == step and model.is_file()


def main(args) -> int:
    from ...compiler.plan import build_plan
    from ..data.prepare import prepare, summary
    from ..data.wording import counted
    from ..folders import check_init_from, latest_checkpoint, refuse_a_used_run_dir

    # torch is imported only to resume or to train in this process: a mistake in the spec is
    # said at once, and a launcher of several processes does not load it beside them
    spec = _spec_for(args)
    print_warnings(spec)
    plan = build_plan(spec).model_dump(mode="json")
    run_dir = Path(args.out) if args.out else Path(spec.job.out_dir) / spec.job.name
    nproc = args.nproc or (plan.get("layout") or {}).get("world_size") or spec.world_size
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} exists and is not a folder (expected a run directory: give --out another path)")
    ckpt = latest_checkpoint(run_dir) if args.resume else None
    if ckpt is None:  # the run starts from train.init_from, if it names a folder (a resumed one from its checkpoint)
        check_init_from(spec)
    if args.resume:
        from .checkpoint import check_resumable
        if ckpt is None:
            print(f"no complete checkpoint in {run_dir}: starting from step 0", file=sys.stderr)
        elif (step := check_resumable(ckpt, plan, spec.train.steps)) == spec.train.steps and _finished(run_dir, step):
            print(f"{run_dir} has finished its {counted(spec.train.steps, 'step')} ({ckpt.name}): nothing to train; "
                  "raise train.max_steps to continue it", file=sys.stderr)
            return 0
    else:
        refuse_a_used_run_dir(run_dir, "--out")
    run_dir.mkdir(parents=True, exist_ok=True)  # (before the data: an --out that cannot be made fails at once)
    print(summary(prepare(spec)), file=sys.stderr)
    (run_dir / "plan.json").write_text(json.dumps(plan, indent=2))
    (run_dir / "spec.toml").write_text(spec_to_toml(spec))
    try:
        return _run(plan, run_dir, nproc, args.resume)
    except KeyboardInterrupt:
        print(_interrupted_note(run_dir), file=sys.stderr)
        raise


def _interrupted_note(run_dir: Path) -> str:
    """What an interrupted run keeps: its newest checkpoint, which --resume continues from."""
    from ..folders import latest_checkpoint
    from .checkpoint import read_meta
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return f"{run_dir} holds no checkpoint yet: a new run starts from step 0"
    try:
        step = read_meta(ckpt)["step"]
    except UserError as e:  # (said instead of the note: a traceback here would hide the interruption)
        return str(e)
    return (f"{run_dir} keeps {ckpt.name}: the same command with --resume continues from step {step} "
            "(the steps after it are redone)")


def _threads_per_process(nproc: int) -> dict:
    """The environment of torchrun's workers: unless the user chose OMP_NUM_THREADS, the cores this
    process may use shared among them (torchrun would give each one thread, and say so)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"OMP_NUM_THREADS": str(max(1, cores // nproc)), **os.environ}


def _run(plan: dict, run_dir: Path, nproc: int, resume: bool) -> int:
    """Train the plan into run_dir: in this process, or under torchrun for several."""
    if nproc == 1:
        from .distributed import init_distributed
        from .loop import train
        report = train(plan, run_dir, init_distributed(), resume=resume)
        val = report.get("validation") or {}
        tps = report["measured"]["tokens_per_s"]
        print(f"run directory: {run_dir}  (step {report['steps']}" + (f", {tps:,.0f} tokens/s" if tps else "")
              + (f", val_loss {val['val_loss']:.4f}" if val else "") + ")", file=sys.stderr)
        return 0
    cmd = [sys.executable, "-m", "llmc.runtime.train.launch", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "llmc.runtime.entry", "--plan", str(run_dir / "plan.json"), "--out", str(run_dir)]
    if resume:
        cmd.append("--resume")
    code = subprocess.call(cmd, env=_threads_per_process(nproc))
    if code:
        raise UserError("training failed; see the messages above")
    print(f"run directory: {run_dir}", file=sys.stderr)
    return 0
