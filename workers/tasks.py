"""Celery tasks: each takes a job id, and the work happens in `workers.runner`."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from workers.celery_app import FINISH_PIPELINE_TASK, RUN_JOB_TASK
from workers.db import default_store
from workers.runner import finish_pipeline, run_job_task
from workers.settings import get_settings


@shared_task(bind=True, name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True)
def run_job(self: Task, job_id: str) -> dict[str, Any]:
    """Run one weak_label, train or evaluate job (alone or as a pipeline stage)."""
    return run_job_task(self, job_id, default_store(), get_settings())


@shared_task(bind=True, name=FINISH_PIPELINE_TASK, acks_late=True)
def close_pipeline(self: Task, pipeline_id: str) -> dict[str, Any]:
    """Mark a pipeline succeeded after its last stage; runs on the cpu queue."""
    return finish_pipeline(pipeline_id, default_store())
