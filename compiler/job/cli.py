"""The job verbs: compile, run, status, logs, cancel, list."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from torchx.schedulers.local_scheduler import SignalException
from torchx.specs import AppState, is_terminal, parse_app_handle
from torchx.specs.api import MalformedAppHandleException

from ..errors import UserError
from ..spec import load_spec, print_warnings
from . import track
from .emit import REQUEST_FILES, compile_job, workdir_of
from .follow import follow, print_logs, print_report
from .schedulers import BACKENDS, SESSION, make_runner, slurm_unreachable, torchx_scheduler, volcano_retries_warning


def compile_main(args) -> int:
    """`llmc compile SPEC -o OUT`."""
    spec = load_spec(args.spec, args.overrides)
    print_warnings(spec)
    job = compile_job(spec, Path(args.output), spec_path=args.spec, overrides=args.overrides)
    for what, name in job.files.items():
        print(f"{job.out / name}  ({what})")
    for name, reason in job.unavailable.items():
        print(f"note: no {name} request: {reason}", file=sys.stderr)
    return 0


def run_main(args) -> int:
    """`llmc run SPEC`: plan, compile into RUN_DIR/job, submit through TorchX, follow."""
    spec = load_spec(args.spec, args.overrides)
    print_warnings(spec)
    scheduler = args.scheduler or spec.job.scheduler
    workdir = workdir_of(spec, scheduler)
    run_dir = workdir / spec.job.out_dir / spec.job.name
    if scheduler == "local" and spec.job.retries:
        print(f"note: job.retries = {spec.job.retries} does not apply to a local run: TorchX's local scheduler "
              "does not restart a failed job (Slurm and Kubernetes do)", file=sys.stderr)
    if args.dryrun:
        with tempfile.TemporaryDirectory(prefix="llmc-dryrun-") as tmp:
            job = compile_job(spec, Path(tmp), scheduler=scheduler, spec_path=args.spec,
                              overrides=args.overrides, plan_at=run_dir / "job", resume=args.resume)
            if scheduler in job.unavailable:
                raise UserError(job.unavailable[scheduler])
            print(f"# dry run: nothing submitted. The {scheduler} request (TorchX dryrun):")
            print((job.out / REQUEST_FILES[scheduler]).read_text(encoding="utf-8"))
        return 0

    _check_fresh(spec, run_dir, scheduler, args.resume)
    _refuse_a_busy_run_dir(run_dir)
    job = compile_job(spec, run_dir / "job", scheduler=scheduler, spec_path=args.spec, overrides=args.overrides,
                      resume=args.resume)
    if scheduler in job.unavailable:
        raise UserError(job.unavailable[scheduler])
    app = job.app()
    role, replicas = app.roles[0].name, app.roles[0].num_replicas
    with make_runner() as runner:
        handle = _submit(runner, app, torchx_scheduler(spec, scheduler), job.cfg())
        print(handle, flush=True)
        track.record(handle, scheduler=scheduler, role=role, replicas=replicas, run_dir=str(run_dir),
                     log_dir=job.log_dir, job_card=str(job.out / "job_card.md"),
                     pid=os.getpid() if scheduler == "local" else None)
        if not args.follow and scheduler != "local":
            print(f"follow it with: llmc logs --follow {handle}")
            return 0
        # A local job lives inside this process: --no-follow only keeps its logs quiet.
        try:
            state = follow(runner, handle, role, replicas, logs=args.follow)
        except (KeyboardInterrupt, SignalException) as e:
            if scheduler != "local":
                print(f"the job keeps running; stop it with: llmc cancel {handle}", file=sys.stderr)
                raise
            # TorchX's local scheduler turns SIGINT (Ctrl-C) and SIGTERM (`llmc cancel`) into a
            # SignalException; leaving the runner stops the job.
            signum = getattr(e, "sigval", signal.SIGINT)
            track.record(handle, state=AppState.CANCELLED.name)
            print(f"{handle}: stopped by {signal.Signals(signum).name}, finished {AppState.CANCELLED.name}",
                  file=sys.stderr)
            return 128 + signum
        track.record(handle, state=state.name)
    print(f"{handle}: finished {state.name}")
    if state == AppState.SUCCEEDED:
        print_report(run_dir)
        return 0
    return 1


def _check_fresh(spec, run_dir: Path, scheduler: str, resume: bool) -> None:
    """Refuse to submit a new run whose run directory, on this machine's file system (local and
    Slurm jobs run where they are submitted from), holds checkpoints of a run, or whose
    train.init_from it cannot start from: the job itself would refuse (runtime/entry.py), after
    waiting in the queue."""
    from ...runtime.folders import check_init_from, refuse_a_used_run_dir  # (torch-free)

    if scheduler != "kubernetes" and not resume:
        refuse_a_used_run_dir(run_dir, "set job.name (or job.out_dir)")
        check_init_from(spec)


ACTIVE = ("SUBMITTED", "PENDING", "RUNNING")


def _refuse_a_busy_run_dir(run_dir: Path) -> None:
    """Refuse to submit into the run directory of a job `llmc run` submitted from here that is still
    queued or running (with --resume too): the two would train into one folder, and this one's
    job/plan.json would replace the plan the other reads when it starts."""
    waiting = [handle for handle, known in track.jobs().items()
               if known.get("run_dir") == str(run_dir) and known.get("state", "RUNNING") in ACTIVE]
    if not waiting:
        return
    with make_runner() as runner, _scheduler_errors("asking after the jobs of this run directory"):
        for handle in waiting:
            try:
                state = AppState[_status(runner, handle).split()[0]]  # (the words after it explain)
            except UserError:  # the scheduler no longer knows it: not running
                continue
            if state.name in ACTIVE:
                raise UserError(f"{run_dir} is the run directory of {handle}, which is {state.name}: wait for it, "
                                f"stop it (llmc cancel {handle}), or set job.name (or job.out_dir) for another")
            if is_terminal(state):
                track.record(handle, state=state.name)  # final: not asked again


def _submit(runner, app, scheduler: str, cfg: dict) -> str:
    """Submit through TorchX; a scheduler that refuses or cannot be reached is the user's to fix.
    (TorchX's Volcano retries warning was said when the job was compiled.)"""
    with _scheduler_errors(f"submitting to {scheduler}"), volcano_retries_warning(shown=False):
        return runner.run(app, scheduler, cfg=cfg)


@contextlib.contextmanager
def _scheduler_errors(doing: str):
    """A scheduler's command or API that fails (sbatch/sacct exit non-zero, the Kubernetes API server
    is unreachable or refuses) is reported as an error of `doing`, not a traceback."""
    try:
        yield
    except UserError:
        raise
    except subprocess.CalledProcessError as e:   # sbatch, sacct, scancel (see schedulers.run_slurm)
        said = _client_says(e)
        hint = "; is the cluster up?" if slurm_unreachable(said) else ""
        raise UserError(f"{doing} failed: {shlex.join(map(str, e.cmd))} exited {e.returncode}"
                        f"{': ' + said if said else ''}{hint}") from None
    except Exception as e:  # noqa: BLE001 - any scheduler client error
        raise UserError(f"{doing} failed: {type(e).__name__}: {_first_line(e)}") from None


def _client_says(e: subprocess.CalledProcessError) -> str:
    """A failed command's error output on one line: its lines joined by '; ', each without the
    'sbatch: error: ' that starts it (the command is named beside it). Where a line is 'fatal:',
    the fatal lines alone: the errors before them are how the client got there."""
    text = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
    program = re.escape(os.path.basename(str(e.cmd[0])))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    fatal = [line for line in lines if re.match(rf"{program}: fatal: ", line)]
    return "; ".join(re.sub(rf"^{program}: ((error|fatal): )?", "", line) for line in fatal or lines)


def _first_line(e: Exception | str) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _handle(text: str):
    try:
        app = parse_app_handle(text)
    except MalformedAppHandleException:
        raise UserError(f"not an app handle (expected scheduler://session/app-id as printed by "
                        f"`llmc run`, found {text!r})") from None
    if app.scheduler_backend not in BACKENDS:
        raise UserError(f"not a scheduler llmc submits to (expected one of {', '.join(BACKENDS)} in the handle, "
                        f"found {app.scheduler_backend!r} in {text!r})")
    # The app ids TorchX gives: sbatch's job number; NAMESPACE:NAME of the Volcano Job.
    if app.scheduler_backend == "slurm" and not app.app_id.isdigit():
        raise UserError(f"not a Slurm job (expected slurm://{app.session_name or SESSION}/JOB_NUMBER, "
                        f"found {app.app_id!r} in {text!r})")
    if app.scheduler_backend == "kubernetes" and (app.app_id.count(":") != 1 or not all(app.app_id.split(":"))):
        raise UserError(f"not a Kubernetes job (expected kubernetes://{app.session_name or SESSION}/NAMESPACE:NAME, "
                        f"found {app.app_id!r} in {text!r})")
    return app


# Slurm's accounting (sacct, which TorchX asks) lists a job once slurmdbd has recorded it, which can
# take a while after sbatch returned on a loaded controller: a job submitted moments ago is queued.
ACCOUNTING_LAG_S = 300


def _status(runner, handle: str) -> str:
    status = runner.status(handle)
    if status is not None:
        return status.state.name
    known = track.lookup(handle)
    if "state" in known:
        return known["state"]
    if known and _scheduler_is_local(handle):
        return "RUNNING" if _alive(known.get("pid")) else "UNKNOWN (its `llmc run` ended before the job did)"
    if known and time.time() - known.get("time", 0) < ACCOUNTING_LAG_S:
        return "PENDING (submitted; the scheduler does not list it yet)"
    raise UserError(f"the scheduler does not know {handle}")


def _scheduler_is_local(handle: str) -> bool:
    return _handle(handle).scheduler_backend.startswith("local")


def _alive(pid) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except OSError:
        return False
    return True


def status_main(args) -> int:
    """`llmc status HANDLE`."""
    _handle(args.handle)
    with make_runner() as runner, _scheduler_errors(f"asking for the status of {args.handle}"):
        print(f"{args.handle}: {_status(runner, args.handle)}")
    return 0


def logs_main(args) -> int:
    """`llmc logs HANDLE [--follow]`."""
    app = _handle(args.handle)
    known = track.lookup(args.handle)
    with make_runner() as runner, _scheduler_errors(f"reading the logs of {args.handle}"):
        if app.scheduler_backend.startswith("local") and runner.status(args.handle) is None:
            return _local_logs_from_disk(args.handle, app.app_id, known, args.follow)
        role, replicas = known.get("role"), known.get("replicas", 1)
        if role is None:   # submitted from elsewhere: ask the scheduler
            described = runner.describe(args.handle)
            if described is None or not described.roles:
                raise UserError(f"the scheduler does not know {args.handle}")
            role, replicas = described.roles[0].name, described.roles[0].num_replicas
        if not args.follow:
            # TorchX's log readers wait for a job's log files to appear, even when not following:
            # a job that has not started has none yet.
            status = runner.status(args.handle)
            if status is not None and status.state in (AppState.SUBMITTED, AppState.PENDING):
                print(f"{args.handle}: {status.state.name}, no logs yet (`llmc logs --follow` waits for them)",
                      file=sys.stderr)
                return 0
        print_logs(runner, args.handle, role, int(replicas), tail=args.follow)
    return 0


def _local_logs_from_disk(handle: str, app_id: str, known: dict, follow: bool) -> int:
    """A local job launched by another process: its logs are files under the run's log folder;
    following them lasts as long as the `llmc run` that owns the job."""
    if not known.get("log_dir"):
        raise UserError(f"no record of {handle} in {track.RECORD} (run `llmc logs` where you ran `llmc run`)")
    files = sorted(Path(known["log_dir"]).glob(f"*/{app_id}/*/*/combined.log"))
    if not files:
        raise UserError(f"no log files of {handle} under {known['log_dir']}")
    readers = [path.open(encoding="utf-8", errors="replace") for path in files]
    try:
        while True:
            alive = follow and _alive(known.get("pid"))
            for reader in readers:
                print(reader.read(), end="", flush=True)
            if not alive:
                return 0
            time.sleep(1)
    finally:
        for reader in readers:
            reader.close()


def cancel_main(args) -> int:
    """`llmc cancel HANDLE`."""
    app = _handle(args.handle)
    with make_runner() as runner, _scheduler_errors(f"cancelling {args.handle}"):
        if app.scheduler_backend.startswith("local") and runner.status(args.handle) is None:
            pid = track.lookup(args.handle).get("pid")
            if not _alive(pid):
                raise UserError(f"{args.handle} is not running")
            os.kill(int(pid), signal.SIGTERM)   # its `llmc run` stops the job and exits
        else:
            runner.cancel(args.handle)
        print(f"{args.handle}: cancel requested")
    return 0


def list_main(args) -> int:
    """`llmc list [--scheduler]`: the scheduler's jobs (Slurm: the user's; Kubernetes: those of the
    current context's namespace), and every job `llmc run` submitted to it from this directory that
    it still knows (in another namespace: job.namespace), with its run directory. TorchX lists no
    local jobs: for local, the recorded ones."""
    recorded = {handle: known for handle, known in track.jobs().items()
                if _handle(handle).scheduler_backend.split("_")[0] == args.scheduler}
    with make_runner() as runner, _scheduler_errors(f"listing the jobs of {args.scheduler}"):
        states = {} if args.scheduler == "local" else {app.app_handle: app.state.name
                                                       for app in runner.list(args.scheduler)}
        for handle in recorded.keys() - states.keys():
            try:
                states[handle] = _status(runner, handle)
            except UserError:  # gone from the scheduler (deleted, or beyond its accounting)
                pass
        for handle, state in states.items():
            print(f"{handle}\t{state}\t{recorded.get(handle, {}).get('run_dir', '')}".rstrip("\t"))
    return 0

