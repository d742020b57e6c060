"""Jobs run by real `celery worker` subprocesses over Redis or the embedded SQLite broker.

These train MiniLM on small slices of GENIES on the CPU; each test takes tens of seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.workers.worker_harness import Deployment
from workers.db import Job
from workers.submit import cancel_job, submit_job

pytestmark = pytest.mark.slow

# Generous limits: a shared 2-core CI machine trains MiniLM at about 1-4 s per step.
PIPELINE_TIMEOUT_S = 420
TRAIN_TIMEOUT_S = 300


def _run_pipeline(deployment: Deployment, config: dict) -> None:
    deployment.start_worker()
    job = deployment.store.create_job("pipeline", config, owner="tests")
    submit_job(job.id, store=deployment.store, app=deployment.app)

    done = deployment.wait_for_state(job.id, {"succeeded", "failed", "cancelled"}, timeout_s=PIPELINE_TIMEOUT_S)
    assert done.state == "succeeded", f"{done.to_dict()}\n{deployment.worker_logs()}"

    stages = [(child.stage_name, child.type, child.state) for child in done.children]
    assert stages == [
        ("weak", "weak_label", "succeeded"),
        ("train:anchored", "train", "succeeded"),
        ("report", "evaluate", "succeeded"),
    ]
    report_files = done.outputs["report"]["report"]
    assert report_files, done.outputs
    for path in report_files.values():
        assert Path(path).is_file(), path
    assert (Path(done.out_dir) / "job.json").is_file()

    models = {model.name: model for model in deployment.store.list_models()}
    assert set(models) == {"weak", "anchored"}
    anchored = models["anchored"]
    assert (Path(anchored.path) / "w2s_metadata.json").is_file()
    assert anchored.lineage["pipeline_id"] == job.id
    assert anchored.job_id == done.children[1].id
    assert done.outputs["models"]["train:anchored"]["id"] == anchored.id

    # Optimizer state is gone from the kept checkpoints once the stage succeeded.
    assert not list(Path(done.out_dir).rglob("optimizer.pt"))
    assert f"job={done.children[1].id}" in deployment.worker_logs(tail=10**7)
    stage_log = (Path(done.children[1].out_dir) / "job.log").read_text()
    assert "train:anchored: saved" in stage_log
    assert "stage weak" not in stage_log, "each stage's log holds only its own records"


def test_pipeline_over_redis(redis_deployment: Deployment, pipeline_config: dict) -> None:
    _run_pipeline(redis_deployment, pipeline_config)


def test_pipeline_on_embedded_broker(embedded_deployment: Deployment, pipeline_config: dict) -> None:
    assert embedded_deployment.settings.broker_url is None
    _run_pipeline(embedded_deployment, pipeline_config)
    assert (embedded_deployment.settings.var_dir / "broker.sqlite").is_file()


def _start_training(deployment: Deployment, config: dict) -> Job:
    job = deployment.store.create_job("train", config)
    submit_job(job.id, store=deployment.store, app=deployment.app)
    return job


def _wait_for_checkpoint(deployment: Deployment, job: Job) -> Job:
    """Wait until the job saved its first checkpoint and trained past it."""
    first_checkpoint = Path(job.out_dir) / "checkpoints" / "checkpoint-4"
    return deployment.wait_for(
        job.id,
        lambda row: row.state == "running" and first_checkpoint.is_dir() and (row.progress_step or 0) >= 5,
        timeout_s=TRAIN_TIMEOUT_S,
        description="training past checkpoint-4",
    )


def _assert_resumed_or_failed_with_reason(deployment: Deployment, job_id: str) -> Job:
    done = deployment.wait_for_state(job_id, {"succeeded", "failed"}, timeout_s=TRAIN_TIMEOUT_S)
    if done.state == "failed":
        assert done.error_type and done.error_message, done.to_dict()
        return done
    assert done.attempts == 2
    assert done.lease_owner is None
    assert (Path(done.out_dir) / "model" / "w2s_metadata.json").is_file()
    assert "resuming from" in deployment.worker_logs(tail=10**7)
    steps = json.loads((Path(done.out_dir) / "model" / "w2s_metadata.json").read_text())["train_metrics"]["steps"]
    assert steps == 10
    return done


def test_killed_pool_process_is_redelivered_and_resumes(redis_deployment: Deployment, train_job_config: dict) -> None:
    worker = redis_deployment.start_worker()
    job = _start_training(redis_deployment, train_job_config)
    _wait_for_checkpoint(redis_deployment, job)

    worker.kill_pool_process()

    done = _assert_resumed_or_failed_with_reason(redis_deployment, job.id)
    assert done.state == "succeeded", f"{done.to_dict()}\n{redis_deployment.worker_logs()}"
    assert "taking over from" in worker.log_text()


def test_killed_worker_is_replaced_and_job_resumes(redis_deployment: Deployment, train_job_config: dict) -> None:
    first = redis_deployment.start_worker("first")
    job = _start_training(redis_deployment, train_job_config)
    _wait_for_checkpoint(redis_deployment, job)

    first.kill_main()
    assert first.pool_pids() == []
    # Nothing runs the job now; its lease still names the dead pool process until it expires.
    assert redis_deployment.store.get_job(job.id).state == "running"

    second = redis_deployment.start_worker("second")
    done = _assert_resumed_or_failed_with_reason(redis_deployment, job.id)
    assert done.state == "succeeded", f"{done.to_dict()}\n{redis_deployment.worker_logs()}"
    assert "job requeued and sent again" in second.log_text()


def test_cancel_during_training(redis_deployment: Deployment, train_job_config: dict) -> None:
    worker = redis_deployment.start_worker()
    job = _start_training(redis_deployment, train_job_config)
    redis_deployment.wait_for(
        job.id, lambda row: row.state == "running" and (row.progress_step or 0) >= 1, timeout_s=TRAIN_TIMEOUT_S, description="first step"
    )

    cancel_job(job.id, store=redis_deployment.store, app=redis_deployment.app)
    started = time.monotonic()
    done = redis_deployment.wait_for_state(job.id, {"cancelled", "succeeded", "failed"}, timeout_s=60)
    elapsed = time.monotonic() - started

    assert done.state == "cancelled", f"{done.to_dict()}\n{redis_deployment.worker_logs()}"
    # One training step on a loaded CPU takes up to a few seconds, plus cancel_check_s.
    assert elapsed < 20, f"cancel took {elapsed:.1f} s"
    assert not Path(done.out_dir).exists()
    assert redis_deployment.store.list_models() == []
    assert worker.popen.poll() is None


def test_score_dataset_job_writes_rewards(redis_deployment: Deployment, genies: Path, minilm_dir: Path, tmp_path: Path) -> None:
    from ml.data import read_preferences, write_pairs_jsonl

    pairs, _ = read_preferences(genies / "arc_easy" / "test.json.gz")
    data = tmp_path / "candidates.jsonl"
    write_pairs_jsonl(pairs[:12], data)  # 4 prompts with 4 responses each
    redis_deployment.start_worker()
    job = redis_deployment.store.create_job("score_dataset", {"model": str(minilm_dir), "data": str(data), "max_length": 64})
    submit_job(job.id, store=redis_deployment.store, app=redis_deployment.app)

    done = redis_deployment.wait_for_state(job.id, {"succeeded", "failed", "cancelled"}, timeout_s=TRAIN_TIMEOUT_S)
    assert done.state == "succeeded", f"{done.to_dict()}\n{redis_deployment.worker_logs()}"
    rows = [json.loads(line) for line in (Path(done.out_dir) / "rewards.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert all(len(row["responses"]) == 4 for row in rows), rows[0]
    assert done.outputs["responses"] == 16
