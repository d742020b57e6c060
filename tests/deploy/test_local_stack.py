"""Run the compose services' commands as local processes through a pipeline and a scoring request.

The migrate, api, worker-cpu and scorer-cpu services of docker-compose.yml start with the argv
of their `command`. Only what Docker would supply is replaced:

- `--host 0.0.0.0` becomes 127.0.0.1 and each `--port` a free local port, because Compose
  publishes the container ports on the loopback address.
- The environment is the container's: `.env.example` as the env_file, then the service's
  `environment`. Values that name a container mount point move to a local folder: a temporary
  artifact folder, the shared data folder and the prepared models. The database and broker URLs
  point at a new PostgreSQL database (dropped afterwards) and the local Redis under a key prefix
  of this test.

The Compose healthchecks decide when the services are ready. Needs Redis on 127.0.0.1:6379 and
PostgreSQL on 127.0.0.1:5432 (W2S_TEST_REDIS_URL and W2S_TEST_POSTGRES_URL override them). Trains
MiniLM on 16 prompts on the CPU: about 95 s in all on 2 shared CPU cores.
"""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import httpx
import pytest
import redis
import yaml
from sqlalchemy import create_engine, text

from tests.app.conftest import SOURCE, pipeline_request
from tests.conftest import MODELS_DIR
from tests.workers.conftest import postgres_url  # noqa: F401  (fixture: new database, dropped afterwards)
from tests.workers.worker_harness import REDIS_URL, WorkerProcess, redis_available

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

# The images copy these repository files to /opt/w2s, where the compose healthchecks run them.
CONTAINER_FILES = {"/opt/w2s/healthcheck.py": ROOT / "docker" / "healthcheck.py"}
# Services of the "cpu" profile. The "worker" and "scorer" services of the "gpu" profile run the
# same commands, which the test asserts.
CPU_SERVICES = {"worker": "worker-cpu", "scorer": "scorer-cpu"}
# Compose services that the application reaches by host name inside the compose network.
STORE_HOSTS = ("postgres", "redis")

MINILM = "all-MiniLM-L6-v2"
START_TIMEOUT_S = 180
# Several times the pipeline's run time here (about a minute on 2 shared CPU cores), for busier machines.
PIPELINE_TIMEOUT_S = 300
TERMINAL_STATES = {"succeeded", "failed", "cancelled"}
ALIAS = "deploy-test"

INTERPOLATION = re.compile(
    r"""
    \$\$                                                   # escaped dollar
    | \$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)                # ${NAME
      (?:(?P<operator>:?[-?])(?P<argument>[^}]*))?\}       #   :-default, -default, :?error, ?error }
    | \$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)                   # $NAME
    """,
    re.VERBOSE,
)


# --- Reading the compose file -------------------------------------------------------------------


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Substitute ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error} and $NAME as Compose does.

    `$$` becomes a literal `$`, which the container's shell then expands.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        operator = match.group("operator")
        argument = match.group("argument") or ""
        current = variables.get(name)
        # With a colon, an empty variable counts as unset.
        if operator and operator.startswith(":") and current == "":
            current = None
        if current is not None:
            return current
        if operator in (":?", "?"):
            raise ValueError(f"compose variable {name} is required but not set: {argument}")
        if operator in (":-", "-"):
            return argument
        return ""

    return INTERPOLATION.sub(replace, value)


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a Compose env file: NAME=VALUE lines, with comments and blank lines skipped."""
    variables: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, separator, value = line.partition("=")
        if not separator:
            raise ValueError(f"{path}:{number}: expected NAME=VALUE, got {line!r}")
        variables[name.strip()] = value
    return variables


def service_command(service: dict[str, Any], dotenv: Mapping[str, str]) -> list[str]:
    command = service["command"]
    assert isinstance(command, list), f"command {command!r} is not in exec form (a list), so its argv depends on a shell"
    return [interpolate(str(part), dotenv) for part in command]


def container_environment(service: dict[str, Any], dotenv: Mapping[str, str]) -> dict[str, str]:
    """Return the variables Compose gives the container: the env_file, then `environment` on top."""
    env: dict[str, str] = {}
    env_files = service.get("env_file") or []
    env_files = [env_files] if isinstance(env_files, str) else env_files
    # A deployment creates .env by copying .env.example.
    assert env_files in ([], [".env"]), f"unexpected env_file {env_files!r}; this test maps only .env to .env.example"
    if env_files:
        env.update(dotenv)

    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(entry.split("=", 1) for entry in environment)
    for name, value in environment.items():
        assert not isinstance(value, bool), f"environment {name}: unquoted YAML boolean {value!r}; compose rejects it, quote it"
        env[name] = interpolate(str(value), dotenv)
    return env


def volume_targets(service: dict[str, Any]) -> set[str]:
    """Return the container paths of the service's volumes ("name:/path" or "name:/path:ro")."""
    return {entry.split(":")[1] for entry in service.get("volumes") or []}


def bind_locally(command: list[str], port: int) -> tuple[list[str], int]:
    """Set the value after --host to 127.0.0.1 and after --port to `port`, and return the argv with the container port."""
    local = list(command)
    for flag in ("--host", "--port"):
        assert flag in local, f"{flag} missing in {command}; the test binds the server through it"
    host_index = local.index("--host") + 1
    port_index = local.index("--port") + 1
    container_port = int(local[port_index])
    local[host_index] = "127.0.0.1"
    local[port_index] = str(port)
    return local, container_port


def local_healthcheck(service: dict[str, Any], dotenv: Mapping[str, str], ports: Mapping[int, int]) -> list[str]:
    """Return the service's healthcheck as a local argv: repository scripts and local ports."""
    test = [interpolate(str(part), dotenv) for part in service["healthcheck"]["test"]]
    kind, argv = test[0], test[1:]
    if kind == "CMD-SHELL":
        argv = ["sh", "-c", " ".join(argv)]
    else:
        assert kind == "CMD", f"unexpected healthcheck form {kind!r} in {test}"
    argv = [str(CONTAINER_FILES.get(part, part)) for part in argv]
    for container_port, local_port in ports.items():
        argv = [part.replace(f"127.0.0.1:{container_port}/", f"127.0.0.1:{local_port}/") for part in argv]
        # Without the replacement the check would reach whatever else listens on the container port.
        assert any(f"127.0.0.1:{local_port}/" in part for part in argv), f"healthcheck {test} names no URL on port {container_port}"
    return argv


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- The local stack ------------------------------------------------------------------------------


@dataclass
class LocalStack:
    """The compose services of one deployment as local processes, with their environment and logs."""

    root: Path
    services: dict[str, dict[str, Any]]
    dotenv: dict[str, str]
    mounts: dict[str, Path]
    overrides: dict[str, str]
    base_env: dict[str, str]
    processes: dict[str, WorkerProcess] = field(default_factory=dict)

    def environment(self, name: str) -> dict[str, str]:
        """Return the process environment of service `name`: the container's variables, mapped to this host."""
        env = dict(self.base_env)
        for key, value in container_environment(self.services[name], self.dotenv).items():
            for target, local in self.mounts.items():
                if value == target or value.startswith(target + "/"):
                    value = str(local) + value[len(target) :]
            env[key] = value
        env.update(self.overrides)
        return env

    def run_once(self, name: str, argv: list[str], timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, cwd=self.root / "home", env=self.environment(name), capture_output=True, text=True, timeout=timeout_s
        )

    def start(self, name: str, argv: list[str]) -> WorkerProcess:
        log_path = self.root / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(argv, cwd=self.root / "home", env=self.environment(name), stdout=log, stderr=subprocess.STDOUT)
        process = WorkerProcess(popen=popen, log_path=log_path, name=name)
        self.processes[name] = process
        return process

    def wait_healthy(self, name: str, healthcheck: list[str], timeout_s: float = START_TIMEOUT_S) -> None:
        """Run the healthcheck once a second until it exits 0.

        Raises RuntimeError when the process exits first and TimeoutError when `timeout_s` runs out.
        """
        process = self.processes[name]
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.run_once(name, healthcheck, timeout_s=60)
            if result.returncode == 0:
                return
            if process.popen.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.popen.returncode} before its healthcheck passed:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{name}: healthcheck {healthcheck} still failing after {timeout_s} s "
                    f"({(result.stdout + result.stderr).strip()[-500:]}):\n{self.logs()}"
                )
            time.sleep(1.0)

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(f"--- {name} ---\n{process.log_text()[-tail:]}" for name, process in self.processes.items())

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop()


@pytest.fixture
def stack(tmp_path: Path, shared_data: Path, postgres_url: str) -> Iterator[LocalStack]:  # noqa: F811
    if not redis_available():
        pytest.fail(f"Redis at {REDIS_URL} is not reachable; this test needs it (set W2S_TEST_REDIS_URL)")
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    (tmp_path / "home").mkdir()
    mounts = {
        "/artifacts": tmp_path / "artifacts",
        "/data": shared_data,
        "/models": MODELS_DIR,
        "/cache": tmp_path / "cache",
    }
    key_prefix = f"w2s-deploy-test-{uuid.uuid4().hex[:10]}:"
    overrides = {
        "W2S_DATABASE_URL": postgres_url,
        "W2S_BROKER_URL": REDIS_URL,
        "W2S_REDIS_KEY_PREFIX": key_prefix,
    }
    base_env = {key: value for key, value in os.environ.items() if not key.startswith("W2S_")}
    # The images put their virtual environment first on PATH, so `w2s`, `uvicorn`, `celery` and
    # `python` in the compose commands are the project's. The images also set PYTHONUNBUFFERED=1.
    # Docker sets HOSTNAME, which the worker healthcheck uses for Celery's node name.
    base_env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
        HOSTNAME=socket.gethostname(),
    )
    local = LocalStack(
        root=tmp_path,
        services=compose["services"],
        dotenv=read_env_file(ENV_EXAMPLE),
        mounts=mounts,
        overrides=overrides,
        base_env=base_env,
    )
    try:
        yield local
    finally:
        local.stop()
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{key_prefix}*"))
        if keys:
            client.delete(*keys)


# --- Test -------------------------------------------------------------------------------------------


def test_compose_commands_run_pipeline_and_scoring(stack: LocalStack, postgres_url: str) -> None:  # noqa: F811
    services = stack.services
    dotenv = stack.dotenv
    for gpu_name, cpu_name in CPU_SERVICES.items():
        assert service_command(services[gpu_name], dotenv) == service_command(services[cpu_name], dotenv)

    # Every mount point and store host that the app services see must have a local counterpart.
    used = ["migrate", "api", *CPU_SERVICES.values()]
    for name in used:
        assert volume_targets(services[name]) <= set(stack.mounts), f"{name} mounts a volume this test does not map"
        for key, value in stack.environment(name).items():
            for host in STORE_HOSTS:
                assert f"@{host}:" not in value, f"{name}: {key}={value} still names the container host {host}"
                assert f"//{host}:" not in value, f"{name}: {key}={value} still names the container host {host}"

    # migrate: the one-shot schema upgrade. It runs twice, because every `docker compose up` runs it
    # again on a database that is already current.
    migrate = service_command(services["migrate"], dotenv)
    for attempt in (1, 2):
        result = stack.run_once("migrate", migrate)
        assert result.returncode == 0, f"{migrate} failed on run {attempt}:\n{result.stdout}\n{result.stderr}"
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()

    # An operator key, created in the api container's environment.
    created = stack.run_once("api", ["w2s", "keys", "create", "--name", "deploy-test", "--scopes", "jobs,models,score"])
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {key}"}

    # api, worker and scorer start together, as Compose starts them once migrate has exited.
    api_port, scorer_port = free_port(), free_port()
    api_command, api_container_port = bind_locally(service_command(services["api"], dotenv), api_port)
    scorer_command, scorer_container_port = bind_locally(service_command(services["scorer-cpu"], dotenv), scorer_port)
    stack.start("api", api_command)
    stack.start("worker-cpu", service_command(services["worker-cpu"], dotenv))
    stack.start("scorer-cpu", scorer_command)

    stack.wait_healthy("api", local_healthcheck(services["api"], dotenv, {api_container_port: api_port}))
    stack.processes["worker-cpu"].wait_ready(timeout_s=START_TIMEOUT_S)
    stack.wait_healthy("worker-cpu", local_healthcheck(services["worker-cpu"], dotenv, {}))
    stack.wait_healthy("scorer-cpu", local_healthcheck(services["scorer-cpu"], dotenv, {scorer_container_port: scorer_port}))

    api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers=headers, timeout=30, trust_env=False)
    scorer = httpx.Client(base_url=f"http://127.0.0.1:{scorer_port}", timeout=120, trust_env=False)
    with api, scorer:
        # Pipeline: model and data named by paths inside W2S_MODEL_DIR and W2S_DATA_DIR.
        base = api.post("/v1/models", json={"name": "minilm", "path": MINILM})
        assert base.status_code == 201, base.text
        request = pipeline_request(f"genies/{SOURCE}/train.json.gz", f"model:{base.json()['id']}")
        request["config"]["name"] = "deploy-test"
        request["config"]["source"].update(max_train_prompts=16, max_test_prompts=8)
        request["config"]["targets"][0]["max_test_prompts"] = 8
        submitted = api.post("/v1/jobs", json=request)
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]

        deadline = time.monotonic() + PIPELINE_TIMEOUT_S
        job = submitted.json()
        while job["state"] not in TERMINAL_STATES and time.monotonic() < deadline:
            time.sleep(2.0)
            response = api.get(f"/v1/jobs/{job_id}")
            assert response.status_code == 200, response.text
            job = response.json()
        assert job["state"] == "succeeded", f"pipeline {job_id} is {job['state']} (error {job.get('error')}):\n{stack.logs()}"
        assert [stage["state"] for stage in job["stages"]] == ["succeeded"] * len(job["stages"])
        assert job["stages"], job

        # Report files: written under the local W2S_ARTIFACT_ROOT and served by the API.
        files = job["outputs"]["report"]["report"]
        assert {"json", "markdown", "accuracy_plot", "drift_plot"} <= set(files), files
        artifact_root = stack.mounts["/artifacts"].resolve()
        for kind, path in files.items():
            path = Path(path)
            assert path.is_file(), f"report file {kind} missing at {path}"
            assert path.stat().st_size > 0, f"report file {kind} is empty: {path}"
            assert path.resolve().is_relative_to(artifact_root), f"report file {kind} outside {artifact_root}: {path}"
        report = api.get(f"/v1/jobs/{job_id}/report")
        assert report.status_code == 200, report.text
        assert report.json()
        markdown = api.get(f"/v1/jobs/{job_id}/report", params={"format": "markdown"})
        assert markdown.status_code == 200, markdown.text
        assert "anchored" in markdown.text

        # Scoring: the trained arm, through an alias, on the scorer service.
        trained = api.get("/v1/models", params={"name": "anchored"}).json()["items"]
        assert len(trained) == 1, trained
        model_id = trained[0]["id"]
        alias = api.put(f"/v1/models/aliases/{ALIAS}", json={"model_id": model_id})
        assert alias.status_code == 200, alias.text

        score_request = {
            "model": ALIAS,
            "items": [
                {"prompt": "Who was the first president of the United States?", "response": "George Washington."},
                {
                    "messages": [
                        {"role": "user", "content": "Who was the first president of the United States?"},
                        {"role": "assistant", "content": "Abraham Lincoln."},
                    ]
                },
            ],
        }
        anonymous = scorer.post("/v1/score", json=score_request)
        assert anonymous.status_code == 401, anonymous.text
        scored = scorer.post("/v1/score", json=score_request, headers=headers)
        assert scored.status_code == 200, f"{scored.text}\n{stack.logs()}"
        body = scored.json()
        assert body["model"] == model_id
        # With W2S_SCORING_MAX_LENGTH unset, the scorer uses the model's training max_length.
        assert body["max_length"] == request["config"]["student"]["max_length"]
        assert len(body["items"]) == 2
        for item in body["items"]:
            assert math.isfinite(item["reward"]), item
            assert item["tokens"] > 0, item
            assert item["truncated"] is False, item

    for name, process in stack.processes.items():
        assert process.popen.poll() is None, f"{name} exited with {process.popen.returncode}:\n{stack.logs()}"
