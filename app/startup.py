"""Database migrations at API startup that tolerate an unreachable database.

An API that exits when its database is down is restarted by its supervisor, fails again, and
loops. The jobs API and the scorer start anyway, return 503 `database_unavailable` on routes that
need the database (app/errors.py), and apply the migrations from a background thread once the
database accepts connections.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.exc import SQLAlchemyError

from workers.db import upgrade_database

MIGRATION_RETRY_S = 10.0


def migrate_or_retry(url: str, logger: logging.Logger, retry_s: float = MIGRATION_RETRY_S) -> threading.Event:
    """Apply the migrations to `url`, or on a database error retry them every `retry_s` seconds on a thread.

    Returns an event that stops the retries when set (at shutdown).
    """
    stop = threading.Event()
    try:
        upgrade_database(url)
        return stop
    except SQLAlchemyError as exc:
        logger.error(
            "job database unavailable at startup; requests that need it get 503, migrations retried every %.0f s: %s",
            retry_s,
            getattr(exc, "orig", None) or exc,
        )

    def retry() -> None:
        failures = 1
        while not stop.wait(retry_s):
            try:
                upgrade_database(url)
            except SQLAlchemyError as exc:
                failures += 1
                if failures % 10 == 0:
                    logger.warning("job database still unavailable after %d tries: %s", failures, getattr(exc, "orig", None) or exc)
                continue
            logger.info("job database reachable after %d failed tries; migrations applied", failures)
            return

    threading.Thread(target=retry, name="w2s-migration-retry", daemon=True).start()
    return stop
