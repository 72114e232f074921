"""Spec -> the job's files: resolved spec, plan.json, AppDef, each scheduler's request, job card.

`llmc compile` writes them where it is told; `llmc run` writes them into RUN_DIR/job/ and submits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import os
import shlex
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import jinja2
import yaml   # TorchX's own dependency
from torchx import specs
from torchx.schedulers import local_scheduler
from torchx.schedulers.kubernetes_scheduler import sanitize_for_serialization

from ..errors import UserError
from ..plan import build_plan
from ..spec import Spec, spec_to_toml
from .appdef import SCHEDULERS, build_appdef, layout_of, node_resources
from .schedulers import make_runner, scheduler_cfg, torchx_scheduler, volcano_retries_warning

REQUEST_FILES = {"local": "local.request.txt", "slurm": "slurm.sbatch.sh", "kubernetes": "kubernetes.volcano.yaml"}


@dataclass
class CompiledJob:
    """What `compile_job` wrote, and what submitting needs."""

    spec: Spec
    plan: dict
    scheduler: str            # the scheduler the job is for (job.scheduler or --scheduler)
    out: Path                 # the folder holding the files below
    workdir: Path             # the job's working directory on this machine
    plan_path: str            # plan.json as the job sees it (relative to its working directory)
    run_dir: str              # the run directory as the job sees it
    log_dir: str              # local scheduler logs (host path)
    resume: bool = False      # the job continues from the run's newest complete checkpoint
    files: dict[str, str] = field(default_factory=dict)        # what -> file name in `out`
    unavailable: dict[str, str] = field(default_factory=dict)  # scheduler -> why it cannot take this job

    def app(self) -> specs.AppDef:
        """A fresh AppDef for this job's scheduler (TorchX's dryrun mutates the one it gets)."""
        return build_appdef(self.plan, self.scheduler, self.plan_path, self.run_dir, resume=self.resume)

    def cfg(self, scheduler: str | None = None) -> dict:
        return scheduler_cfg(self.spec, scheduler or self.scheduler, self.log_dir)


def workdir_of(spec: Spec, scheduler: str) -> Path:
    """Where the job runs: job.image names a working folder for local and Slurm; else here."""
    if scheduler in ("local", "slurm") and spec.job.image:
        path = Path(spec.job.image)
        if not path.is_dir():
            raise UserError(f"job.image: for the {scheduler} scheduler the image is a working folder, "
                            f"and {spec.job.image!r} is not a folder")
        return path.resolve()
    return Path.cwd()


def _job_relative(path: Path, workdir: Path) -> str:
    path = path.resolve()
    try:
        return str(path.relative_to(workdir))
    except ValueError:
        return str(path)   # outside the working directory: absolute


def _appdef_json(app: specs.AppDef) -> str:
    def plain(value):
        if isinstance(value, enum.Enum):
            return value.value
        raise TypeError(f"cannot serialise {type(value).__name__}")
    return json.dumps(dataclasses.asdict(app), indent=2, default=plain) + "\n"


@contextlib.contextmanager
def _warnings_of_torchx_local(shown: bool):
    """TorchX's local scheduler warns, as it builds a request of GPU replicas, that they may share
    GPUs (its CUDA_VISIBLE_DEVICES warning): for a job of another scheduler that is noise."""
    logger = logging.getLogger(local_scheduler.__name__)
    level = logger.level
    if not shown:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _render_request(runner, job: CompiledJob, scheduler: str) -> str:
    workdir_of(job.spec, scheduler)   # local/Slurm read job.image as a folder: UserError if it is not
    if scheduler == "kubernetes":
        try:
            import kubernetes  # noqa: F401 - TorchX builds the Volcano Job from its client models
        except ImportError:
            raise UserError('the Kubernetes scheduler needs the kubernetes client: pip install "torchx[kubernetes]"'
                            ) from None
    app = build_appdef(job.plan, scheduler, job.plan_path, job.run_dir, resume=job.resume)
    shown = scheduler == job.scheduler
    with _warnings_of_torchx_local(shown), volcano_retries_warning(shown):
        info = runner.dryrun(app, torchx_scheduler(job.spec, scheduler), cfg=job.cfg(scheduler))
    if scheduler == "slurm":
        request = info.request
        if request.job_dir:   # TorchX adds sbatch's --chdir when it submits: the script's "Run with" line needs it
            request.cmd.append(f"--chdir={request.job_dir}")
        return request.materialize()
    if scheduler == "kubernetes":
        # TorchX names the namespace in the API call, not in the object: the file says it too, so
        # that `kubectl create -f` puts the job where `llmc run` would.
        resource = sanitize_for_serialization(info.request.resource)
        resource["metadata"] = {**resource["metadata"], "namespace": job.cfg(scheduler)["namespace"]}
        return yaml.safe_dump(resource, sort_keys=False)
    return str(info) + "\n"


def render_job_card(job: CompiledJob, spec_path: str, overrides: list[str]) -> str:
    """The job card (markdown): the plan in brief, resources, and the exact launch commands."""
    template = resources.files("llmc.templates").joinpath("job_card.md.j2").read_text(encoding="utf-8")
    layout = layout_of(job.plan)
    role = job.app().roles[0]
    run = ["llmc", "run", spec_path, "--scheduler", job.scheduler] + (["--resume"] if job.resume else [])
    for text in overrides:
        run += ["--set", text]
    return jinja2.Template(template, keep_trailing_newline=True, undefined=jinja2.StrictUndefined).render(
        job=job, spec=job.spec, plan=job.plan, layout=layout, full_layout=job.plan["layout"],
        resources=node_resources(job.spec, layout),
        run_command=shlex.join(run),
        node_command=shlex.join([role.entrypoint] + role.args))


def plan_document(spec: Spec) -> dict:
    """plan.json: the planner's Plan as JSON."""
    return build_plan(spec).model_dump(mode="json")


def compile_job(spec: Spec, out: Path, *, scheduler: str | None = None, spec_path: str = "SPEC",
                overrides: list[str] = (), plan_at: Path | None = None, resume: bool = False) -> CompiledJob:
    """Plan `spec` and write its job files into `out` (created). Returns what was written.

    Every file is rendered before the first is written: a spec that cannot be planned or
    compiled leaves `out` as it was (no new folder, no new files beside an earlier compile's).
    `plan_at` is the folder the job will read plan.json from, when that is not `out` (a dry run
    writes into a temporary folder but shows the paths a real run would use).
    """
    scheduler = scheduler or spec.job.scheduler
    workdir = workdir_of(spec, scheduler)
    run_dir = Path(spec.job.out_dir) / spec.job.name
    plan = plan_document(spec)
    job = CompiledJob(spec=spec, plan=plan, scheduler=scheduler, out=out, workdir=workdir,
                      plan_path=_job_relative((plan_at or out) / "plan.json", workdir),
                      run_dir=os.path.normpath(str(run_dir)),
                      log_dir=str((workdir / run_dir / "logs").resolve()), resume=resume)

    texts: dict[str, str] = {}   # file name -> text, in the order they are listed

    def render(what: str, name: str, text: str) -> None:
        texts[name] = text
        job.files[what] = name

    render("resolved spec", "spec.toml", spec_to_toml(spec))
    render("plan", "plan.json", json.dumps(plan, indent=2) + "\n")
    render("TorchX AppDef", "appdef.json", _appdef_json(job.app()))   # raises UserError if impossible
    with make_runner() as runner:
        for name in SCHEDULERS:
            try:
                render(f"{name} request (TorchX dryrun)", REQUEST_FILES[name], _render_request(runner, job, name))
            except UserError as e:
                job.unavailable[name] = str(e)
    render("job card", "job_card.md", render_job_card(job, spec_path, list(overrides)))

    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in REQUEST_FILES.values():   # an earlier compile's request for a scheduler now unavailable
            if name not in texts:
                (out / name).unlink(missing_ok=True)
        for name, text in texts.items():
            (out / name).write_text(text, encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write the job files into {out} ({e.strerror or e})") from None
    return job
