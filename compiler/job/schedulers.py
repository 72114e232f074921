"""Which TorchX scheduler and options serve each llmc scheduler, and the fixes TorchX 0.7.0 needs.

llmc's `local` is TorchX's `local_cwd` (or `local_dir` when job.image names a working folder),
`slurm` is TorchX's Slurm scheduler with repairs (below), `kubernetes` is TorchX's
Volcano-based Kubernetes scheduler (stopping where no cluster is configured).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from torchx.runner import Runner
from torchx.schedulers import get_scheduler_factories
from torchx.schedulers import local_scheduler
from torchx.schedulers.api import AppDryRunInfo, DescribeAppResponse, ListAppResponse
from torchx.schedulers.kubernetes_scheduler import KubernetesScheduler
from torchx.schedulers.slurm_scheduler import SLURM_STATES, SlurmBatchRequest, SlurmScheduler, _save_job_dir
from torchx.specs import AppState, ReplicaStatus, Role, RoleStatus

from ..errors import UserError
from ..plan.hardware import lookup
from ..spec import Spec

SESSION = "llmc"


# What Slurm's clients say when they cannot reach the cluster (no configuration, slurmctld or slurmdbd
# down), as opposed to the cluster refusing a request (a partition it has not, more GPUs than a node has).
SLURM_UNREACHABLE = ("Could not establish a configuration source", "Unable to contact slurm controller",
                     "Problem talking to the database", "Connection refused")


def slurm_unreachable(stderr: str) -> bool:
    """Whether a Slurm client's error output says the cluster could not be reached."""
    return any(text in stderr for text in SLURM_UNREACHABLE)


def run_slurm(argv: list[str]) -> subprocess.CompletedProcess:
    """Run a Slurm client (sbatch, sacct, scancel) for its output (text). Its stderr is kept for the
    CalledProcessError it fails with, where llmc's error shows it; on success it is passed on.
    A client that is not installed here is a UserError (the machine is not a Slurm login node)."""
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise UserError(f"{argv[0]} is not on PATH (is this a Slurm login node?): llmc submits Slurm jobs "
                        "with sbatch and follows them with sacct and scancel") from None
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, argv, done.stdout, done.stderr)
    sys.stderr.write(done.stderr)
    return done


def slurm_state(text: str) -> AppState:
    """Map an sacct State to TorchX's: sacct writes 'CANCELLED by <uid>', which TorchX 0.7.0 does
    not know (its `status` after `cancel` fails on an assertion); the first word is the state."""
    word = text.split()[0] if text.strip() else ""
    return SLURM_STATES.get(word, AppState.UNKNOWN)


class SlurmSchedulerFixed(SlurmScheduler):
    """TorchX's Slurm scheduler, reading sacct's state words robustly (describe, list), and keeping
    what sbatch, sacct and scancel say when they fail (TorchX leaves their stderr on the terminal).

    `describe` answers from a one-second memory: TorchX's log followers ask for the state every
    0.1 s while waiting for output, and each question is an sacct process competing with the job.
    """

    DESCRIBE_TTL_S = 1.0

    def __init__(self, session_name: str) -> None:
        super().__init__(session_name)
        self._described: dict[str, tuple[float, DescribeAppResponse | None]] = {}

    def schedule(self, dryrun_info: AppDryRunInfo[SlurmBatchRequest]) -> str:
        """As TorchX 0.7.0's: the script is written into the job's folder (else a temporary one) and
        submitted with sbatch --parsable, whose stdout is the job id."""
        request = dryrun_info.request
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(request.job_dir or tmp, "torchx-sbatch.sh")
            if request.job_dir is not None:
                request.cmd += [f"--chdir={request.job_dir}"]
            request.cmd += [path]
            Path(path).write_text(request.materialize())
            job_id = run_slurm(request.cmd).stdout.strip()
        if request.job_dir is not None:
            _save_job_dir(job_id, request.job_dir)   # where TorchX's log reader finds the job's files
        return job_id

    def _cancel_existing(self, app_id: str) -> None:
        run_slurm(["scancel", app_id])

    def describe(self, app_id: str) -> DescribeAppResponse | None:
        now = time.monotonic()
        cached = self._described.get(app_id)
        if cached is None or now - cached[0] > self.DESCRIBE_TTL_S:
            cached = self._described[app_id] = (now, self._describe_now(app_id))
        return cached[1]

    def _partition_memmb(self, partition: str | None) -> int | None:
        """Memory (MB) of `partition` (or the default one); None when sinfo cannot say.
        As TorchX's, but quiet when no cluster is configured (`llmc compile` on a laptop)."""
        try:
            out = subprocess.run(["sinfo", "--noheader", "--format", "%P|%m", "--noconvert"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=30)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            return None
        if out.returncode != 0:
            return None
        for line in out.stdout.splitlines():
            name, _, memory = line.partition("|")
            is_default = name.endswith("*")
            if name.strip("*") == partition or (partition is None and is_default):
                return int(memory.strip().rstrip("M+") or 0)
        return None

    def _describe_now(self, app_id: str) -> DescribeAppResponse | None:
        out = run_slurm(["sacct", "--parsable2", "--noconvert", "-j", app_id, "--format", "JobID,JobName,State"]).stdout
        rows = [r for r in csv.DictReader(out.splitlines(), delimiter="|")
                if r["JobID"].split("+")[0] == app_id and "." not in r["JobID"]]
        if not rows:
            return None
        roles: dict[str, Role] = {}
        statuses: dict[str, RoleStatus] = {}
        state, message = AppState.UNKNOWN, ""
        for row in rows:   # one row per heterogeneous component = one replica
            state, message = slurm_state(row["State"]), row["State"]
            role, _, replica = row["JobName"].rpartition("-")
            if not role or not replica.isdigit():
                continue   # sacct can lag behind the job's name
            roles.setdefault(role, Role(name=role, num_replicas=0, image="")).num_replicas += 1
            statuses.setdefault(role, RoleStatus(role, [])).replicas.append(
                ReplicaStatus(id=int(replica), role=role, state=state, hostname=""))
        return DescribeAppResponse(app_id=app_id, roles=list(roles.values()),
                                   roles_statuses=list(statuses.values()), state=state, msg=message)

    def list(self) -> list[ListAppResponse]:
        out = run_slurm(["sacct", "--json", "-S1970-01-01-00:00:01"]).stdout
        apps = []
        for job in json.loads(out)["jobs"]:
            current = job["state"]["current"]   # a string before Slurm 23.02, a list after
            current = current[0] if isinstance(current, list) else current
            apps.append(ListAppResponse(app_id=str(job["job_id"]), state=slurm_state(current)))
        return apps


def _create_slurm(session_name: str, **_: Any) -> SlurmSchedulerFixed:
    return SlurmSchedulerFixed(session_name=session_name)


class KubernetesSchedulerFixed(KubernetesScheduler):
    """TorchX's Kubernetes scheduler, stopping where there is no cluster configuration: TorchX warns
    and goes on with an empty one, whose request then fails as 'No host specified'."""

    def _api_client(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            api_client = super()._api_client()
        for warning in caught:
            if str(warning.message).startswith("failed to load kube config"):
                self._client = None
                raise UserError(f"no Kubernetes cluster to talk to ({warning.message}); "
                                "KUBECONFIG or ~/.kube/config names one")
        return api_client


@contextlib.contextmanager
def volcano_retries_warning(shown: bool):
    """TorchX warns, as it builds a Volcano Job with retries (once per task), that Volcano as of 1.4.0
    does not support retries correctly: a UserWarning of several lines, printed with TorchX's source
    line. Within this block it is said once as one `warning:` line (`shown`), or not at all (a job
    for another scheduler, or a submission after the compile said it); other warnings show as ever."""
    with warnings.catch_warnings(record=True) as caught:
        yield
    said = {}
    for warning in caught:
        text = " ".join(str(warning.message).split())
        if issubclass(warning.category, UserWarning) and "Volcano does NOT support retries correctly" in text:
            said[text] = None
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno,
                                 warning.file, warning.line)
    for text in said if shown else ():
        print(f"warning: TorchX: {text}", file=sys.stderr)


def _create_kubernetes(session_name: str, **_: Any) -> KubernetesSchedulerFixed:
    return KubernetesSchedulerFixed(session_name=session_name)


def make_runner() -> Runner:
    """A TorchX runner with llmc's scheduler set (the Slurm and Kubernetes repairs, a directory-image local)."""
    factories = dict(get_scheduler_factories())
    factories["slurm"] = _create_slurm
    factories["kubernetes"] = _create_kubernetes
    factories["local_dir"] = functools.partial(local_scheduler.create_scheduler,
                                               image_provider_class=local_scheduler.LocalDirectoryImageProvider)
    return Runner(name=SESSION, scheduler_factories=factories)


# the TorchX schedulers llmc submits to: the first part of every handle `llmc run` prints
BACKENDS = ("local_cwd", "local_dir", "slurm", "kubernetes")


def torchx_scheduler(spec: Spec, scheduler: str) -> str:
    """The TorchX scheduler name that serves llmc's `scheduler`."""
    if scheduler == "local":
        return "local_dir" if spec.job.image else "local_cwd"
    return scheduler


def scheduler_cfg(spec: Spec, scheduler: str, log_dir: str) -> dict[str, Any]:
    """TorchX run options from the spec's [job] table (validated values only)."""
    job = spec.job
    if scheduler == "local":
        cfg = {"log_dir": log_dir}
        # Several "nodes" on this one host: each replica's torchrun puts local rank k on GPU k, so
        # without disjoint CUDA_VISIBLE_DEVICES (TorchX divides the host's GPUs among the replicas)
        # they would all share the first GPUs. TorchX counts the GPUs with nvidia-smi (and fails
        # when it is absent; then there are no NVIDIA GPUs here to share), so only NVIDIA's are
        # divided: on AMD GPUs the replicas share the host's (TorchX warns so).
        if (spec.hardware.nodes > 1 and lookup(spec.hardware.accelerator).vendor == "nvidia"
                and shutil.which("nvidia-smi")):
            cfg["auto_set_cuda_visible_devices"] = True
        return cfg
    if scheduler == "slurm":
        cfg: dict[str, Any] = {}
        if job.partition:
            cfg["partition"] = job.partition
        if job.time_limit:
            cfg["time"] = str(job.time_limit)   # minutes
        if job.image:
            cfg["job_dir"] = str(Path(job.image).resolve())   # the job's working folder (sbatch --chdir)
        return cfg
    return {"queue": job.queue, "namespace": job.namespace}
