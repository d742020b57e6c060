"""Bad input to the jobs API and the scorer, as one table of cases.

Each case sends one request a user could send by mistake and checks the status (4xx, never 500),
the error code, the field the body names, words of the message (the field, the value, the limit)
and a non-empty fix. Around each case the job database, the dataset folder and the scorer's
loaded models are compared: a rejected request leaves no dataset row or file, no job, no
registered model or alias, and no loaded model behind.

The apps run in the ASGI test client over a real Redis and an isolated SQLite store
(tests/app/conftest.py). The data folder is a copy of three GENIES files plus a symlink that
points outside it. The model folder contains a copy of MiniLM-L6, a pickle-only MiniLM
(pytorch_model.bin written by torch.save), a MiniLM whose config has auto_map, and a symlink to
a folder outside. Cases already checked by another test are listed in COVERED with that test.
"""

from __future__ import annotations

import gzip
import importlib
import json
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.scoring_main import create_app as create_scoring_app
from tests.app.conftest import Api, make_api, pipeline_request
from tests.workers.worker_harness import free_port
from workers.db import Dataset, Job, ModelAlias, RegisteredModel, utcnow

GENIES_FILES = ("us_history_textbook/train.json.gz", "us_history_textbook/test.json.gz", "us_history_fiction/test.json.gz")
TRAIN = "genies/us_history_textbook/train.json.gz"
MODEL = "minilm"
PICKLE_MODEL = "pickle-only"
REMOTE_CODE_MODEL = "remote-code"
ESCAPING_MODEL = "escape"
ESCAPING_DATA = "linked.json.gz"
# Limits of the `limited` deployment, small so that the cases send small bodies.
LIMITED_UPLOAD_BYTES = 4096
LIMITED_DECOMPRESSED_BYTES = 20_000
LIMITED_REQUEST_BYTES = 2048
# The scorer's limits: bodies over SCORER_BODY_BYTES get 413; texts over SCORER_MAX_LENGTH tokens are cut.
SCORER_BODY_BYTES = 20_000
SCORER_MAX_LENGTH = 32
UNKNOWN_ID = "0b6f5f7c-3d57-4c58-a3c1-6f4f3b1e6c1a"


# --- environment ------------------------------------------------------------------------------------


@dataclass
class Env:
    """The deployments and scorers the cases send requests to, with their folders."""

    api: Api  # defaults: pickle and remote code off, default limits
    limited: Api  # small upload, decompression and JSON body limits
    permissive: Api  # the operator turned on W2S_ALLOW_PICKLE and W2S_ALLOW_REMOTE_CODE
    scorer: TestClient  # scorer over `api`'s store
    permissive_scorer: TestClient  # scorer over `permissive`'s store
    data_dir: Path
    model_dir: Path
    model_ids: dict[str, str] = field(default_factory=dict)  # "api/<folder>" -> registered id

    def deployment(self, name: str) -> Api:
        return getattr(self, name)


def _copy_data(shared_data: Path, root: Path) -> Path:
    data_dir = root / "data"
    for name in GENIES_FILES:
        target = data_dir / "genies" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_data / "genies" / name, target)
    outside = root / "outside-data"
    outside.mkdir()
    shutil.copy(shared_data / "genies" / GENIES_FILES[1], outside / "secret.json.gz")
    (data_dir / ESCAPING_DATA).symlink_to(outside / "secret.json.gz")
    return data_dir


def build_model_folders(minilm_dir: Path, root: Path) -> Path:
    """Write the model folder: MiniLM, a pickle-only MiniLM, an auto_map MiniLM and an escaping symlink."""
    import torch
    from safetensors.torch import load_file

    model_dir = root / "models"
    shutil.copytree(minilm_dir, model_dir / MODEL)

    pickle_dir = model_dir / PICKLE_MODEL
    pickle_dir.mkdir()
    for path in minilm_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy(path, pickle_dir / path.name)
    torch.save(load_file(str(minilm_dir / "model.safetensors")), pickle_dir / "pytorch_model.bin")

    remote_dir = model_dir / REMOTE_CODE_MODEL
    shutil.copytree(minilm_dir, remote_dir)
    config = json.loads((remote_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_reward.RewardModel"}
    (remote_dir / "config.json").write_text(json.dumps(config))
    (remote_dir / "modeling_reward.py").write_text("raise RuntimeError('remote code must not run in this test')\n")

    outside = root / "outside-model"
    outside.mkdir()
    shutil.copy(minilm_dir / "config.json", outside / "config.json")
    (model_dir / ESCAPING_MODEL).symlink_to(outside, target_is_directory=True)
    return model_dir


def _register_directly(api: Api, folder: Path) -> str:
    """Insert a registry row for `folder`, as a model registered before the folder checks existed would be."""
    model_id = str(uuid.uuid4())
    with api.deployment.store.session() as session:
        session.add(
            RegisteredModel(id=model_id, name=folder.name, path=str(folder), lineage={"source": "directory"}, metrics={}, created_at=utcnow())
        )
    return model_id


def _scorer(api: Api) -> Iterator[TestClient]:
    settings = api.deployment.settings.model_copy(
        update={
            "scoring_max_body_bytes": SCORER_BODY_BYTES,
            "scoring_max_length": SCORER_MAX_LENGTH,
            "scoring_precision": "fp32",
            "scoring_device": "cpu",
            "scoring_preload_models": [],
            "scoring_default_model": None,
        }
    )
    with TestClient(create_scoring_app(settings, store=api.deployment.store)) as client:
        yield client


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, shared_data: Path, minilm_dir: Path) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("bad-input")
    data_dir = _copy_data(shared_data, root)
    model_dir = build_model_folders(minilm_dir, root)
    folders = {"data_dir": data_dir, "model_dir": model_dir}
    limits = {
        "max_upload_bytes": LIMITED_UPLOAD_BYTES,
        "max_upload_decompressed_bytes": LIMITED_DECOMPRESSED_BYTES,
        "max_request_bytes": LIMITED_REQUEST_BYTES,
    }
    deployments = [
        make_api(root / "api", shared_data, **folders),
        make_api(root / "limited", shared_data, **folders, **limits),
        make_api(root / "permissive", shared_data, **folders, allow_pickle=True, allow_remote_code=True),
    ]
    try:
        api, limited, permissive = (next(deployment) for deployment in deployments)
        scorers = [_scorer(api), _scorer(permissive)]
        try:
            scorer, permissive_scorer = (next(client) for client in scorers)
            result = Env(api, limited, permissive, scorer, permissive_scorer, data_dir, model_dir)
            registered = api.client.post("/v1/models", json={"name": MODEL, "path": MODEL}, headers=api.headers("modeller"))
            assert registered.status_code == 201, registered.text
            result.model_ids["api/minilm"] = registered.json()["id"]
            for folder in (PICKLE_MODEL, REMOTE_CODE_MODEL):
                result.model_ids[f"api/{folder}"] = _register_directly(api, model_dir / folder)
            yield result
        finally:
            for scorer_generator in scorers:
                scorer_generator.close()
    finally:
        for deployment in deployments:
            deployment.close()


# --- request helpers --------------------------------------------------------------------------------


def upload(api: Api, filename: str, data: bytes, **form: str) -> httpx.Response:
    return api.client.post("/v1/datasets", files={"file": (filename, data)}, data=form or None, headers=api.headers())


def jsonl(*rows: dict[str, Any]) -> bytes:
    return "\n".join(json.dumps(row) for row in rows).encode()


def valid_job(model: str = MODEL) -> dict[str, Any]:
    """A pipeline request the API accepts (see test_baseline_job_is_accepted); cases change one field."""
    return pipeline_request(TRAIN, model)


def with_field(request: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Set `config.<dotted>` of `request` to `value`; numeric parts index lists."""
    node: Any = request["config"]
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return request


def post_job(api: Api, request: dict[str, Any], **headers: str) -> httpx.Response:
    # json.dumps writes NaN and Infinity as bare words, as JavaScript and Python clients do.
    body = json.dumps(request).encode()
    return api.client.post("/v1/jobs", content=body, headers=api.headers() | {"Content-Type": "application/json"} | headers)


def job_field(dotted: str, value: Any, model: str = MODEL) -> Callable[[Env], httpx.Response]:
    return lambda env: post_job(env.api, with_field(valid_job(model), dotted, value))


def raw_post(path: str, body: bytes, target: str = "api") -> Callable[[Env], httpx.Response]:
    def send(env: Env) -> httpx.Response:
        if target == "scorer":
            return env.scorer.post(path, content=body, headers=env.api.headers("scorer") | {"Content-Type": "application/json"})
        api = env.deployment(target)
        return api.client.post(path, content=body, headers=api.headers() | {"Content-Type": "application/json"})

    return send


def score(body: dict[str, Any]) -> Callable[[Env], httpx.Response]:
    return lambda env: env.scorer.post("/v1/score", json=body, headers=env.api.headers("scorer"))


CHUNK_ROW = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}).encode() + b"\n"
CHUNK_ROWS = 1000
CHUNKS = 4


@contextmanager
def served(app: Any) -> Iterator[str]:
    """Serve `app` with uvicorn on a free port of 127.0.0.1 in a thread; yield its URL.

    The ASGI test client hands a request body to the app in one piece, so a body that must arrive
    in chunks is sent to a real server.
    """
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), f"uvicorn exited while starting on port {port}"
        assert time.monotonic() < deadline, f"uvicorn did not start on port {port} within 30 s"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def chunked_upload(env: Env) -> httpx.Response:
    """Stream a multipart upload larger than the limit without Content-Length, as a chunked body."""
    boundary = "w2s-test-boundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\nContent-Type: application/octet-stream\r\n\r\n'

    def body() -> Iterator[bytes]:
        yield head.encode()
        # 4 x ~45 kB: over the file limit plus the 64 KiB allowed for the multipart envelope.
        for _ in range(CHUNKS):
            yield CHUNK_ROW * CHUNK_ROWS
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = env.limited.headers() | {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    with served(env.limited.client.app) as url:
        response = httpx.post(f"{url}/v1/datasets", content=body(), headers=headers, timeout=60)
        response.read()
    return response


def gzip_bomb(env: Env) -> httpx.Response:
    rows = jsonl(*[{"prompt": f"prompt {i}", "chosen": "yes " * 20, "rejected": "no " * 20} for i in range(400)])
    data = gzip.compress(rows)
    assert len(data) < LIMITED_UPLOAD_BYTES < LIMITED_DECOMPRESSED_BYTES < len(rows)
    return upload(env.limited, "pairs.jsonl.gz", data)


# --- the table --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad request: what it sends, and the status, code, field and message words expected back."""

    id: str
    area: str
    send: Callable[[Env], httpx.Response]
    status: int
    code: str
    field: str | None
    says: tuple[str, ...] = ()
    value: Any = None  # the value the error body echoes, when set
    check: Callable[[dict[str, Any]], bool] | None = None  # a further condition on the error body
    scorer: bool = False  # also check that the scorer loaded no model


PAIR = {"prompt": "Name a prime number.", "chosen": "7", "rejected": "8"}
CONVERSATION = {"prompt": [{"role": "user", "content": "Name a prime number."}]}

CASES = [
    # Dataset uploads
    Case("upload invalid JSON line", "dataset", lambda env: upload(env.api, "pairs.jsonl", jsonl(PAIR) + b'\n{"prompt": "p", "chosen": '),
         422, "invalid_dataset", "file line 2", ("line 2", "invalid JSON")),
    Case("upload invalid JSON array", "dataset", lambda env: upload(env.api, "pairs.json", b'[{"prompt": "p", "chosen": "a"'),
         422, "invalid_dataset", "file line 1, column 31", ("invalid JSON",)),
    Case("upload truncated gzip", "dataset", lambda env: upload(env.api, "pairs.jsonl.gz", gzip.compress(jsonl(*[PAIR] * 50))[:40]),
         422, "invalid_dataset", "file", ("gzip data is invalid or truncated",)),
    Case("upload non-UTF-8 bytes", "dataset", lambda env: upload(env.api, "pairs.jsonl", jsonl(PAIR) + b'\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'),
         422, "invalid_dataset", "file line 2", ("invalid UTF-8 byte 0xe9", "line 2")),
    Case("upload chosen identical to rejected", "dataset", lambda env: upload(env.api, "pairs.jsonl", jsonl(PAIR | {"rejected": "7"})),
         422, "invalid_dataset", "file", ("line 1", "the chosen and rejected responses are identical")),
    Case("upload empty chosen string", "dataset", lambda env: upload(env.api, "pairs.jsonl", jsonl(PAIR | {"chosen": ""})),
         422, "invalid_dataset", "file", ("line 1", "the chosen response is empty")),
    Case("upload unknown message role", "dataset",
         lambda env: upload(env.api, "chat.jsonl", jsonl(CONVERSATION | {"chosen": [{"role": "wizard", "content": "7"}], "rejected": [{"role": "assistant", "content": "8"}]})),
         422, "invalid_dataset", "file line 1 field chosen[0].role", ("'wizard'", "system, user, assistant")),
    Case("upload label of wrong type", "dataset", lambda env: upload(env.api, "pairs.jsonl", jsonl(PAIR | {"label": "high"})),
         422, "invalid_dataset", "file line 1 field label", ("'label'", "a number from 0 to 1")),
    Case("upload empty file", "dataset", lambda env: upload(env.api, "pairs.jsonl", b""),
         422, "invalid_dataset", "file", ("the file is empty",)),
    Case("upload unsupported extension", "dataset", lambda env: upload(env.api, "pairs.csv", b"prompt,chosen,rejected\n"),
         422, "invalid_dataset", "file", ("unsupported file extension", ".jsonl")),
    Case("upload unknown format", "dataset", lambda env: upload(env.api, "pairs.jsonl", jsonl(PAIR), format="csv"),
         422, "invalid_format", "format", ("'csv'",)),
    Case("upload filename '..'", "dataset", lambda env: upload(env.api, "..", jsonl(PAIR)),
         422, "invalid_filename", "file", ("'..'",)),
    Case("upload two files", "dataset",
         lambda env: env.api.client.post("/v1/datasets", files=[("file", ("a.jsonl", jsonl(PAIR))), ("file", ("b.jsonl", jsonl(PAIR)))], headers=env.api.headers()),
         422, "too_many_files", "file", ("Maximum number of files is 1",)),
    Case("upload without file field", "dataset", lambda env: env.api.client.post("/v1/datasets", data={"format": "trl"}, headers=env.api.headers()),
         422, "missing_file", "file", ("'file'",)),
    Case("upload streamed over byte limit", "dataset", chunked_upload,
         413, "upload_too_large", "file", (f"limit of {LIMITED_UPLOAD_BYTES} bytes", "W2S_MAX_UPLOAD_BYTES"),
         # Rejected while streaming: fewer bytes were read than were sent.
         check=lambda error: error["value"] < CHUNKS * CHUNK_ROWS * len(CHUNK_ROW)),
    Case("upload gzip over decompressed limit", "dataset", gzip_bomb,
         422, "invalid_dataset", "file", (f"at most {LIMITED_DECOMPRESSED_BYTES} bytes after decompression",)),
    Case("dataset unknown id", "dataset", lambda env: env.api.client.get("/v1/datasets/" + "0" * 64, headers=env.api.headers()),
         404, "dataset_not_found", "dataset_id", ("0" * 64,)),
    Case("dataset delete unknown id", "dataset", lambda env: env.api.client.delete("/v1/datasets/" + "0" * 64, headers=env.api.headers()),
         404, "dataset_not_found", "dataset_id", ("0" * 64,)),
    # Job configs
    Case("job invalid JSON", "job", raw_post("/v1/jobs", b'{"type": "pipeline", "config": {'),
         422, "invalid_json", "body", ("character 32", "double quotes")),
    Case("job non-UTF-8 body", "job", raw_post("/v1/jobs", b'{"type": "pipeline", "config": {"name": "caf\xe9"}}'),
         422, "invalid_json", "body", ("not valid UTF-8", "0xe9")),
    Case("job body over byte limit", "job", raw_post("/v1/jobs", json.dumps(with_field(valid_job(), "name", "x" * 3000)).encode(), target="limited"),
         413, "body_too_large", "body", (f"limit of {LIMITED_REQUEST_BYTES} bytes", "W2S_MAX_REQUEST_BYTES")),
    Case("job config not an object", "job", lambda env: post_job(env.api, {"type": "pipeline", "config": [1, 2]}),
         422, "invalid_request", "config", ("valid dictionary",)),
    Case("job batch size of wrong type", "job", job_field("student.batch_size", "eight"),
         422, "invalid_config", "config.student.batch_size", ("student.batch_size", "valid integer")),
    Case("job empty dataset path", "job", job_field("source.train", ""),
         422, "empty_value", "config.source.train", ("empty string", "dataset:<id>")),
    Case("job empty model path", "job", job_field("weak.model", "  "),
         422, "empty_value", "config.weak.model", ("empty string", "model:<id or alias>")),
    Case("job NaN learning rate", "job", job_field("student.learning_rate", float("nan")),
         422, "invalid_config", "config.student.learning_rate", ("student.learning_rate", "finite number")),
    Case("job infinite lambda", "job", job_field("arms.0.anchor.lam", float("inf")),
         422, "invalid_config", "config.arms.0.anchor.lam", ("arms.0.anchor.lam",)),
    Case("job negative batch size", "job", job_field("student.batch_size", -8),
         422, "invalid_config", "config.student.batch_size", ("student.batch_size", "greater than or equal to 1"), value=-8),
    Case("job negative lambda", "job", job_field("arms.0.anchor.lam", -0.5),
         422, "invalid_config", "config.arms.0.anchor.lam", ("arms.0.anchor.lam",), value=-0.5),
    Case("job lambda above maximum", "job", job_field("arms.0.anchor.lam", 1e9),
         422, "invalid_config", "config.arms.0.anchor.lam", ("arms.0.anchor.lam", "1000")),
    Case("job batch size above maximum", "job", job_field("student.batch_size", 100_000),
         422, "invalid_config", "config.student.batch_size", ("student.batch_size", "less than or equal to 4096"), value=100_000),
    Case("job max length above maximum", "job", job_field("weak.max_length", 1_000_000),
         422, "invalid_config", "config.weak.max_length", ("weak.max_length", "less than or equal to 8192")),
    Case("job misspelt field", "job", job_field("student.learning_rat", 0.001),
         422, "invalid_config", "config.student.learning_rat", ("student.learning_rat", "Extra inputs are not permitted")),
    Case("job arm name with ../", "job", job_field("arms.0.name", "../../escape"),
         422, "invalid_config", "config.arms.0.name", ("'../../escape'", "folder name")),
    Case("job data symlink leaving data folder", "job", job_field("source.test", ESCAPING_DATA),
         422, "path_not_allowed", "config.source.test", (f"'{ESCAPING_DATA}'", "outside the data folder")),
    Case("job model symlink leaving model folder", "job", job_field("weak.model", ESCAPING_MODEL),
         422, "path_not_allowed", "config.weak.model", (f"'{ESCAPING_MODEL}'", "outside the model folder")),
    Case("job pickle-only model", "job", job_field("student.model", PICKLE_MODEL),
         422, "pickle_not_allowed", "config.student.model", ("pytorch_model.bin", "W2S_ALLOW_PICKLE")),
    Case("job remote-code model", "job", job_field("weak.model", REMOTE_CODE_MODEL),
         422, "remote_code_not_allowed", "config.weak.model", ("auto_map", "W2S_ALLOW_REMOTE_CODE")),
    Case("job remote code asked for in config", "job",
         lambda env: post_job(env.api, with_field(with_field(valid_job(), "student.allow_remote_code", True), "student.model", REMOTE_CODE_MODEL)),
         422, "remote_code_not_allowed", "config.student.model", ("auto_map",)),
    Case("job registered pickle-only model", "job", lambda env: post_job(env.api, with_field(valid_job(), "student.model", f"model:{env.model_ids['api/pickle-only']}")),
         422, "pickle_not_allowed", "config.student.model", ("pytorch_model.bin",)),
    Case("job Idempotency-Key too long", "job", lambda env: post_job(env.api, valid_job(), **{"Idempotency-Key": "k" * 201}),
         422, "invalid_idempotency_key", "Idempotency-Key", ("1 to 200 characters", "201")),
    Case("job list unknown state", "job", lambda env: env.api.client.get("/v1/jobs", params={"state": "paused"}, headers=env.api.headers()),
         422, "invalid_request", "state.0", ("'queued'",)),
    Case("job list limit 0", "job", lambda env: env.api.client.get("/v1/jobs", params={"limit": 0}, headers=env.api.headers()),
         422, "invalid_request", "limit", ("greater than or equal to 1",)),
    Case("job cancel unknown id", "job", lambda env: env.api.client.post(f"/v1/jobs/{UNKNOWN_ID}/cancel", headers=env.api.headers()),
         404, "job_not_found", "job_id", (UNKNOWN_ID,)),
    Case("job logs unknown id", "job", lambda env: env.api.client.get(f"/v1/jobs/{UNKNOWN_ID}/logs", headers=env.api.headers()),
         404, "job_not_found", "job_id", (UNKNOWN_ID,)),
    # Model registry
    Case("register pickle-only model", "model", lambda env: env.api.client.post("/v1/models", json={"name": "p", "path": PICKLE_MODEL}, headers=env.api.headers("modeller")),
         422, "pickle_not_allowed", "path", (f"'{PICKLE_MODEL}'", "pytorch_model.bin", "W2S_ALLOW_PICKLE")),
    Case("register remote-code model", "model", lambda env: env.api.client.post("/v1/models", json={"name": "r", "path": REMOTE_CODE_MODEL}, headers=env.api.headers("modeller")),
         422, "remote_code_not_allowed", "path", (f"'{REMOTE_CODE_MODEL}'", "auto_map", "W2S_ALLOW_REMOTE_CODE")),
    Case("register symlink leaving model folder", "model", lambda env: env.api.client.post("/v1/models", json={"name": "e", "path": ESCAPING_MODEL}, headers=env.api.headers("modeller")),
         422, "path_not_allowed", "path", (f"'{ESCAPING_MODEL}'", "outside the model folder")),
    Case("register empty name", "model", lambda env: env.api.client.post("/v1/models", json={"name": "", "path": MODEL}, headers=env.api.headers("modeller")),
         422, "invalid_request", "name", ("at least 1 character",)),
    Case("alias to unknown model", "model", lambda env: env.api.client.put("/v1/models/aliases/prod", json={"model_id": UNKNOWN_ID}, headers=env.api.headers("modeller")),
         422, "model_not_found", "model_id", (UNKNOWN_ID,)),
    Case("alias name starting with dots", "model", lambda env: env.api.client.put("/v1/models/aliases/..prod", json={"model_id": env.model_ids["api/minilm"]}, headers=env.api.headers("modeller")),
         422, "invalid_request", "alias", ("pattern",)),
    Case("model unknown id", "model", lambda env: env.api.client.get(f"/v1/models/{UNKNOWN_ID}/download", headers=env.api.headers()),
         404, "model_not_found", "model_id", (UNKNOWN_ID,)),
    # Scoring requests
    Case("score invalid JSON", "scoring", raw_post("/v1/score", b'{"model": "x", "items": [', target="scorer"),
         422, "invalid_json", "body", ("character 25",), scorer=True),
    Case("score non-UTF-8 body", "scoring", raw_post("/v1/score", b'{"model": "x", "items": [{"prompt": "\xff", "response": "a"}]}', target="scorer"),
         422, "invalid_json", "body", ("not valid UTF-8", "0xff"), scorer=True),
    Case("score items of wrong type", "scoring", score({"model": MODEL, "items": "Name a prime number."}),
         422, "invalid_request", "items", ("valid list",), scorer=True),
    Case("score empty model name", "scoring", score({"model": "", "items": [{"prompt": "p", "response": "r"}]}),
         422, "invalid_request", "model", ("at least 1 character",), scorer=True),
    Case("score unknown message role", "scoring",
         score({"model": MODEL, "items": [{"messages": [{"role": "user", "content": "q"}, {"role": "wizard", "content": "a"}]}]}),
         422, "invalid_request", "items.0.messages.1.role", ("'system', 'user' or 'assistant'",), scorer=True),
    Case("score model name with ../", "scoring", score({"model": "../../etc/passwd", "items": [{"prompt": "p", "response": "r"}]}),
         404, "model_not_found", "model", ("'../../etc/passwd'",), scorer=True),
    Case("score pickle-only model", "scoring", lambda env: score({"model": env.model_ids["api/pickle-only"], "items": [{"prompt": "p", "response": "r"}]})(env),
         422, "pickle_not_allowed", "model", ("pytorch_model.bin", "W2S_ALLOW_PICKLE"), scorer=True),
    Case("score remote-code model", "scoring", lambda env: score({"model": env.model_ids["api/remote-code"], "items": [{"prompt": "p", "response": "r"}]})(env),
         422, "remote_code_not_allowed", "model", ("auto_map",), scorer=True),
    Case("score model info of pickle-only model", "scoring", lambda env: env.scorer.get(f"/v1/score/models/{env.model_ids['api/pickle-only']}", headers=env.api.headers("scorer")),
         422, "pickle_not_allowed", "model", ("pytorch_model.bin",), scorer=True),
    Case("get_reward queries of wrong type", "scoring", lambda env: env.scorer.post("/get_reward", json={"query": [1, 2], "model": MODEL}, headers=env.api.headers("scorer")),
         422, "invalid_request", "query.0", ("valid string",), scorer=True),
    Case("get_reward without a model", "scoring", lambda env: env.scorer.post("/get_reward", json={"query": ["Human: hi\n\nAssistant: hello"]}, headers=env.api.headers("scorer")),
         422, "model_missing", "model", ("W2S_SCORING_DEFAULT_MODEL",), scorer=True),
]

# Cases that another test already sends and checks in the same way; listed here so that the table
# names every case. test_covered_cases_exist checks that each named test exists.
COVERED = {
    "upload row field of wrong type": "tests/app/test_api_jobs.py::test_upload_invalid_row_names_row_and_field",
    "upload declared over byte limit": "tests/app/test_api_jobs.py::test_upload_too_large_is_413",
    "job student lambda negative": "tests/app/test_api_jobs.py::test_invalid_job_config_is_422",
    "job absolute data path": "tests/app/test_api_jobs.py::test_invalid_job_config_is_422",
    "job ../ data path": "tests/app/test_api_jobs.py::test_invalid_job_config_is_422",
    "job unknown dataset id": "tests/app/test_api_jobs.py::test_invalid_job_config_is_422",
    "job model path outside model folder": "tests/app/test_api_jobs.py::test_invalid_job_config_is_422",
    "job unknown model id": "tests/app/test_api_jobs.py::test_invalid_job_config_is_422",
    "job unknown type": "tests/app/test_api_jobs.py::test_unknown_job_type_is_422",
    "job unknown id": "tests/app/test_api_jobs.py::test_unknown_job_is_404",
    "register ../ and absolute paths": "tests/app/test_api_jobs.py::test_register_model_invalid_is_422",
    "score body over byte limit": "tests/app/test_scoring.py::test_body_over_limit_is_413",
    "score chunked body over byte limit": "tests/app/test_scoring.py::test_chunked_body_over_limit_is_413",
    "score text longer than max length": "tests/app/test_scoring.py::test_score_truncates_long_text",
    "score conversation ending with user": "tests/app/test_scoring.py::test_score_rejects_conversation_ending_with_user",
    "compare one response": "tests/app/test_scoring.py::test_compare_needs_two_responses",
    "score unknown model": "tests/app/test_scoring.py::test_unknown_model_is_404",
    "score too many items": "tests/app/test_scoring.py::test_too_many_items_is_422",
    "score too many characters": "tests/app/test_scoring.py::test_too_many_characters_is_422",
    "score too many tokens": "tests/app/test_scoring.py::test_too_many_tokens_is_422",
}


# --- checks -----------------------------------------------------------------------------------------


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "field", "value", "fix"}, body
    return body["error"]


def snapshot(api: Api) -> dict[str, Any]:
    """Return what a request could leave behind in one deployment: rows, dataset files, aliases."""
    with api.deployment.store.session() as session:
        counts = {table.__name__: session.scalar(select(func.count()).select_from(table)) for table in (Dataset, Job, RegisteredModel, ModelAlias)}
    datasets_folder = api.deployment.settings.resolved_artifact_root / "datasets"
    files = sorted(str(path) for path in datasets_folder.rglob("*")) if datasets_folder.exists() else []
    return {"rows": counts, "dataset files": files}


def loaded_models(scorer: TestClient) -> set[str]:
    return {served.ref.id for served in scorer.app.state.scoring_engine.cache.loaded()}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_request_is_rejected(env: Env, case: Case, record_property: Callable[[str, Any], None]) -> None:
    before = {name: snapshot(env.deployment(name)) for name in ("api", "limited", "permissive")}
    loaded_before = loaded_models(env.scorer)

    response = case.send(env)

    assert response.status_code == case.status, response.text
    error = _error(response)
    # Kept in --junitxml output; docs/RELIABILITY.md quotes the messages from there.
    record_property("status", response.status_code)
    record_property("message", error["message"])
    assert error["code"] == case.code, error
    # A union or list field may add one more part, e.g. 'lam.float' for the float branch of lam.
    assert error["field"] == case.field or error["field"].startswith(f"{case.field}."), error
    for words in case.says:
        assert words in error["message"], error
    if case.value is not None:
        assert error["value"] == case.value, error
    if case.check is not None:
        assert case.check(error), error
    assert error["fix"], error
    for name, state in before.items():
        assert snapshot(env.deployment(name)) == state, f"{case.id} left something behind in {name}"
    if case.scorer:
        assert loaded_models(env.scorer) == loaded_before, f"{case.id} loaded a model"


def test_table_size() -> None:
    assert len(CASES) + len(COVERED) >= 40
    assert len({case.id for case in CASES} | set(COVERED)) == len(CASES) + len(COVERED)


@pytest.mark.parametrize("name", sorted(COVERED))
def test_covered_cases_exist(name: str) -> None:
    path, _, test_name = COVERED[name].partition("::")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    assert callable(getattr(module, test_name, None)), f"{COVERED[name]} no longer exists; move case {name!r} into CASES"


# --- requests that are not rejected ------------------------------------------------------------------


def test_baseline_job_is_accepted(env: Env) -> None:
    """The request every job case changes is valid, so each rejection comes from the changed field."""
    response = post_job(env.permissive, valid_job())

    assert response.status_code == 202, response.text


def test_upload_filename_traversal_stays_in_dataset_folder(env: Env) -> None:
    response = upload(env.permissive, "../../../escape.jsonl", jsonl(PAIR))

    assert response.status_code == 201, response.text
    assert response.json()["filename"] == "escape.jsonl"
    root = env.permissive.deployment.settings.resolved_artifact_root / "datasets"
    stored = root / response.json()["id"] / "escape.jsonl"
    assert stored.is_file()
    assert not (root.parent / "escape.jsonl").exists()
    delete = env.permissive.client.delete(f"/v1/datasets/{response.json()['id']}", headers=env.permissive.headers())
    assert delete.status_code == 204


def _register(api: Api, folder: str) -> httpx.Response:
    return api.client.post("/v1/models", json={"name": folder, "path": folder}, headers=api.headers("modeller"))


@pytest.mark.parametrize(("folder", "field"), [(PICKLE_MODEL, "student.model"), (REMOTE_CODE_MODEL, "weak.model")])
def test_operator_switch_admits_model(env: Env, folder: str, field: str) -> None:
    registered = _register(env.permissive, folder)
    job = post_job(env.permissive, with_field(valid_job(), field, folder))

    # 200 when another test registered the folder first.
    assert registered.status_code in (200, 201), registered.text
    assert job.status_code == 202, job.text


def test_operator_switch_scores_pickle_model(env: Env) -> None:
    registered = _register(env.permissive, PICKLE_MODEL)
    assert registered.status_code in (200, 201), registered.text
    model_id = registered.json()["id"]
    long_prompt = "Tell me about the history of the United States. " * 20

    response = env.permissive_scorer.post(
        "/v1/score",
        json={"model": model_id, "items": [{"prompt": "Name a prime number.", "response": "7"}, {"prompt": long_prompt, "response": "It began long ago."}]},
        headers=env.permissive.headers("scorer"),
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == model_id
    assert body["max_length"] == SCORER_MAX_LENGTH
    assert [item["truncated"] for item in body["items"]] == [False, True]
    assert body["truncated_items"] == 1
    assert body["items"][1]["tokens"] == SCORER_MAX_LENGTH
