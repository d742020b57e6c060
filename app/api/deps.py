"""Dependencies of the route handlers: settings, job store, Celery app, and the caller's API key.

`app.main.create_app` puts the settings, the store and the Celery app on `app.state`. An app built
elsewhere (such as the scoring service) may leave them out; the process-wide defaults of
`workers.settings` and `workers.db` are used then.

Use `require_scope("jobs")` (or the aliases `JobsKey`, `ModelsKey`, `ScoreKey`, `AdminKey`) as a
parameter type to authenticate the request: a missing or unknown key is 401, a key without the
scope is 403, and with W2S_AUTH_DISABLED every request is a development admin.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.auth import DEVELOPMENT_PRINCIPAL, SCOPES, Principal, authenticate
from app.errors import Forbidden, Unauthorized
from workers.db import JobStore, default_store
from workers.settings import Settings
from workers.settings import get_settings as process_settings


def get_settings(request: Request) -> Settings:
    return getattr(request.app.state, "settings", None) or process_settings()


def get_store(request: Request) -> JobStore:
    return getattr(request.app.state, "store", None) or default_store()


def get_celery(request: Request) -> Any:
    celery = getattr(request.app.state, "celery", None)
    if celery is None:
        from workers.celery_app import app as celery

    return celery


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
CeleryDep = Annotated[Any, Depends(get_celery)]

# auto_error=False: a missing header gets the API's own 401 body, not FastAPI's 403.
bearer_scheme = HTTPBearer(auto_error=False, description="API key created by an operator with `w2s keys create`.")


def current_principal(
    settings: SettingsDep,
    store: StoreDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Principal:
    """Authenticate the bearer key of the request; raise Unauthorized when it is missing or unknown."""
    if settings.auth_disabled:
        return DEVELOPMENT_PRINCIPAL
    fix = "Send 'Authorization: Bearer <key>'; an operator creates keys with `w2s keys create`."
    if credentials is None:
        raise Unauthorized(
            "missing API key: the Authorization header is absent or not 'Bearer <key>'",
            code="missing_api_key",
            field="Authorization",
            fix=fix,
            headers={"WWW-Authenticate": "Bearer"},
        )
    principal = authenticate(store, credentials.credentials)
    if principal is None:
        # The key itself is never echoed back or logged.
        raise Unauthorized(
            "invalid API key: the bearer key is unknown or revoked",
            code="invalid_api_key",
            field="Authorization",
            fix=fix,
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def require_scope(scope: str) -> Callable[..., Principal]:
    """Build a dependency that authenticates the request and checks that the key has `scope`."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {sorted(SCOPES)}")

    def check_scope(principal: CurrentPrincipal) -> Principal:
        if not principal.has_scope(scope):
            raise Forbidden(
                f"API key {principal.name!r} lacks scope {scope!r}; it has {sorted(principal.scopes)}",
                code="missing_scope",
                field="Authorization",
                value=sorted(principal.scopes),
                fix=f"Use a key with scope {scope!r}, or ask an operator for one (`w2s keys create --scopes {scope}`).",
            )
        return principal

    check_scope.__name__ = f"require_scope_{scope}"
    return check_scope


JobsKey = Annotated[Principal, Depends(require_scope("jobs"))]
ModelsKey = Annotated[Principal, Depends(require_scope("models"))]
ScoreKey = Annotated[Principal, Depends(require_scope("score"))]
AdminKey = Annotated[Principal, Depends(require_scope("admin"))]
