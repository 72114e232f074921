"""Checkpoints: atomic, resumable, with torch.distributed.checkpoint (DCP).

RUN_DIR/checkpoints/step-00000100/ holds the model and optimizer (DCP, each rank writing its
part), `rank{r}.pt` per rank (RNG states, sampler position, scheduler) and `meta.json` (step, plan
hash, the spec). It is written as `.tmp-step-...` and renamed once every rank has finished, so a
folder named `step-*` is always complete; a run killed while writing leaves only a `.tmp-` folder,
which resume ignores and the next save replaces. The newest `keep` checkpoints are kept. A file
damaged afterwards (meta.json, rank{r}.pt, a shard) is a one-line UserError naming it; nothing is removed.
A checkpoint resumes under another process count or parallel layout too (load_checkpoint), and
inference reads its model part alone in one process (load_model_weights, via model/io.py).
"""

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from ..parallel.checkpoint import load_train_state_dict, train_state_dict

from ...compiler.errors import UserError
from ...compiler.spec.dump import flatten
from ..folders import checkpoints
from .distributed import DistEnv, all_reduce_sum

# Keys a resumed run may change: budget, cadence, logging, compilation, launch settings, and the
# machines and parallel layout (DCP reshards the model and optimizer; the sample order is global).
RESUMABLE_CHANGES = ("train.max_steps", "train.tokens", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.eval_every", "train.eval_batches", "train.log_every", "train.compile", "job.",
                     "hardware.", "parallel.", "train.micro_batch_size")


def _barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# What meta.json records that a reader needs (plan_hash may be null: a plan without a spec hash).
META_KEYS = {"step": int, "world_size": int, "spec": dict}
RANK_STATE_KEYS = ("rng", "data", "scheduler")


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"[:300]


def _damaged(path: Path, file: Path, problem: str) -> UserError:
    """The one-line refusal of a damaged checkpoint, and what the user can do (nothing is removed)."""
    return UserError(f"{file}: damaged checkpoint ({problem}); use another checkpoint, or move "
                     f"{Path(path).name} out of {Path(path).parent} and --resume continues from the one before it")


def read_meta(path: Path) -> dict:
    """meta.json of checkpoint `path`, refused with its path when it is not JSON or lacks a key
    of META_KEYS (a file damaged after the checkpoint was completed: truncated, edited)."""
    file = Path(path) / "meta.json"
    try:
        meta = json.loads(file.read_bytes())
    except (OSError, ValueError) as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise _damaged(path, file, f"not readable JSON: {_one_line(e)}") from None
    if not isinstance(meta, dict):
        raise _damaged(path, file, f"expected a JSON object, found {type(meta).__name__}")
    wrong = [f"{key} ({kind.__name__})" for key, kind in META_KEYS.items() if not isinstance(meta.get(key), kind)]
    if wrong:
        raise _damaged(path, file, "missing or invalid " + ", ".join(wrong))
    return meta


def checkpoint_plan(path: Path) -> dict:
    """The plan a checkpoint was trained under: RUN_DIR/plan.json when it is of the checkpoint's spec,
    else the spec its meta.json records (all a model needs)."""
    meta = read_meta(path)
    try:
        plan = json.loads((Path(path).parent.parent / "plan.json").read_text())
        if isinstance(plan, dict) and plan.get("spec") == meta["spec"]:
            return plan
    except (OSError, ValueError):
        pass
    return {"spec": meta["spec"], "spec_hash": meta.get("plan_hash")}


def _dcp_load(state: dict, path: Path) -> str | None:
    """Read checkpoint `path` into `state` in place (DCP, under this process's layout); None, or
    what went wrong (a shard missing or damaged)."""
    try:
        with warnings.catch_warnings():  # one process without a process group is a supported case
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path))
    except (CheckpointException, Exception) as e:  # noqa: BLE001 - DCP's wraps each rank's (a BaseException)
        return _one_line(next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e)
    return None


def load_model_weights(path: Path, model) -> None:
    """The model part of checkpoint `path` into a whole (unwrapped) `model` in this process, whatever
    layout wrote it (DCP reads every rank's shards); the optimizer state is not read."""
    state = {"model": model.state_dict()}
    if (problem := _dcp_load(state, path)) is not None:
        raise UserError(f"{path}: cannot read this checkpoint's model weights in one process ({problem}); use "
                        f"another checkpoint, or `llmc train SPEC --out {Path(path).parent.parent} --resume` under "
                        "the run's layout to write its final model")
    model.load_state_dict(state["model"])


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, data_state: dict, plan: dict,
                    env: DistEnv, keep: int, scaler=None) -> Path:
    """Write checkpoint `step` (every rank calls this); return its folder. `scaler`: fp16's
    GradScaler, whose loss scale a resumed run continues from."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(env)
    state = train_state_dict(model, optimizer)  # parallel runtime: expert shards as DTensors
    with warnings.catch_warnings():  # one process without a process group is a supported case, not news
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(tmp))
    torch.save({"rng": rng_state(), "data": data_state, "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None}, tmp / f"rank{env.rank}.pt")
    _barrier(env)
    if env.is_main:
        meta = {"step": step, "plan_hash": plan.get("spec_hash"), "world_size": env.world_size, "spec": plan["spec"]}
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(env)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, env: DistEnv, scaler=None) -> tuple[int, dict]:
    """Restore model, optimizer, scheduler, fp16's loss scaler and RNG in place; return (step, the
    sampler state)."""
    meta = read_meta(path)
    # The sampler and scheduler states are the same on every rank (the sample order is global), so
    # another process count reads rank 0's; only the per-rank RNG streams cannot carry over then.
    same_ranks = meta["world_size"] == env.world_size
    extra = _read_rank_state(path, path / f"rank{env.rank if same_ranks else 0}.pt", env)
    state = train_state_dict(model, optimizer)  # parallel runtime: expert shards as DTensors
    if (problem := _dcp_load(state, path)) is not None:  # under this run's layout, whatever wrote it
        raise _damaged(path, path, problem)
    load_train_state_dict(model, optimizer, state)
    scheduler.load_state_dict(extra["scheduler"])
    if scaler is not None and extra.get("scaler"):  # (the same on every rank: they skip steps together)
        scaler.load_state_dict(extra["scaler"])
    if same_ranks:
        set_rng_state(extra["rng"])
    return int(meta["step"]), extra["data"]


def _read_rank_state(path: Path, file: Path, env: DistEnv) -> dict:
    """A rank's `rank{r}.pt` (RNG, sampler, scheduler, loss scale), refused on every rank together
    when any rank's is missing or damaged (a rank that went on would wait for the others forever)."""
    try:
        extra = torch.load(file, weights_only=False)
        problem = None if isinstance(extra, dict) and all(k in extra for k in RANK_STATE_KEYS) else \
            f"expected a dict of {', '.join(RANK_STATE_KEYS)}"
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds for a damaged file (zip, pickle, EOF)
        extra, problem = None, _one_line(e)
    failed = all_reduce_sum(torch.tensor([float(problem is not None)], device=env.device), env)
    if problem is not None:
        raise _damaged(path, file, problem)
    if failed.item():
        raise _damaged(path, path, "another rank's rank*.pt is missing or damaged")
    return extra


def spec_differences(old_spec: dict, new_spec: dict) -> list[str]:
    """Differences between two resolved specs that make a checkpoint unusable ("key: old -> new")."""
    old, new = flatten(old_spec), flatten(new_spec)
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key.startswith(RESUMABLE_CHANGES) or old.get(key) == new.get(key):
            continue
        diffs.append(f"{key}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}")
    return diffs


def check_resumable(path: Path, plan: dict, total_steps: int) -> int:
    """Refuse to resume `path` under a plan whose spec differs in anything but the budget and cadence,
    or whose budget of `total_steps` ends before the checkpoint's step; return that step."""
    meta = read_meta(path)
    diffs = spec_differences(meta["spec"], plan["spec"])
    if diffs:
        raise UserError(f"cannot resume {path}: the spec changed since it was written:\n  " + "\n  ".join(diffs)
                        + "\n(start a new run with another --out, or restore these values)")
    step = int(meta["step"])
    if step > total_steps:
        raise UserError(f"cannot resume {path}: it is at step {step}, past this run's {total_steps} steps "
                        "(expected train.max_steps / train.tokens of at least that many steps)")
    return step
