"""The FastAPI app of w2s-anchor: `uvicorn app.main:app`.

`create_app` builds the app for given settings and a Celery app (tests pass their own); `app` is
the one built from the W2S_ environment variables. Job routes import no torch or transformers.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from app.api.routes import datasets, health, jobs, metrics, models
from app.errors import install_error_handlers
from app.limits import BodySizeLimit
from app.metrics import JobCollector, RequestMetrics
from app.startup import migrate_or_retry
from workers.db import JobStore
from workers.settings import Settings, get_settings

logger = logging.getLogger("app")

DESCRIPTION = """Weak-to-strong reward-model training as a service: upload preference datasets, run
weak labelling, student training, evaluation and whole pipelines on Celery workers, follow their
progress, fetch reports, and manage the trained reward models.

Every request except health and metrics needs `Authorization: Bearer <key>`. Every error has the
body `{"error": {"code", "message", "field", "value", "fix"}}`."""


def create_app(settings: Settings | None = None, *, celery: Any = None, store: JobStore | None = None) -> FastAPI:
    """Build the API for `settings` (default: the environment) and a Celery app to queue jobs with."""
    settings = settings or get_settings()
    store = store or JobStore(settings.resolved_database_url, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.auth_disabled:
            logger.warning("authentication is DISABLED (W2S_AUTH_DISABLED=true): every request is accepted as an admin")
        stop_migration_retry = migrate_or_retry(settings.resolved_database_url, logger) if settings.auto_migrate else None
        logger.info("API started; job database %s", store.engine.url.render_as_string(hide_password=True))
        yield
        if stop_migration_retry is not None:
            stop_migration_retry.set()
        logger.info("API stopped")

    app = FastAPI(
        title="w2s-anchor",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {"name": "datasets", "description": "Preference files, validated on upload and stored by content hash."},
            {"name": "jobs", "description": "Weak labelling, training, evaluation and pipeline jobs."},
            {"name": "models", "description": "Registered reward models, their lineage and aliases."},
            {"name": "operations", "description": "Health checks and Prometheus metrics."},
        ],
    )
    app.state.settings = settings
    app.state.store = store
    app.state.celery = celery
    app.state.metrics_registry = CollectorRegistry()
    app.state.metrics_registry.register(JobCollector(store))

    install_error_handlers(app)
    # Uploads stream past this limit; the upload route counts them against W2S_MAX_UPLOAD_BYTES.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes, setting="W2S_MAX_REQUEST_BYTES", streamed_paths={"/v1/datasets"})
    app.add_middleware(RequestMetrics, registry=app.state.metrics_registry)
    for router in (health.router, metrics.router, datasets.router, jobs.router, models.router):
        app.include_router(router)
    return app


app = create_app()
