"""Worker lifecycle: log format with job ids, migrations at start, the lease reaper, start/stop logs."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import Celery, signals
from kombu.exceptions import OperationalError as KombuOperationalError
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from workers import leases
from workers.db import JobNotFound, default_store, dispose_engines, upgrade_database
from workers.joblog import install_job_id_format
from workers.settings import get_settings

logger = logging.getLogger("workers.worker")


class Reaper(threading.Thread):
    """Finds running jobs whose lease expired (their worker died) and requeues or fails them.

    Every worker runs one, in its main process, so a job left by a dead worker is recovered by any
    worker still alive or started later, within about lease_s + reaper_interval_s.
    """

    def __init__(self, app: Celery):
        super().__init__(name="w2s-lease-reaper", daemon=True)
        self.app = app
        self.settings = get_settings()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            self.scan()
            if self._stop_event.wait(self.settings.reaper_interval_s):
                return

    def scan(self) -> None:
        from workers.submit import resubmit

        store = default_store()
        try:
            reaped = leases.reap_expired_leases(
                store, max_attempts=self.settings.max_attempts, grace_s=self.settings.heartbeat_s
            )
        except SQLAlchemyError as exc:
            logger.warning("lease scan failed, will retry in %.0f s: %s", self.settings.reaper_interval_s, exc)
            return
        for job in reaped:
            extra = {"job_id": job.job_id}
            if job.action == "requeued":
                logger.warning("lease of %s expired; job requeued and sent again", job.previous_owner, extra=extra)
                try:
                    resubmit(job.job_id, store=store, app=self.app)
                except (JobNotFound, SQLAlchemyError, KombuOperationalError, OSError) as exc:
                    # The job is now queued with no message, and later scans only look at running
                    # jobs. An operator has to resubmit it, so this is an error.
                    logger.error("requeued job could not be sent again: %s", exc, extra=extra)
            elif job.action == "failed":
                logger.error("lease of %s expired and no attempts are left; job marked failed", job.previous_owner, extra=extra)
            else:
                logger.info("lease of %s expired on a cancelled job; job marked cancelled", job.previous_owner, extra=extra)

    def stop(self) -> None:
        self._stop_event.set()


_reaper: Reaper | None = None


def _safe_database_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


@signals.after_setup_logger.connect
def _format_worker_logs(logger: logging.Logger, **kwargs: Any) -> None:
    install_job_id_format(logger)


@signals.after_setup_task_logger.connect
def _format_task_logs(logger: logging.Logger, **kwargs: Any) -> None:
    install_job_id_format(logger)


@signals.worker_init.connect
def _migrate_on_start(sender: Any = None, **kwargs: Any) -> None:
    # Progress bars redraw many times a second and would flood the log; progress goes to the job row.
    os.environ.setdefault("TQDM_DISABLE", "1")
    settings = get_settings()
    if settings.auto_migrate:
        upgrade_database(settings.resolved_database_url)
        logger.info("job database %s is at the latest migration", _safe_database_url(settings.resolved_database_url))
    # Connections opened here must not be shared with the pool processes forked next.
    dispose_engines()


@signals.worker_process_init.connect
def _fresh_connections_in_pool_process(**kwargs: Any) -> None:
    dispose_engines()


@signals.worker_ready.connect
def _start(sender: Any = None, **kwargs: Any) -> None:
    global _reaper
    settings = get_settings()
    app = sender.app
    queues = sorted(queue.name for queue in app.amqp.queues.consume_from.values()) if app.amqp.queues.consume_from else []
    logger.info(
        "worker %s started: queues %s, broker %s%s, database %s, artifacts %s",
        sender.hostname,
        ",".join(queues),
        maybe_sanitize_url(settings.resolved_broker_url),
        " (embedded)" if settings.embedded else "",
        _safe_database_url(settings.resolved_database_url),
        settings.resolved_artifact_root,
    )
    _reaper = Reaper(app)
    _reaper.start()


@signals.worker_shutdown.connect
def _stop(sender: Any = None, **kwargs: Any) -> None:
    if _reaper is not None:
        _reaper.stop()
    logger.info("worker %s stopping", getattr(sender, "hostname", "?"))


@signals.task_retry.connect
def _log_retry(request: Any = None, reason: Any = None, **kwargs: Any) -> None:
    job_id = request.args[0] if request is not None and request.args else "-"
    logger.warning("task %s will be retried: %s", getattr(request, "task", "?"), reason, extra={"job_id": job_id})
