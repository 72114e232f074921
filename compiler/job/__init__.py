"""Plan -> TorchX job: the AppDef, each scheduler's request, a job card; submit, follow, logs.

`appdef` builds the AppDef from a plan document, `emit` writes a job's files, `schedulers` maps
llmc's schedulers onto TorchX's (with the Slurm repairs), `follow` prints state and logs, `track`
remembers submitted jobs, `cli` holds the verbs.
"""

from .cli import cancel_main, compile_main, list_main, logs_main, run_main, status_main

__all__ = ["cancel_main", "compile_main", "list_main", "logs_main", "run_main", "status_main"]
