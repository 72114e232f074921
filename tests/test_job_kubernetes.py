"""Kubernetes: the Volcano Job llmc emits, field by field, and submission to a fake API server.

No API server can run here, so the contract is tested: TorchX's kubernetes scheduler talks to
kmock's Kubernetes emulator on 127.0.0.1 through the real `kubernetes` client and a kubeconfig.
"""

import asyncio
import json
import threading

import kmock
import pytest
import yaml

from llmc.compiler.job.appdef import RENDEZVOUS_SCRIPT
from slurm.llmc_cli import TINY, handle_of, llmc

# Two nodes of two CPU processes, with everything [job] can say.
SPEC = ["--set", "hardware.nodes=2", "--set", "hardware.gpus_per_node=2", "--set", "train.micro_batch_size=8",
        "--set", "train.global_batch_size=32",
        "--set", "job.image=registry.example/llmc:1.0", "--set", "job.queue=research",
        "--set", "job.cpus_per_node=4", "--set", "job.memory_gb_per_node=8", "--set", "job.env.FOO=bar baz",
        "--set", 'job.mounts=[{src="/mnt/shared", dst="/work"}]']
TORCHRUN = ["python", "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
            "--rdzv_backend", "c10d", "--rdzv_id"]   # then the app id, then the entry
ENTRY = ["-m", "llmc.runtime.entry", "--plan", "runs/tiny/job/plan.json", "--out", "runs/tiny"]


def check_volcano_job(job: dict) -> None:
    """What the Volcano Job for SPEC must say (independent of how llmc builds it)."""
    assert job["apiVersion"] == "batch.volcano.sh/v1alpha1" and job["kind"] == "Job"
    assert job["metadata"]["name"].startswith("tiny-")
    spec = job["spec"]
    assert spec["schedulerName"] == "volcano" and spec["queue"] == "research" and spec["maxRetry"] == 0
    tasks = spec["tasks"]
    assert [t["name"] for t in tasks] == ["tiny-0", "tiny-1"]        # one task per node
    assert [t["replicas"] for t in tasks] == [1, 1]
    app_id = job["metadata"]["name"]
    for i, task in enumerate(tasks):
        (container,) = task["template"]["spec"]["containers"]
        assert container["image"] == "registry.example/llmc:1.0"
        rank0 = "TORCHX_RANK0_HOST" if i == 0 else "VC_TINY_0_HOSTS"   # Volcano's host list of task 0
        assert container["command"] == (["bash", "-c", RENDEZVOUS_SCRIPT, "llmc-rendezvous", rank0, "29500"]
                                        + TORCHRUN + [app_id] + ENTRY)
        resources = container["resources"]
        assert resources["limits"] == {"cpu": "4000m", "memory": f"{8 * 1024}M"}
        cpu_request = int(resources["requests"]["cpu"].rstrip("m"))
        memory_request = int(resources["requests"]["memory"].rstrip("M"))
        assert 0 < cpu_request <= 4000 and 0 < memory_request <= 8 * 1024
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["FOO"] == "bar baz" and env["OMP_NUM_THREADS"] == "2"
        if i == 0:
            assert env["TORCHX_RANK0_HOST"] == "localhost"
        assert {"name": "c10d", "containerPort": 29500} in container["ports"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in task["template"]["spec"]["volumes"]}
        assert volumes[mounts["/work"]]["hostPath"]["path"] == "/mnt/shared"


def test_compiled_volcano_job(tmp_path):
    result = llmc("compile", TINY, "-o", "build", *SPEC, "--set", "job.scheduler=kubernetes", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # compile's paths point at its output folder; a run's at RUN_DIR/job.
    job = yaml.safe_load((tmp_path / "build" / "kubernetes.volcano.yaml").read_text())
    command = job["spec"]["tasks"][0]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--plan") + 1] == "build/plan.json"
    result = llmc("run", TINY, "--scheduler", "kubernetes", "--dryrun", *SPEC, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    check_volcano_job(yaml.safe_load(result.stdout.split("\n", 1)[1]))
    assert not (tmp_path / "runs").exists()   # a dry run submits and writes nothing


class FakeApiServer:
    """kmock's Kubernetes emulator on 127.0.0.1, served from a thread, answering creations with 201."""

    def __enter__(self):
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "the fake API server did not start"
        return self

    async def _serve(self):
        self._stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            # A real API server answers a creation with 201 and the object (the client expects both).
            emulator[kmock.action.CREATE] << 201 << (lambda request: request.data)
            self.emulator, self.url = emulator, str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def volcano_jobs(self) -> dict[str, dict]:
        return {key[2]: dict(obj) for key, obj in self.emulator.objects.items()
                if key[0].group == "batch.volcano.sh" and key[0].plural == "jobs" and not obj.deleted}


@pytest.fixture
def api_server(tmp_path):
    with FakeApiServer() as server:
        config = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
                  "clusters": [{"name": "fake", "cluster": {"server": server.url}}],
                  "users": [{"name": "fake", "user": {"token": "test"}}],
                  "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "default"}}]}
        (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
        yield server


def test_submit_to_kubernetes_through_torchx(tmp_path, api_server):
    env = {"KUBECONFIG": str(tmp_path / "kubeconfig")}
    result = llmc("run", TINY, "--scheduler", "kubernetes", "--no-follow", *SPEC, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    handle = handle_of(result.stdout, "kubernetes")
    (name, job), = api_server.volcano_jobs().items()
    assert handle == f"kubernetes://llmc/default:{name}"
    check_volcano_job(job)
    # The files the job reads were written where its command points (relative to the working dir).
    assert (tmp_path / "runs" / "tiny" / "job" / "plan.json").exists()

    result = llmc("cancel", handle, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert api_server.volcano_jobs() == {}


def test_unreachable_api_server_is_an_error_not_a_hang(tmp_path):
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "x",
              "clusters": [{"name": "x", "cluster": {"server": "http://127.0.0.1:9"}}],
              "users": [{"name": "x", "user": {"token": "t"}}],
              "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}]}
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    result = llmc("run", TINY, "--scheduler", "kubernetes", "--no-follow", *SPEC, cwd=tmp_path,
                  env={"KUBECONFIG": str(tmp_path / "kubeconfig")}, timeout=120)
    assert result.returncode == 1
    assert "error:" in result.stderr and "Traceback" not in result.stderr


def test_kubernetes_without_image_is_refused(tmp_path):
    result = llmc("run", TINY, "--scheduler", "kubernetes", "--dryrun", cwd=tmp_path)
    assert result.returncode == 1 and "job.image is empty" in result.stderr


def test_job_namespace_is_where_the_volcano_job_is_created(tmp_path, api_server):
    """job.namespace: the API server receives the creation in that namespace (not "default"), the
    handle names it, cancel deletes it there, and the compiled file says it for `kubectl create -f`."""
    env = {"KUBECONFIG": str(tmp_path / "kubeconfig")}
    in_research = [*SPEC, "--set", "job.namespace=ml-research"]
    result = llmc("run", TINY, "--scheduler", "kubernetes", "--no-follow", *in_research, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    ((resource, namespace, name), _), = [(key, obj) for key, obj in api_server.emulator.objects.items()
                                         if key[0].plural == "jobs" and not obj.deleted]
    assert namespace == "ml-research"
    assert handle_of(result.stdout, "kubernetes") == f"kubernetes://llmc/ml-research:{name}"
    # TorchX lists the context's namespace ("default"); llmc adds the jobs it submitted elsewhere,
    # with their run directory (the fake API server gives the job no phase: TorchX says UNKNOWN)
    listing = llmc("list", "--scheduler", "kubernetes", cwd=tmp_path, env=env)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines() == [f"kubernetes://llmc/ml-research:{name}\tUNKNOWN\t{tmp_path / 'runs' / 'tiny'}"]
    result = llmc("cancel", f"kubernetes://llmc/ml-research:{name}", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert api_server.volcano_jobs() == {}

    result = llmc("compile", TINY, "-o", "build", *in_research, "--set", "job.scheduler=kubernetes", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load((tmp_path / "build" / "kubernetes.volcano.yaml").read_text())["metadata"]["namespace"] \
        == "ml-research"


@pytest.mark.parametrize("namespace", ["ML", "research_team", "-ns", "ns-", "a" * 64, "", "ns\n"])
def test_job_namespace_must_be_an_rfc_1123_label(tmp_path, namespace):
    (tmp_path / "job.toml").write_text(f'extends = "{TINY}"\n\n[job]\nnamespace = {json.dumps(namespace)}\n')
    result = llmc("lint", "job.toml", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "job.toml:4: job.namespace: expected lowercase letters, digits and '-', 1-63 characters" in result.stdout
    assert f"found {namespace!r}" in result.stdout


def test_job_namespace_defaults_to_default():
    from llmc.compiler.spec.job import JobSpec
    assert JobSpec().namespace == "default"
    assert JobSpec(namespace="a" * 63).namespace == "a" * 63


# TorchX's UserWarning for a Volcano Job with retries, which Python printed over four lines with
# TorchX's file and source line; what llmc says instead, once per command, in one line.
VOLCANO_RETRIES_WARNING = ("warning: TorchX: Role tiny configured with restarts: 2. As of 1.4.0 Volcano does NOT "
                           "support retries correctly. More info: https://github.com/volcano-sh/volcano/issues/1651")


def warning_lines(stderr: str) -> list[str]:
    assert "UserWarning" not in stderr and "warnings.warn" not in stderr and ".py:" not in stderr, stderr
    return [line for line in stderr.splitlines() if "Volcano" in line]


def test_volcano_retries_warning_is_one_line(tmp_path, api_server):
    retries = [*SPEC, "--set", "job.retries=2"]   # two nodes: TorchX warns for each of the two tasks
    result = llmc("compile", TINY, "-o", "build", *retries, "--set", "job.scheduler=kubernetes", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert warning_lines(result.stderr) == [VOLCANO_RETRIES_WARNING]
    result = llmc("run", TINY, "--scheduler", "kubernetes", "--dryrun", *retries, cwd=tmp_path)
    assert result.returncode == 0 and warning_lines(result.stderr) == [VOLCANO_RETRIES_WARNING], result.stderr
    # compiled, then submitted (TorchX builds the Volcano Job again): said once
    result = llmc("run", TINY, "--scheduler", "kubernetes", "--no-follow", *retries, cwd=tmp_path,
                  env={"KUBECONFIG": str(tmp_path / "kubeconfig")})
    assert result.returncode == 0 and warning_lines(result.stderr) == [VOLCANO_RETRIES_WARNING], result.stderr
    (job,) = api_server.volcano_jobs().values()
    assert job["spec"]["maxRetry"] == 2


def test_volcano_retries_warning_only_for_a_kubernetes_job_with_retries(tmp_path):
    result = llmc("compile", TINY, "-o", "build", *SPEC, "--set", "job.scheduler=kubernetes", cwd=tmp_path)
    assert result.returncode == 0 and warning_lines(result.stderr) == [], result.stderr   # no retries
    # A Slurm job (job.image its working folder) with retries: the Volcano Job is compiled beside it.
    slurm_job = ["--set", "job.retries=2", "--set", f"job.image={tmp_path}", "--set", "job.scheduler=slurm"]
    result = llmc("compile", TINY, "-o", "build", *slurm_job, cwd=tmp_path)
    assert result.returncode == 0 and (tmp_path / "build" / "kubernetes.volcano.yaml").is_file(), result.stderr
    assert warning_lines(result.stderr) == [], result.stderr


def test_other_warnings_are_shown_as_ever(capsys):
    import warnings

    from llmc.compiler.job.schedulers import volcano_retries_warning
    with pytest.warns(DeprecationWarning, match="something else") as shown:
        with volcano_retries_warning(shown=True):
            warnings.warn("\nRole r configured with restarts: 1. As of 1.4.0 Volcano\n"
                          "does NOT support retries correctly. More info: https://example/1\n    ")
            warnings.warn("something else", DeprecationWarning)
    assert [str(w.message) for w in shown] == ["something else"]
    assert capsys.readouterr().err == ("warning: TorchX: Role r configured with restarts: 1. As of 1.4.0 Volcano "
                                       "does NOT support retries correctly. More info: https://example/1\n")
