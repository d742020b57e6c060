"""State changes of running jobs, each one guarded by the job's lease.

A worker may run a job only while it holds the job's lease: `lease_owner` names the process and
`lease_expires_at` is renewed by heartbeats. Every write of a running job checks that the caller
still owns the lease, so a job never runs in two places at once. A second delivery of the same job
finds the lease taken and stops, and a worker that lost its lease stops writing. A lease that
expires because its worker died is taken over by the next delivery or by the reaper
(`reap_expired_leases`), which requeues the job or, after `max_attempts` starts, marks it failed.

NOTE: lease times come from each machine's clock, so the worker machines' clocks must be synchronised
(NTP) to well below `heartbeat_s`.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import traceback
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from workers.db import TERMINAL_STATES, Job, JobState, JobStore, RegisteredModel, utcnow

logger = logging.getLogger(__name__)

HOSTNAME = socket.gethostname()


def make_lease_owner() -> str:
    """Return an owner id unique to this process: `host:pid:random`."""
    return f"{HOSTNAME}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # A killed pool process stays a zombie until its parent reaps it; it runs nothing any more.
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] in {"Z", "X"}


def owner_is_dead_local_process(owner: str | None, me: str) -> bool:
    """Tell whether `owner` was a process on this host that no longer exists.

    This lets a redelivered job start at once after its pool process was killed, without waiting
    for the lease to expire. Owners on other hosts are never judged dead here.
    """
    if not owner or owner == me:
        return False
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != HOSTNAME:
        return False
    try:
        pid = int(parts[1])
    except ValueError:
        return False
    if pid == os.getpid():
        # Another run in this very process (a thread pool, or a test): never judged dead here.
        return False
    return _process_is_gone(pid)


@dataclass(frozen=True)
class ErrorInfo:
    """Why a job failed: exception type, message, and where (stage and source line)."""

    type: str
    message: str
    where: str

    @classmethod
    def from_exception(cls, exc: BaseException, stage: str | None = None) -> "ErrorInfo":
        frames = traceback.extract_tb(exc.__traceback__)
        # The innermost frame in this project's code is the most useful; library frames follow it.
        own = [frame for frame in frames if "/ml/" in frame.filename or "/workers/" in frame.filename]
        frame = (own or frames or [None])[-1]
        location = f"{_short_path(frame.filename)}:{frame.lineno} in {frame.name}" if frame else "unknown"
        where = f"stage {stage} at {location}" if stage else location
        return cls(type=type(exc).__name__, message=str(exc) or repr(exc), where=where)


def _short_path(filename: str) -> str:
    for marker in ("/ml/", "/workers/"):
        if marker in filename:
            return marker[1:] + filename.rsplit(marker, 1)[1]
    if "/site-packages/" in filename:
        return filename.split("/site-packages/", 1)[1]
    return filename


class Acquire(enum.Enum):
    """Outcome of `acquire_lease`."""

    ACQUIRED = "acquired"
    NOT_FOUND = "not_found"
    FINISHED = "finished"  # already succeeded, failed or cancelled
    CANCELLED = "cancelled"  # cancel was requested before the job started; now marked cancelled
    HELD = "held"  # another live worker holds the lease
    EXHAUSTED = "exhausted"  # max_attempts starts used up; now marked failed


@dataclass
class AcquireResult:
    outcome: Acquire
    job: Job | None
    previous_owner: str | None = None


def acquire_lease(store: JobStore, job_id: str, owner: str, *, lease_s: float, max_attempts: int) -> AcquireResult:
    """Take the lease of a queued job, or of a running one whose worker is gone, and mark it running."""
    now = utcnow()
    with store.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            return AcquireResult(Acquire.NOT_FOUND, None)
        if job.state in TERMINAL_STATES:
            return AcquireResult(Acquire.FINISHED, job)

        previous = job.lease_owner
        lease_is_live = previous is not None and job.lease_expires_at is not None and job.lease_expires_at > now
        if lease_is_live and not owner_is_dead_local_process(previous, owner):
            return AcquireResult(Acquire.HELD, job, previous)

    if job.cancel_requested:
        if _finish(store, job_id, previous, JobState.CANCELLED, now=now):
            return AcquireResult(Acquire.CANCELLED, store.get_job(job_id), previous)
        return AcquireResult(Acquire.HELD, job, previous)

    if job.attempts >= max_attempts:
        reason = (
            f"gave up after {job.attempts} attempts (W2S_MAX_ATTEMPTS={max_attempts}); "
            f"the worker of the last attempt ({previous or 'unknown'}) stopped without finishing the job"
        )
        error = ErrorInfo("WorkerLost", reason, f"stage {job.stage_name}" if job.stage_name else "worker")
        if _finish(store, job_id, previous, JobState.FAILED, error=error, now=now):
            fail_pipeline_after_stage(store, store.get_job(job_id), error)
            return AcquireResult(Acquire.EXHAUSTED, store.get_job(job_id), previous)
        return AcquireResult(Acquire.HELD, job, previous)

    with store.session() as session:
        guard = Job.lease_owner.is_(None) if previous is None else Job.lease_owner == previous
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.notin_(TERMINAL_STATES), guard, Job.cancel_requested.is_(False))
            .values(
                state=JobState.RUNNING.value,
                lease_owner=owner,
                lease_expires_at=now + timedelta(seconds=lease_s),
                heartbeat_at=now,
                attempts=Job.attempts + 1,
                worker_host=HOSTNAME,
                started_at=job.started_at or now,
            )
        )
        if result.rowcount != 1:
            return AcquireResult(Acquire.HELD, job, previous)
        if job.parent_id:
            session.execute(
                update(Job)
                .where(Job.id == job.parent_id, Job.state == JobState.QUEUED.value)
                .values(state=JobState.RUNNING.value, started_at=now)
            )
    return AcquireResult(Acquire.ACQUIRED, store.get_job(job_id), previous)


def renew_lease(store: JobStore, job_id: str, owner: str, *, lease_s: float) -> tuple[bool, bool]:
    """Extend the lease; return (still owned, cancel requested)."""
    now = utcnow()
    with store.session() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == owner, Job.state == JobState.RUNNING.value)
            .values(lease_expires_at=now + timedelta(seconds=lease_s), heartbeat_at=now)
        )
        cancel = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return result.rowcount == 1, bool(cancel)


def read_cancel_flag(store: JobStore, job_id: str) -> bool:
    with store.session() as session:
        return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def write_progress(
    store: JobStore,
    job_id: str,
    owner: str,
    *,
    stage: str,
    step: int,
    total: int,
    metrics: dict[str, Any],
    parent_id: str | None = None,
    stage_prefix: str | None = None,
) -> None:
    """Store the latest progress on the job row, and on its pipeline's row prefixed with the stage name."""
    now = utcnow()
    values = {
        "progress_stage": stage,
        "progress_step": step,
        "progress_total": total,
        "progress_metrics": metrics,
        "progress_at": now,
    }
    with store.session() as session:
        session.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner).values(**values))
        if parent_id:
            parent_values = dict(values, progress_stage=f"{stage_prefix}/{stage}" if stage_prefix else stage)
            session.execute(
                update(Job).where(Job.id == parent_id, Job.state.notin_(TERMINAL_STATES)).values(**parent_values)
            )


def _finish(
    store: JobStore,
    job_id: str,
    owner: str | None,
    state: JobState,
    *,
    error: ErrorInfo | None = None,
    outputs: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> bool:
    """Move a job to a final state if `owner` still owns its lease, or if it has no lease when `owner` is None.

    Returns whether the row changed.
    """
    now = now or utcnow()
    values: dict[str, Any] = {
        "state": state.value,
        "finished_at": now,
        "lease_owner": None,
        "lease_expires_at": None,
    }
    if error is not None:
        values.update(error_type=error.type, error_message=error.message, error_where=error.where)
    if outputs is not None:
        values["outputs"] = outputs
    guard = Job.lease_owner.is_(None) if owner is None else Job.lease_owner == owner
    with store.session() as session:
        result = session.execute(
            update(Job).where(Job.id == job_id, Job.state.notin_(TERMINAL_STATES), guard).values(**values)
        )
    return result.rowcount == 1


def finish_succeeded(store: JobStore, job_id: str, owner: str, outputs: dict[str, Any]) -> bool:
    return _finish(store, job_id, owner, JobState.SUCCEEDED, outputs=outputs)


def finish_pipeline_succeeded(store: JobStore, parent_id: str, outputs: dict[str, Any]) -> bool:
    """Mark a pipeline succeeded (it holds no lease; its stages did)."""
    with store.session() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == parent_id, Job.state.notin_(TERMINAL_STATES))
            .values(state=JobState.SUCCEEDED.value, outputs=outputs, finished_at=utcnow(), progress_stage="done")
        )
    return result.rowcount == 1


def finish_failed(store: JobStore, job: Job, owner: str | None, error: ErrorInfo) -> bool:
    """Mark the job failed; for a pipeline stage, also fail the pipeline and cancel the stages after it."""
    moved = _finish(store, job.id, owner, JobState.FAILED, error=error)
    if moved:
        fail_pipeline_after_stage(store, job, error)
    return moved


def finish_cancelled(store: JobStore, job: Job, owner: str | None) -> bool:
    """Mark the job cancelled; for a pipeline stage, also cancel the pipeline and its other stages."""
    moved = _finish(store, job.id, owner, JobState.CANCELLED)
    if moved and job.parent_id:
        now = utcnow()
        with store.session() as session:
            session.execute(
                update(Job)
                .where(Job.parent_id == job.parent_id, Job.state.notin_(TERMINAL_STATES), Job.lease_owner.is_(None))
                .values(state=JobState.CANCELLED.value, cancel_requested=True, finished_at=now)
            )
            session.execute(
                update(Job)
                .where(Job.id == job.parent_id, Job.state.notin_(TERMINAL_STATES))
                .values(state=JobState.CANCELLED.value, cancel_requested=True, finished_at=now)
            )
    return moved


def fail_pipeline_after_stage(store: JobStore, job: Job, error: ErrorInfo) -> None:
    """Fail the pipeline of a failed stage, naming the stage, and cancel the stages not yet started."""
    if not job.parent_id:
        return
    now = utcnow()
    stage = job.stage_name or job.id
    with store.session() as session:
        session.execute(
            update(Job)
            .where(Job.parent_id == job.parent_id, Job.state.notin_(TERMINAL_STATES), Job.lease_owner.is_(None))
            .values(
                state=JobState.CANCELLED.value,
                finished_at=now,
                error_type="StageFailed",
                error_message=f"not run because stage {stage} failed",
                error_where=f"stage {stage}",
            )
        )
        session.execute(
            update(Job)
            .where(Job.id == job.parent_id, Job.state.notin_(TERMINAL_STATES))
            .values(
                state=JobState.FAILED.value,
                finished_at=now,
                error_type=error.type,
                error_message=f"stage {stage} failed: {error.message}",
                error_where=error.where if error.where.startswith("stage ") else f"stage {stage} at {error.where}",
            )
        )


def release_for_retry(store: JobStore, job_id: str, owner: str) -> bool:
    """Give the lease back and requeue the job, before a retry after a transient error."""
    with store.session() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == owner, Job.state == JobState.RUNNING.value)
            .values(state=JobState.QUEUED.value, lease_owner=None, lease_expires_at=None)
        )
    return result.rowcount == 1


def update_config(store: JobStore, job_id: str, owner: str, config: dict[str, Any]) -> bool:
    with store.session() as session:
        result = session.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner).values(config=config))
    return result.rowcount == 1


def unregister_models(store: JobStore, job_ids: list[str]) -> int:
    """Delete the registry rows of these jobs' models (their folders are being deleted)."""
    with store.session() as session:
        rows = list(session.scalars(select(RegisteredModel).where(RegisteredModel.job_id.in_(job_ids))))
        for row in rows:
            session.delete(row)
    return len(rows)


# --- Reaper ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReapedJob:
    """A job whose lease expired, and what the reaper did: 'requeued', 'failed' or 'cancelled'."""

    job_id: str
    parent_id: str | None
    action: str
    previous_owner: str | None


def reap_expired_leases(store: JobStore, *, max_attempts: int, grace_s: float) -> list[ReapedJob]:
    """Requeue, fail or cancel running jobs whose lease expired more than `grace_s` ago.

    Requeued jobs must be sent to the broker again by the caller (`workers.submit.resubmit`).
    Several reapers may run at once: each change is guarded by the expired owner and expiry time, so
    only one of them acts on a job.
    """
    cutoff = utcnow() - timedelta(seconds=grace_s)
    with store.session() as session:
        expired = list(
            session.scalars(
                select(Job).where(
                    Job.state == JobState.RUNNING.value,
                    Job.lease_owner.is_not(None),
                    Job.lease_expires_at < cutoff,
                )
            )
        )

    reaped = []
    for job in expired:
        guard = (Job.id == job.id, Job.lease_owner == job.lease_owner, Job.lease_expires_at == job.lease_expires_at)
        previous = job.lease_owner
        if job.cancel_requested:
            with store.session() as session:
                moved = session.execute(update(Job).where(*guard).values(lease_owner=None, lease_expires_at=None))
            if moved.rowcount == 1 and finish_cancelled(store, job, None):
                reaped.append(ReapedJob(job.id, job.parent_id, "cancelled", previous))
            continue
        if job.attempts >= max_attempts:
            error = ErrorInfo(
                "WorkerLost",
                f"the worker ({previous}) stopped sending heartbeats and all {job.attempts} attempts "
                f"(W2S_MAX_ATTEMPTS={max_attempts}) are used up",
                f"stage {job.stage_name}" if job.stage_name else "worker",
            )
            with store.session() as session:
                moved = session.execute(update(Job).where(*guard).values(lease_owner=None, lease_expires_at=None))
            if moved.rowcount == 1 and finish_failed(store, job, None, error):
                reaped.append(ReapedJob(job.id, job.parent_id, "failed", previous))
            continue
        with store.session() as session:
            moved = session.execute(
                update(Job)
                .where(*guard)
                .values(state=JobState.QUEUED.value, lease_owner=None, lease_expires_at=None)
            )
        if moved.rowcount == 1:
            reaped.append(ReapedJob(job.id, job.parent_id, "requeued", previous))
    return reaped
