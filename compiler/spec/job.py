"""`[job]`: how the run is launched. Every value here may reach a scheduler, so it is validated."""

import posixpath
import re
from typing import Literal

from pydantic import Field, field_validator

from .base import Table

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SAFE_TEXT = re.compile(r"^[^\x00-\x1f\x7f]*$")   # no control characters (newlines included)
# Each pattern must match the whole value (fullmatch): `$` also matches before a final newline.


class MountSpec(Table):
    """One `[[job.mounts]]` entry: a host path bound into the job's container."""

    src: str = Field(..., description="Host path (absolute).")
    dst: str = Field(..., description="Path inside the container (absolute).")
    read_only: bool = Field(False, description="Mount read-only.")

    @field_validator("src", "dst")
    @classmethod
    def _absolute(cls, p: str) -> str:
        if not p.startswith("/") or not _SAFE_TEXT.fullmatch(p):
            raise ValueError(f"expected an absolute path without control characters, found {p!r}")
        return posixpath.normpath(p)


class JobSpec(Table):
    """`[job]`."""

    name: str = Field("llmc", description="Job name: lowercase letters, digits and '-' (at most 63).")
    scheduler: Literal["local", "slurm", "kubernetes"] = Field("local", description="Where to submit.")
    image: str = Field("", description="Container image (kubernetes), or a working directory (slurm/local); "
                                       "empty = the current directory.")
    partition: str = Field("", description="Slurm partition.")
    queue: str = Field("default", description="Kubernetes (Volcano) queue.")
    namespace: str = Field("default", description="Kubernetes namespace the Volcano Job is created in: "
                                                  "lowercase letters, digits and '-' (at most 63).")
    time_limit: int = Field(0, ge=0, description="Wall-clock limit (minutes; 0 = none).")
    retries: int = Field(0, ge=0, le=100, description="Restarts after a failure (count): Slurm requeues the job, "
                                                      "Volcano restarts it, and a restarted attempt continues from "
                                                      "the newest complete checkpoint the job wrote (checkpoints of "
                                                      "another run are refused; `llmc run --resume` continues "
                                                      "them); the local scheduler does not restart "
                                                      "(TorchX's local scheduler has no retries).")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables of every process.")
    mounts: list[MountSpec] = Field(default_factory=list, description="Host paths mounted into the job.")
    out_dir: str = Field("runs", description="Where run directories are written (relative to the working directory).")
    cpus_per_node: int | None = Field(None, ge=1, description="CPUs requested per node (count); default from hardware.")
    memory_gb_per_node: int | None = Field(None, ge=1, description="Memory requested per node (GB); default from hardware.")

    @field_validator("name", "namespace")
    @classmethod
    def _name(cls, v: str) -> str:
        # Both name Kubernetes objects: an RFC 1123 label.
        if not _NAME.fullmatch(v):
            raise ValueError(f"expected lowercase letters, digits and '-', 1-63 characters, "
                             f"starting and ending alphanumeric, found {v!r}")
        return v

    @field_validator("image", "partition", "queue", "out_dir")
    @classmethod
    def _plain(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._/:@+-]*", v):
            raise ValueError(f"expected letters, digits and . _ / : @ + - only, found {v!r}")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        for k, v in env.items():
            if not _ENV_KEY.fullmatch(k):
                raise ValueError(f"environment variable names are [A-Za-z_][A-Za-z0-9_]*, found {k!r}")
            if not _SAFE_TEXT.fullmatch(v):
                raise ValueError(f"environment value of {k} contains a control character (e.g. a newline)")
        return env
