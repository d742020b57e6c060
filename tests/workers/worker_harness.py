"""Real Celery workers for tests: an isolated deployment (own SQLite job database, own queues,
own Redis key prefix or embedded broker) and worker subprocesses that can be killed.

Used by tests/workers and reusable by the HTTP tests:

    deployment = Deployment.create(tmp_path, broker="redis")
    worker = deployment.start_worker()
    job = deployment.store.create_job("train", config)
    submit_job(job.id, store=deployment.store, app=deployment.app)
    deployment.wait_for_state(job.id, {"succeeded"}, timeout_s=120)
    worker.stop(); deployment.close()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import psutil
import redis

from workers.celery_app import create_app
from workers.db import Job, JobStore, upgrade_database
from workers.settings import Settings

REDIS_URL = os.environ.get("W2S_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

# Short leases and intervals so that recovery happens within seconds in tests.
FAST_SETTINGS: dict[str, Any] = {
    "lease_s": 6.0,
    "heartbeat_s": 1.0,
    "reaper_interval_s": 1.0,
    "progress_interval_s": 0.5,
    "cancel_check_s": 0.5,
    "max_attempts": 3,
    "retry_backoff_s": 1.0,
    "task_time_limit_s": 900,
    "task_kill_grace_s": 30,
    "visibility_timeout_s": 3600,
}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on at the moment of the call."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RedisServer:
    """A `redis-server` subprocess of one test, on its own port and without persistence.

    Fault tests stop and restart it; they never touch a Redis they did not start. Because it keeps
    no data on disk, a restart loses every message that was in it, which is the worst case for
    the job system.
    """

    port: int
    root: Path
    popen: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start_new(cls, root: Path) -> "RedisServer":
        root.mkdir(parents=True, exist_ok=True)
        server = cls(port=free_port(), root=root)
        server.start()
        return server

    def start(self, timeout_s: float = 15.0) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed; the fault tests start their own Redis server")
        log = open(self.root / f"redis-{self.port}.log", "ab")
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.root)]
        self.popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited with {self.popen.returncode}")
            if redis_available(self.url):
                return
            time.sleep(0.1)
        raise TimeoutError(f"redis-server on port {self.port} did not answer within {timeout_s} s")

    def stop(self) -> None:
        """Stop this server (SIGTERM, then SIGKILL after 10 s) by its process id."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


def redis_available(url: str = REDIS_URL) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


def settings_env(settings: Settings) -> dict[str, str]:
    """Render settings as the W2S_ environment variables a worker subprocess reads."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        env[f"W2S_{name.upper()}"] = str(value)
    return env


@dataclass
class WorkerProcess:
    """A `celery worker` subprocess (prefork pool, one process) and its log file."""

    popen: subprocess.Popen
    log_path: Path
    name: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "started: queues" in self.log_text() and self.pool_pids():
                return
            if self.popen.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited with {self.popen.returncode}:\n{self.log_text()[-4000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"worker {self.name} not ready after {timeout_s} s:\n{self.log_text()[-4000:]}")

    def pool_pids(self) -> list[int]:
        try:
            return [child.pid for child in psutil.Process(self.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def kill_pool_process(self) -> int:
        """SIGKILL the pool process that runs the job; return its pid."""
        pids = self.pool_pids()
        if len(pids) != 1:
            raise RuntimeError(f"expected one pool process under worker {self.pid}, found {pids}")
        os.kill(pids[0], signal.SIGKILL)
        return pids[0]

    def kill_main(self) -> None:
        """SIGKILL the main worker process (its pool process dies with it through PDEATHSIG)."""
        pool = self.pool_pids()
        os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)
        _wait_gone(pool, timeout_s=10)

    def stop(self, timeout_s: float = 20.0) -> None:
        """Warm shutdown with SIGTERM; SIGKILL whatever is still alive after `timeout_s`."""
        if self.popen.poll() is not None:
            return
        pool = self.pool_pids()
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)
        for pid in pool:
            if psutil.pid_exists(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _wait_gone(pids: Iterable[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.1)


@dataclass
class Deployment:
    """One isolated job system: settings, job store, a Celery app to submit with, and its workers."""

    root: Path
    settings: Settings
    store: JobStore
    app: Any
    workers: list[WorkerProcess] = field(default_factory=list)

    @classmethod
    def create(cls, root: Path, *, broker: str = "redis", **overrides: Any) -> "Deployment":
        """Create the folders, database and settings; `broker` is 'redis' or 'embedded'."""
        tag = uuid.uuid4().hex[:10]
        root.mkdir(parents=True, exist_ok=True)
        values: dict[str, Any] = dict(FAST_SETTINGS)
        values.update(
            var_dir=root / "var",
            database_url=f"sqlite:///{root / 'jobs.sqlite'}",
            artifact_root=str(root / "artifacts"),
            gpu_queue=f"gpu-{tag}",
            cpu_queue=f"cpu-{tag}",
        )
        if broker == "redis":
            values.update(broker_url=REDIS_URL, redis_key_prefix=f"w2s-test-{tag}:")
        elif broker != "embedded":
            raise ValueError(f"unknown broker {broker!r}; expected 'redis' or 'embedded'")
        values.update(overrides)
        settings = Settings(**values)
        upgrade_database(settings.resolved_database_url)
        store = JobStore(settings.resolved_database_url, settings)
        app = create_app(settings, set_as_current=False)
        return cls(root=root, settings=settings, store=store, app=app)

    def start_worker(self, name: str | None = None, *, wait: bool = True, extra_env: dict[str, str] | None = None) -> WorkerProcess:
        name = name or f"w{len(self.workers) + 1}"
        log_path = self.root / f"worker-{name}-{len(self.workers)}.log"

        env = {key: value for key, value in os.environ.items() if not key.startswith("W2S_")}
        env.update(settings_env(self.settings))
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra_env or {})

        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.celery_app",
            "worker",
            f"--queues={self.settings.gpu_queue},{self.settings.cpu_queue}",
            "--concurrency=1",
            "--prefetch-multiplier=1",
            "--loglevel=INFO",
            f"--hostname={name}-{uuid.uuid4().hex[:6]}@%h",
            "--without-gossip",
            "--without-mingle",
        ]
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT)
        worker = WorkerProcess(popen=popen, log_path=log_path, name=name)
        self.workers.append(worker)

        if wait:
            worker.wait_ready()
        return worker

    def wait_for(self, job_id: str, predicate: Callable[[Job], bool], *, timeout_s: float, description: str) -> Job:
        deadline = time.monotonic() + timeout_s
        job = self.store.get_job(job_id)
        while time.monotonic() < deadline:
            job = self.store.get_job(job_id)
            if predicate(job):
                return job
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} did not reach '{description}' in {timeout_s} s; last row: {job.to_dict()}\n{self.worker_logs()}")

    def wait_for_state(self, job_id: str, states: set[str], *, timeout_s: float) -> Job:
        return self.wait_for(job_id, lambda job: job.state in states, timeout_s=timeout_s, description=f"state in {sorted(states)}")

    def worker_logs(self, tail: int = 6000) -> str:
        return "\n".join(f"--- {worker.log_path.name} ---\n{worker.log_text()[-tail:]}" for worker in self.workers)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        if self.settings.broker_url and redis_available(self.settings.broker_url):
            client = redis.Redis.from_url(self.settings.broker_url)
            keys = list(client.scan_iter(match=f"{self.settings.redis_key_prefix}*"))
            if keys:
                client.delete(*keys)
