"""A pipeline over HTTP, run to success by a real `celery worker` subprocess through Redis.

Trains MiniLM on a tiny GENIES slice on the CPU: about a minute on a shared 2-core machine.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from tests.app.conftest import SOURCE, Api, genies_file, pipeline_request, upload

pytestmark = pytest.mark.slow

MINILM = "all-MiniLM-L6-v2"
# Generous: the stream closes when the job ends; a shared 2-core machine trains MiniLM at 1-4 s per step.
PIPELINE_TIMEOUT_S = 420


def _read_events(api: Api, job_id: str) -> list[tuple[str, dict]]:
    events = []
    name = None
    with api.client.stream("GET", f"/v1/jobs/{job_id}/events", headers=api.headers(), timeout=PIPELINE_TIMEOUT_S) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_pipeline_over_http(api: Api, shared_data: Path) -> None:
    worker = api.deployment.start_worker()
    path = genies_file(shared_data, SOURCE, "train")
    first = upload(api, path)
    second = upload(api, path)
    assert first.status_code == 201, first.text
    assert second.json()["id"] == first.json()["id"]

    model = api.client.post("/v1/models", json={"name": "minilm", "path": MINILM}, headers=api.headers("modeller")).json()
    request = pipeline_request(first.json()["reference"], f"model:{model['id']}")
    created = api.client.post("/v1/jobs", json=request, headers=api.headers())
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]

    events = _read_events(api, job_id)

    names = [name for name, _ in events]
    assert names[0] == "state"
    assert "progress" in names
    assert names[-1] == "end"
    assert names.index("progress") < names.index("end")
    final = events[-1][1]
    assert final["state"] == "succeeded", f"{final}\n{api.deployment.worker_logs()}"

    job = api.client.get(f"/v1/jobs/{job_id}", headers=api.headers()).json()
    assert job["state"] == "succeeded"
    assert [stage["state"] for stage in job["stages"]] == ["succeeded"] * 3

    report = api.client.get(f"/v1/jobs/{job_id}/report", headers=api.headers())
    assert report.status_code == 200
    assert report.json()
    markdown = api.client.get(f"/v1/jobs/{job_id}/report", params={"format": "markdown"}, headers=api.headers())
    assert markdown.headers["content-type"].startswith("text/markdown")
    assert "anchored" in markdown.text
    plot = api.client.get(f"/v1/jobs/{job_id}/report/plots/accuracy", headers=api.headers())
    assert plot.headers["content-type"] == "image/png"
    assert plot.content[:8] == b"\x89PNG\r\n\x1a\n"

    models = api.client.get("/v1/models", params={"name": "anchored"}, headers=api.headers()).json()["items"]
    assert len(models) == 1
    anchored = models[0]
    assert anchored["lineage"]["source"] == "trained"
    assert anchored["lineage"]["pipeline_id"] == job_id
    assert anchored["lineage"]["weak_labeller"] is not None
    assert first.json()["id"] in json.dumps(anchored["lineage"]) or anchored["lineage"]["datasets"]

    archive = api.client.get(f"/v1/models/{anchored['id']}/download", headers=api.headers())
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        names = tar.getnames()
    assert any(name.endswith("/config.json") for name in names), names
    assert any(name.endswith("/w2s_metadata.json") for name in names), names

    logs = api.client.get(f"/v1/jobs/{job_id}/logs", headers=api.headers())
    assert logs.status_code == 200
    assert any("[train:anchored]" in line and "saved" in line for line in logs.json()["lines"]), logs.json()
    worker.stop()
