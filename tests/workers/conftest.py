"""Fixtures of the job-system tests: isolated job stores, GENIES slices, and worker deployments.

Databases are always new: a SQLite file in tmp_path, or a uniquely named PostgreSQL database that
is dropped afterwards. Redis is shared, so each deployment uses its own key prefix and queues.
"""

from __future__ import annotations

import gzip
import json
import os
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.workers.worker_harness import Deployment, redis_available
from workers.db import JobStore, get_engine, upgrade_database
from workers.settings import Settings

POSTGRES_ADMIN_URL = os.environ.get("W2S_TEST_POSTGRES_URL", "postgresql+psycopg://127.0.0.1:5432/postgres")
SOURCE = "us_history_textbook"
TARGET = "us_history_fiction"


def _postgres_admin_engine():
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed; PostgreSQL tests need the psycopg[binary] package")
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError as exc:
        pytest.skip(f"PostgreSQL at {POSTGRES_ADMIN_URL} is not reachable: {exc.orig}")
    return engine


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """URL of a new, uniquely named PostgreSQL database, dropped after the test."""
    from sqlalchemy import text

    admin = _postgres_admin_engine()
    name = f"w2s_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        get_engine(url).dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> JobStore:
    """A migrated job store on a fresh SQLite file or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_url")
    upgrade_database(url)
    settings = Settings(var_dir=tmp_path / "var", database_url=url, artifact_root=str(tmp_path / "artifacts"))
    return JobStore(url, settings)


@pytest.fixture(scope="session")
def train_slice(genies: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 24 prompts (72 pairs) of a real GENIES train file, in its original format."""
    rows = json.loads(gzip.open(genies / SOURCE / "train.json.gz").read())
    path = tmp_path_factory.mktemp("genies") / f"{SOURCE}_train_24.json"
    path.write_text(json.dumps(rows[:24]))
    return path


def tiny_train_config(model: Path, **overrides) -> dict:
    """MiniLM settings that train in seconds on a CPU: short sequences, fp32, small batches."""
    config = {"model": str(model), "epochs": 1, "batch_size": 8, "max_length": 64, "precision": "fp32"}
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def pipeline_config(genies: Path, minilm_dir: Path) -> dict:
    """A pipeline on a slice of GENIES with MiniLM as weak and strong model, one anchored arm."""
    return {
        "name": "worker-test",
        "source": {
            "name": SOURCE,
            "train": str(genies / SOURCE / "train.json.gz"),
            "test": str(genies / SOURCE / "test.json.gz"),
            "max_train_prompts": 16,
            "max_test_prompts": 8,
        },
        "targets": [{"name": TARGET, "test": str(genies / TARGET / "test.json.gz"), "max_test_prompts": 8}],
        "weak": tiny_train_config(minilm_dir),
        "student": tiny_train_config(minilm_dir),
        "arms": [{"name": "anchored", "anchor": {"lam": 1.0}}],
        "eval": {"max_length": 64, "batch_size": 32, "bootstrap_samples": 100, "precision": "fp32"},
    }


@pytest.fixture(scope="session")
def train_job_config(train_slice: Path, minilm_dir: Path) -> dict:
    """A train job long enough to be interrupted: 10 steps, a checkpoint every 4."""
    return {
        "data": str(train_slice),
        "labels": "gold",
        "name": "interrupted",
        "student": tiny_train_config(minilm_dir, max_steps=10, save_steps=4, save_total_limit=2),
    }


@pytest.fixture
def redis_deployment(tmp_path: Path) -> Iterator[Deployment]:
    if not redis_available():
        pytest.fail("Redis at 127.0.0.1:6379 is not reachable; the worker tests need it (set W2S_TEST_REDIS_URL)")
    deployment = Deployment.create(tmp_path, broker="redis")
    try:
        yield deployment
    finally:
        deployment.close()


@pytest.fixture
def embedded_deployment(tmp_path: Path) -> Iterator[Deployment]:
    deployment = Deployment.create(tmp_path, broker="embedded")
    try:
        yield deployment
    finally:
        deployment.close()
