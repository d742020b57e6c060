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
        self._failures = 0
        self._resend_failures = 0

    def run(self) -> None:
        while True:
            self.scan()
            if self._stop_event.wait(self.settings.reaper_interval_s):
                return

    def scan(self) -> None:
        from workers.submit import resubmit

        store = default_store()
        try:
            if _migration_pending.is_set():
                _migrate(self.settings)
            reaped = leases.reap_expired_leases(
                store, max_attempts=self.settings.max_attempts, grace_s=self.settings.heartbeat_s
            )
        except SQLAlchemyError as exc:
            self._failures += 1
            # An outage of the database repeats this every interval; the first failure and every
            # tenth one are logged.
            if self._failures == 1 or self._failures % 10 == 0:
                logger.warning(
                    "job database unavailable: lease scan failed %d time(s) in a row, retrying every %.0f s: %s",
                    self._failures,
                    self.settings.reaper_interval_s,
                    exc,
                )
            return
        if self._failures:
            logger.info("job database reachable again after %d failed lease scan(s)", self._failures)
            self._failures = 0
        for job in reaped:
            extra = {"job_id": job.job_id}
            if job.action == "requeued":
                logger.warning("lease of %s expired; job requeued and sent again", job.previous_owner, extra=extra)
                try:
                    resubmit(job.job_id, store=store, app=self.app)
                except (JobNotFound, SQLAlchemyError, KombuOperationalError, OSError) as exc:
                    # The job is now queued with no message; `resend_lost` sends it once the broker is back.
                    logger.error("requeued job could not be sent again: %s", exc, extra=extra)
            elif job.action == "failed":
                logger.error("lease of %s expired and no attempts are left; job marked failed", job.previous_owner, extra=extra)
            else:
                logger.info("lease of %s expired on a cancelled job; job marked cancelled", job.previous_owner, extra=extra)
        self.resend_lost(store)

    def resend_lost(self, store) -> None:
        """Send again the queued jobs whose broker message was lost, e.g. in a Redis restart."""
        from redis.exceptions import RedisError

        from workers.lost_messages import resend_lost_jobs

        try:
            resend_lost_jobs(store, self.app, self.settings)
        except (RedisError, SQLAlchemyError, KombuOperationalError, OSError) as exc:
            # Every scan tries again; while the broker is down the first failure and every tenth are logged.
            self._resend_failures += 1
            if self._resend_failures == 1 or self._resend_failures % 10 == 0:
                logger.warning(
                    "check for lost broker messages failed %d time(s) in a row, retrying every %.0f s: %s",
                    self._resend_failures,
                    self.settings.reaper_interval_s,
                    exc,
                )
            return
        self._resend_failures = 0

    def stop(self) -> None:
        self._stop_event.set()


_reaper: Reaper | None = None
# Set when the migrations could not be applied at start because the database was unreachable.
_migration_pending = threading.Event()
_migration_error: list[str] = []


def _migrate(settings) -> None:
    """Apply pending migrations; raises SQLAlchemyError while the database is unreachable."""
    upgrade_database(settings.resolved_database_url)
    if _migration_pending.is_set():
        _migration_pending.clear()
        logger.info("job database %s reachable; migrations applied", _safe_database_url(settings.resolved_database_url))


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
        try:
            upgrade_database(settings.resolved_database_url)
            logger.info("job database %s is at the latest migration", _safe_database_url(settings.resolved_database_url))
        except SQLAlchemyError as exc:
            # Exiting here would make a supervisor restart the worker in a loop. The worker starts,
            # and its reaper applies the migrations once the database accepts connections. Logging is not set
            # up yet, so the error is logged when the worker is ready.
            _migration_pending.set()
            _migration_error[:] = [str(getattr(exc, "orig", None) or exc)]
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
    if _migration_pending.is_set():
        logger.error(
            "job database %s unavailable at start; migrations not applied yet, retrying every %.0f s "
            "(jobs received meanwhile are retried with backoff): %s",
            _safe_database_url(settings.resolved_database_url),
            settings.reaper_interval_s,
            _migration_error[0] if _migration_error else "unknown error",
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
