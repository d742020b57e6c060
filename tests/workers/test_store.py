"""Job store, leases and the reaper against a real database (SQLite file and PostgreSQL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import update

from workers import leases
from workers.db import Base, IdempotencyConflict, Job, JobNotFound, JobStore, ModelIncomplete, utcnow
from workers.leases import Acquire
from workers.runner import ProgressSink
from workers.settings import Settings


def _evaluate_config(tmp_path: Path) -> dict:
    """A valid evaluate config whose files exist (their content is never read here)."""
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    test = tmp_path / "test.json"
    test.write_text("[]")
    return {"models": {"m": str(model)}, "source": {"name": "s", "test": str(test)}}


def _expire_lease(store: JobStore, job_id: str, seconds_ago: float = 60) -> None:
    with store.session() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=seconds_ago))
        )


def test_migrations_match_models(store: JobStore) -> None:
    with store.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_create_and_get_job(store: JobStore, tmp_path: Path) -> None:
    job = store.create_job("evaluate", _evaluate_config(tmp_path), owner="alice")

    loaded = store.get_job(job.id)
    assert loaded.state == "queued"
    assert loaded.type == "evaluate"
    assert loaded.owner == "alice"
    assert loaded.attempts == 0
    assert loaded.config["eval"]["bootstrap_samples"] == 1000  # defaults are stored, not implied
    assert loaded.out_dir == str(store.settings.resolved_artifact_root / "jobs" / job.id)
    assert loaded.created_at.tzinfo is not None


def test_get_job_unknown_id(store: JobStore) -> None:
    with pytest.raises(JobNotFound, match="job nope not found"):
        store.get_job("nope")


def test_list_jobs_filters_and_paging(store: JobStore, tmp_path: Path) -> None:
    config = _evaluate_config(tmp_path)
    ids = [store.create_job("evaluate", config, owner="alice").id for _ in range(3)]
    store.create_job("evaluate", config, owner="bob")
    store.request_cancel(ids[0])

    page = store.list_jobs(owner="alice", limit=2)
    assert page.total == 3
    assert len(page.jobs) == 2
    assert store.list_jobs(owner="alice", limit=2, offset=2).jobs[0].owner == "alice"
    assert store.list_jobs(state="cancelled").total == 1
    assert store.list_jobs(state=["queued", "cancelled"], owner="alice").total == 3
    assert store.list_jobs(job_type="pipeline").total == 0
    with pytest.raises(ValueError, match="limit must be >= 1"):
        store.list_jobs(limit=0)


def test_idempotency_key_returns_same_job(store: JobStore, tmp_path: Path) -> None:
    config = _evaluate_config(tmp_path)
    first = store.create_job("evaluate", config, owner="alice", idempotency_key="k1")
    again = store.create_job("evaluate", config, owner="alice", idempotency_key="k1")
    assert again.id == first.id

    other = dict(config, baseline="m")
    with pytest.raises(IdempotencyConflict, match="already used for job"):
        store.create_job("evaluate", other, owner="alice", idempotency_key="k1")


def test_cancel_queued_job_is_immediate(store: JobStore, tmp_path: Path) -> None:
    job = store.create_job("evaluate", _evaluate_config(tmp_path))
    cancelled = store.request_cancel(job.id)
    assert cancelled.state == "cancelled"
    assert cancelled.cancel_requested is True
    assert cancelled.finished_at is not None


def test_cancel_running_job_sets_flag_only(store: JobStore, tmp_path: Path) -> None:
    job = store.create_job("evaluate", _evaluate_config(tmp_path))
    owner = leases.make_lease_owner()
    assert leases.acquire_lease(store, job.id, owner, lease_s=30, max_attempts=3).outcome is Acquire.ACQUIRED

    flagged = store.request_cancel(job.id)
    assert flagged.state == "running"
    assert flagged.cancel_requested is True
    assert leases.renew_lease(store, job.id, owner, lease_s=30) == (True, True)


def test_lease_acquire_then_duplicate_is_held(store: JobStore, tmp_path: Path) -> None:
    job = store.create_job("evaluate", _evaluate_config(tmp_path))
    first = leases.acquire_lease(store, job.id, leases.make_lease_owner(), lease_s=30, max_attempts=3)
    assert first.outcome is Acquire.ACQUIRED
    assert first.job.state == "running"
    assert first.job.attempts == 1
    assert first.job.worker_host == leases.HOSTNAME

    # A second delivery from a live process on another machine must not start the job.
    remote_owner = "other-host:1234:abcd"
    second = leases.acquire_lease(store, job.id, remote_owner, lease_s=30, max_attempts=3)
    assert second.outcome is Acquire.HELD
    assert store.get_job(job.id).attempts == 1


def test_lease_of_dead_local_process_is_taken_over(store: JobStore, tmp_path: Path) -> None:
    job = store.create_job("evaluate", _evaluate_config(tmp_path))
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_owner = f"{leases.HOSTNAME}:{int(finished.stdout)}:deadbeef"
    with store.session() as session:
        session.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(state="running", lease_owner=dead_owner, lease_expires_at=utcnow() + timedelta(seconds=300), attempts=1)
        )

    result = leases.acquire_lease(store, job.id, leases.make_lease_owner(), lease_s=30, max_attempts=3)
    assert result.outcome is Acquire.ACQUIRED
    assert result.previous_owner == dead_owner
    assert result.job.attempts == 2


def test_lease_of_live_local_process_is_held(store: JobStore, tmp_path: Path) -> None:
    job = store.create_job("evaluate", _evaluate_config(tmp_path))
    live_owner = f"{leases.HOSTNAME}:{os.getppid()}:cafe"
    with store.session() as session:
        session.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(state="running", lease_owner=live_owner, lease_expires_at=utcnow() + timedelta(seconds=300), attempts=1)
        )
    assert leases.acquire_lease(store, job.id, leases.make_lease_owner(), lease_s=30, max_attempts=3).outcome is Acquire.HELD


def test_acquire_fails_job_after_max_attempts(store: JobStore, tmp_path: Path) -> None:
    job = store.create_job("evaluate", _evaluate_config(tmp_path))
    for _ in range(2):
        owner = leases.make_lease_owner()
        assert leases.acquire_lease(store, job.id, owner, lease_s=30, max_attempts=2).outcome is Acquire.ACQUIRED
        _expire_lease(store, job.id)

    result = leases.acquire_lease(store, job.id, leases.make_lease_owner(), lease_s=30, max_attempts=2)
    assert result.outcome is Acquire.EXHAUSTED
    assert result.job.state == "failed"
    assert result.job.error_type == "WorkerLost"
    assert "gave up after 2 attempts" in result.job.error_message


def test_lost_owner_cannot_write(store: JobStore, tmp_path: Path) -> None:
    job = store.create_job("evaluate", _evaluate_config(tmp_path))
    old_owner = leases.make_lease_owner()
    leases.acquire_lease(store, job.id, old_owner, lease_s=30, max_attempts=3)
    _expire_lease(store, job.id)
    new_owner = "other-host:99:feed"
    assert leases.acquire_lease(store, job.id, new_owner, lease_s=30, max_attempts=3).outcome is Acquire.ACQUIRED

    assert leases.renew_lease(store, job.id, old_owner, lease_s=30) == (False, False)
    assert leases.finish_succeeded(store, job.id, old_owner, {"x": 1}) is False
    assert store.get_job(job.id).state == "running"
    assert leases.finish_succeeded(store, job.id, new_owner, {"x": 1}) is True
    assert store.get_job(job.id).outputs == {"x": 1}


def test_reaper_requeues_then_fails(store: JobStore, tmp_path: Path) -> None:
    job = store.create_job("evaluate", _evaluate_config(tmp_path))
    leases.acquire_lease(store, job.id, "gone-host:1:aa", lease_s=30, max_attempts=2)
    _expire_lease(store, job.id)

    reaped = leases.reap_expired_leases(store, max_attempts=2, grace_s=5)
    assert [(r.job_id, r.action) for r in reaped] == [(job.id, "requeued")]
    requeued = store.get_job(job.id)
    assert requeued.state == "queued"
    assert requeued.lease_owner is None
    # A second reaper running at the same time finds nothing left to do.
    assert leases.reap_expired_leases(store, max_attempts=2, grace_s=5) == []

    leases.acquire_lease(store, job.id, "gone-host:2:bb", lease_s=30, max_attempts=2)
    _expire_lease(store, job.id)
    reaped = leases.reap_expired_leases(store, max_attempts=2, grace_s=5)
    assert [r.action for r in reaped] == ["failed"]
    failed = store.get_job(job.id)
    assert failed.state == "failed"
    assert failed.error_type == "WorkerLost"
    assert "gone-host:2:bb" in failed.error_message


def test_reaper_leaves_live_leases(store: JobStore, tmp_path: Path) -> None:
    job = store.create_job("evaluate", _evaluate_config(tmp_path))
    leases.acquire_lease(store, job.id, "busy-host:1:aa", lease_s=30, max_attempts=3)
    assert leases.reap_expired_leases(store, max_attempts=3, grace_s=0) == []
    assert store.get_job(job.id).state == "running"


def test_stage_failure_fails_pipeline(store: JobStore, tmp_path: Path) -> None:
    pipeline = store.create_job("evaluate", _evaluate_config(tmp_path))
    with store.session() as session:
        session.execute(update(Job).where(Job.id == pipeline.id).values(type="pipeline"))
    config = _evaluate_config(tmp_path)
    first = store.create_job("evaluate", config, parent_id=pipeline.id, stage_name="weak", stage_index=0)
    second = store.create_job("evaluate", config, parent_id=pipeline.id, stage_name="report", stage_index=1)
    owner = leases.make_lease_owner()
    leases.acquire_lease(store, first.id, owner, lease_s=30, max_attempts=3)

    error = leases.ErrorInfo("ValueError", "bad data", "ml/weak.py:10 in weak_label")
    assert leases.finish_failed(store, store.get_job(first.id), owner, error)

    parent = store.get_job(pipeline.id)
    assert parent.state == "failed"
    assert parent.error_message == "stage weak failed: bad data"
    assert parent.error_where == "stage weak at ml/weak.py:10 in weak_label"
    skipped = store.get_job(second.id)
    assert skipped.state == "cancelled"
    assert skipped.error_message == "not run because stage weak failed"


def test_register_model_requires_metadata(store: JobStore, tmp_path: Path) -> None:
    model_dir = tmp_path / "trained"
    with pytest.raises(ModelIncomplete, match="not found"):
        store.register_model("m", model_dir)
    model_dir.mkdir()
    with pytest.raises(ModelIncomplete, match="has no w2s_metadata.json"):
        store.register_model("m", model_dir)
    assert store.list_models() == []

    (model_dir / "w2s_metadata.json").write_text(json.dumps({"base_model": "x"}))
    row = store.register_model("m", model_dir, base_model="x", metrics={"accuracy": 0.7})
    assert row.path == str(model_dir.resolve())
    assert store.register_model("m", model_dir).id == row.id
    assert [model.name for model in store.list_models()] == ["m"]


def test_progress_writes_are_rate_limited(store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = store.create_job("evaluate", _evaluate_config(tmp_path))
    owner = leases.make_lease_owner()
    job = leases.acquire_lease(store, job.id, owner, lease_s=30, max_attempts=3).job
    writes: list[int] = []
    original = leases.write_progress

    def counting_write(*args, **kwargs):
        writes.append(kwargs["step"])
        original(*args, **kwargs)

    monkeypatch.setattr(leases, "write_progress", counting_write)
    sink = ProgressSink(store, job, owner, interval_s=3600)
    for step in range(1, 101):
        sink("train", step, 100, {"loss": 0.5, "nan": float("nan")})

    # The first report of a stage and the last step are written; the 98 in between are not.
    assert writes == [1, 100]
    row = store.get_job(job.id)
    assert (row.progress_stage, row.progress_step, row.progress_total) == ("train", 100, 100)
    assert row.progress_metrics == {"loss": 0.5, "nan": None}


def test_settings_reject_short_visibility_timeout() -> None:
    with pytest.raises(ValueError, match="visibility_timeout_s .* must exceed task_time_limit_s"):
        Settings(task_time_limit_s=7200, visibility_timeout_s=3600)


def test_settings_reject_heartbeat_above_lease() -> None:
    with pytest.raises(ValueError, match="heartbeat_s .* must be below lease_s"):
        Settings(lease_s=10, heartbeat_s=10)


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("W2S_VAR_DIR", str(tmp_path))
    monkeypatch.setenv("W2S_BROKER_URL", "redis://example:6379/1")
    monkeypatch.setenv("W2S_MAX_ATTEMPTS", "5")
    settings = Settings()
    assert settings.max_attempts == 5
    assert settings.embedded is False
    assert settings.resolved_database_url == f"sqlite:///{(tmp_path / 'jobs.sqlite').resolve()}"
    assert settings.resolved_artifact_root == (tmp_path / "artifacts").resolve()
