"""The scoring service over real HTTP: a `uvicorn app.scoring_main:app` subprocess on 127.0.0.1.

Models are two MiniLM reward models registered in the service's SQLite registry: A (trained for a
few steps, with normalization and an OOD summary) and B (A with its head bias 1.0 higher). The
alias 'prod' points at A until the alias test moves it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest

from app.auth import DEVELOPMENT_PRINCIPAL, create_api_key
from app.services.models import set_alias
from ml.train import load_limited
from tests.ml.test_serving import BIAS_SHIFT, TRAIN_MAX_LENGTH, build_serving_models
from workers.db import JobStore, upgrade_database
from workers.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
MAX_ITEMS = 64
MAX_TOKENS = 3000
MAX_CHARS = 200_000
MAX_BODY_BYTES = 300_000
STARTUP_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Scorer:
    """A running scorer process with its registry, keys and model ids."""

    url: str
    store: JobStore
    keys: dict[str, str]
    model_a: str
    model_b: str
    log: Path

    def headers(self, role: str = "score") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}

    def client(self, role: str = "score") -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(role), timeout=60)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory, minilm_dir, genies) -> Iterator[Scorer]:
    model_a_dir, model_b_dir = build_serving_models(tmp_path_factory.getbasetemp() / "serving-models", minilm_dir, genies)
    folder = tmp_path_factory.mktemp("scorer")
    database_url = f"sqlite:///{folder / 'jobs.sqlite'}"
    upgrade_database(database_url)
    store = JobStore(database_url, Settings(var_dir=folder, database_url=database_url))
    model_a = store.register_model("serving-a", model_a_dir).id
    model_b = store.register_model("serving-b", model_b_dir).id
    set_alias(store, DEVELOPMENT_PRINCIPAL, "prod", model_a)
    keys = {role: create_api_key(store, role, scopes)[1] for role, scopes in {"score": ["score"], "jobs": ["jobs"]}.items()}

    port = _free_port()
    env = {
        **os.environ,
        "W2S_VAR_DIR": str(folder),
        "W2S_DATABASE_URL": database_url,
        "W2S_AUTH_DISABLED": "false",
        "W2S_SCORING_PRECISION": "fp32",
        "W2S_SCORING_MAX_QUEUE": str(MAX_ITEMS),
        "W2S_SCORING_MAX_ITEMS": str(MAX_ITEMS),
        "W2S_SCORING_MAX_TOKENS": str(MAX_TOKENS),
        "W2S_SCORING_MAX_CHARS": str(MAX_CHARS),
        "W2S_SCORING_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "W2S_SCORING_ALIAS_REFRESH_S": "0.2",
        "W2S_SCORING_DEFAULT_MODEL": "prod",
        "W2S_SCORING_PRELOAD_MODELS": '["prod"]',
        "HF_HUB_OFFLINE": "1",
    }
    log = folder / "scorer.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.scoring_main:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"scorer exited with {process.returncode} during startup:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/v1/health/live", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"scorer did not respond within {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield Scorer(url=url, store=store, keys=keys, model_a=model_a, model_b=model_b, log=log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def pairs(genies):
    pairs = load_limited(str(genies / "us_history_textbook" / "test.json.gz"), max_prompts=6)
    unique = list(dict.fromkeys([(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]))
    return unique[:8]


def _items(pairs) -> list[dict]:
    return [{"prompt": prompt, "response": response} for prompt, response in pairs]


def _error(response: httpx.Response) -> dict:
    return response.json()["error"]


# --- endpoints ------------------------------------------------------------------------------------


def test_score_returns_rewards_per_item(scorer, pairs):
    with scorer.client() as client:
        info = client.get("/v1/score/models/prod").json()
        response = client.post("/v1/score", json={"model": "prod", "items": _items(pairs[:3])})
    assert response.status_code == 200, response.text
    body = response.json()
    norm = info["normalization"]
    assert body["model"] == scorer.model_a
    assert body["max_length"] == TRAIN_MAX_LENGTH
    assert len(body["items"]) == 3
    for item in body["items"]:
        assert item["normalized"] == pytest.approx((item["reward"] - norm["mean"]) / norm["std"])
        assert item["ood"] == (item["ood_distance"] > info["ood"]["threshold"])
        assert item["tokens"] <= TRAIN_MAX_LENGTH


def test_score_conversation_equals_pair_with_chat_messages(scorer):
    conversation = [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "Seven."}]
    with scorer.client() as client:
        as_messages = client.post("/v1/score", json={"model": "prod", "items": [{"messages": conversation}]})
        as_pair = client.post(
            "/v1/score", json={"model": "prod", "items": [{"prompt": conversation[:1], "response": conversation[1:]}]}
        )
    assert as_messages.status_code == 200, as_messages.text
    assert as_messages.json()["items"][0]["reward"] == pytest.approx(as_pair.json()["items"][0]["reward"], abs=1e-6)


def test_score_rejects_conversation_ending_with_user(scorer):
    conversation = [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Rate me."}]
    with scorer.client() as client:
        response = client.post("/v1/score", json={"model": "prod", "items": [{"messages": conversation}]})
    assert response.status_code == 422
    assert "must have role 'assistant'" in _error(response)["message"]


def test_score_truncates_long_text(scorer, pairs):
    prompt, response_text = pairs[0]
    with scorer.client() as client:
        response = client.post("/v1/score", json={"model": "prod", "items": [{"prompt": prompt * 4, "response": response_text * 4}, {"prompt": "Hi", "response": "Hello!"}]})
    body = response.json()
    assert response.status_code == 200, response.text
    assert body["truncated_items"] == 1
    assert body["items"][0]["truncated"] is True
    assert body["items"][0]["tokens"] == TRAIN_MAX_LENGTH
    assert body["items"][1]["truncated"] is False


def test_compare_gives_bradley_terry_probabilities(scorer, pairs):
    prompt = pairs[0][0]
    responses = [pairs[0][1], "I do not know.", "The answer is 42."]
    with scorer.client() as client:
        compared = client.post("/v1/compare", json={"model": "prod", "prompt": prompt, "responses": responses})
        scored = client.post("/v1/score", json={"model": "prod", "items": [{"prompt": prompt, "response": r} for r in responses]})
    assert compared.status_code == 200, compared.text
    body = compared.json()
    rewards = [item["reward"] for item in body["items"]]
    probabilities = np.array(body["probabilities"])
    assert rewards == pytest.approx([item["reward"] for item in scored.json()["items"]], abs=1e-6)
    assert probabilities[0, 1] == pytest.approx(1 / (1 + np.exp(-(rewards[0] - rewards[1]))))
    assert np.allclose(probabilities + probabilities.T, 1.0)
    assert body["best"] == int(np.argmax(rewards))


def test_compare_needs_two_responses(scorer):
    with scorer.client() as client:
        response = client.post("/v1/compare", json={"model": "prod", "prompt": "p", "responses": ["only one"]})
    assert response.status_code == 422
    assert _error(response)["field"] == "responses"


def test_get_reward_speaks_openrlhf_protocol(scorer, pairs):
    queries = [prompt + response for prompt, response in pairs[:3]]
    request = {"query": queries, "prompts": [p for p, _ in pairs[:3]], "labels": ["", "", ""]}
    with scorer.client() as client:
        response = client.post("/get_reward", json=request)
        normalized = client.post("/get_reward", params={"normalize": "true"}, json=request)
        info = client.get("/v1/score/models/prod").json()
    body = response.json()
    assert response.status_code == 200, response.text
    assert set(body) == {"rewards", "scores", "extra_logs"}
    assert body["scores"] == body["rewards"]
    assert len(body["rewards"]) == 3
    assert len(body["extra_logs"]["ood_distance"]) == 3
    norm = info["normalization"]
    expected = [(r - norm["mean"]) / norm["std"] for r in body["rewards"]]
    assert normalized.json()["rewards"] == pytest.approx(expected)


def test_get_reward_takes_key_in_url(scorer, pairs):
    # OpenRLHF sends no Authorization header; requests and httpx send URL credentials as Basic auth.
    host = scorer.url.removeprefix("http://")
    url = f"http://openrlhf:{scorer.keys['score']}@{host}/get_reward"
    response = httpx.post(url, json={"query": [pairs[0][0] + pairs[0][1]]}, timeout=60)
    anonymous = httpx.post(f"{scorer.url}/get_reward", json={"query": ["text"]}, timeout=60)
    assert response.status_code == 200, response.text
    assert anonymous.status_code == 401
    assert _error(anonymous)["code"] == "missing_api_key"


def test_get_reward_model_query_parameter(scorer, pairs):
    with scorer.client() as client:
        by_alias = client.post("/get_reward", json={"query": ["a text"]})
        by_id = client.post("/get_reward", params={"model": scorer.model_b}, json={"query": ["a text"]})
    assert by_id.status_code == 200, by_id.text
    assert by_id.json()["rewards"][0] == pytest.approx(by_alias.json()["rewards"][0] + BIAS_SHIFT, abs=1e-5)


def test_model_info(scorer):
    with scorer.client() as client:
        response = client.get("/v1/score/models/prod")
        loaded = client.get("/v1/score/models")
    info = response.json()
    assert response.status_code == 200, response.text
    assert info["id"] == scorer.model_a
    assert info["precision"] == "fp32"
    assert info["max_length"] == TRAIN_MAX_LENGTH
    assert "all-MiniLM-L6-v2" in info["base_model"]
    assert info["normalization"]["std"] > 0
    assert info["ood"]["statistic"] == "ppca_mahalanobis"
    assert info["ood"]["percentile"] == 99.0
    assert info["ood"]["threshold"] > 0
    assert scorer.model_a in [model["id"] for model in loaded.json()["items"]]


def test_health_ready(scorer):
    assert httpx.get(f"{scorer.url}/v1/health/ready", timeout=10).status_code == 401
    response = httpx.get(f"{scorer.url}/v1/health/ready", headers=scorer.headers(), timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["checks"]["database"] == "ok"


def test_openapi_documents_error_statuses(scorer):
    schema = httpx.get(f"{scorer.url}/openapi.json", timeout=10).json()
    for path in ("/v1/score", "/v1/compare", "/get_reward"):
        documented = set(schema["paths"][path]["post"]["responses"])
        assert {"401", "413", "422", "429"} <= documented, path


# --- auth, limits, errors -------------------------------------------------------------------------


def test_missing_key_is_401(scorer):
    response = httpx.post(f"{scorer.url}/v1/score", json={"model": "prod", "items": [{"prompt": "a", "response": "b"}]})
    assert response.status_code == 401
    assert _error(response)["code"] == "missing_api_key"


def test_key_without_score_scope_is_403(scorer):
    with scorer.client("jobs") as client:
        response = client.post("/v1/score", json={"model": "prod", "items": [{"prompt": "a", "response": "b"}]})
    assert response.status_code == 403
    assert "lacks scope 'score'" in _error(response)["message"]


def test_unknown_model_is_404(scorer):
    with scorer.client() as client:
        response = client.post("/v1/score", json={"model": "no-such-model", "items": [{"prompt": "a", "response": "b"}]})
    assert response.status_code == 404
    assert _error(response)["code"] == "model_not_found"
    assert _error(response)["value"] == "no-such-model"


def test_body_over_limit_is_413(scorer):
    text = "x" * (MAX_BODY_BYTES + 10)
    with scorer.client() as client:
        response = client.post("/v1/score", json={"model": "prod", "items": [{"prompt": text, "response": "b"}]})
    error = _error(response)
    assert response.status_code == 413
    assert error["code"] == "body_too_large"
    assert f"over the limit of {MAX_BODY_BYTES} bytes" in error["message"]
    assert error["value"] > MAX_BODY_BYTES


def test_chunked_body_over_limit_is_413(scorer):
    def chunks():
        yield b'{"model": "prod", "items": [{"prompt": "'
        for _ in range(MAX_BODY_BYTES // 10_000 + 2):
            yield b"x" * 10_000
        yield b'", "response": "b"}]}'

    with scorer.client() as client:
        response = client.post("/v1/score", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert "at least" in _error(response)["message"] or "bytes" in _error(response)["message"]


def test_too_many_items_is_422(scorer):
    items = [{"prompt": "p", "response": "r"}] * (MAX_ITEMS + 1)
    with scorer.client() as client:
        response = client.post("/v1/score", json={"model": "prod", "items": items})
    error = _error(response)
    assert response.status_code == 422
    assert error["code"] == "too_many_items"
    assert error["message"] == f"items: request has {MAX_ITEMS + 1} items, over the limit of {MAX_ITEMS} items"
    assert error["value"] == MAX_ITEMS + 1


def test_too_many_characters_is_422(scorer):
    text = "word " * (MAX_CHARS // 5 // 2 + 100)
    with scorer.client() as client:
        response = client.post("/get_reward", json={"query": [text, text]})
    error = _error(response)
    assert response.status_code == 422
    assert error["code"] == "too_many_characters"
    assert f"over the limit of {MAX_CHARS} characters" in error["message"]
    assert error["value"] == 2 * len(text)


def test_too_many_tokens_is_422(scorer, pairs):
    # 60 items truncated to 64 tokens each: 3840 tokens, over the 3000 allowed.
    items = [{"prompt": pairs[0][0], "response": pairs[0][1]}] * 60
    with scorer.client() as client:
        response = client.post("/v1/score", json={"model": "prod", "items": items})
    error = _error(response)
    assert response.status_code == 422
    assert error["code"] == "too_many_tokens"
    assert f"over the limit of {MAX_TOKENS} tokens" in error["message"]
    assert error["value"] == 60 * TRAIN_MAX_LENGTH


def test_get_reward_unknown_model_is_404(scorer):
    with scorer.client() as client:
        response = client.post("/get_reward", params={"model": "missing"}, json={"query": ["t"]})
    assert response.status_code == 404
    assert _error(response)["field"] == "model"


# --- batching properties --------------------------------------------------------------------------


def test_scores_independent_of_batch_over_http(scorer, pairs):
    items = _items(pairs) + [{"prompt": "Hi", "response": "Hello!"}, {"prompt": pairs[0][0] * 3, "response": pairs[0][1] * 3}]
    with scorer.client() as client:
        std = client.get("/v1/score/models/prod").json()["normalization"]["std"]
        alone = [client.post("/v1/score", json={"model": "prod", "items": [item]}).json()["items"][0]["reward"] for item in items]
        together = [item["reward"] for item in client.post("/v1/score", json={"model": "prod", "items": items}).json()["items"]]

    async def concurrent() -> list[float]:
        async with httpx.AsyncClient(base_url=scorer.url, headers=scorer.headers(), timeout=60) as client:
            groups = [items[0:1], items[1:3], items[3:6], items[6:7], items[7:]]
            responses = await asyncio.gather(*(client.post("/v1/score", json={"model": "prod", "items": g}) for g in groups))
        return [item["reward"] for response in responses for item in response.json()["items"]]

    mixed = asyncio.run(concurrent())
    assert np.abs(np.array(together) - alone).max() <= 1e-4 * std
    assert np.abs(np.array(mixed) - alone).max() <= 1e-4 * std


def test_queue_full_is_429_with_retry_after(scorer):
    items = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(MAX_ITEMS)]

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=scorer.url, headers=scorer.headers(), timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/score", json={"model": "prod", "items": items}) for _ in range(12)))

    responses = asyncio.run(flood())
    statuses = [r.status_code for r in responses]
    rejected = [r for r in responses if r.status_code == 429]
    assert 200 in statuses
    assert rejected, f"no request was rejected: {statuses}"
    assert set(statuses) <= {200, 429}
    error = _error(rejected[0])
    assert error["code"] == "scoring_queue_full"
    assert f"the limit is {MAX_ITEMS}" in error["message"]
    assert int(rejected[0].headers["Retry-After"]) >= 1


def test_alias_switch_under_load_drops_no_request(scorer, pairs):
    """Move 'prod' from A to B while 8 clients score; every request succeeds with A's or B's reward."""
    items = _items(pairs[:4])
    with scorer.client() as client:
        reference_a = [i["reward"] for i in client.post("/v1/score", json={"model": scorer.model_a, "items": items}).json()["items"]]
    reference_b = [reward + BIAS_SHIFT for reward in reference_a]
    switched_at: list[float] = []
    seen: list[tuple[float, str, list[float]]] = []
    failures: list[str] = []

    async def client_loop(client: httpx.AsyncClient, index: int) -> None:
        for _ in range(40):
            response = await client.post("/v1/score", json={"model": "prod", "items": items[index % 4 : index % 4 + 1]})
            if response.status_code != 200:
                failures.append(f"{response.status_code}: {response.text[:200]}")
                continue
            body = response.json()
            seen.append((time.monotonic(), body["model"], [index % 4, body["items"][0]["reward"]]))
            if switched_at and time.monotonic() - switched_at[0] > 3 and body["model"] == scorer.model_b:
                return

    async def switch() -> None:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(set_alias, scorer.store, DEVELOPMENT_PRINCIPAL, "prod", scorer.model_b)
        switched_at.append(time.monotonic())

    async def run() -> None:
        async with httpx.AsyncClient(base_url=scorer.url, headers=scorer.headers(), timeout=60) as client:
            await asyncio.gather(switch(), *(client_loop(client, i) for i in range(8)))

    try:
        asyncio.run(run())
    finally:
        set_alias(scorer.store, DEVELOPMENT_PRINCIPAL, "prod", scorer.model_a)

    assert failures == []
    models = [model for _, model, _ in seen]
    assert scorer.model_a in models
    assert scorer.model_b in models
    for _, model, (index, reward) in seen:
        expected = reference_a[index] if model == scorer.model_a else reference_b[index]
        assert reward == pytest.approx(expected, abs=1e-5), model
    last_a = max(t for t, model, _ in seen if model == scorer.model_a)
    first_b = min(t for t, model, _ in seen if model == scorer.model_b)
    assert first_b >= switched_at[0]
    assert last_a - first_b < 1.0, "once B answers, A stops answering the alias (within in-flight requests)"
