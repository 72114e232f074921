"""What a training job runs on every rank:
`python -m llmc.runtime.entry --plan plan.json --out RUN_DIR [--resume] [--job-id ID]`.

Under torchrun each process joins the process group torchrun describes; alone it runs as one
process. The plan is the only input (see runtime/train/loop.py).

A run directory that already holds checkpoints is continued, never trained over from step 0:
with --resume (the user's choice), or, for a job the scheduler may restart (job.retries > 0, which
passes --job-id), when the checkpoints are this job's own, written by an earlier attempt of it.
RUN_DIR/attempts.json records which job the run directory's attempts belong to.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from llmc.compiler.errors import UserError
from llmc.compiler.spec import SpecError
from llmc.runtime.folders import latest_checkpoint
from llmc.runtime.train.checkpoint import read_meta
from llmc.runtime.train.distributed import finish, init_distributed
from llmc.runtime.train.loop import read_plan, train

ATTEMPTS_FILE = "attempts.json"   # {"job_id": the scheduler's id of the job, "attempts": how many started}


def read_attempts(run_dir: Path) -> dict:
    """RUN_DIR/attempts.json, or {} when there is none (or it is not a JSON object)."""
    try:
        attempts = json.loads((run_dir / ATTEMPTS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return attempts if isinstance(attempts, dict) else {}


def record_attempt(run_dir: Path, job_id: str, attempts: dict) -> int:
    """Count this attempt of job `job_id` in RUN_DIR/attempts.json (written whole, then renamed);
    return its number (1 for the job's first)."""
    number = attempts.get("attempts", 0) + 1 if attempts.get("job_id") == job_id else 1
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{ATTEMPTS_FILE}.tmp"
    tmp.write_text(json.dumps({"job_id": job_id, "attempts": number}) + "\n")
    os.replace(tmp, run_dir / ATTEMPTS_FILE)
    return number


def continues(run_dir: Path, resume: bool, job_id: str | None, attempts: dict) -> bool:
    """Whether this attempt continues from the run's newest complete checkpoint; a run directory
    holding checkpoints of another run (or of a run not known to be this job's) is refused."""
    if resume or latest_checkpoint(run_dir) is None:
        return resume
    owner = attempts.get("job_id")
    if job_id is not None and owner == job_id:
        return True   # a restarted attempt of this job
    whose = f" of job {owner}" if owner else ""
    raise UserError(f"{run_dir} already holds checkpoints{whose}, not of this job: pass --resume to continue "
                    "them (llmc run --resume), or train into another run directory (job.name, job.out_dir)")


def _a_peer_left(error: RuntimeError) -> bool:
    """A collective failed because another rank's process ended (gloo's words; NCCL's watchdog
    aborts the process itself): that rank's own message says why, this traceback nothing."""
    return any(words in str(error) for words in ("closed by peer", "reset by peer"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmc.runtime.entry", description=__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True, help="plan.json written by `llmc compile` / `llmc train`")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--job-id", help="the scheduler's id of this job, the same in each of its attempts: "
                                         "a restarted attempt continues from the checkpoints the job wrote")
    args = parser.parse_args(argv)
    env = init_distributed()
    run_dir = Path(args.out)
    code = 0
    try:
        attempts = read_attempts(run_dir)
        resume = continues(run_dir, args.resume, args.job_id, attempts)
        if args.job_id is not None and env.is_main:
            number = record_attempt(run_dir, args.job_id, attempts)
            if number > 1 and (ckpt := latest_checkpoint(run_dir)) is not None:
                print(f"job {args.job_id}, attempt {number}: continuing from {ckpt.name} "
                      f"(step {read_meta(ckpt)['step']})", file=sys.stderr)
        train(read_plan(Path(args.plan)), run_dir, env, resume=resume)
    except (UserError, SpecError) as e:
        print(f"error (rank {env.rank}): {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:  # Ctrl-C reaches every rank: the launcher says what the run keeps
        code = 130
    except RuntimeError as e:
        if not (env.distributed and _a_peer_left(e)):
            raise
        print(f"error (rank {env.rank}): lost the connection to a rank that stopped", file=sys.stderr)
        code = 1
    finish(env, code)
    return code


if __name__ == "__main__":
    sys.exit(main())
