"""torchrun for `llmc train --nproc N`: `python -m llmc.runtime.train.launch TORCHRUN_ARGS`.

torch.distributed.run itself, with its arguments, except for how it ends when a worker fails.
The workers print their own errors (a user's mistake in one line, a bug with its traceback);
torchrun then raises ChildFailedError, whose traceback through its own launcher and table of
every rank's exit tell nothing more at a terminal. Here that ending is one line: which rank
failed first and how. Jobs (`llmc run`) keep plain torchrun, whose table goes to the job's log.
"""

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def describe(failure) -> str:
    """How a worker ended: its exit code, or the signal that killed it."""
    if failure.exitcode < 0:
        name = failure.signal_name()
        hint = " (out of memory?)" if failure.exitcode == -signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {failure.exitcode}"


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        said = f"rank {rank} {describe(failure)}"
        if len(e.failures) > 1:
            said += f", the first of {len(e.failures)} to fail"
        print(said, file=sys.stderr)
        return 1
    except SignalException as e:  # torchrun stopped by a signal (Ctrl-C): its workers are stopped
        return 128 + e.sigval
    return 0


if __name__ == "__main__":
    sys.exit(main())
