"""Scoring routes: /v1/score, /v1/compare, OpenRLHF's /get_reward, model info and health.

The handlers validate the request, call the one `ScoringEngine` on `app.state.scoring_engine`,
and translate engine errors to the API's error body. They run on the scorer service
(`app.scoring_main`), never on the jobs API.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy import text

from app.api.deps import SettingsDep, StoreDep, current_principal, require_scope
from app.auth import Principal
from app.errors import APIError, InvalidInput, NotFound, QueueFull, ServiceUnavailable, error_responses
from app.schemas.health import Liveness, Readiness
from app.schemas.scoring import (
    CompareRequest,
    CompareResponse,
    GetRewardRequest,
    GetRewardResponse,
    ScoreRequest,
    ScoreResponse,
    ScoringModelInfo,
    ScoringModels,
    text_chars,
    text_value,
)
from ml.modeling import ModelLoadError
from ml.serving import ModelNotFound, ScoringEngine, ScoringResult, bradley_terry_matrix
from ml.serving import QueueFull as EngineQueueFull
from ml.serving import RequestLimitExceeded
from workers.settings import Settings

logger = logging.getLogger(__name__)

router = APIRouter(tags=["scoring"])

SCORING_ERRORS = error_responses(401, 403, 404, 413, 422, 429, 500)


def get_engine(request: Request) -> ScoringEngine:
    return request.app.state.scoring_engine


EngineDep = Annotated[ScoringEngine, Depends(get_engine)]
ScoreKey = Annotated[Principal, Depends(require_scope("score"))]


def _basic_password(request: Request) -> str | None:
    """Return the password of an HTTP Basic Authorization header, or None when there is none."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, separator, password = decoded.partition(":")
    return password if separator else None


def openrlhf_principal(request: Request, settings: SettingsDep, store: StoreDep) -> Principal:
    """Authenticate /get_reward by bearer key, or by an API key sent as the HTTP Basic password.

    OpenRLHF's remote reward client sends no Authorization header, but its HTTP library (requests)
    turns credentials in the URL into Basic auth, so `--remote_rm_url https://rm:<key>@host/get_reward`
    authenticates without changes to OpenRLHF.
    """
    password = _basic_password(request)
    credentials = None
    if password is not None:
        credentials = HTTPAuthorizationCredentials(scheme="Bearer", credentials=password)
    else:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            credentials = HTTPAuthorizationCredentials(scheme="Bearer", credentials=value.strip())
    principal = current_principal(settings, store, credentials)
    return require_scope("score")(principal)


OpenRLHFKey = Annotated[Principal, Depends(openrlhf_principal)]


# --- limits and errors ----------------------------------------------------------------------------


def check_item_limits(settings: Settings, field: str, count: int, chars: int) -> None:
    """Raise 422 when a request has more items or characters than the settings allow."""
    if count > settings.scoring_max_items:
        raise InvalidInput(
            f"{field}: request has {count} items, over the limit of {settings.scoring_max_items} items",
            code="too_many_items",
            field=field,
            value=count,
            fix=f"Send at most {settings.scoring_max_items} items per request (W2S_SCORING_MAX_ITEMS), or split the request.",
        )
    if chars > settings.scoring_max_chars:
        raise InvalidInput(
            f"{field}: request has {chars} characters of text, over the limit of {settings.scoring_max_chars} characters",
            code="too_many_characters",
            field=field,
            value=chars,
            fix=f"Send at most {settings.scoring_max_chars} characters per request (W2S_SCORING_MAX_CHARS), or split the request.",
        )


class RejectionLog:
    """Logs 429 rejections at most once per `interval_s`, with the count since the last line."""

    def __init__(self, interval_s: float = 10.0):
        self.interval_s = interval_s
        self._count = 0
        self._logged_at = float("-inf")

    def record(self, error: EngineQueueFull) -> None:
        self._count += 1
        now = time.monotonic()
        if now - self._logged_at >= self.interval_s:
            logger.warning("scoring queue full: %d request(s) rejected with 429 since the last report; %s", self._count, error)
            self._count = 0
            self._logged_at = now


_rejections = RejectionLog()


def engine_error(error: Exception, model: str) -> APIError:
    """Translate an engine error to the API error returned to the client."""
    if isinstance(error, ModelNotFound):
        return NotFound(
            f"model {model!r} not found: no registered model has this id or alias",
            code="model_not_found",
            field="model",
            value=model,
            fix="List registered models with GET /v1/models on the jobs API.",
        )
    if isinstance(error, RequestLimitExceeded):
        return InvalidInput(
            f"request has {error.received} {error.unit} after truncation, over the limit of {error.limit} {error.unit}",
            code="too_many_tokens",
            field="items",
            value=error.received,
            fix=f"Send at most {error.limit} {error.unit} per request (W2S_SCORING_MAX_TOKENS), or split the request.",
        )
    if isinstance(error, EngineQueueFull):
        _rejections.record(error)
        return QueueFull(
            str(error),
            code="scoring_queue_full",
            value=error.queued,
            fix=f"Retry after {error.retry_after_s} s, or send smaller requests.",
            headers={"Retry-After": str(error.retry_after_s)},
        )
    if isinstance(error, ModelLoadError):
        return APIError(
            f"model {model!r} could not be loaded: {error}",
            code="model_load_failed",
            field="model",
            value=model,
            fix="An operator should check the model folder; the scorer log has the details.",
        )
    logger.error("model %s: unexpected scoring error: %s", model, error)
    return APIError("unexpected scoring error", fix="Retry later; the scorer log has the details.")


async def run_scoring(engine: ScoringEngine, model: str, items: list[Any]) -> ScoringResult:
    try:
        return await engine.score(model, items)
    except (ModelNotFound, RequestLimitExceeded, EngineQueueFull, ModelLoadError) as error:
        raise engine_error(error, model) from error


def item_scores(result: ScoringResult) -> list[dict[str, Any]]:
    return [vars(item) for item in result.items]


def json_response(content: dict[str, Any]) -> Response:
    """Serialize a response body that the handler built to match its response model.

    Returning a Response skips FastAPI's validation of the returned value against the response
    model, which costs more CPU than the scoring request's own bookkeeping on a hot path.
    """
    return Response(content=json.dumps(content, allow_nan=False), media_type="application/json")


# --- routes ---------------------------------------------------------------------------------------


@router.post("/v1/score", response_model=ScoreResponse, responses=SCORING_ERRORS)
async def score(body: ScoreRequest, engine: EngineDep, settings: SettingsDep, principal: ScoreKey) -> Response:
    """Score prompt-response pairs or conversations: raw and normalized reward, OOD distance and flag."""
    check_item_limits(settings, "items", len(body.items), sum(item.chars() for item in body.items))
    result = await run_scoring(engine, body.model, [item.to_input() for item in body.items])
    return json_response(
        {
            "model": result.model["id"],
            "max_length": result.model["max_length"],
            "truncated_items": result.truncated,
            "items": item_scores(result),
        }
    )


@router.post("/v1/compare", response_model=CompareResponse, responses=SCORING_ERRORS)
async def compare(body: CompareRequest, engine: EngineDep, settings: SettingsDep, principal: ScoreKey) -> Response:
    """Score two or more responses to one prompt and return the Bradley-Terry probability of each pair."""
    chars = text_chars(body.prompt) * len(body.responses) + sum(text_chars(r) for r in body.responses)
    check_item_limits(settings, "responses", len(body.responses), chars)
    prompt = text_value(body.prompt)
    result = await run_scoring(engine, body.model, [(prompt, text_value(response)) for response in body.responses])
    rewards = result.rewards
    return json_response(
        {
            "model": result.model["id"],
            "max_length": result.model["max_length"],
            "truncated_items": result.truncated,
            "items": item_scores(result),
            "probabilities": bradley_terry_matrix(rewards),
            "best": max(range(len(rewards)), key=rewards.__getitem__),
        }
    )


@router.post("/get_reward", response_model=GetRewardResponse, responses=SCORING_ERRORS)
async def get_reward(
    body: GetRewardRequest,
    engine: EngineDep,
    settings: SettingsDep,
    principal: OpenRLHFKey,
    model: Annotated[str | None, Query(min_length=1, max_length=200, description="Model id or alias.")] = None,
    normalize: Annotated[bool, Query(description="Return normalized rewards instead of raw ones.")] = False,
) -> Response:
    """OpenRLHF's remote reward protocol: {"query": [full text, ...]} gives {"rewards", "scores", "extra_logs"}."""
    name = body.model or model or settings.scoring_default_model
    if name is None:
        raise InvalidInput(
            "no model given: the request has no 'model' field or query parameter and W2S_SCORING_DEFAULT_MODEL is unset",
            code="model_missing",
            field="model",
            fix="Append ?model=<id or alias> to the URL, or ask the operator to set W2S_SCORING_DEFAULT_MODEL.",
        )
    check_item_limits(settings, "query", len(body.query), sum(len(q) for q in body.query))
    result = await run_scoring(engine, name, list(body.query))
    if normalize:
        if result.model["normalization"] is None:
            raise InvalidInput(
                f"model {result.model['id']} has no normalization statistics, so normalize=true cannot be served",
                code="normalization_missing",
                field="normalize",
                value=True,
                fix="Drop normalize=true, or train the model with held-out pairs so that their mean and std are stored.",
            )
        values = [item.normalized for item in result.items]
    else:
        values = result.rewards
    extra_logs: dict[str, list[float]] = {}
    if result.model["ood"] is not None:
        extra_logs["ood_distance"] = [item.ood_distance for item in result.items]
        extra_logs["ood"] = [float(item.ood) for item in result.items]
    return json_response({"rewards": values, "scores": values, "extra_logs": extra_logs})


@router.get("/v1/score/models", response_model=ScoringModels, responses=error_responses(401, 403))
async def loaded_models(engine: EngineDep, principal: ScoreKey) -> ScoringModels:
    """List the models loaded in the scorer now, least recently used first."""
    return ScoringModels(items=[ScoringModelInfo(**served.info()) for served in engine.cache.loaded()])


@router.get("/v1/score/models/{model}", response_model=ScoringModelInfo, responses=error_responses(401, 403, 404, 500))
async def model_info(model: str, engine: EngineDep, principal: ScoreKey) -> ScoringModelInfo:
    """Describe a model as served: id, base model, precision, max length, normalization and OOD threshold; loads it if needed."""
    try:
        info = await engine.model_info(model)
    except (ModelNotFound, ModelLoadError) as error:
        raise engine_error(error, model) from error
    return ScoringModelInfo(**info)


# --- health ---------------------------------------------------------------------------------------


@router.get("/v1/health/live", response_model=Liveness, tags=["operations"])
def live() -> Liveness:
    """Return 200 while the process serves requests; checks nothing else."""
    return Liveness()


def _check_database(store) -> None:
    with store.engine.connect() as connection:
        connection.execute(text("SELECT 1"))


@router.get("/v1/health/ready", response_model=Readiness, responses=error_responses(401, 503), tags=["operations"])
async def ready(
    settings: SettingsDep, store: StoreDep, engine: EngineDep, _principal: Annotated[Principal, Depends(current_principal)]
) -> Readiness:
    """Check the database (API keys and the model registry); 503 when it is down.

    Needs any valid key, because the response names internal services. Probes without a key use /live.
    """
    try:
        await asyncio.wait_for(asyncio.to_thread(_check_database, store), timeout=settings.health_timeout_s)
    except Exception as error:  # every failure means "not ready"; the reason goes to the client and the log
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        logger.warning("readiness: database is down: %s", reason)
        raise ServiceUnavailable(
            f"not ready: database down ({reason})",
            code="not_ready",
            field="database",
            fix="Check the database; the scorer retries on the next request.",
            headers={"Retry-After": "10"},
        ) from error
    checks = {"database": "ok", "scoring_queue": f"{engine.admission.queued}/{engine.admission.capacity} sequences"}
    return Readiness(checks=checks)
