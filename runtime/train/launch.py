"""torchrun for `llmc train --nproc N`: `python -m llmc.runtime.train.launch TORCHRUN_ARGS`.

torch.distributed.run itself, with its arguments, except for how it ends when a worker fails.
The workers print their own errors (a user's mistake in one line, a bug with its traceback);
torchrun then raises ChildFailedError, whose traceback through its own launcher and table of
every rank's exit tell nothing more at a terminal. Here that ending is one line: which ranks
failed and how. Jobs (`llmc run`) keep plain torchrun, whose table goes to the job's log.
"""

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def ending(failure) -> str:
    """How a worker ended: its exit code, or the signal that killed it."""
    if failure.exitcode < 0:
        hint = " (out of memory?)" if failure.exitcode == -signal.SIGKILL else ""
        return f"killed by {failure.signal_name()}{hint}"
    return f"exit code {failure.exitcode}"


def summary(failures: dict) -> str:
    """The failed ranks grouped by how they ended, e.g. `ranks 0, 2: killed by SIGTERM; rank 1: exit
    code 1`. Not which failed first: torchrun stamps failures in whole seconds."""
    ranks_by_ending: dict[str, list[int]] = {}
    for rank in sorted(failures):
        ranks_by_ending.setdefault(ending(failures[rank]), []).append(rank)
    return "; ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {how}"
                     for how, ranks in ranks_by_ending.items())


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        print(summary(e.failures), file=sys.stderr)
        return 1
    except SignalException as e:  # torchrun stopped by a signal (Ctrl-C): its workers are stopped
        return 128 + e.sigval
    return 0


if __name__ == "__main__":
    sys.exit(main())
