"""Security checks of the jobs API and the scorer: keys on every route, scopes, key storage and
logging, allowed folders, and the operator switches for pickle and remote code.

The route checks walk the route table of both apps, so a route added later is checked without
changing this file. Requests go to the in-process ASGI apps over a real Redis and SQLite store.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import event

from app.auth import authenticate
from app.scoring_main import create_app as create_scoring_app
from app.scoring_main import serving_config
from app.services.references import DATASET_FIELDS, MODEL_FIELDS
from ml.modeling import ModelLoadError, load_reward_model
from tests.app.conftest import Api, make_api
from tests.app.test_bad_input import PICKLE_MODEL, REMOTE_CODE_MODEL, build_model_folders
from workers.settings import Settings

# Routes that respond without a key. Liveness serves container healthchecks, which send no key
# (docker/healthcheck.py). The OpenAPI document and its viewers describe the routes and hold no data.
PUBLIC = {"/v1/health/live", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
# Authenticated routes that any valid key may call, whatever its scopes.
ANY_KEY = {("jobs", "/v1/metrics"), ("jobs", "/v1/health/ready"), ("scorer", "/v1/health/ready")}
# A key of these roles lacks the scope: tests/app/conftest.py gives user ['jobs'] and scorer ['score'].
ROLE_WITHOUT = {"jobs": "scorer", "models": "user", "score": "user", "admin": "user"}
PATH_VALUES = {"plot": "accuracy", "alias": "prod"}
OUTSIDE_FILE = "/etc/hostname"


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Iterator[tuple[Api, TestClient]]:
    for api in make_api(tmp_path_factory.mktemp("security"), shared_data):
        settings = api.deployment.settings.model_copy(update={"scoring_preload_models": [], "scoring_precision": "fp32", "scoring_device": "cpu"})
        with TestClient(create_scoring_app(settings, store=api.deployment.store)) as scorer:
            yield api, scorer


def _clients(apps: tuple[Api, TestClient]) -> dict[str, TestClient]:
    api, scorer = apps
    return {"jobs": api.client, "scorer": scorer}


def _dependency_names(route: APIRoute) -> set[str]:
    names: set[str] = set()
    pending = list(route.dependant.dependencies)
    while pending:
        dependant = pending.pop()
        names.add(getattr(dependant.call, "__name__", ""))
        pending.extend(dependant.dependencies)
    return names


def _routes(client: TestClient) -> Iterator[tuple[str, str, Any]]:
    """Yield (method, full path, route) for every HTTP route of the client's app, routers included."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # FastAPI before 0.165 lists included routes in app.routes itself
        contexts = [(route.path, route) for route in client.app.routes]
    else:
        contexts = [(context.path, context.original_route) for context in iter_route_contexts(client.app.routes)]
    for path, route in contexts:
        for method in sorted(getattr(route, "methods", None) or []):
            if method != "HEAD":
                yield method, path, route


def _url(path: str) -> str:
    return re.sub(r"\{(\w+)(?::\w+)?\}", lambda match: PATH_VALUES.get(match.group(1), "x"), path)


def _scopes(route: Any) -> set[str]:
    if not isinstance(route, APIRoute):
        return set()
    names = _dependency_names(route)
    scopes = {name.removeprefix("require_scope_") for name in names if name.startswith("require_scope_")}
    if "openrlhf_principal" in names:
        scopes.add("score")  # it checks the 'score' scope itself, after reading a Basic or Bearer key
    return scopes


def _authenticated(route: Any) -> bool:
    if not isinstance(route, APIRoute):
        return False
    names = _dependency_names(route)
    return "current_principal" in names or "openrlhf_principal" in names


def test_only_listed_routes_are_public(apps: tuple[Api, TestClient]) -> None:
    public = {path for client in _clients(apps).values() for _, path, route in _routes(client) if not _authenticated(route)}

    assert public == PUBLIC


@pytest.mark.parametrize("app_name", ["jobs", "scorer"])
def test_every_route_needs_a_key(apps: tuple[Api, TestClient], app_name: str) -> None:
    client = _clients(apps)[app_name]
    checked = 0
    for method, path, route in _routes(client):
        anonymous = client.request(method, _url(path))
        if path in PUBLIC:
            assert anonymous.status_code != 401, f"{method} {path}"
            continue
        wrong = client.request(method, _url(path), headers={"Authorization": "Bearer w2s_" + "x" * 43})

        assert anonymous.status_code == 401, f"{method} {path}: {anonymous.status_code} {anonymous.text[:200]}"
        assert anonymous.json()["error"]["code"] == "missing_api_key", f"{method} {path}"
        assert wrong.status_code == 401, f"{method} {path}: {wrong.status_code}"
        assert wrong.json()["error"]["code"] == "invalid_api_key", f"{method} {path}"
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("app_name", ["jobs", "scorer"])
def test_scopes_are_enforced(apps: tuple[Api, TestClient], app_name: str) -> None:
    api, _ = apps
    client = _clients(apps)[app_name]
    checked = 0
    for method, path, route in _routes(client):
        if not _authenticated(route):
            continue
        scopes = _scopes(route)
        if (app_name, path) in ANY_KEY:
            assert not scopes, f"{method} {path} is listed in ANY_KEY but needs {scopes}"
            continue
        assert len(scopes) == 1, f"{method} {path} needs scopes {scopes}; give it exactly one"
        scope = scopes.pop()
        denied = client.request(method, _url(path), headers=api.headers(ROLE_WITHOUT[scope]))
        admitted = client.request(method, _url(path), headers=api.headers("admin"))

        assert denied.status_code == 403, f"{method} {path}: {denied.status_code} {denied.text[:200]}"
        assert denied.json()["error"]["code"] == "missing_scope"
        assert admitted.status_code not in (401, 403), f"{method} {path}: admin got {admitted.status_code}"
        checked += 1
    assert checked >= 3


def test_any_key_route_takes_every_scope(apps: tuple[Api, TestClient]) -> None:
    api, _ = apps
    for role in ("user", "scorer", "modeller", "admin"):
        response = api.client.get("/v1/metrics", headers=api.headers(role))
        assert response.status_code == 200, f"{role}: {response.text[:200]}"


def test_key_is_looked_up_by_hash(apps: tuple[Api, TestClient]) -> None:
    api, _ = apps
    key = api.keys["user"]
    parameters: list[str] = []

    def record(conn, cursor, statement, params, context, executemany) -> None:
        parameters.append(repr(params))

    event.listen(api.deployment.store.engine, "before_cursor_execute", record)
    try:
        response = api.client.get("/v1/jobs", headers=api.headers("user"))
    finally:
        event.remove(api.deployment.store.engine, "before_cursor_execute", record)

    assert response.status_code == 200
    sent = "\n".join(parameters)
    assert hashlib.sha256(key.encode()).hexdigest() in sent
    assert key not in sent
    assert key[len("w2s_"):] not in sent


def test_key_is_not_stored(apps: tuple[Api, TestClient]) -> None:
    api, _ = apps
    path = Path(api.deployment.settings.resolved_database_url.removeprefix("sqlite:///"))
    # In WAL mode recent rows are in the -wal file until a checkpoint.
    database = b"".join(file.read_bytes() for file in path.parent.glob(path.name + "*"))

    for key in api.keys.values():
        assert key.encode() not in database
        assert hashlib.sha256(key.encode()).hexdigest().encode() in database


def test_near_miss_key_is_rejected(apps: tuple[Api, TestClient]) -> None:
    api, _ = apps
    key = api.keys["user"]
    last = "A" if key[-1] != "A" else "B"

    assert authenticate(api.deployment.store, key) is not None
    assert authenticate(api.deployment.store, key[:-1] + last) is None
    assert authenticate(api.deployment.store, key[:-1]) is None


def test_keys_are_never_logged(apps: tuple[Api, TestClient], caplog: pytest.LogCaptureFixture) -> None:
    api, scorer = apps
    good = api.keys["admin"]
    bad = good[:-1] + ("A" if good[-1] != "A" else "B")
    caplog.set_level(logging.DEBUG)

    responses = [
        api.client.get("/v1/jobs", headers={"Authorization": f"Bearer {good}"}),
        api.client.get("/v1/jobs", headers={"Authorization": f"Bearer {bad}"}),
        api.client.post("/v1/jobs", json={"type": "pipeline", "config": {}}, headers={"Authorization": f"Bearer {good}"}),
        scorer.post("/get_reward", json={"query": ["hi"], "model": "absent"}, auth=("rm", good)),
        scorer.post("/get_reward", json={"query": ["hi"], "model": "absent"}, auth=("rm", bad)),
        scorer.post("/v1/score", json={"model": "absent", "items": [{"prompt": "p", "response": "r"}]}, headers={"Authorization": f"Bearer {bad}"}),
    ]

    assert [response.status_code for response in responses] == [200, 401, 422, 404, 401, 401]
    assert caplog.records, "no log record was captured, so the check would pass vacuously"
    for secret in (good, bad, good[len("w2s_"):]):
        assert secret not in caplog.text
        for record in caplog.records:
            assert secret not in record.getMessage()
        for response in responses:
            assert secret not in response.text


@pytest.mark.parametrize(
    ("job_type", "field_path", "kind"),
    [(job_type, path, "dataset") for job_type, paths in DATASET_FIELDS.items() for path in paths]
    + [(job_type, path, "model") for job_type, paths in MODEL_FIELDS.items() for path in paths],
)
@pytest.mark.parametrize("outside", [OUTSIDE_FILE, "../../../../etc/hostname"])
def test_no_server_path_outside_allowed_folders(apps: tuple[Api, TestClient], job_type: str, field_path: tuple[str, ...], kind: str, outside: str) -> None:
    api, _ = apps
    config, names = _nested(field_path, outside)

    response = api.client.post("/v1/jobs", json={"type": job_type, "config": config}, headers=api.headers())

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "path_not_allowed", error
    assert error["field"] == "config." + ".".join(names), error
    folder = "data folder" if kind == "dataset" else "model folder"
    assert f"outside the {folder}" in error["message"], error


def _nested(path: tuple[str, ...], value: Any) -> tuple[Any, list[str]]:
    """Return a config holding `value` at `path` and the field's dotted parts; '*' is item 0 of 'targets', else key 'a'."""
    if not path:
        return value, []
    head, rest = path[0], path[1:]
    if rest and rest[0] == "*":
        inner, names = _nested(rest[1:], value)
        if head == "targets":
            return {head: [inner]}, [head, "0", *names]
        return {head: {"a": inner}}, [head, "a", *names]
    inner, names = _nested(rest, value)
    return {head: inner}, [head, *names]


def test_operator_switches_default_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("W2S_ALLOW_PICKLE", raising=False)
    monkeypatch.delenv("W2S_ALLOW_REMOTE_CODE", raising=False)
    settings = Settings()
    serving = serving_config(settings)

    assert settings.allow_pickle is False
    assert settings.allow_remote_code is False
    assert serving.allow_pickle is False
    assert serving.allow_remote_code is False


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    return build_model_folders(minilm_dir, tmp_path_factory.mktemp("security-models"))


def test_loader_rejects_pickle_by_default(model_folders: Path) -> None:
    with pytest.raises(ModelLoadError, match="allow_pickle"):
        load_reward_model(model_folders / PICKLE_MODEL)


def test_loader_runs_no_remote_code_by_default(model_folders: Path) -> None:
    # modeling_reward.py in the folder raises when imported, so a successful load proves it did not run.
    model = load_reward_model(model_folders / REMOTE_CODE_MODEL)

    assert type(model.model).__module__.startswith("transformers.models.bert")
