"""Fixtures of the HTTP API tests: an API app over an isolated deployment (Redis, SQLite, artifacts) and keys.

The app runs in the ASGI test client; jobs go through a real Redis, and the pipeline test starts a
real `celery worker` subprocess (tests/workers/worker_harness.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient

from app.auth import create_api_key
from app.main import create_app
from tests.conftest import MODELS_DIR
from tests.workers.worker_harness import Deployment, redis_available

SOURCE = "us_history_textbook"
TARGET = "us_history_fiction"


@dataclass
class Api:
    """An API app over one deployment, with a client and a key per role."""

    deployment: Deployment
    client: TestClient
    keys: dict[str, str]

    def headers(self, role: str = "user") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}


def make_api(tmp_path: Path, shared_data: Path, **overrides: Any) -> Iterator[Api]:
    if not redis_available():
        pytest.fail("Redis at 127.0.0.1:6379 is not reachable; the API tests need it (set W2S_TEST_REDIS_URL)")
    settings: dict[str, Any] = {"data_dir": shared_data, "model_dir": MODELS_DIR, "event_poll_interval_s": 0.25}
    settings.update(overrides)
    deployment = Deployment.create(tmp_path, broker="redis", **settings)
    keys = {}
    for role, scopes in {"user": ["jobs"], "other": ["jobs"], "scorer": ["score"], "modeller": ["jobs", "models"], "admin": ["admin"]}.items():
        _, keys[role] = create_api_key(deployment.store, role, scopes)
    app = create_app(deployment.settings, celery=deployment.app, store=deployment.store)
    try:
        with TestClient(app) as client:
            yield Api(deployment=deployment, client=client, keys=keys)
    finally:
        deployment.close()


@pytest.fixture
def api(tmp_path: Path, shared_data: Path) -> Iterator[Api]:
    yield from make_api(tmp_path, shared_data)


def genies_file(shared_data: Path, name: str, split: str) -> Path:
    return shared_data / "genies" / name / f"{split}.json.gz"


def pipeline_request(source_train: str, model: str) -> dict[str, Any]:
    """A pipeline on a tiny GENIES slice with MiniLM as weak and strong model, one anchored arm."""
    tiny = {"model": model, "epochs": 1, "batch_size": 8, "max_length": 64, "precision": "fp32"}
    return {
        "type": "pipeline",
        "config": {
            "name": "api-test",
            "source": {
                "name": SOURCE,
                "train": source_train,
                "test": f"genies/{SOURCE}/test.json.gz",
                "max_train_prompts": 24,
                "max_test_prompts": 12,
            },
            "targets": [{"name": TARGET, "test": f"genies/{TARGET}/test.json.gz", "max_test_prompts": 12}],
            "weak": dict(tiny),
            "student": dict(tiny),
            "arms": [{"name": "anchored", "anchor": {"lam": 1.0}}],
            "eval": {"max_length": 64, "batch_size": 32, "bootstrap_samples": 200, "precision": "fp32"},
        },
    }


def upload(api: Api, path: Path, role: str = "user"):
    with path.open("rb") as file:
        return api.client.post("/v1/datasets", files={"file": (path.name, file)}, headers=api.headers(role))
