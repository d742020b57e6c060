"""Prometheus metrics in the text exposition format."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import CurrentPrincipal
from app.errors import error_responses

router = APIRouter(prefix="/v1", tags=["operations"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"description": "Prometheus text format: requests, latencies, queue depth and jobs by state.", "content": {CONTENT_TYPE_LATEST: {}}}}
    | error_responses(401, 503),
)
def metrics(request: Request, principal: CurrentPrincipal) -> Response:
    """Return the Prometheus metrics of this API process; any valid API key may read them.

    Prometheus sends the key with `authorization: {type: Bearer, credentials: <key>}` in its scrape config.
    """
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
