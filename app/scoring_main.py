"""The scoring service: `uvicorn app.scoring_main:app --port 8001`.

It serves registered reward models over HTTP (/v1/score, /v1/compare, OpenRLHF's /get_reward) from
one `ml.serving.ScoringEngine`, checks bearer keys with the 'score' scope against the same
database as the jobs API, and resolves model ids and aliases through the same model registry.
Run it as one process (one uvicorn worker): each process loads its own copy of every model.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI

from app.api.routes import scoring
from app.errors import install_error_handlers
from app.limits import BodySizeLimit
from app.services.model_policy import check_model_folder
from app.services.references import find_model
from ml.serving import ModelNotFound, ModelRef, ModelResolver, ScoringEngine, ServingConfig
from app.startup import migrate_or_retry
from workers.db import JobStore
from workers.settings import Settings, get_settings

logger = logging.getLogger("app.scoring")

DESCRIPTION = """Reward scoring for RLHF loops: dynamic batching across concurrent clients, raw and
normalized rewards, an out-of-distribution flag, and OpenRLHF's remote reward protocol.

Every request except health needs `Authorization: Bearer <key>` with the 'score' scope
(`/get_reward` also takes the key as the HTTP Basic password). Every error has the body
`{"error": {"code", "message", "field", "value", "fix"}}`."""


class RegistryResolver:
    """Resolves model ids and aliases through the model registry of the job database.

    A model folder that needs pickle loading or remote code, which the operator has not enabled,
    is rejected here with 422, before any of its files are loaded.
    """

    def __init__(self, store: JobStore, settings: Settings):
        self.store = store
        self.settings = settings

    def resolve(self, name: str) -> ModelRef:
        row = find_model(self.store, name)
        if row is None:
            raise ModelNotFound(name)
        check_model_folder(self.settings, row.path, "model", name)
        return ModelRef(id=row.id, path=row.path, name=row.name)


def serving_config(settings: Settings) -> ServingConfig:
    """Build the engine settings from the W2S_SCORING_* settings."""
    if settings.scoring_max_items > settings.scoring_max_queue:
        raise ValueError(
            f"scoring_max_items ({settings.scoring_max_items}) exceeds scoring_max_queue ({settings.scoring_max_queue}), "
            "so a request of the maximum size could never be queued; lower W2S_SCORING_MAX_ITEMS or raise W2S_SCORING_MAX_QUEUE"
        )
    return ServingConfig(
        token_budget=settings.scoring_token_budget,
        max_wait_ms=settings.scoring_max_wait_ms,
        max_queue=settings.scoring_max_queue,
        memory_budget_mb=settings.scoring_memory_budget_mb,
        precision=settings.scoring_precision,
        max_length=settings.scoring_max_length,
        max_request_tokens=settings.scoring_max_tokens,
        alias_refresh_s=settings.scoring_alias_refresh_s,
        device=settings.scoring_device,
        allow_remote_code=settings.allow_remote_code,
        allow_pickle=settings.allow_pickle,
    )


def create_app(
    settings: Settings | None = None,
    *,
    store: JobStore | None = None,
    resolver: ModelResolver | None = None,
) -> FastAPI:
    """Build the scoring service for `settings` (default: the environment).

    `resolver` replaces the model registry, e.g. a `StaticResolver` that serves model folders by name.
    """
    settings = settings or get_settings()
    store = store or JobStore(settings.resolved_database_url, settings)
    config = serving_config(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not logging.getLogger().handlers:
            # uvicorn configures only its own loggers; without this the engine's INFO logs are lost.
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if settings.auth_disabled:
            logger.warning("authentication is DISABLED (W2S_AUTH_DISABLED=true): every request is accepted as an admin")
        stop_migration_retry = migrate_or_retry(settings.resolved_database_url, logger) if settings.auto_migrate else None
        engine = ScoringEngine(resolver or RegistryResolver(store, settings), config)
        app.state.scoring_engine = engine
        for name in settings.scoring_preload_models:
            try:
                await engine.model(name)
            except Exception:  # the service still starts; requests for this model report the error
                logger.exception("preloading model %r failed", name)
        logger.info(
            "scorer started: token budget %d, max wait %.1f ms, queue %d sequences, memory budget %d MiB, precision %s",
            config.token_budget,
            config.max_wait_ms,
            config.max_queue,
            config.memory_budget_mb,
            config.precision,
        )
        yield
        engine.close()
        if stop_migration_retry is not None:
            stop_migration_retry.set()
        logger.info("scorer stopped")

    app = FastAPI(
        title="w2s-anchor scorer",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {"name": "scoring", "description": "Rewards, comparisons and OpenRLHF's remote reward protocol."},
            {"name": "operations", "description": "Health checks."},
        ],
    )
    app.state.settings = settings
    app.state.store = store
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.scoring_max_body_bytes, setting="W2S_SCORING_MAX_BODY_BYTES")
    app.include_router(scoring.router)
    return app


app = create_app()
