"""Sending jobs to the broker, and cancelling them.

A job row is created first (`workers.db.create_job`, which validates the config), then
`submit_job(job_id)` sends it. The Celery task id of a job's message is the job id, so
`revoke(job_id)` reaches it. A pipeline becomes one child job per stage of
`ml.jobs.plan_pipeline` plus a closing task, sent as one Celery chain: a stage runs only after the
previous one succeeded, and a failed stage stops the chain.
"""

from __future__ import annotations

import logging
from pathlib import Path

from celery import Celery, chain
from celery.canvas import Signature

from ml.config import PipelineConfig
from ml.jobs import plan_pipeline
from workers.celery_app import FINISH_PIPELINE_TASK, RUN_JOB_TASK
from workers.db import Job, JobState, JobStore, JobType, default_store

logger = logging.getLogger(__name__)


class JobNotSubmittable(ValueError):
    """The job is finished or is a pipeline stage, which is sent with its pipeline."""


def _default_app() -> Celery:
    from workers.celery_app import app

    return app


def ensure_pipeline_children(store: JobStore, parent: Job) -> list[Job]:
    """Create one child job per pipeline stage, unless they exist; return them in stage order."""
    if parent.children:
        return list(parent.children)
    config = PipelineConfig.model_validate(parent.config)
    stages = plan_pipeline(config, Path(parent.out_dir))
    root = Path(parent.out_dir).resolve()
    for stage in stages:
        # Arm names become folder names; a name such as '../x' must not move a stage's outputs
        # out of the pipeline's folder. Checked before any child job exists.
        if not Path(stage.out_dir).resolve().is_relative_to(root):
            raise JobNotSubmittable(f"pipeline {parent.id}: stage {stage.name} would write to {stage.out_dir}, outside {root}")
    for index, stage in enumerate(stages):
        store.create_job(
            stage.job_type,
            stage.config.model_dump(mode="json"),
            owner=parent.owner,
            parent_id=parent.id,
            # The stage inputs (weak labels, trained models) are written by earlier stages.
            check_paths=False,
            stage_name=stage.name,
            stage_index=index,
            out_dir=stage.out_dir,
        )
    return list(store.get_job(parent.id).children)


def _run_signature(celery: Celery, job: Job) -> Signature:
    settings = celery.w2s_settings
    return celery.signature(
        RUN_JOB_TASK, args=(job.id,), immutable=True, queue=settings.gpu_queue, task_id=job.id
    )


def _pipeline_chain(celery: Celery, store: JobStore, parent: Job) -> chain:
    children = ensure_pipeline_children(store, parent)
    pending = [child for child in children if child.state != JobState.SUCCEEDED.value]
    settings = celery.w2s_settings
    closing = celery.signature(FINISH_PIPELINE_TASK, args=(parent.id,), immutable=True, queue=settings.cpu_queue)
    return chain(*[_run_signature(celery, child) for child in pending], closing)


# Publish retries for a client that waits for the response. One quick retry turns a broker outage
# into a 503 within about a second, instead of holding the request through the default policy.
FAIL_FAST_RETRY_POLICY = {"max_retries": 1, "interval_start": 0.2, "interval_step": 0.2, "interval_max": 0.2}


def submit_job(
    job_id: str, *, store: JobStore | None = None, app: Celery | None = None, retry_policy: dict[str, float] | None = None
) -> Job:
    """Send a queued job (or a whole pipeline) to the broker and return its row.

    `retry_policy` replaces the app's `task_publish_retry_policy` for this send. Raises JobNotFound,
    or JobNotSubmittable for a finished job or a pipeline stage.
    """
    options = {} if retry_policy is None else {"retry_policy": retry_policy}
    store = store or default_store()
    celery = app or _default_app()
    job = store.get_job(job_id)
    if job.terminal:
        raise JobNotSubmittable(f"job {job_id} is already {job.state}; create a new job to run it again")
    if job.parent_id:
        raise JobNotSubmittable(f"job {job_id} is stage {job.stage_name} of pipeline {job.parent_id}; submit the pipeline")

    if job.type == JobType.PIPELINE.value:
        _pipeline_chain(celery, store, job).apply_async(**options)
        logger.info("pipeline %s sent with %d stages", job.id, len(store.get_job(job.id).children))
    else:
        _run_signature(celery, job).apply_async(**options)
        logger.info("job %s (%s) sent to queue %s", job.id, job.type, celery.w2s_settings.gpu_queue)
    return store.get_job(job_id)


def resubmit(job_id: str, *, store: JobStore | None = None, app: Celery | None = None) -> None:
    """Send a requeued job again; a pipeline stage is sent with the rest of its pipeline's chain."""
    store = store or default_store()
    celery = app or _default_app()
    job = store.get_job(job_id)
    if job.parent_id:
        parent = store.get_job(job.parent_id)
        if parent.terminal:
            logger.info("job %s not resent: its pipeline %s is %s", job_id, parent.id, parent.state)
            return
        _pipeline_chain(celery, store, parent).apply_async()
    elif not job.terminal:
        _run_signature(celery, job).apply_async()
    logger.info("job %s sent again (its worker or its broker message was lost)", job_id)


def cancel_job(job_id: str, *, store: JobStore | None = None, app: Celery | None = None) -> Job:
    """Cancel a job: set its cancel flag (read by the running worker) and revoke its queued messages.

    Revoking needs a broker with broadcast (Redis); on the embedded broker only the flag is set,
    which is enough because every worker checks it before and while running a job.
    """
    store = store or default_store()
    celery = app or _default_app()
    job = store.request_cancel(job_id)
    if not celery.w2s_settings.embedded:
        task_ids = [job.id] + [child.id for child in job.children]
        celery.control.revoke(task_ids)
    logger.info("job %s cancel requested; state %s", job_id, job.state)
    return job
