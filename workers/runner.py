"""The body of the job task: lease, heartbeat, progress, the `ml/` call, and the result.

`run_job_task` is called by the Celery task `w2s.run_job` with the job id. It takes the job's
lease (or stops if another worker holds it), runs `ml.jobs.run_job` in the job's output folder with
`resume=True` (a redelivered training job continues from its newest checkpoint), and stores the
outcome. Raising `celery.exceptions.Ignore` acknowledges the message without running the rest of a
pipeline chain; that is how a duplicate delivery or a cancelled job stops quietly.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from ml.config import parse_job_config
from ml.context import JobCancelled, RunContext
from workers import leases
from workers.db import Job, JobStore, JobType, utcnow
from workers.leases import Acquire, ErrorInfo
from workers.local_artifacts import (
    MANIFEST_FILE,
    complete_model_dir,
    json_safe,
    remove_checkpoints,
    remove_optimizer_state,
    remove_tree,
    write_json_atomic,
)
from workers.settings import Settings

logger = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    """Renews the job's lease every `heartbeat_s` and records a cancel request or a lost lease."""

    def __init__(self, store: JobStore, job_id: str, owner: str, settings: Settings, lease_expires_at: datetime | None):
        super().__init__(name=f"heartbeat-{job_id[:8]}", daemon=True)
        self.store = store
        self.job_id = job_id
        self.owner = owner
        self.settings = settings
        self.lease_expires_at = lease_expires_at
        self.cancel_requested = threading.Event()
        self.lease_lost = threading.Event()
        self._stop_event = threading.Event()
        self._failures = 0

    def run(self) -> None:
        from workers.joblog import job_log_context

        with job_log_context(self.job_id):
            while not self._stop_event.wait(self.settings.heartbeat_s):
                self.beat()

    def beat(self) -> None:
        try:
            owned, cancel = leases.renew_lease(self.store, self.job_id, self.owner, lease_s=self.settings.lease_s)
        except OperationalError as exc:
            self._failures += 1
            # Without a renewal the reaper may hand the job to another worker once the lease
            # expires, so the job stops itself at that moment rather than run twice.
            if self.lease_expires_at is not None and utcnow() >= self.lease_expires_at:
                logger.error("lease renewal failed %d times and the lease expired; stopping the job: %s", self._failures, exc)
                self.lease_lost.set()
            elif self._failures == 1 or self._failures % 10 == 0:
                logger.warning("lease renewal failed (%d in a row), retrying in %.0f s: %s", self._failures, self.settings.heartbeat_s, exc)
            return
        self._failures = 0
        if not owned:
            logger.error("lease lost: another worker or the reaper took the job over; stopping this run")
            self.lease_lost.set()
            return
        self.lease_expires_at = utcnow() + timedelta(seconds=self.settings.lease_s)
        if cancel and not self.cancel_requested.is_set():
            logger.info("cancel requested")
            self.cancel_requested.set()

    def stop(self) -> None:
        self._stop_event.set()


class ProgressSink:
    """Progress callback for `RunContext`: keeps every report and writes at most one per interval."""

    def __init__(self, store: JobStore, job: Job, owner: str, interval_s: float):
        self.store = store
        self.job = job
        self.owner = owner
        self.interval_s = interval_s
        self._last_write = float("-inf")
        self._last_stage: str | None = None
        self._pending: tuple[str, int, int, dict[str, Any]] | None = None
        self._failures = 0

    def __call__(self, stage: str, step: int, total: int, metrics: dict[str, Any]) -> None:
        self._pending = (stage, int(step), int(total), json_safe(metrics or {}))
        now = time.monotonic()
        # Stage changes and the last step are always written, so the row never shows a stale stage.
        if stage != self._last_stage or step >= total or now - self._last_write >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        if self._pending is None:
            return
        stage, step, total, metrics = self._pending
        try:
            leases.write_progress(
                self.store,
                self.job.id,
                self.owner,
                stage=stage,
                step=step,
                total=total,
                metrics=metrics,
                parent_id=self.job.parent_id,
                stage_prefix=self.job.stage_name,
            )
        except OperationalError as exc:
            # Progress is informational: a database hiccup must not fail a long training job.
            self._failures += 1
            if self._failures == 1 or self._failures % 100 == 0:
                logger.warning("progress write failed (%d so far): %s", self._failures, exc)
            return
        self._pending = None
        self._last_write = time.monotonic()
        self._last_stage = stage


class StopCheck:
    """`should_stop` for `RunContext`: true once cancel is requested or the lease is lost."""

    def __init__(self, store: JobStore, job_id: str, heartbeat: Heartbeat, interval_s: float):
        self.store = store
        self.job_id = job_id
        self.heartbeat = heartbeat
        self.interval_s = interval_s
        self._last_check = time.monotonic()

    def __call__(self) -> bool:
        if self.heartbeat.lease_lost.is_set() or self.heartbeat.cancel_requested.is_set():
            return True
        now = time.monotonic()
        if now - self._last_check >= self.interval_s:
            self._last_check = now
            try:
                if leases.read_cancel_flag(self.store, self.job_id):
                    logger.info("cancel requested")
                    self.heartbeat.cancel_requested.set()
                    return True
            except OperationalError as exc:
                logger.warning("reading the cancel flag failed, will retry: %s", exc)
        return False


def _is_cuda_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc)


def _halve_batch(job_type: str, config: dict[str, Any]) -> dict[str, Any] | None:
    """Return the config with half the batch size and twice the accumulation, or None if the batch is 1."""
    key = {JobType.TRAIN.value: "student", JobType.WEAK_LABEL.value: "weak"}.get(job_type)
    train = config.get(key) if key else None
    if not isinstance(train, dict) or train.get("batch_size", 1) <= 1:
        return None
    smaller = dict(config)
    smaller[key] = dict(train, batch_size=train["batch_size"] // 2, grad_accum=train.get("grad_accum", 1) * 2)
    return smaller


class JobRun:
    """One attempt at one job, from taking the lease to storing the outcome."""

    def __init__(self, task: Task, job_id: str, store: JobStore, settings: Settings):
        self.task = task
        self.job_id = job_id
        self.store = store
        self.settings = settings
        self.owner = leases.make_lease_owner()

    def run(self) -> dict[str, Any]:
        from workers.joblog import LOG_FILE, job_log_file

        job = self._acquire()
        with job_log_file(job.id, Path(job.out_dir) / LOG_FILE):
            return self._run(job)

    def _run(self, job: Job) -> dict[str, Any]:
        out_dir = Path(job.out_dir)
        heartbeat = Heartbeat(self.store, job.id, self.owner, self.settings, job.lease_expires_at)
        progress = ProgressSink(self.store, job, self.owner, self.settings.progress_interval_s)
        context = RunContext(
            out_dir=out_dir,
            progress=progress,
            should_stop=StopCheck(self.store, job.id, heartbeat, self.settings.cancel_check_s),
            resume=True,
            job_id=job.id,
            extra={
                "allow_remote_code": self.settings.allow_remote_code,
                "allow_pickle": self.settings.allow_pickle,
                "progress_bars": False,
            },
        )
        logger.info(
            "job %s (%s%s) starts, attempt %d of %d, output %s",
            job.id,
            job.type,
            f", stage {job.stage_name} of pipeline {job.parent_id}" if job.parent_id else "",
            job.attempts,
            self.settings.max_attempts,
            out_dir,
        )
        heartbeat.start()
        try:
            from ml.jobs import run_job

            outputs = run_job(job.type, parse_job_config(job.type, job.config), context)
            progress.flush()
        except JobCancelled:
            progress.flush()
            self._stop_after_cancel(job, heartbeat)
        except SoftTimeLimitExceeded as exc:
            self._fail(job, ErrorInfo(
                "TimeLimitExceeded",
                f"the job ran longer than W2S_TASK_TIME_LIMIT_S={self.settings.task_time_limit_s} s",
                ErrorInfo.from_exception(exc, job.stage_name).where,
            ))
            raise
        except OperationalError as exc:
            self._retry_transient(job, exc, heartbeat)
        except Exception as exc:
            if _is_cuda_oom(exc):
                self._retry_oom(job, exc, heartbeat)
            self._fail(job, ErrorInfo.from_exception(exc, job.stage_name))
            raise
        finally:
            heartbeat.stop()
        return self._succeed(job, outputs, heartbeat)

    # --- Start ------------------------------------------------------------------------------------

    def _acquire(self) -> Job:
        try:
            result = leases.acquire_lease(
                self.store, self.job_id, self.owner, lease_s=self.settings.lease_s, max_attempts=self.settings.max_attempts
            )
        except OperationalError as exc:
            logger.warning("job database unavailable when starting the job, retrying: %s", exc)
            raise self.task.retry(exc=exc, countdown=self._backoff(), max_retries=self.settings.max_transient_retries)

        outcome = result.outcome
        if outcome is Acquire.ACQUIRED:
            if result.previous_owner:
                logger.warning("taking over from %s, whose process is gone; resuming from the last checkpoint", result.previous_owner)
            return result.job
        if outcome is Acquire.NOT_FOUND:
            logger.error("job %s not found in the job database %s; message dropped", self.job_id, self.store.url)
        elif outcome is Acquire.FINISHED:
            logger.info("job already %s; delivery ignored", result.job.state)
            if result.job.state == "cancelled":
                self._clean_cancelled(result.job)
        elif outcome is Acquire.HELD:
            logger.warning("job is running under %s; duplicate delivery ignored", result.previous_owner)
        elif outcome is Acquire.CANCELLED:
            logger.info("job cancelled before it started")
            self._clean_cancelled(result.job)
        elif outcome is Acquire.EXHAUSTED:
            logger.error("job failed: %s", result.job.error_message)
        raise Ignore()

    # --- Outcomes ---------------------------------------------------------------------------------

    def _succeed(self, job: Job, outputs: dict[str, Any], heartbeat: Heartbeat) -> dict[str, Any]:
        out_dir = Path(job.out_dir)
        outputs = json_safe(outputs or {})
        freed = remove_optimizer_state(out_dir)
        if freed:
            logger.info("removed %.1f MB of optimizer state from the checkpoints", freed / 1e6)

        owned, _ = leases.renew_lease(self.store, job.id, self.owner, lease_s=self.settings.lease_s)
        if not owned:
            logger.error("job finished but its lease was taken over; the result is not recorded by this run")
            raise Ignore()

        model = self._register_model(job, out_dir, outputs)
        if model is not None:
            outputs["registered_model"] = {"id": model.id, "name": model.name, "path": model.path}
        write_json_atomic(
            out_dir / MANIFEST_FILE,
            {"job_id": job.id, "type": job.type, "config": job.config, "outputs": outputs, "finished_at": utcnow().isoformat()},
        )
        if not leases.finish_succeeded(self.store, job.id, self.owner, outputs):
            logger.error("job finished but its lease was taken over before the result was stored")
            raise Ignore()
        logger.info("job succeeded; outputs in %s", out_dir)
        return {"job_id": job.id, "state": "succeeded"}

    def _register_model(self, job: Job, out_dir: Path, outputs: dict[str, Any]):
        model_dir = complete_model_dir(out_dir)
        if model_dir is None:
            return None
        config = job.config
        if job.type == JobType.TRAIN.value:
            name, base_model = config.get("name", "student"), config["student"]["model"]
        elif job.type == JobType.WEAK_LABEL.value:
            name, base_model = "weak", (config.get("weak") or {}).get("model")
        else:
            return None
        lineage = {"job_id": job.id, "job_type": job.type, "pipeline_id": job.parent_id, "stage": job.stage_name, "config": config}
        metrics = outputs.get("metrics") if isinstance(outputs.get("metrics"), dict) else {}
        model = self.store.register_model(
            name, model_dir, base_model=base_model, lineage=lineage, metrics=metrics, job_id=job.id
        )
        logger.info("registered model %s (%s) at %s", model.id, name, model_dir)
        return model

    def _fail(self, job: Job, error: ErrorInfo) -> None:
        logger.error("job failed: %s: %s (at %s)", error.type, error.message, error.where)
        if not leases.finish_failed(self.store, job, self.owner, error):
            logger.error("could not record the failure: the job's lease was taken over")

    def _stop_after_cancel(self, job: Job, heartbeat: Heartbeat) -> None:
        if heartbeat.lease_lost.is_set():
            logger.error("run stopped because the lease was lost; the job is left to its new owner")
            raise Ignore()
        # Outputs go first, so a job that reads as cancelled has no partial outputs left.
        self._clean_cancelled(job)
        if leases.finish_cancelled(self.store, job, self.owner):
            logger.info("job cancelled")
        raise Ignore()

    def _clean_cancelled(self, job: Job) -> None:
        """Delete the outputs of a cancelled job; for a pipeline stage, the whole pipeline's folder."""
        root = self.settings.resolved_artifact_root
        if job.parent_id:
            parent = self.store.get_job(job.parent_id)
            ids = [parent.id] + [child.id for child in parent.children]
            folder = Path(parent.out_dir)
        else:
            ids, folder = [job.id], Path(job.out_dir)
        removed = leases.unregister_models(self.store, ids)
        if remove_tree(folder, root):
            logger.info("deleted the partial outputs in %s and %d registered model(s)", folder, removed)

    # --- Retries ----------------------------------------------------------------------------------

    def _backoff(self) -> float:
        return self.settings.retry_backoff_s * (2 ** self.task.request.retries)

    def _retry_transient(self, job: Job, exc: Exception, heartbeat: Heartbeat) -> None:
        retries = self.task.request.retries
        if retries >= self.settings.max_transient_retries or job.attempts >= self.settings.max_attempts:
            self._fail(job, ErrorInfo.from_exception(exc, job.stage_name))
            raise exc
        countdown = self._backoff()
        logger.warning("transient error %s: %s; retry %d of %d in %.0f s", type(exc).__name__, exc, retries + 1, self.settings.max_transient_retries, countdown)
        leases.release_for_retry(self.store, job.id, self.owner)
        raise self.task.retry(exc=exc, countdown=countdown, max_retries=self.settings.max_transient_retries)

    def _retry_oom(self, job: Job, exc: Exception, heartbeat: Heartbeat) -> None:
        """Retry after CUDA out of memory with half the batch size, if allowed; return to fail otherwise."""
        if not self.settings.oom_halve_batch:
            return
        retries = self.task.request.retries
        if retries >= self.settings.max_transient_retries or job.attempts >= self.settings.max_attempts:
            return
        smaller = _halve_batch(job.type, job.config)
        if smaller is None:
            return
        key = "student" if job.type == JobType.TRAIN.value else "weak"
        batch = smaller[key]["batch_size"]
        leases.update_config(self.store, job.id, self.owner, smaller)
        # The saved data order depends on the batch size, so the retry trains from the start.
        removed = remove_checkpoints(Path(job.out_dir))
        countdown = self._backoff()
        logger.warning(
            "CUDA out of memory; retrying in %.0f s with %s.batch_size=%d and twice the gradient accumulation "
            "(%d checkpoint(s) removed)",
            countdown,
            key,
            batch,
            removed,
        )
        leases.release_for_retry(self.store, job.id, self.owner)
        raise self.task.retry(exc=exc, countdown=countdown, max_retries=self.settings.max_transient_retries)


def run_job_task(task: Task, job_id: str, store: JobStore, settings: Settings) -> dict[str, Any]:
    """Run one attempt of `job_id` inside a Celery task; see the module docstring."""
    from workers.joblog import job_log_context

    with job_log_context(job_id):
        return JobRun(task, job_id, store, settings).run()


def finish_pipeline(parent_id: str, store: JobStore) -> dict[str, Any]:
    """Mark a pipeline succeeded once every stage succeeded, with each stage's outputs."""
    from workers.joblog import job_log_context

    with job_log_context(parent_id):
        parent = store.get_job(parent_id)
        if parent.terminal:
            logger.info("pipeline already %s; nothing to close", parent.state)
            raise Ignore()
        unfinished = [child.stage_name for child in parent.children if child.state != "succeeded"]
        if unfinished:
            logger.error("pipeline not closed: stages %s have not succeeded", unfinished)
            raise Ignore()
        outputs: dict[str, Any] = {"stages": {}}
        for child in parent.children:
            outputs["stages"][child.stage_name] = child.outputs
        report_stage = parent.children[-1]
        outputs["report"] = report_stage.outputs
        outputs["models"] = {
            child.stage_name: child.outputs.get("registered_model")
            for child in parent.children
            if child.outputs and child.outputs.get("registered_model")
        }
        write_json_atomic(Path(parent.out_dir) / MANIFEST_FILE, {"job_id": parent.id, "type": parent.type, "outputs": outputs})
        if leases.finish_pipeline_succeeded(store, parent_id, outputs):
            logger.info("pipeline succeeded; report in %s", report_stage.out_dir)
        return {"job_id": parent_id, "state": "succeeded"}
