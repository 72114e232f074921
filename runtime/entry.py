"""What a training job runs on every rank: `python -m llmc.runtime.entry --plan plan.json --out RUN_DIR [--resume]`.

Under torchrun each process joins the process group torchrun describes; alone it runs as one
process. The plan is the only input (see runtime/train/loop.py).
"""

import argparse
import sys
from pathlib import Path

from llmc.compiler.errors import UserError
from llmc.compiler.spec import SpecError
from llmc.runtime.train.distributed import finish, init_distributed
from llmc.runtime.train.loop import read_plan, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmc.runtime.entry", description=__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True, help="plan.json written by `llmc compile` / `llmc train`")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    args = parser.parse_args(argv)
    env = init_distributed()
    code = 0
    try:
        train(read_plan(Path(args.plan)), Path(args.out), env, resume=args.resume)
    except (UserError, SpecError) as e:
        print(f"error (rank {env.rank}): {e}", file=sys.stderr)
        code = 1
    finish(env, code)
    return code


if __name__ == "__main__":
    sys.exit(main())
