"""Liveness (no key, used by container healthchecks) and readiness (any valid key) of the API."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy import text

from app.api.deps import CeleryDep, CurrentPrincipal, SettingsDep, StoreDep
from app.errors import ServiceUnavailable, error_responses
from app.schemas.health import Liveness, Readiness

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/health", tags=["operations"])


@router.get("/live", response_model=Liveness)
def live() -> Liveness:
    """Return 200 while the process serves requests; checks nothing else."""
    return Liveness()


def _check_database(store) -> None:
    with store.engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def _check_broker(celery, timeout_s: float) -> None:
    with celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=timeout_s)


async def _probe(name: str, function, *args, timeout_s: float) -> str:
    try:
        await asyncio.wait_for(run_in_threadpool(function, *args), timeout=timeout_s + 1)
    except Exception as error:  # every failure means "not ready"; the reason goes to the client and the log
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        logger.warning("readiness: %s is down: %s", name, reason)
        return f"down: {reason}"
    return "ok"


@router.get("/ready", response_model=Readiness, responses=error_responses(401, 503))
async def ready(settings: SettingsDep, store: StoreDep, celery: CeleryDep, _principal: CurrentPrincipal) -> Readiness:
    """Check the job database and the broker; 503 names the one that is down.

    Needs any valid key, because the response names internal services. Probes without a key use /live.
    """
    timeout_s = settings.health_timeout_s
    database, broker = await asyncio.gather(
        _probe("database", _check_database, store, timeout_s=timeout_s),
        _probe("broker", _check_broker, celery, timeout_s, timeout_s=timeout_s),
    )
    checks = {"database": database, "broker": broker}
    down = [name for name, status in checks.items() if status != "ok"]
    if down:
        raise ServiceUnavailable(
            f"not ready: {' and '.join(down)} down ({'; '.join(f'{name} {checks[name]}' for name in down)})",
            code="not_ready",
            field=down[0],
            value=checks,
            fix=f"Check the {' and the '.join(down)} (broker {maybe_sanitize_url(celery.conf.broker_url)}); the API retries on the next request.",
            headers={"Retry-After": "10"},
        )
    return Readiness(checks=checks)
