"""One exception hierarchy for the HTTP API, mapped once to statuses and one error body.

Every failure a client sees has the body

    {"error": {"code": "...", "message": "...", "field": "...", "value": ..., "fix": "..."}}

`code` is machine-readable and stable, `message` names the field and the value, and `fix` says
what to do next. Route handlers raise an `APIError` subclass; `install_error_handlers` turns it,
FastAPI's request validation errors, unknown routes, and database or broker outages into that
body. `error_responses(...)` documents the statuses of a route in the OpenAPI schema.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    """Error body: the failure, its field and value, and the fix."""

    code: str = Field(description="Machine-readable error code, e.g. 'invalid_config' or 'job_not_found'.")
    message: str = Field(description="What failed, naming the field and the value.")
    field: str | None = Field(None, description="Dotted path of the offending field, header or parameter, if any.")
    value: Any = Field(None, description="The offending value as received (shortened when long), if any.")
    fix: str | None = Field(None, description="What to do next.")


class ErrorResponse(BaseModel):
    """Body of every error response."""

    error: ErrorDetail


class APIError(Exception):
    """Base of every error a route raises on purpose; `status` is its HTTP status."""

    status: int = 500
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        field: str | None = None,
        value: Any = None,
        fix: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.code = code or type(self).code
        self.field = field
        self.value = value
        self.fix = fix
        self.headers = headers

    def detail(self) -> ErrorDetail:
        return ErrorDetail(code=self.code, message=self.message, field=self.field, value=_short(self.value), fix=self.fix)


class InvalidInput(APIError):
    """The request is well-formed but a field has an invalid value."""

    status = 422
    code = "invalid_input"


class Unauthorized(APIError):
    """No valid API key was sent."""

    status = 401
    code = "unauthorized"


class Forbidden(APIError):
    """The API key lacks the scope the route needs."""

    status = 403
    code = "forbidden"


class NotFound(APIError):
    """No resource has the requested id (or the key may not see it)."""

    status = 404
    code = "not_found"


class Conflict(APIError):
    """The resource is in a state that does not allow the request."""

    status = 409
    code = "conflict"


class PayloadTooLarge(APIError):
    """The request body exceeds a configured limit."""

    status = 413
    code = "payload_too_large"


class QueueFull(APIError):
    """Too many jobs are waiting; the client should retry later."""

    status = 429
    code = "queue_full"


class ServiceUnavailable(APIError):
    """The job database or the broker cannot be reached."""

    status = 503
    code = "service_unavailable"


# Longer values are cut in error bodies, so an oversized field does not come back whole.
MAX_VALUE_CHARS = 200

STATUS_DESCRIPTIONS = {
    401: "Missing, unknown or revoked API key.",
    403: "The API key lacks the scope this route needs.",
    404: "No resource with this id, or it belongs to another API key.",
    409: "The resource's state does not allow this request.",
    413: "The request body exceeds the configured size limit.",
    422: "A field, parameter or header has an invalid value.",
    429: "The job queue is full; retry later.",
    500: "Unexpected server error.",
    503: "The job database or the broker is unavailable.",
}

STATUS_EXAMPLES = {
    401: ErrorDetail(
        code="unauthorized",
        message="missing API key: the Authorization header is absent",
        field="Authorization",
        fix="Send 'Authorization: Bearer <key>'; an operator creates keys with `w2s keys create`.",
    ),
    403: ErrorDetail(
        code="forbidden",
        message="API key 'ci' lacks scope 'jobs'; it has ['score']",
        field="Authorization",
        value=["score"],
        fix="Use a key with scope 'jobs', or ask an operator for one.",
    ),
    404: ErrorDetail(
        code="job_not_found",
        message="job 0b6f5f7c-3d57-4c58-a3c1-6f4f3b1e6c1a not found",
        field="job_id",
        value="0b6f5f7c-3d57-4c58-a3c1-6f4f3b1e6c1a",
        fix="List your jobs with GET /v1/jobs.",
    ),
    409: ErrorDetail(
        code="job_finished",
        message="job 0b6f5f7c-3d57-4c58-a3c1-6f4f3b1e6c1a is already succeeded and cannot be cancelled",
        field="job_id",
        value="0b6f5f7c-3d57-4c58-a3c1-6f4f3b1e6c1a",
        fix="Only queued or running jobs can be cancelled.",
    ),
    413: ErrorDetail(
        code="payload_too_large",
        message="upload of 734003200 bytes exceeds the limit of 536870912 bytes",
        field="file",
        value=734003200,
        fix="Split the file, or ask the operator to raise W2S_MAX_UPLOAD_BYTES.",
    ),
    422: ErrorDetail(
        code="invalid_config",
        message="config.student.anchor.lam: Input should be greater than or equal to 0",
        field="config.student.anchor.lam",
        value=-1,
        fix="Correct the field and send the request again.",
    ),
    429: ErrorDetail(
        code="queue_full",
        message="100 jobs are queued, the limit is 100",
        fix="Retry after some jobs have finished.",
    ),
    500: ErrorDetail(code="internal_error", message="unexpected server error", fix="Retry later; the server log has the details."),
    503: ErrorDetail(
        code="broker_unavailable",
        message="the broker at redis://127.0.0.1:6379/0 is unreachable: Connection refused",
        fix="Retry later; an operator should check the broker (GET /v1/health/ready).",
    ),
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Return the `responses=` entry that documents `statuses` with the error body and an example."""
    return {
        status: {
            "model": ErrorResponse,
            "description": STATUS_DESCRIPTIONS[status],
            "content": {"application/json": {"example": {"error": STATUS_EXAMPLES[status].model_dump()}}},
        }
        for status in statuses
    }


def _short(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        return value[:MAX_VALUE_CHARS] + "..."
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    return value


def error_response(error: APIError) -> JSONResponse:
    """Render `error` as the one error body with its status and headers."""
    body = ErrorResponse(error=error.detail())
    return JSONResponse(status_code=error.status, content=body.model_dump(mode="json"), headers=error.headers)


def _validation_error(exc: RequestValidationError) -> InvalidInput:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        # FastAPI puts the character offset of the syntax error where a field name would be.
        location = first.get("loc", ())
        offset = location[1] if len(location) > 1 else "?"
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        return InvalidInput(
            f"body: invalid JSON at character {offset}: {reason}",
            code="invalid_json",
            field="body",
            fix="Send the body as one JSON document (Content-Type: application/json); check quotes, commas and brackets.",
        )
    location = [str(part) for part in first.get("loc", ())]
    # The first element names where the value came from: body, query, path or header.
    field = ".".join(location[1:]) if len(location) > 1 else ".".join(location) or None
    message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more invalid field(s))"
    value = first.get("input")
    if isinstance(value, dict):
        value = None  # a missing field reports its whole parent object; that helps no one
    return InvalidInput(message, code="invalid_request", field=field, value=value, fix="Correct the field and send the request again.")


def _http_error(exc: StarletteHTTPException) -> APIError:
    cause = exc.__cause__
    if exc.status_code == 400 and isinstance(cause, UnicodeDecodeError):
        # FastAPI turns a body it cannot decode into a bare 400 "There was an error parsing the body".
        return InvalidInput(
            f"body: the request body is not valid UTF-8 (byte 0x{cause.object[cause.start]:02x} at position {cause.start})",
            code="invalid_json",
            field="body",
            value=cause.start,
            fix="Encode the JSON body as UTF-8; escape other characters as \\uXXXX.",
        )
    if exc.status_code == 404:
        return NotFound(f"no route matches this path: {exc.detail}", code="route_not_found", fix="See GET /docs for the routes.")
    if exc.status_code == 405:
        return APIError(f"method not allowed: {exc.detail}", code="method_not_allowed", fix="See GET /docs for the methods of each route.")
    error = APIError(str(exc.detail), code=f"http_{exc.status_code}", headers=getattr(exc, "headers", None))
    error.status = exc.status_code
    return error


def install_error_handlers(app: FastAPI) -> None:
    """Map APIError, request validation, HTTP errors, database outages and bugs to the error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status >= 500:
            logger.error("%s %s failed with %d %s: %s", request.method, request.url.path, exc.status, exc.code, exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(_http_error(exc))

    @app.exception_handler(OperationalError)
    async def _database_down(request: Request, exc: OperationalError) -> JSONResponse:
        logger.error("%s %s: job database unavailable: %s", request.method, request.url.path, exc.orig)
        return error_response(database_unavailable(exc))

    @app.exception_handler(DBAPIError)
    async def _database_error(request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            logger.error("%s %s: job database connection lost: %s", request.method, request.url.path, exc.orig)
            return error_response(database_unavailable(exc))
        logger.exception("%s %s: database error", request.method, request.url.path)
        return error_response(APIError("unexpected database error", fix="Retry later; the server log has the details."))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s: unexpected error", request.method, request.url.path)
        return error_response(APIError("unexpected server error", fix="Retry later; the server log has the details."))


def database_unavailable(exc: BaseException) -> ServiceUnavailable:
    """Build the 503 of an unreachable job database; the URL is not shown because it may hold a password."""
    reason = getattr(exc, "orig", None) or exc
    return ServiceUnavailable(
        f"the job database is unavailable: {reason}",
        code="database_unavailable",
        fix="Retry later; an operator should check the database (GET /v1/health/ready).",
        headers={"Retry-After": "30"},
    )


def broker_unavailable(exc: BaseException, url: str) -> ServiceUnavailable:
    """Build the 503 of an unreachable broker; `url` must already have its password removed."""
    return ServiceUnavailable(
        f"the broker at {url} is unreachable: {exc}",
        code="broker_unavailable",
        fix="Retry later; an operator should check the broker (GET /v1/health/ready).",
        headers={"Retry-After": "30"},
    )
