"""Outages of the broker and the job database, seen through the HTTP APIs.

Each test starts its own `redis-server` on a free port (tests/workers/worker_harness.py), its own
worker subprocesses and, where a process must survive, its own uvicorn server, and stops only
those by process id. The unavailable PostgreSQL is a URL on a free port where nothing listens,
so the shared PostgreSQL server is never contacted.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from app.auth import create_api_key
from app.main import create_app
from tests.conftest import MODELS_DIR
from tests.workers.worker_harness import Deployment, RedisServer, free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MINILM = "all-MiniLM-L6-v2"
SOURCE_TEST = "genies/us_history_textbook/test.json.gz"
SOURCE_TRAIN = "genies/us_history_textbook/train.json.gz"
FINAL_STATES = {"succeeded", "failed", "cancelled"}


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


def evaluate_request(max_test_prompts: int = 4) -> dict[str, Any]:
    """A small evaluate job: untrained MiniLM on a few prompts of one GENIES test split."""
    return {
        "type": "evaluate",
        "config": {
            "name": "fault-eval",
            "models": {"minilm": MINILM},
            "source": {"name": "us_history_textbook", "test": SOURCE_TEST, "max_test_prompts": max_test_prompts},
            "eval": {"max_length": 64, "batch_size": 32, "bootstrap_samples": 100, "precision": "fp32"},
        },
    }


def train_request(data: str, max_steps: int) -> dict[str, Any]:
    return {
        "type": "train",
        "config": {
            "data": data,
            "labels": "gold",
            "name": "during-outage",
            "student": {"model": MINILM, "max_steps": max_steps, "batch_size": 8, "max_length": 64, "precision": "fp32", "save_steps": 4},
        },
    }


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer.start_new(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


# --- Broker stopped and restarted ------------------------------------------------------------------


def _submit_until_accepted(client: TestClient, headers: dict[str, str], timeout_s: float) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    while True:
        response = client.post("/v1/jobs", json=evaluate_request(), headers=headers)
        if response.status_code == 202 or time.monotonic() - started > timeout_s:
            return response, time.monotonic() - started
        time.sleep(1)


def test_redis_restart_loses_no_job(tmp_path: Path, shared_data: Path, own_redis: RedisServer) -> None:
    """Redis stops while one job runs and three wait; none is lost, submits get 503, scoring goes on."""
    from app.scoring_main import create_app as create_scoring_app

    deployment = Deployment.create(
        tmp_path / "deployment",
        broker="redis",
        broker_url=own_redis.url,
        data_dir=shared_data,
        model_dir=MODELS_DIR,
        resend_lost_after_s=3.0,
        scoring_precision="fp32",
    )
    store = deployment.store
    _, user_key = create_api_key(store, "user", ["jobs"])
    _, modeller_key = create_api_key(store, "modeller", ["models"])
    _, score_key = create_api_key(store, "scorer", ["score"])
    user = {"Authorization": f"Bearer {user_key}"}
    score_headers = {"Authorization": f"Bearer {score_key}"}
    score_body = {"model": "minilm", "items": [{"prompt": "Name a prime number.", "response": "7"}]}

    worker = deployment.start_worker()
    jobs_app = create_app(deployment.settings, celery=deployment.app, store=store)
    scoring_app = create_scoring_app(deployment.settings, store=store)
    try:
        with TestClient(jobs_app) as api, TestClient(scoring_app) as scorer:
            registered = api.post("/v1/models", json={"name": "minilm", "path": MINILM}, headers={"Authorization": f"Bearer {modeller_key}"})
            assert registered.status_code == 201, registered.text
            alias = api.put("/v1/models/aliases/minilm", json={"model_id": registered.json()["id"]}, headers={"Authorization": f"Bearer {modeller_key}"})
            assert alias.status_code == 200, alias.text
            before = scorer.post("/v1/score", json=score_body, headers=score_headers)
            assert before.status_code == 200, before.text

            train_slice = tmp_path / "train_24.json"
            train_slice.write_text(json.dumps(json.loads(gzip.open(shared_data / SOURCE_TRAIN).read())[:24]))
            with train_slice.open("rb") as file:
                uploaded = api.post("/v1/datasets", files={"file": (train_slice.name, file)}, headers=user)
            assert uploaded.status_code == 201, uploaded.text

            running = api.post("/v1/jobs", json=train_request(uploaded.json()["reference"], max_steps=12), headers=user)
            assert running.status_code == 202, running.text
            waiting = [api.post("/v1/jobs", json=evaluate_request(), headers=user) for _ in range(3)]
            assert [response.status_code for response in waiting] == [202, 202, 202], [r.text for r in waiting]
            job_ids = [running.json()["id"]] + [response.json()["id"] for response in waiting]
            deployment.wait_for(
                job_ids[0], lambda row: row.state == "running" and (row.progress_step or 0) >= 1, timeout_s=300, description="training"
            )
            assert all(store.get_job(job_id).state == "queued" for job_id in job_ids[1:])

            own_redis.stop()

            started = time.monotonic()
            rejected = api.post("/v1/jobs", json=evaluate_request(), headers=user)
            rejected_after_s = time.monotonic() - started
            assert rejected.status_code == 503, rejected.text
            error = _error(rejected)
            assert error["code"] == "broker_unavailable"
            assert f"the broker at {own_redis.url} is unreachable" in error["message"]
            assert rejected.headers["retry-after"] == "30"
            # The rejected job left no row behind.
            assert api.get("/v1/jobs", headers=user).json()["total"] == 4

            ready = api.get("/v1/health/ready", headers=user)
            assert ready.status_code == 503
            assert _error(ready)["field"] == "broker"

            # Scoring a loaded model needs no broker.
            during = scorer.post("/v1/score", json=score_body, headers=score_headers)
            assert during.status_code == 200, during.text
            assert during.json()["items"][0]["reward"] == pytest.approx(before.json()["items"][0]["reward"], abs=1e-5)

            own_redis.start()

            accepted, recovered_after_s = _submit_until_accepted(api, user, timeout_s=60)
            assert accepted.status_code == 202, accepted.text
            job_ids.append(accepted.json()["id"])
            assert api.get("/v1/health/ready", headers=user).status_code == 200

            for job_id in job_ids:
                done = deployment.wait_for_state(job_id, FINAL_STATES, timeout_s=300)
                assert done.state == "succeeded", f"{done.to_dict()}\n{deployment.worker_logs()}"
            assert worker.popen.poll() is None, "the worker exited during the outage"
            # The restarted Redis kept no data, so the three waiting jobs came back through the reaper.
            assert worker.log_text().count("no message in the broker") >= 3, deployment.worker_logs()
            print(f"503 after {rejected_after_s:.1f} s; submits accepted again {recovered_after_s:.1f} s after the restart")
    finally:
        deployment.close()


# --- Job database unavailable ----------------------------------------------------------------------


def _start_uvicorn(module: str, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    full_env = {key: value for key, value in os.environ.items() if not key.startswith("W2S_")}
    full_env.update(env, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", module, "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=full_env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    return process, f"http://127.0.0.1:{port}"


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_live(process: subprocess.Popen, url: str, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode} at startup:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/v1/health/live", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"server did not respond within {timeout_s} s:\n{log.read_text()[-3000:]}")


def test_api_without_database_returns_503(tmp_path: Path, own_redis: RedisServer) -> None:
    """An API whose PostgreSQL is unreachable starts, stays up and returns 503 instead of exiting."""
    database_url = f"postgresql+psycopg://w2s@127.0.0.1:{free_port()}/w2s"
    log = tmp_path / "api.log"
    process, url = _start_uvicorn(
        "app.main:app",
        {"W2S_DATABASE_URL": database_url, "W2S_BROKER_URL": own_redis.url, "W2S_VAR_DIR": str(tmp_path / "var")},
        log,
    )
    try:
        _wait_live(process, url, log)
        with httpx.Client(base_url=url, timeout=30) as client:
            key = {"Authorization": "Bearer some-key"}
            ready = client.get("/v1/health/ready", headers=key)
            listed = client.get("/v1/jobs", headers=key)
            submitted = client.post("/v1/jobs", json=evaluate_request(), headers=key)

            # Checking the key needs the database, so readiness reports the outage like any route.
            for response in (ready, listed, submitted):
                assert response.status_code == 503, response.text
                assert _error(response)["code"] == "database_unavailable"
                assert response.headers["retry-after"] == "30"
                assert "w2s@127.0.0.1" not in response.text, "the database URL must not be sent to clients"
            time.sleep(5)
            assert process.poll() is None, f"the API exited:\n{log.read_text()[-3000:]}"
            assert client.get("/v1/health/live").status_code == 200
    finally:
        _stop(process)


def test_worker_without_database_waits(tmp_path: Path, own_redis: RedisServer) -> None:
    """A worker whose job database is unreachable keeps running and logs why, instead of exiting in a loop."""
    database_url = f"postgresql+psycopg://w2s@127.0.0.1:{free_port()}/w2s"
    deployment = Deployment.create(tmp_path / "deployment", broker="redis", broker_url=own_redis.url)
    worker = deployment.start_worker(wait=False, extra_env={"W2S_DATABASE_URL": database_url})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "database" not in worker.log_text().lower():
            assert worker.popen.poll() is None, f"worker exited with {worker.popen.returncode}:\n{worker.log_text()[-4000:]}"
            time.sleep(0.5)
        time.sleep(10)
        log = worker.log_text()
        assert worker.popen.poll() is None, f"worker exited with {worker.popen.returncode}:\n{log[-4000:]}"
        assert "job database" in log, log[-4000:]
        assert "unavailable at start" in log, log[-4000:]
    finally:
        deployment.close()


def test_locked_sqlite_returns_503_on_writes(tmp_path: Path, shared_data: Path, own_redis: RedisServer) -> None:
    """A job database locked by another writer gives 503 on writes after the busy timeout; reads go on."""
    deployment = Deployment.create(tmp_path / "deployment", broker="redis", broker_url=own_redis.url, data_dir=shared_data, model_dir=MODELS_DIR)
    _, key = create_api_key(deployment.store, "user", ["jobs"])
    headers = {"Authorization": f"Bearer {key}"}
    database = deployment.settings.resolved_database_url.removeprefix("sqlite:///")
    try:
        with TestClient(create_app(deployment.settings, celery=deployment.app, store=deployment.store)) as api:
            locker = sqlite3.connect(database, timeout=1, isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")
            try:
                started = time.monotonic()
                submitted = api.post("/v1/jobs", json=evaluate_request(), headers=headers)
                waited_s = time.monotonic() - started
                listed = api.get("/v1/jobs", headers=headers)
            finally:
                locker.execute("ROLLBACK")
                locker.close()

            assert submitted.status_code == 503, submitted.text
            assert _error(submitted)["code"] == "database_unavailable"
            assert "database is locked" in _error(submitted)["message"]
            assert listed.status_code == 200, "reads must go on while another writer holds the lock (WAL)"
            assert listed.json()["total"] == 0
            print(f"503 after {waited_s:.1f} s of busy timeout")

            after = api.post("/v1/jobs", json=evaluate_request(), headers=headers)
            assert after.status_code == 202, after.text
    finally:
        deployment.close()
