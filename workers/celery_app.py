"""The Celery app, configured from `workers.settings`.

Start a worker with `w2s worker` or `celery -A workers.celery_app worker -Q gpu,cpu -c 1`.

Broker: Redis when `W2S_BROKER_URL` is set. Without it the app uses the embedded broker: kombu's
SQLAlchemy transport over a SQLite file in `W2S_VAR_DIR`, so one machine runs the same tasks with
no server to install. Its limits (kombu 5.7): every process must be on the same machine as the
file, and workers poll the message table once a second. It has no broadcast, so `revoke` and
`celery inspect` do not work; cancellation still works through the job row. Delivered messages
stay in the table as invisible rows.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from workers.settings import Settings, get_settings

RUN_JOB_TASK = "w2s.run_job"
FINISH_PIPELINE_TASK = "w2s.finish_pipeline"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Build the Celery configuration of `settings`."""
    if settings.embedded:
        settings.var_dir.mkdir(parents=True, exist_ok=True)
        # kombu's SQLAlchemy transport passes these options to create_engine(); a 30 s SQLite
        # busy timeout lets several worker processes poll the same file.
        transport_options: dict[str, Any] = {"connect_args": {"timeout": 30}}
    else:
        # Redis redelivers a message that was not acknowledged within the visibility timeout,
        # even if its task is still running. Jobs acknowledge at the end (acks_late) and training
        # runs for hours, so the timeout is longer than the longest allowed task
        # (task_time_limit_s + task_kill_grace_s, checked in Settings): Redis never hands a
        # running job to a second worker. A worker that dies is found through its job's lease
        # instead (lease_s), so recovery does not wait for this timeout.
        transport_options = {"visibility_timeout": settings.visibility_timeout_s}
        if settings.redis_key_prefix:
            transport_options["global_keyprefix"] = settings.redis_key_prefix

    return {
        "broker_url": settings.resolved_broker_url,
        # Job state and outputs live in the job database; a result backend is optional.
        "result_backend": settings.result_backend,
        "task_ignore_result": settings.result_backend is None,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        # Keep a running job when the broker connection drops; its lease stops any duplicate.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # Delivery: acknowledge after the job ends, requeue it if the pool process dies, take one
        # message at a time, and run one job at a time per worker (one GPU each).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        # The soft limit raises inside the job, which is then marked failed. NOTE: a job killed at
        # the hard limit is not marked; the lease scan requeues it until max_attempts is used up.
        "task_soft_time_limit": settings.task_time_limit_s,
        "task_time_limit": settings.task_time_limit_s + settings.task_kill_grace_s,
        "task_queues": [Queue(settings.gpu_queue), Queue(settings.cpu_queue)],
        "task_default_queue": settings.cpu_queue,
        "task_routes": {
            RUN_JOB_TASK: {"queue": settings.gpu_queue},
            FINISH_PIPELINE_TASK: {"queue": settings.cpu_queue},
        },
        # Publishing retries with backoff when the broker is briefly unreachable.
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 5, "interval_start": 0.5, "interval_step": 1.0, "interval_max": 5.0},
        "worker_send_task_events": False,
        "worker_hijack_root_logger": True,
        # transformers prints its training logs to stdout; they are information, not warnings.
        "worker_redirect_stdouts_level": "INFO",
    }


def create_app(settings: Settings | None = None, *, set_as_current: bool = True) -> Celery:
    """Create a Celery app for `settings`; a process that only submits jobs may create its own."""
    settings = settings or get_settings()
    celery = Celery("w2s", include=["workers.tasks"], set_as_current=set_as_current)
    celery.conf.update(celery_config(settings))
    celery.w2s_settings = settings
    return celery


app = create_app()

# Worker start and stop hooks (logging, migrations, reaper) connect to Celery's signals on import.
import workers.worker_signals  # noqa: E402,F401
