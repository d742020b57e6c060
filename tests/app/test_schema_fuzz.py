"""Schema-driven fuzzing of both apps with schemathesis: no generated request may get a 5xx.

schemathesis reads each app's OpenAPI document and generates requests for every operation, both
ones that fit the schema (positive) and ones that break it (negative). Every request carries an
admin key, so it passes authentication and reaches the handler. The number of examples is
bounded (EXAMPLES per operation and mode, derandomized), which keeps both apps under about two
minutes on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from app.scoring_main import create_app as create_scoring_app
from tests.app.conftest import SOURCE, Api, genies_file, make_api, upload

EXAMPLES = 20
MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Iterator[Api]:
    for api in make_api(tmp_path_factory.mktemp("fuzz"), shared_data):
        # Real rows for the handlers to find: a dataset, a registered model and an alias.
        assert upload(api, genies_file(shared_data, SOURCE, "test")).status_code == 201
        model = api.client.post("/v1/models", json={"name": "minilm", "path": MODEL}, headers=api.headers("admin"))
        assert model.status_code == 201, model.text
        alias = api.client.put("/v1/models/aliases/default", json={"model_id": model.json()["id"]}, headers=api.headers("admin"))
        assert alias.status_code == 200, alias.text
        yield api


def fuzz(app: Any, headers: dict[str, str]) -> tuple[int, list[str]]:
    """Send generated requests for every operation of `app`; return the count sent and the 5xx failures."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    sent = 0
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def send(case: Any) -> None:
                nonlocal sent
                response = case.call(headers=headers)
                sent += 1
                if response.status_code >= 500:
                    failures.append(f"{operation.label} ({mode.value}): {response.status_code} {response.text[:300]}\n  {case.as_curl_command()}")

            try:
                send()
            except Unsatisfiable:
                # An operation without parameters or body has no negative examples.
                assert mode is GenerationMode.NEGATIVE, operation.label
    return sent, failures


def test_jobs_api_has_no_server_errors(api: Api) -> None:
    sent, failures = fuzz(api.client.app, api.headers("admin"))

    assert sent > 100
    assert not failures, "\n".join(failures)


def test_scorer_has_no_server_errors(api: Api) -> None:
    settings = api.deployment.settings.model_copy(
        update={"scoring_preload_models": [], "scoring_precision": "fp32", "scoring_device": "cpu", "scoring_max_length": 32}
    )
    scorer = create_scoring_app(settings, store=api.deployment.store)

    sent, failures = fuzz(scorer, api.headers("admin"))

    assert sent > 20
    assert not failures, "\n".join(failures)
