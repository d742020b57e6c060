"""Job, dataset and model routes without a worker: jobs stay queued in Redis, so no model trains here."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import update

from tests.app.conftest import SOURCE, Api, genies_file, make_api, pipeline_request, upload
from workers.db import Job

MINILM = "all-MiniLM-L6-v2"


def _error(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "field", "value", "fix"}, body
    return body["error"]


def _uploaded_train(api: Api, shared_data: Path) -> str:
    response = upload(api, genies_file(shared_data, SOURCE, "train"))
    assert response.status_code in (200, 201), response.text
    return response.json()["reference"]


def _queued_pipeline(api: Api, shared_data: Path, **headers: str):
    request = pipeline_request(_uploaded_train(api, shared_data), MINILM)
    return api.client.post("/v1/jobs", json=request, headers=api.headers() | headers)


# --- Datasets ---------------------------------------------------------------------------------------


def test_upload_same_file_twice_is_one_dataset(api: Api, shared_data: Path) -> None:
    path = genies_file(shared_data, SOURCE, "train")
    first = upload(api, path)
    second = upload(api, path, role="other")

    assert first.status_code == 201, first.text
    assert second.status_code == 200, second.text
    assert first.json()["id"] == second.json()["id"]
    body = first.json()
    assert body["format"] == "ranked"
    assert body["pairs"] > 0
    assert body["prompts"] > 0
    assert len(body["samples"]) == 3
    assert body["reference"] == f"dataset:{body['id']}"

    listed = api.client.get("/v1/datasets", headers=api.headers()).json()
    assert listed["total"] == 1
    detail = api.client.get(f"/v1/datasets/{body['id']}", headers=api.headers())
    assert detail.json()["samples"] == body["samples"]


def test_upload_invalid_row_names_row_and_field(api: Api, tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"chosen": 3, "rejected": "b"}) + "\n")

    response = upload(api, path)

    assert response.status_code == 422
    error = _error(response)
    assert error["code"] == "invalid_dataset"
    assert "line 2" in error["message"]
    assert "'chosen'" in error["message"]
    assert error["field"] == "file line 2 field chosen"


def test_upload_gzip_jsonl(api: Api, tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl.gz"
    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(5)]
    path.write_bytes(gzip.compress("\n".join(json.dumps(row) for row in rows).encode()))

    response = upload(api, path)

    assert response.status_code == 201, response.text
    assert response.json()["format"] == "trl"
    assert response.json()["pairs"] == 5


def test_upload_too_large_is_413(tmp_path: Path, shared_data: Path) -> None:
    for api in make_api(tmp_path, shared_data, max_upload_bytes=1000):
        response = upload(api, genies_file(shared_data, SOURCE, "test"))
        assert response.status_code == 413
        error = _error(response)
        assert error["code"] == "upload_too_large"
        assert "exceeds the limit of 1000 bytes" in error["message"]
        assert "W2S_MAX_UPLOAD_BYTES" in error["fix"]


def test_dataset_delete_refused_while_job_uses_it(api: Api, shared_data: Path) -> None:
    job = _queued_pipeline(api, shared_data).json()
    dataset_id = job["datasets"][0]

    rejected = api.client.delete(f"/v1/datasets/{dataset_id}", headers=api.headers())
    assert rejected.status_code == 409
    error = _error(rejected)
    assert error["code"] == "dataset_in_use"
    assert job["id"] in error["message"]

    assert api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api.headers()).status_code == 202
    assert api.client.delete(f"/v1/datasets/{dataset_id}", headers=api.headers()).status_code == 204
    missing = api.client.get(f"/v1/datasets/{dataset_id}", headers=api.headers())
    assert missing.status_code == 404
    assert _error(missing)["code"] == "dataset_not_found"


# --- Jobs -------------------------------------------------------------------------------------------


def test_create_job_returns_202_and_resolves_references(api: Api, shared_data: Path) -> None:
    response = _queued_pipeline(api, shared_data)

    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] == "queued"
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["config"]["source"]["train"].endswith("/train.json.gz")
    assert "dataset:" not in json.dumps(job["config"])
    assert job["config"]["source"]["test"] == str(genies_file(shared_data, SOURCE, "test").resolve())
    assert [stage["stage_name"] for stage in job["stages"]] == ["weak", "train:anchored", "report"]

    fetched = api.client.get(f"/v1/jobs/{job['id']}", headers=api.headers())
    assert fetched.json()["id"] == job["id"]


def test_shipped_config_accepted_over_http(api: Api, shared_data: Path) -> None:
    import yaml

    root = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((root / "configs" / "quick" / "us_history_textbook__us_history_fiction.yaml").read_text())
    assert config["source"]["train"].startswith("${W2S_DATA_DIR}/")

    response = api.client.post("/v1/jobs", json={"type": "pipeline", "config": config}, headers=api.headers())

    assert response.status_code == 202, response.text
    resolved = response.json()["config"]
    assert resolved["source"]["train"] == str((shared_data / "genies" / "us_history_textbook" / "train.json.gz").resolve())
    assert "${" not in json.dumps(resolved)


def test_idempotency_key_returns_same_job(api: Api, shared_data: Path) -> None:
    first = _queued_pipeline(api, shared_data, **{"Idempotency-Key": "run-1"})
    second = _queued_pipeline(api, shared_data, **{"Idempotency-Key": "run-1"})

    assert first.status_code == 202
    assert second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    assert api.client.get("/v1/jobs", headers=api.headers()).json()["total"] == 1

    changed = pipeline_request(_uploaded_train(api, shared_data), MINILM)
    changed["config"]["name"] = "other"
    reused = api.client.post("/v1/jobs", json=changed, headers=api.headers() | {"Idempotency-Key": "run-1"})
    assert reused.status_code == 409
    assert _error(reused)["code"] == "idempotency_key_reused"


def test_list_filters_and_pagination(api: Api, shared_data: Path) -> None:
    ids = [_queued_pipeline(api, shared_data).json()["id"] for _ in range(3)]
    api.client.post(f"/v1/jobs/{ids[0]}/cancel", headers=api.headers())

    page = api.client.get("/v1/jobs", params={"limit": 2, "offset": 0}, headers=api.headers()).json()
    assert page["total"] == 3
    assert len(page["items"]) == 2
    queued = api.client.get("/v1/jobs", params={"state": "queued"}, headers=api.headers()).json()
    assert sorted(job["id"] for job in queued["items"]) == sorted(ids[1:])
    cancelled = api.client.get("/v1/jobs", params={"state": "cancelled", "type": "pipeline"}, headers=api.headers()).json()
    assert [job["id"] for job in cancelled["items"]] == [ids[0]]


def test_key_sees_only_own_jobs_unless_admin(api: Api, shared_data: Path) -> None:
    job_id = _queued_pipeline(api, shared_data).json()["id"]

    other = api.client.get(f"/v1/jobs/{job_id}", headers=api.headers("other"))
    assert other.status_code == 404
    assert _error(other)["code"] == "job_not_found"
    assert api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers("other")).status_code == 404
    assert api.client.get("/v1/jobs", headers=api.headers("other")).json()["total"] == 0

    assert api.client.get(f"/v1/jobs/{job_id}", headers=api.headers("admin")).status_code == 200
    assert api.client.get("/v1/jobs", headers=api.headers("admin")).json()["total"] == 1


def test_cancel_then_cancel_again_is_409_and_rerun(api: Api, shared_data: Path) -> None:
    job_id = _queued_pipeline(api, shared_data).json()["id"]

    cancelled = api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers())
    assert cancelled.status_code == 202
    assert cancelled.json()["state"] == "cancelled"

    again = api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers())
    assert again.status_code == 409
    error = _error(again)
    assert error["code"] == "job_finished"
    assert error["message"] == f"job {job_id} is already cancelled and cannot be cancelled"

    rerun = api.client.post(f"/v1/jobs/{job_id}/rerun", headers=api.headers())
    assert rerun.status_code == 202, rerun.text
    assert rerun.json()["rerun_of"] == job_id
    assert rerun.json()["config"] == cancelled.json()["config"]
    assert rerun.json()["datasets"] == cancelled.json()["datasets"]

    not_finished = api.client.post(f"/v1/jobs/{rerun.json()['id']}/rerun", headers=api.headers())
    assert not_finished.status_code == 409
    assert _error(not_finished)["code"] == "job_not_rerunnable"


def test_report_of_unfinished_job_is_409(api: Api, shared_data: Path) -> None:
    job_id = _queued_pipeline(api, shared_data).json()["id"]

    response = api.client.get(f"/v1/jobs/{job_id}/report", headers=api.headers())

    assert response.status_code == 409
    assert _error(response)["code"] == "report_not_ready"


def test_logs_are_paged(api: Api, shared_data: Path) -> None:
    job = _queued_pipeline(api, shared_data).json()
    weak = job["stages"][0]
    out_dir = Path(api.deployment.store.get_job(weak["id"]).out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / "job.log").write_text("".join(f"line {i}\n" for i in range(5)))

    page = api.client.get(f"/v1/jobs/{job['id']}/logs", params={"offset": 1, "limit": 3}, headers=api.headers()).json()

    assert page["lines"] == ["[weak] line 1", "[weak] line 2", "[weak] line 3"]
    assert page["next_offset"] == 4
    assert page["total"] == 5


# --- Invalid input and other errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "code", "message"),
    [
        ("config.student.anchor", {"lam": -1}, "invalid_config", "student.anchor.lam: Value error, lambda must be a number from 0 to 1000"),
        ("config.source.test", "/etc/passwd", "path_not_allowed", "config.source.test: path '/etc/passwd' is outside the data folder"),
        ("config.source.test", "../outside.json", "path_not_allowed", "config.source.test: path '../outside.json' is outside the data folder"),
        ("config.source.train", "dataset:unknown", "dataset_not_found", "config.source.train: dataset 'unknown' not found"),
        ("config.weak.model", "/tmp", "path_not_allowed", "config.weak.model: model path '/tmp' is outside the model folder"),
        ("config.weak.model", "model:nope", "model_not_found", "config.weak.model: model 'nope' is neither a registered model id nor an alias"),
    ],
)
def test_invalid_job_config_is_422(api: Api, shared_data: Path, field: str, value, code: str, message: str) -> None:
    request = pipeline_request(_uploaded_train(api, shared_data), MINILM)
    parent, _, key = field.removeprefix("config.").rpartition(".")
    node = request["config"]
    for part in parent.split("."):
        node = node[part]
    node[key] = value

    response = api.client.post("/v1/jobs", json=request, headers=api.headers())

    assert response.status_code == 422, response.text
    error = _error(response)
    assert error["code"] == code
    assert message in error["message"]
    assert error["field"].startswith(field)
    assert error["fix"]


def test_unknown_job_type_is_422(api: Api) -> None:
    response = api.client.post("/v1/jobs", json={"type": "finetune", "config": {}}, headers=api.headers())

    assert response.status_code == 422
    error = _error(response)
    assert error["field"] == "type"
    assert error["value"] == "finetune"
    assert "pipeline" in error["message"]


def test_unknown_job_is_404(api: Api) -> None:
    response = api.client.get("/v1/jobs/0b6f5f7c-3d57-4c58-a3c1-6f4f3b1e6c1a", headers=api.headers())

    assert response.status_code == 404
    error = _error(response)
    assert error["message"] == "job 0b6f5f7c-3d57-4c58-a3c1-6f4f3b1e6c1a not found"
    assert error["value"] == "0b6f5f7c-3d57-4c58-a3c1-6f4f3b1e6c1a"


def test_missing_key_is_401(api: Api) -> None:
    response = api.client.get("/v1/jobs")

    assert response.status_code == 401
    error = _error(response)
    assert error["code"] == "missing_api_key"
    assert error["field"] == "Authorization"
    assert response.headers["www-authenticate"] == "Bearer"


def test_revoked_key_is_401(api: Api) -> None:
    from app.auth import revoke_api_key

    key = api.keys["other"]
    revoke_api_key(api.deployment.store, key[:10])

    response = api.client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"})

    assert response.status_code == 401
    error = _error(response)
    assert error["code"] == "invalid_api_key"
    assert key not in response.text


def test_wrong_scope_is_403(api: Api) -> None:
    response = api.client.get("/v1/jobs", headers=api.headers("scorer"))

    assert response.status_code == 403
    error = _error(response)
    assert error["code"] == "missing_scope"
    assert error["message"] == "API key 'scorer' lacks scope 'jobs'; it has ['score']"


def test_queue_full_is_429(tmp_path: Path, shared_data: Path) -> None:
    for api in make_api(tmp_path, shared_data, max_queued_jobs=1):
        assert _queued_pipeline(api, shared_data).status_code == 202
        response = _queued_pipeline(api, shared_data)
        assert response.status_code == 429
        error = _error(response)
        assert error["code"] == "queue_full"
        assert error["message"] == "the job queue is full: 1 jobs are queued and the limit is 1 (W2S_MAX_QUEUED_JOBS)"
        assert response.headers["retry-after"] == "60"


def test_broker_down_is_503(api: Api, shared_data: Path) -> None:
    from workers.celery_app import create_app as create_celery

    down = create_celery(api.deployment.settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"}), set_as_current=False)
    down.conf.task_publish_retry = False
    api.client.app.state.celery = down
    request = pipeline_request(_uploaded_train(api, shared_data), MINILM)

    response = api.client.post("/v1/jobs", json=request, headers=api.headers())
    ready = api.client.get("/v1/health/ready", headers=api.headers())

    assert response.status_code == 503
    error = _error(response)
    assert error["code"] == "broker_unavailable"
    assert "redis://127.0.0.1:1/0 is unreachable" in error["message"]
    assert api.client.get("/v1/jobs", headers=api.headers()).json()["total"] == 0
    assert ready.status_code == 503
    assert _error(ready)["field"] == "broker"
    assert _error(ready)["value"]["database"] == "ok"


def test_database_down_is_503(api: Api, tmp_path: Path) -> None:
    from workers.db import JobStore

    folder = tmp_path / "not-a-database"
    folder.mkdir()
    api.client.app.state.store = JobStore(f"sqlite:///{folder}", api.deployment.settings)

    response = api.client.get("/v1/health/ready", headers=api.headers())
    listed = api.client.get("/v1/datasets", headers=api.headers())

    # Readiness needs a key, and checking the key needs the database, so the key check reports it.
    assert response.status_code == 503
    assert _error(response)["code"] == "database_unavailable"
    assert listed.status_code == 503
    assert _error(listed)["code"] == "database_unavailable"


# --- Models -----------------------------------------------------------------------------------------


def test_register_alias_and_delete_model(api: Api) -> None:
    registered = api.client.post("/v1/models", json={"name": "minilm", "path": MINILM}, headers=api.headers("modeller"))
    assert registered.status_code == 201, registered.text
    model = registered.json()
    assert model["lineage"]["source"] == "directory"
    assert api.client.post("/v1/models", json={"name": "minilm", "path": MINILM}, headers=api.headers("modeller")).status_code == 200

    forbidden = api.client.put("/v1/models/aliases/default", json={"model_id": model["id"]}, headers=api.headers("user"))
    assert forbidden.status_code == 403
    alias = api.client.put("/v1/models/aliases/default", json={"model_id": model["id"]}, headers=api.headers("modeller"))
    assert alias.status_code == 200
    by_alias = api.client.get("/v1/models/default", headers=api.headers())
    assert by_alias.json()["id"] == model["id"]
    assert by_alias.json()["aliases"] == ["default"]

    assert api.client.delete(f"/v1/models/{model['id']}", headers=api.headers("modeller")).status_code == 204
    after_delete = api.client.get("/v1/models/default", headers=api.headers())
    assert after_delete.status_code == 404
    assert _error(after_delete)["code"] == "model_not_found"
    assert (api.deployment.settings.model_dir / MINILM / "config.json").is_file()


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"name": "x", "path": "../"}, "path_not_allowed"),
        ({"name": "x", "path": "/etc"}, "path_not_allowed"),
        ({"name": "x", "hub_name": "org/reward-model"}, "hub_models_disabled"),
        ({"name": "x"}, "invalid_request"),
    ],
)
def test_register_model_invalid_is_422(api: Api, body: dict, code: str) -> None:
    response = api.client.post("/v1/models", json=body, headers=api.headers("modeller"))

    assert response.status_code == 422
    assert _error(response)["code"] == code


def test_model_in_use_delete_is_409(api: Api, shared_data: Path) -> None:
    model = api.client.post("/v1/models", json={"name": "minilm", "path": MINILM}, headers=api.headers("modeller")).json()
    request = pipeline_request(_uploaded_train(api, shared_data), f"model:{model['id']}")
    job = api.client.post("/v1/jobs", json=request, headers=api.headers()).json()
    assert job["models"] == [model["id"]]

    response = api.client.delete(f"/v1/models/{model['id']}", headers=api.headers("modeller"))

    assert response.status_code == 409
    assert _error(response)["code"] == "model_in_use"


# --- Operations and schema ---------------------------------------------------------------------------


def test_health_metrics_and_openapi(api: Api, shared_data: Path) -> None:
    assert api.client.get("/v1/health/live").json() == {"status": "ok"}
    assert api.client.get("/v1/health/ready").status_code == 401
    ready = api.client.get("/v1/health/ready", headers=api.headers())
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}

    _queued_pipeline(api, shared_data)
    metrics = api.client.get("/v1/metrics", headers=api.headers()).text
    assert 'w2s_jobs{state="queued",type="pipeline"} 1.0' in metrics
    assert "w2s_queue_depth 3.0" in metrics
    assert 'w2s_http_requests_total{method="POST",route="/v1/jobs",status="202"} 1.0' in metrics

    paths = api.client.get("/openapi.json").json()["paths"]
    assert set(paths["/v1/jobs"]["post"]["responses"]) == {"200", "202", "401", "403", "409", "422", "429", "503"}
    assert set(paths["/v1/jobs/{job_id}/cancel"]["post"]["responses"]) >= {"202", "404", "409"}
    assert set(paths["/v1/datasets"]["post"]["responses"]) >= {"201", "200", "413", "422"}
    # Liveness returns 200 whenever the process runs. Every other route can fail.
    for path, operations in paths.items():
        for method, operation in operations.items():
            errors = {status: response for status, response in operation["responses"].items() if status >= "400"}
            if path != "/v1/health/live":
                assert errors, f"{method.upper()} {path} documents no error status"
            for status, response in errors.items():
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, f"{method.upper()} {path} {status}"


def test_import_app_main_loads_no_torch() -> None:
    code = "import sys, app.main; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2])

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_auth_disabled_accepts_requests_without_key(tmp_path: Path, shared_data: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="app"):
        for api in make_api(tmp_path, shared_data, auth_disabled=True):
            response = api.client.get("/v1/jobs")
            assert response.status_code == 200
    assert "authentication is DISABLED" in caplog.text


def test_cancel_finished_job_is_409(api: Api, shared_data: Path) -> None:
    job_id = _queued_pipeline(api, shared_data).json()["id"]
    with api.deployment.store.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(state="succeeded"))

    response = api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers())

    assert response.status_code == 409
    assert _error(response)["message"] == f"job {job_id} is already succeeded and cannot be cancelled"
