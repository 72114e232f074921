"""A throw-away one-node Slurm cluster on 127.0.0.1 (munge, MariaDB, slurmdbd, slurmctld, slurmd).

Runs as root without systemd or cgroups: every daemon runs in the foreground as a child of this
process, with its state, sockets and logs in one temporary folder, and is ended by its PID.
Clients (sbatch, sacct, ...) find the cluster through `env()` (SLURM_CONF).
"""

from __future__ import annotations

import os
import shutil
import socket
import string
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).parent
BINARIES = ["munged", "mungekey", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd",
            "sbatch", "sacct", "sinfo", "scancel"]


def missing_binaries() -> list[str]:
    """The cluster's programs that are not installed (.ci/install-slurm.sh installs them)."""
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurmCluster:
    """`with LocalSlurmCluster(tmp) as cluster:` starts the daemons; leaving stops them by PID."""

    def __init__(self, root: Path, cpus: int = 2, memory_mb: int = 4096) -> None:
        self.root = Path(root)
        self.state, self.logs = self.root / "state", self.root / "logs"
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.sock"
        self.cpus, self.memory_mb = cpus, memory_mb
        self.procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "LocalSlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """The environment of a Slurm client of this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        for d in (self.state / "ctld", self.state / "slurmd", self.logs, self.munge_socket.parent):
            d.mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._start_mariadb()
        ports = {"ctld_port": _free_port(), "slurmd_port": _free_port(), "dbd_port": _free_port()}
        values = dict(ports, state=self.state, logs=self.logs, munge_socket=self.munge_socket,
                      db_port=self.db_port, node="llmcnode", hostname=socket.gethostname(),
                      cpus=self.cpus, memory_mb=self.memory_mb)
        self._render("slurm.conf.in", self.conf, values)
        dbd_conf = self.root / "slurmdbd.conf"
        self._render("slurmdbd.conf.in", dbd_conf, values)
        dbd_conf.chmod(0o600)   # slurmdbd refuses a readable config (it holds the DB password)

        self._spawn("slurmdbd", [_which("slurmdbd"), "-D"])   # reads slurmdbd.conf beside SLURM_CONF
        self._wait_port(ports["dbd_port"], "slurmdbd")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait_port(ports["ctld_port"], "slurmctld")
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", "llmcnode", "-f", str(self.conf)])
        self._wait(lambda: "idle" in self._run(["sinfo", "--noheader", "-o", "%t"]).stdout,
                   "the node to become idle", "slurmd")

    def stop(self) -> None:
        """End every daemon this cluster started, newest first, by PID."""
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self.procs.clear()

    # ------------------------------------------------------------------ daemons

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        subprocess.run([_which("mungekey"), "--create", "--keyfile", str(key)], check=True, capture_output=True)
        key.chmod(0o400)
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--key-file={key}",
                               f"--socket={self.munge_socket}", f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                               f"--log-file={self.logs / 'munged.log'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
        self._wait(self.munge_socket.exists, "the munge socket", "munged")

    def _start_mariadb(self) -> None:
        data = self.root / "mysql"
        subprocess.run([_which("mariadb-install-db"), f"--datadir={data}", "--user=root",
                        "--auth-root-authentication-method=normal", "--skip-test-db"],
                       check=True, capture_output=True)
        self.db_port = _free_port()
        self._spawn("mariadbd", [_which("mariadbd"), "--no-defaults", f"--datadir={data}", "--user=root",
                                 "--bind-address=127.0.0.1", f"--port={self.db_port}",
                                 f"--socket={self.root / 'mysql.sock'}", f"--pid-file={self.root / 'mysql.pid'}",
                                 "--skip-grant-tables", "--innodb-buffer-pool-size=16M",
                                 f"--log-error={self.logs / 'mariadb.log'}"])
        self._wait_port(self.db_port, "mariadbd")

    # ------------------------------------------------------------------ helpers

    def _render(self, template: str, dest: Path, values: dict) -> None:
        text = string.Template((HERE / template).read_text()).substitute({k: str(v) for k, v in values.items()})
        dest.write_text(text)

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = (self.logs / f"{name}.stdout").open("wb")
        self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env(), cwd=self.root)

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=60)

    def _wait_port(self, port: int, name: str) -> None:
        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        self._wait(listening, f"port {port}", name)

    def _wait(self, ready, what: str, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}) before {what}:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what} ({name}):\n{self.log_tail(name)}")
            time.sleep(0.2)

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The end of a daemon's log files (for failure messages)."""
        text = []
        for path in sorted(self.logs.glob(f"{name}*")):
            text += [f"== {path.name}"] + path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(text)
