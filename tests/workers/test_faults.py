"""Faults injected into real workers: repeated SIGKILLs mid-training, and a full disk while saving.

Every test starts its own `redis-server` on a free port and its own worker subprocesses, and stops
only those, by process id. The shared Redis on port 6379 is not used here.
"""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

from app.auth import DEVELOPMENT_PRINCIPAL
from app.services.models import set_alias
from tests.workers.conftest import tiny_train_config
from tests.workers.worker_harness import Deployment, RedisServer
from workers.db import Job
from workers.runner import run_job_task
from workers.submit import submit_job

pytestmark = pytest.mark.slow

TRAIN_TIMEOUT_S = 300


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer.start_new(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


def _deployment(tmp_path: Path, redis_server: RedisServer, **overrides) -> Deployment:
    return Deployment.create(tmp_path / "deployment", broker="redis", broker_url=redis_server.url, **overrides)


@pytest.fixture(scope="module")
def long_train_config(train_slice: Path, minilm_dir: Path) -> dict:
    """A train job with three checkpoints to resume from: 16 steps, a checkpoint every 4."""
    return {
        "data": str(train_slice),
        "labels": "gold",
        "name": "killed-twice",
        "student": tiny_train_config(minilm_dir, max_steps=16, save_steps=4, save_total_limit=3),
    }


def _wait_for_step(deployment: Deployment, job_id: str, *, attempt: int, checkpoint: Path, step: int) -> Job:
    """Wait until attempt `attempt` runs, `checkpoint` exists and training reported a step >= `step`."""
    return deployment.wait_for(
        job_id,
        lambda row: row.state == "running"
        and row.attempts == attempt
        and checkpoint.is_dir()
        and (row.progress_step or 0) >= step,
        timeout_s=TRAIN_TIMEOUT_S,
        description=f"attempt {attempt} past {checkpoint.name}",
    )


def _kill_twice(deployment: Deployment, config: dict, second_checkpoint: str = "checkpoint-8") -> tuple[Job, list[int]]:
    worker = deployment.start_worker()
    job = deployment.store.create_job("train", config)
    submit_job(job.id, store=deployment.store, app=deployment.app)
    checkpoints = Path(job.out_dir) / "checkpoints"

    _wait_for_step(deployment, job.id, attempt=1, checkpoint=checkpoints / "checkpoint-4", step=5)
    killed = [worker.kill_pool_process()]
    # The redelivered attempt resumes from checkpoint-4 and is killed again past `second_checkpoint`.
    step = int(second_checkpoint.rsplit("-", 1)[1]) + 1
    _wait_for_step(deployment, job.id, attempt=2, checkpoint=checkpoints / second_checkpoint, step=step)
    killed.append(worker.kill_pool_process())
    return job, killed


def _registered_for(deployment: Deployment, job_id: str):
    return deployment.store.list_models(job_id=job_id)


def test_sigkill_twice_resumes_from_checkpoints(tmp_path: Path, own_redis: RedisServer, long_train_config: dict) -> None:
    deployment = _deployment(tmp_path, own_redis, max_attempts=3)
    try:
        job, killed = _kill_twice(deployment, long_train_config)
        assert len(set(killed)) == 2, f"the second kill must hit a new pool process: {killed}"

        done = deployment.wait_for_state(job.id, {"succeeded", "failed", "cancelled"}, timeout_s=TRAIN_TIMEOUT_S)
        logs = deployment.worker_logs(tail=10**7)
        assert done.state == "succeeded", f"{done.to_dict()}\n{logs[-6000:]}"
        assert done.attempts == 3
        assert done.lease_owner is None
        assert "resuming from" in logs
        assert logs.count("taking over from") == 2

        model_dir = Path(done.out_dir) / "model"
        metadata = json.loads((model_dir / "w2s_metadata.json").read_text())
        assert metadata["train_metrics"]["steps"] == 16
        models = _registered_for(deployment, job.id)
        assert [Path(model.path) for model in models] == [model_dir.resolve()]
        assert not list(Path(done.out_dir).glob(".model.*")), "a staging folder of the model was left behind"
    finally:
        deployment.close()


def test_sigkill_twice_fails_after_max_attempts(tmp_path: Path, own_redis: RedisServer, long_train_config: dict) -> None:
    deployment = _deployment(tmp_path, own_redis, max_attempts=2)
    try:
        job, killed = _kill_twice(deployment, long_train_config, second_checkpoint="checkpoint-4")
        assert len(set(killed)) == 2

        done = deployment.wait_for_state(job.id, {"succeeded", "failed", "cancelled"}, timeout_s=120)
        assert done.state == "failed", f"{done.to_dict()}\n{deployment.worker_logs()}"
        assert done.error_type == "WorkerLost"
        assert "gave up after 2 attempts" in done.error_message
        assert "W2S_MAX_ATTEMPTS=2" in done.error_message
        assert done.lease_owner is None
        assert done.finished_at is not None
        assert _registered_for(deployment, job.id) == []
        assert not (Path(done.out_dir) / "model").exists()
        # The worker itself survived both kills and is ready for the next job.
        assert deployment.workers[0].popen.poll() is None
    finally:
        deployment.close()


# --- Disk full while saving the model --------------------------------------------------------------


class _InlineTask:
    """The parts of a Celery task the runner uses, for running one attempt in this process."""

    def __init__(self) -> None:
        self.request = SimpleNamespace(retries=0)

    def retry(self, **kwargs):  # pragma: no cover - reached only if the runner treats ENOSPC as transient
        raise AssertionError(f"the runner retried a full disk: {kwargs}")


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_disk_full_during_save(
    tmp_path: Path, own_redis: RedisServer, train_slice: Path, minilm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk during `save_pretrained` fails the job with ENOSPC; the model registered before is untouched.

    Both jobs run in this process through the worker's runner, so the safetensors writer can be
    replaced by one that writes half a file and then raises OSError(ENOSPC), as a full disk does.
    """
    import transformers.modeling_utils as modeling_utils

    deployment = _deployment(tmp_path, own_redis)
    store, settings = deployment.store, deployment.settings
    config = {
        "data": str(train_slice),
        "labels": "gold",
        "name": "prod-candidate",
        "student": tiny_train_config(minilm_dir, max_steps=2, save_steps=1000),
    }
    try:
        first = store.create_job("train", config)
        run_job_task(_InlineTask(), first.id, store, settings)
        first = store.get_job(first.id)
        assert first.state == "succeeded", first.to_dict()
        (old_model,) = store.list_models()
        set_alias(store, DEVELOPMENT_PRINCIPAL, "prod", old_model.id)
        old_digest = _tree_digest(Path(old_model.path))
        assert "model.safetensors" in old_digest

        real_save = modeling_utils.safe_save_file
        attempts: list[str] = []

        def disk_full_save(tensors, filename, *args, **kwargs):
            attempts.append(str(filename))
            with open(filename, "wb") as file:
                file.write(b"\0" * 4096)  # part of the file reached the disk before it filled up
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))

        monkeypatch.setattr(modeling_utils, "safe_save_file", disk_full_save)
        second = store.create_job("train", config)
        with pytest.raises(OSError) as raised:
            run_job_task(_InlineTask(), second.id, store, settings)
        monkeypatch.setattr(modeling_utils, "safe_save_file", real_save)
        assert raised.value.errno == errno.ENOSPC
        assert attempts, "the fault was never injected: save_pretrained no longer calls safe_save_file"

        failed = store.get_job(second.id)
        assert failed.state == "failed", failed.to_dict()
        assert failed.error_type == "OSError"
        assert "No space left on device" in failed.error_message
        assert failed.error_where
        assert failed.lease_owner is None

        # Nothing of the second job is registered, and no partial model folder is left.
        assert store.list_models(job_id=second.id) == []
        out_dir = Path(failed.out_dir)
        assert not (out_dir / "model").exists()
        assert not list(out_dir.glob(".model.*")), "the staging folder of the failed save was left behind"

        # The model registered before is still registered, still the alias target, and byte for byte the same.
        assert [model.id for model in store.list_models()] == [old_model.id]
        from app.services.references import find_model

        assert find_model(store, "prod").id == old_model.id
        assert _tree_digest(Path(old_model.path)) == old_digest
    finally:
        deployment.close()
