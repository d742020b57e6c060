"""Artifact store for job outputs: a local folder or an S3-compatible object store, through fsspec.

An artifact is a folder of files stored under `<root>/<key>/`, where the root is a local path
(`/artifacts`, `file:///artifacts`) or `s3://bucket/prefix`. Local and S3 roots have the same
interface, so a worker writes to a shared volume on one host and to S3 or MinIO across hosts
without code changes.

Completeness: `upload_dir` writes every file first and the completion marker `_SUCCESS` last.
The marker contains a JSON manifest (relative path to size in bytes, plus an upload id). Every
read treats a folder without the marker as absent, so a crashed upload never looks finished.
`delete` removes the marker first for the same reason.

One writer per key: keys come from job ids, so two uploads of the same key at once are not
expected. If it happens anyway, files of both uploads can mix, and the manifest sizes detect
most but not all such mixes on download.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Mapping

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import get_protocol

logger = logging.getLogger(__name__)

MARKER_NAME = "_SUCCESS"
MANIFEST_FORMAT = 1
S3_PROTOCOLS = ("s3", "s3a")


class ArtifactNotFoundError(FileNotFoundError):
    """Raised when an artifact is missing or its upload never finished (no completion marker)."""


class ArtifactIntegrityError(OSError):
    """Raised when stored files do not match the artifact's manifest."""


@dataclass(frozen=True)
class Manifest:
    """Contents of a completion marker: the files of one finished upload and their sizes in bytes."""

    key: str
    upload_id: str
    created_at: str
    files: dict[str, int]

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def to_bytes(self) -> bytes:
        document = {
            "format": MANIFEST_FORMAT,
            "key": self.key,
            "upload_id": self.upload_id,
            "created_at": self.created_at,
            "files": self.files,
        }
        return json.dumps(document, indent=1, sort_keys=True).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, key: str) -> "Manifest":
        """Parse a marker's JSON and raise ArtifactIntegrityError when it is not a valid manifest."""
        try:
            document = json.loads(data.decode("utf-8"))
            files = {str(path): int(size) for path, size in document["files"].items()}
            return cls(
                key=str(document["key"]),
                upload_id=str(document["upload_id"]),
                created_at=str(document["created_at"]),
                files=files,
            )
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactIntegrityError(
                f"completion marker of artifact {key!r} is not a valid manifest ({exc}). Delete and upload the artifact again"
            ) from exc


def validate_key(key: str, kind: str = "artifact key") -> str:
    """Return `key` unchanged, or raise ValueError unless it is a safe relative path.

    A valid key is made of non-empty names separated by '/', without '.', '..', backslashes or
    the reserved marker name, so it can never point outside the store's root.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid {kind} {key!r}: expected a non-empty string such as 'jobs/<job_id>/model'")
    parts = key.split("/")
    if key.startswith("/") or "\\" in key or any(part in ("", ".", "..") for part in parts):
        raise ValueError(
            f"invalid {kind} {key!r}: use a relative path of non-empty names separated by '/', "
            "without a leading '/', '.', '..' or backslashes"
        )
    if MARKER_NAME in parts:
        raise ValueError(f"invalid {kind} {key!r}: the name {MARKER_NAME!r} is reserved for completion markers")
    return key


def _collect_files(source: Path) -> list[tuple[str, Path, int]]:
    """List (relative POSIX path, local path, size in bytes) of every file below `source`, sorted.

    Symbolic links are followed, so a Hugging Face snapshot folder (links into a blob cache)
    uploads the linked contents. A directory reached twice through links is walked once.
    """
    entries: list[tuple[str, Path, int]] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(source, followlinks=True):
        real_dir = os.path.realpath(dirpath)
        if real_dir in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real_dir)
        dirnames.sort()

        for name in sorted(filenames):
            path = Path(dirpath) / name
            relative = path.relative_to(source).as_posix()
            if relative == MARKER_NAME:
                # A folder produced by download_dir contains a copy of the marker, and the upload writes a new one.
                continue
            if name == MARKER_NAME:
                raise ValueError(f"cannot upload {path}: the file name {MARKER_NAME!r} is reserved for completion markers")
            if not path.is_file():
                raise ValueError(f"cannot upload {path}: not a regular file (a broken link, socket or device)")
            entries.append((relative, path, path.stat().st_size))
    return sorted(entries)


def _read_local_manifest(folder: Path) -> Manifest | None:
    marker = folder / MARKER_NAME
    if not marker.is_file():
        return None
    try:
        return Manifest.from_bytes(marker.read_bytes(), key=str(folder))
    except ArtifactIntegrityError:
        return None


class ArtifactStore:
    """Artifacts under one root URL, with the same methods for local folders and S3 buckets.

    `root` is a local path or `s3://bucket/prefix`. `endpoint_url` selects an S3-compatible server
    such as MinIO and applies only to S3 roots. S3 credentials come from the usual AWS sources
    (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile). `cache_dir` is where
    `download_dir` puts artifacts of a remote store when no destination is given.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        endpoint_url: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        root_url = os.fspath(root).strip()
        if not root_url:
            raise ValueError("artifact root is empty; use a local folder such as /artifacts or s3://bucket/prefix")
        protocol = get_protocol(root_url)
        options = dict(storage_options or {})
        if endpoint_url:
            if protocol not in S3_PROTOCOLS:
                raise ValueError(
                    f"an S3 endpoint URL ({endpoint_url}) was given but the artifact root {root_url!r} is not an "
                    "s3:// URL; unset the endpoint or use an s3://bucket/prefix root"
                )
            options.setdefault("endpoint_url", endpoint_url)
        if protocol == "file" and "://" not in root_url:
            root_url = os.path.abspath(os.path.expanduser(root_url))

        self.root_url = root_url
        self.protocol = protocol
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._fs, root_path = url_to_fs(root_url, **options)
        self._root = root_path.rstrip("/")
        self.is_local = isinstance(self._fs, LocalFileSystem)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, cache_dir: str | os.PathLike[str] | None = None
    ) -> "ArtifactStore":
        """Build a store from W2S_ARTIFACT_ROOT and the optional W2S_S3_ENDPOINT_URL."""
        env = os.environ if environ is None else environ
        root = env.get("W2S_ARTIFACT_ROOT", "").strip()
        if not root:
            raise ValueError(
                "W2S_ARTIFACT_ROOT is not set; set it to a local folder such as /artifacts or to s3://bucket/prefix"
            )
        endpoint_url = env.get("W2S_S3_ENDPOINT_URL", "").strip() or None
        return cls(root, endpoint_url=endpoint_url, cache_dir=cache_dir)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root_url!r})"

    # --- Paths -------------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        return f"{self._root}/{validate_key(key)}"

    def url(self, key: str) -> str:
        """Return the artifact's folder as a URL (`s3://...`) or, for a local store, an absolute path."""
        path = self._path(key)
        if self.is_local:
            return path
        return f"{self.protocol}://{path}"

    # --- Reading -----------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        """Return whether the artifact exists and its upload finished (its completion marker exists)."""
        marker = f"{self._path(key)}/{MARKER_NAME}"
        self._fs.invalidate_cache(marker)
        return self._fs.exists(marker)

    def read_manifest(self, key: str) -> Manifest:
        """Read the artifact's manifest, or raise ArtifactNotFoundError if it is missing or incomplete."""
        marker = f"{self._path(key)}/{MARKER_NAME}"
        self._fs.invalidate_cache(marker)
        try:
            data = self._fs.cat_file(marker)
        except FileNotFoundError:
            raise ArtifactNotFoundError(
                f"artifact {key!r} not found in {self.root_url} (missing, or its upload did not finish)"
            ) from None
        return Manifest.from_bytes(data, key)

    def files(self, key: str) -> list[str]:
        """Return the relative paths of the artifact's files, sorted."""
        return sorted(self.read_manifest(key).files)

    def list_keys(self, prefix: str = "") -> list[str]:
        """Return the keys of finished artifacts at or below the folder `prefix`, sorted.

        `prefix` is a folder, so "jobs/1" matches "jobs/1/model" but not "jobs/10/model".
        Folders of unfinished uploads are left out.
        """
        base = self._path(prefix) if prefix else self._root
        self._fs.invalidate_cache(base)
        try:
            found = self._fs.find(base)
        except FileNotFoundError:
            return []

        keys = []
        root_prefix = self._root + "/"
        for path in found:
            folder, _, name = path.rstrip("/").rpartition("/")
            if name == MARKER_NAME and folder.startswith(root_prefix):
                keys.append(folder[len(root_prefix) :])
        return sorted(keys)

    def open(self, key: str, path: str, mode: str = "rb", **kwargs: Any) -> IO[Any]:
        """Open one file of a finished artifact for reading ("rb" or "r").

        Raises ArtifactNotFoundError for a missing or unfinished artifact and FileNotFoundError
        for a path that is not in its manifest.
        """
        if mode not in ("rb", "r"):
            raise ValueError(f"invalid mode {mode!r}: artifacts open only for reading ('rb' or 'r'); use upload_dir to write")
        relative = validate_key(path, kind="file path")
        manifest = self.read_manifest(key)
        if relative not in manifest.files:
            raise FileNotFoundError(
                f"{relative!r} is not a file of artifact {key!r}; it contains {len(manifest.files)} files, "
                "listed by ArtifactStore.files()"
            )
        return self._fs.open(f"{self._path(key)}/{relative}", mode, **kwargs)

    # --- Writing -----------------------------------------------------------------------------

    def upload_dir(self, local_dir: str | os.PathLike[str], key: str, *, overwrite: bool = False) -> Manifest:
        """Upload every file below `local_dir` as artifact `key`, writing the completion marker last.

        Raises FileExistsError when the artifact already exists and `overwrite` is false, and
        ValueError when the key lies inside, or would contain, another finished artifact. Files
        left by an earlier unfinished upload of the same key are deleted first.
        """
        source = Path(local_dir)
        if not source.is_dir():
            raise NotADirectoryError(f"cannot upload {source}: not a directory")
        target = self._path(key)
        marker = f"{target}/{MARKER_NAME}"
        self._check_no_finished_ancestor(key)
        self._check_no_finished_descendant(key)

        self._fs.invalidate_cache(target)
        if self._fs.exists(marker):
            if not overwrite:
                raise FileExistsError(f"artifact {key!r} already exists at {self.url(key)}; pass overwrite=True to replace it")
            # From here on every reader treats the old artifact as absent.
            self._fs.rm_file(marker)
        if self._fs.exists(target):
            logger.info("artifact %s: deleting files of an earlier upload at %s", key, self.url(key))
            self._fs.rm(target, recursive=True)

        entries = _collect_files(source)
        upload_id = uuid.uuid4().hex
        total_bytes = sum(size for _, _, size in entries)
        logger.info(
            "artifact %s: uploading %d files (%d bytes) from %s to %s, upload %s",
            key, len(entries), total_bytes, source, self.url(key), upload_id,
        )
        if self.is_local:
            self._fs.makedirs(target, exist_ok=True)
        for relative, local_path, _ in entries:
            remote = f"{target}/{relative}"
            if self.is_local:
                self._fs.makedirs(remote.rpartition("/")[0], exist_ok=True)
            self._fs.put_file(str(local_path), remote)

        manifest = Manifest(
            key=key,
            upload_id=upload_id,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            files={relative: size for relative, _, size in entries},
        )
        self._fs.pipe_file(marker, manifest.to_bytes())
        logger.info("artifact %s: upload %s finished", key, upload_id)
        return manifest

    def delete(self, key: str) -> bool:
        """Delete the artifact, finished or not, and return whether anything was there.

        Everything under the key's folder goes, nested artifacts included. The marker goes first,
        so a reader never sees a finished artifact with files missing.
        """
        target = self._path(key)
        marker = f"{target}/{MARKER_NAME}"
        self._fs.invalidate_cache(target)
        if not self._fs.exists(target):
            return False
        if self._fs.exists(marker):
            self._fs.rm_file(marker)
        self._fs.rm(target, recursive=True)
        logger.info("artifact %s: deleted from %s", key, self.root_url)
        return True

    def _check_no_finished_ancestor(self, key: str) -> None:
        # Deleting or overwriting the enclosing artifact would silently remove this one.
        parts = key.split("/")
        for depth in range(1, len(parts)):
            ancestor = "/".join(parts[:depth])
            if self.exists(ancestor):
                raise ValueError(f"cannot store artifact {key!r} inside the finished artifact {ancestor!r}; choose another key")

    def _check_no_finished_descendant(self, key: str) -> None:
        # Clearing the folder before the upload would delete these artifacts.
        nested = [found for found in self.list_keys(key) if found != key]
        if nested:
            raise ValueError(
                f"cannot store artifact {key!r}: its folder contains {len(nested)} finished artifacts "
                f"such as {nested[0]!r}; choose another key"
            )

    # --- Downloading -------------------------------------------------------------------------

    def download_dir(self, key: str, dest: str | os.PathLike[str] | None = None) -> Path:
        """Return a local folder with the artifact's files, downloading them when needed.

        Without `dest`, a local store returns the stored folder itself, which callers must treat
        as read-only, and a remote store downloads to `<cache_dir>/<key>`. A destination that
        already holds the same upload (same manifest upload id) is reused without a download.
        Files are downloaded to a temporary sibling folder, checked against the manifest sizes,
        and renamed into place, so an interrupted download leaves no half-filled destination.
        """
        manifest = self.read_manifest(key)
        if dest is None:
            if self.is_local:
                return Path(self._path(key))
            if self.cache_dir is None:
                raise ValueError(f"cannot download artifact {key!r}: pass dest or construct the store with cache_dir")
            dest = self.cache_dir / key
        destination = Path(dest)

        cached = _read_local_manifest(destination)
        if cached is not None and cached.upload_id == manifest.upload_id:
            logger.debug("artifact %s: upload %s already at %s", key, manifest.upload_id, destination)
            return destination
        if cached is None and destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
            raise FileExistsError(
                f"cannot download artifact {key!r} to {destination}: it exists and is not a downloaded artifact; "
                "choose a missing or empty folder"
            )

        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent))
        try:
            logger.info(
                "artifact %s: downloading %d files (%d bytes) to %s",
                key, len(manifest.files), manifest.total_bytes, destination,
            )
            self._download_files(key, manifest, staging)
            (staging / MARKER_NAME).write_bytes(manifest.to_bytes())
            self._replace_folder(staging, destination, manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return destination

    def _download_files(self, key: str, manifest: Manifest, staging: Path) -> None:
        target = self._path(key)
        for relative, expected_size in sorted(manifest.files.items()):
            local_path = staging / relative
            local_path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._fs.get_file(f"{target}/{relative}", str(local_path))
            except FileNotFoundError:
                raise ArtifactIntegrityError(
                    f"artifact {key!r} lists {relative!r} but the file is missing from {self.url(key)}; "
                    "upload the artifact again"
                ) from None
            actual_size = local_path.stat().st_size
            if actual_size != expected_size:
                raise ArtifactIntegrityError(
                    f"artifact {key!r}: {relative!r} has {actual_size} bytes but the manifest lists {expected_size}; "
                    "the stored file changed after upload, so upload the artifact again"
                )

    @staticmethod
    def _replace_folder(staging: Path, destination: Path, manifest: Manifest) -> None:
        # Another process may download the same artifact into the same cache at the same time,
        # so a failed rename is fine when the folder that won holds the same upload.
        previous = None
        if destination.exists():
            previous = destination.with_name(f".{destination.name}.old-{uuid.uuid4().hex}")
            os.rename(destination, previous)
        try:
            os.rename(staging, destination)
        except OSError:
            winner = _read_local_manifest(destination)
            if winner is None or winner.upload_id != manifest.upload_id:
                raise
        finally:
            if previous is not None:
                shutil.rmtree(previous, ignore_errors=True)
