"""The `w2s` API client commands against a real uvicorn server on 127.0.0.1 (no worker: jobs stay queued)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import uvicorn

from app.cli import main
from tests.app.conftest import SOURCE, Api, genies_file, make_api, pipeline_request


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served(tmp_path: Path, shared_data: Path) -> Iterator[tuple[Api, str]]:
    for api in make_api(tmp_path, shared_data):
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(api.client.app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            yield api, f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout=10)


def test_cli_upload_submit_list_cancel_watch(served: tuple[Api, str], shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    api, url = served
    connection = ["--api-url", url, "--api-key", api.keys["user"]]

    assert main(["datasets", "upload", str(genies_file(shared_data, SOURCE, "train")), *connection]) == 0
    uploaded = capsys.readouterr().out
    reference = uploaded.split("use it in a job config as: ")[1].strip()
    assert reference.startswith("dataset:")

    config = tmp_path / "pipeline.json"
    config.write_text(json.dumps(pipeline_request(reference, "all-MiniLM-L6-v2")["config"]))
    assert main(["submit", "pipeline", str(config), "--idempotency-key", "cli-1", *connection]) == 0
    job_id = capsys.readouterr().out.split()[1]
    assert main(["submit", "pipeline", str(config), "--idempotency-key", "cli-1", *connection]) == 0
    assert capsys.readouterr().out.split()[1] == job_id

    assert main(["jobs", *connection]) == 0
    listing = capsys.readouterr().out
    assert job_id in listing
    assert "1 of 1 jobs" in listing

    assert main(["jobs", "cancel", job_id, *connection]) == 0
    assert capsys.readouterr().out.strip() == f"job {job_id} cancelled (cancel requested)"
    assert main(["watch", job_id, *connection]) == 1
    assert capsys.readouterr().out.strip() == f"job {job_id} cancelled"


def test_cli_prints_error_code_and_fix(served: tuple[Api, str], capsys: pytest.CaptureFixture) -> None:
    api, url = served

    status = main(["jobs", "cancel", "0b6f5f7c-3d57-4c58-a3c1-6f4f3b1e6c1a", "--api-url", url, "--api-key", api.keys["user"]])

    assert status == 2
    error = capsys.readouterr().err
    assert "404 job_not_found: job 0b6f5f7c-3d57-4c58-a3c1-6f4f3b1e6c1a not found" in error
    assert "fix: List your jobs with GET /v1/jobs." in error


def test_cli_keys_create_list_revoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from workers.db import upgrade_database
    from workers.settings import get_settings

    url = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    upgrade_database(url)
    monkeypatch.setenv("W2S_DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        assert main(["keys", "create", "--name", "ci", "--scopes", "jobs,score"]) == 0
        created = capsys.readouterr().out.splitlines()
        key = created[-1]
        assert key.startswith("w2s_")
        assert main(["keys", "list"]) == 0
        listing = capsys.readouterr().out
        assert f"{key[:10]}..." in listing
        assert key not in listing
        assert main(["keys", "revoke", key[:10]]) == 0
        assert "revoked" in capsys.readouterr().out
        assert main(["keys", "list"]) == 0
        assert capsys.readouterr().out == ""
    finally:
        get_settings.cache_clear()
