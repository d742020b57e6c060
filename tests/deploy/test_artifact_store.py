"""ArtifactStore against a local folder and against moto's S3 server, with the same tests for both.

The S3 server is moto's standalone server (`python -m moto.server`), started on a free port of
127.0.0.1 for the session and stopped by its pid afterwards.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from workers.artifacts import (
    MARKER_NAME,
    ArtifactIntegrityError,
    ArtifactNotFoundError,
    ArtifactStore,
    validate_key,
)

BUCKET = "w2s-artifacts-test"
MOTO_START_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_http(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with code {process.returncode} before answering on {url}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"moto server did not answer on {url} within {timeout_s} s")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 with one bucket, and yield its endpoint URL."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"

    with pytest.MonkeyPatch.context() as env, open(log_path, "wb") as log:
        # Fixed fake credentials, and no user AWS config that could redirect requests elsewhere.
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_CONFIG_FILE", str(log_path.parent / "no-aws-config"))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(log_path.parent / "no-aws-credentials"))
        env.delenv("AWS_PROFILE", raising=False)
        env.delenv("AWS_SESSION_TOKEN", raising=False)

        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_for_http(f"{endpoint}/moto-api/", process, MOTO_START_TIMEOUT_S)
            import boto3

            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
            yield endpoint
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    cache_dir = tmp_path / "cache"
    if backend == "local":
        return ArtifactStore(tmp_path / "store", cache_dir=cache_dir)
    endpoint = request.getfixturevalue("s3_endpoint")
    # A fresh prefix per test keeps tests independent inside the one session bucket.
    return ArtifactStore(f"s3://{BUCKET}/{uuid.uuid4().hex}", endpoint_url=endpoint, cache_dir=cache_dir)


def _write_model_folder(folder: Path) -> dict[str, bytes]:
    """Write a small folder shaped like a model directory, and return its files' contents by relative path."""
    contents = {
        "config.json": b'{"model_type": "mpnet"}\n',
        "model.safetensors": bytes(range(256)) * 64,
        "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}\n',
        "tokenizer/vocab.txt": "[PAD]\n[UNK]\nr\u00e9sum\u00e9\n".encode("utf-8"),
        "empty.txt": b"",
    }
    for relative, data in contents.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return contents


def _read_tree(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MARKER_NAME
    }


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    folder = tmp_path / "source"
    return folder, _write_model_folder(folder)


# --- Upload, list, read -----------------------------------------------------------------------


def test_upload_then_exists_and_listed(store: ArtifactStore, source: tuple[Path, dict[str, bytes]]) -> None:
    folder, contents = source
    manifest = store.upload_dir(folder, "jobs/a1/model")

    assert store.exists("jobs/a1/model")
    assert store.list_keys() == ["jobs/a1/model"]
    assert store.files("jobs/a1/model") == sorted(contents)
    assert manifest.files == {relative: len(data) for relative, data in contents.items()}
    assert store.read_manifest("jobs/a1/model").upload_id == manifest.upload_id


def test_download_matches_source(store: ArtifactStore, source: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    folder, contents = source
    store.upload_dir(folder, "jobs/a1/model")

    dest = store.download_dir("jobs/a1/model", tmp_path / "download" / "model")

    assert dest == tmp_path / "download" / "model"
    assert _read_tree(dest) == contents
    assert (dest / MARKER_NAME).is_file()
    leftovers = [path.name for path in dest.parent.iterdir() if path.name != "model"]
    assert leftovers == []


def test_download_default_destination(
    store: ArtifactStore, backend: str, source: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    folder, contents = source
    store.upload_dir(folder, "jobs/a1/model")

    dest = store.download_dir("jobs/a1/model")

    if backend == "local":
        assert dest == tmp_path / "store" / "jobs" / "a1" / "model"
    else:
        assert dest == tmp_path / "cache" / "jobs" / "a1" / "model"
    assert _read_tree(dest) == contents


def test_download_reuses_cached_copy(
    store: ArtifactStore, source: tuple[Path, dict[str, bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, contents = source
    store.upload_dir(folder, "m")
    dest = tmp_path / "cached" / "m"
    store.download_dir("m", dest)

    fetched: list[str] = []
    original_get_file = store._fs.get_file

    def counting_get_file(remote: str, local: str, *args, **kwargs):
        fetched.append(remote)
        return original_get_file(remote, local, *args, **kwargs)

    monkeypatch.setattr(store._fs, "get_file", counting_get_file)
    store.download_dir("m", dest)
    assert fetched == []

    (folder / "config.json").write_bytes(b'{"model_type": "mpnet", "revision": 2}\n')
    store.upload_dir(folder, "m", overwrite=True)
    store.download_dir("m", dest)
    assert len(fetched) == len(contents)
    assert (dest / "config.json").read_bytes() == b'{"model_type": "mpnet", "revision": 2}\n'
    assert sorted(path.name for path in dest.parent.iterdir()) == ["m"]


def test_open_reads_one_file(store: ArtifactStore, source: tuple[Path, dict[str, bytes]]) -> None:
    folder, contents = source
    store.upload_dir(folder, "m")

    with store.open("m", "1_Pooling/config.json") as handle:
        assert handle.read() == contents["1_Pooling/config.json"]
    with store.open("m", "tokenizer/vocab.txt", "r", encoding="utf-8") as handle:
        assert handle.read() == contents["tokenizer/vocab.txt"].decode("utf-8")


def test_open_rejects_unknown_path_and_write_mode(store: ArtifactStore, source: tuple[Path, dict[str, bytes]]) -> None:
    folder, _ = source
    store.upload_dir(folder, "m")

    with pytest.raises(FileNotFoundError, match="'missing.bin' is not a file of artifact 'm'"):
        store.open("m", "missing.bin")
    with pytest.raises(ValueError, match="open only for reading"):
        store.open("m", "config.json", "wb")
    with pytest.raises(ValueError, match="invalid file path"):
        store.open("m", "../m/config.json")


def test_large_file_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    # 51 MiB is above s3fs's default 50 MiB block size, so the S3 upload is a multipart upload.
    folder = tmp_path / "big"
    folder.mkdir()
    data = os.urandom(51 * 1024 * 1024)
    (folder / "optimizer.pt").write_bytes(data)

    store.upload_dir(folder, "checkpoints/step-100")
    dest = store.download_dir("checkpoints/step-100", tmp_path / "big-download")

    assert (dest / "optimizer.pt").read_bytes() == data


def test_list_keys_prefix_is_folder(store: ArtifactStore, source: tuple[Path, dict[str, bytes]]) -> None:
    folder, _ = source
    for key in ("jobs/1/model", "jobs/10/model", "jobs/1/arms/anchor/model", "other"):
        store.upload_dir(folder, key)

    assert store.list_keys("jobs/1") == ["jobs/1/arms/anchor/model", "jobs/1/model"]
    assert store.list_keys("jobs") == ["jobs/1/arms/anchor/model", "jobs/1/model", "jobs/10/model"]
    assert store.list_keys("missing") == []
    assert len(store.list_keys()) == 4


def test_empty_store_lists_nothing(store: ArtifactStore) -> None:
    assert store.list_keys() == []
    assert not store.exists("jobs/a1/model")


# --- Completeness -----------------------------------------------------------------------------


def test_interrupted_upload_reads_as_absent(
    store: ArtifactStore, source: tuple[Path, dict[str, bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, contents = source
    original_put_file = store._fs.put_file
    uploaded: list[str] = []

    def failing_put_file(local: str, remote: str, *args, **kwargs):
        if len(uploaded) == 2:
            raise ConnectionError("simulated network failure")
        uploaded.append(remote)
        return original_put_file(local, remote, *args, **kwargs)

    monkeypatch.setattr(store._fs, "put_file", failing_put_file)
    with pytest.raises(ConnectionError):
        store.upload_dir(folder, "jobs/a1/model")
    monkeypatch.undo()

    assert len(uploaded) == 2
    assert not store.exists("jobs/a1/model")
    assert store.list_keys() == []
    with pytest.raises(ArtifactNotFoundError, match="did not finish"):
        store.download_dir("jobs/a1/model", tmp_path / "download")
    with pytest.raises(ArtifactNotFoundError):
        store.open("jobs/a1/model", "config.json")
    assert not (tmp_path / "download").exists()

    # A retry replaces the leftovers. A file that only the failed upload had is gone.
    (folder / "model.safetensors").unlink()
    del contents["model.safetensors"]
    store.upload_dir(folder, "jobs/a1/model")
    assert store.exists("jobs/a1/model")
    assert _read_tree(store.download_dir("jobs/a1/model", tmp_path / "retry")) == contents


def test_upload_existing_key_rejected(store: ArtifactStore, source: tuple[Path, dict[str, bytes]]) -> None:
    folder, _ = source
    store.upload_dir(folder, "m")

    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        store.upload_dir(folder, "m")


def test_overwrite_removes_stale_files(
    store: ArtifactStore, source: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    folder, contents = source
    first = store.upload_dir(folder, "m")
    (folder / "model.safetensors").unlink()
    del contents["model.safetensors"]

    second = store.upload_dir(folder, "m", overwrite=True)

    assert second.upload_id != first.upload_id
    assert store.files("m") == sorted(contents)
    assert not store._fs.exists(f"{store._path('m')}/model.safetensors")
    assert _read_tree(store.download_dir("m", tmp_path / "download")) == contents


def test_nested_key_in_finished_artifact_rejected(store: ArtifactStore, source: tuple[Path, dict[str, bytes]]) -> None:
    folder, _ = source
    store.upload_dir(folder, "jobs/a1")

    with pytest.raises(ValueError, match="inside the finished artifact 'jobs/a1'"):
        store.upload_dir(folder, "jobs/a1/model")


def test_key_containing_finished_artifact_rejected(
    store: ArtifactStore, source: tuple[Path, dict[str, bytes]]
) -> None:
    folder, _ = source
    store.upload_dir(folder, "jobs/a1/model")

    with pytest.raises(ValueError, match="its folder contains 1 finished artifacts such as 'jobs/a1/model'"):
        store.upload_dir(folder, "jobs")
    assert store.exists("jobs/a1/model")


def test_delete_finished_and_unfinished(store: ArtifactStore, source: tuple[Path, dict[str, bytes]]) -> None:
    folder, _ = source
    store.upload_dir(folder, "m")
    store._fs.makedirs(store._path("half"), exist_ok=True)
    store._fs.pipe_file(f"{store._path('half')}/config.json", b"{}")

    assert store.delete("m") is True
    assert store.delete("half") is True
    assert store.delete("m") is False
    assert not store.exists("m")
    assert not store._fs.exists(store._path("half"))
    assert store.list_keys() == []


# --- Integrity --------------------------------------------------------------------------------


def test_changed_file_fails_download(
    store: ArtifactStore, source: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    folder, _ = source
    store.upload_dir(folder, "m")
    store._fs.pipe_file(f"{store._path('m')}/model.safetensors", b"truncated")

    with pytest.raises(ArtifactIntegrityError, match="'model.safetensors' has 9 bytes but the manifest lists 16384"):
        store.download_dir("m", tmp_path / "download")
    assert not (tmp_path / "download").exists()
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".download")] == []


def test_missing_file_fails_download(
    store: ArtifactStore, source: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    folder, _ = source
    store.upload_dir(folder, "m")
    store._fs.rm_file(f"{store._path('m')}/config.json")

    with pytest.raises(ArtifactIntegrityError, match="lists 'config.json' but the file is missing"):
        store.download_dir("m", tmp_path / "download")


def test_corrupt_marker_raises_integrity_error(store: ArtifactStore, source: tuple[Path, dict[str, bytes]]) -> None:
    folder, _ = source
    store.upload_dir(folder, "m")
    store._fs.pipe_file(f"{store._path('m')}/{MARKER_NAME}", b"not json")

    with pytest.raises(ArtifactIntegrityError, match="not a valid manifest"):
        store.files("m")


def test_download_into_foreign_folder_rejected(
    store: ArtifactStore, source: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    folder, _ = source
    store.upload_dir(folder, "m")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")

    with pytest.raises(FileExistsError, match="is not a downloaded artifact"):
        store.download_dir("m", foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_download_into_empty_folder_allowed(
    store: ArtifactStore, source: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    folder, contents = source
    store.upload_dir(folder, "m")
    empty = tmp_path / "empty"
    empty.mkdir()

    assert _read_tree(store.download_dir("m", empty)) == contents


# --- Input checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["", "/jobs/a1", "jobs//a1", "jobs/../a1", "./jobs", "jobs/a1/", "jobs\\a1", MARKER_NAME, f"jobs/{MARKER_NAME}"],
)
def test_invalid_key_rejected(key: str) -> None:
    with pytest.raises(ValueError, match="invalid artifact key"):
        validate_key(key)


def test_invalid_key_rejected_by_store(store: ArtifactStore, source: tuple[Path, dict[str, bytes]]) -> None:
    folder, _ = source
    with pytest.raises(ValueError, match="invalid artifact key '../escape'"):
        store.upload_dir(folder, "../escape")
    with pytest.raises(ValueError, match="invalid artifact key"):
        store.exists("/etc")


def test_marker_name_inside_source_rejected(store: ArtifactStore, source: tuple[Path, dict[str, bytes]]) -> None:
    folder, _ = source
    (folder / "1_Pooling" / MARKER_NAME).write_text("")

    with pytest.raises(ValueError, match="reserved for completion markers"):
        store.upload_dir(folder, "m")


def test_upload_of_missing_folder_rejected(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError, match="not a directory"):
        store.upload_dir(tmp_path / "nothing-here", "m")


def test_downloaded_folder_uploads_again(
    store: ArtifactStore, source: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    folder, contents = source
    store.upload_dir(folder, "m")
    copy = store.download_dir("m", tmp_path / "copy")

    store.upload_dir(copy, "m2")

    assert store.files("m2") == sorted(contents)


# --- Construction -----------------------------------------------------------------------------


def test_from_env_requires_root() -> None:
    with pytest.raises(ValueError, match="W2S_ARTIFACT_ROOT is not set"):
        ArtifactStore.from_env({})


def test_from_env_rejects_endpoint_for_local_root(tmp_path: Path) -> None:
    env = {"W2S_ARTIFACT_ROOT": str(tmp_path), "W2S_S3_ENDPOINT_URL": "http://127.0.0.1:9000"}
    with pytest.raises(ValueError, match="is not an s3:// URL"):
        ArtifactStore.from_env(env)


def test_from_env_local_root(tmp_path: Path) -> None:
    store = ArtifactStore.from_env({"W2S_ARTIFACT_ROOT": str(tmp_path / "artifacts"), "W2S_S3_ENDPOINT_URL": ""})

    assert store.is_local
    assert store.url("jobs/a1") == f"{tmp_path}/artifacts/jobs/a1"


def test_from_env_s3_root(s3_endpoint: str, source: tuple[Path, dict[str, bytes]]) -> None:
    folder, contents = source
    prefix = uuid.uuid4().hex
    env = {"W2S_ARTIFACT_ROOT": f"s3://{BUCKET}/{prefix}", "W2S_S3_ENDPOINT_URL": s3_endpoint}

    store = ArtifactStore.from_env(env)
    store.upload_dir(folder, "m")

    assert not store.is_local
    assert store.url("m") == f"s3://{BUCKET}/{prefix}/m"
    assert store.files("m") == sorted(contents)
