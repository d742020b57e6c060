"""Dataset uploads: validation with the `ml.data` readers, content-addressed storage, and lookups.

A file is stored at `<artifact root>/datasets/<sha256>/<filename>`, so workers on other hosts read
it from the shared artifact folder. The same bytes uploaded again return the existing dataset.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePath
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.auth import Principal
from app.errors import Conflict, Forbidden, InvalidInput, NotFound, PayloadTooLarge
from ml.data import DataFormatError, PreferencePair, read_preferences_bytes
from workers.db import TERMINAL_STATES, Dataset, Job, JobReference, JobStore, utcnow
from workers.settings import Settings

logger = logging.getLogger(__name__)

DATASETS_FOLDER = "datasets"
SAMPLE_PAIRS = 3
LISTED_SKIPPED_ROWS = 20
# Texts in sample pairs are cut to this many characters.
SAMPLE_TEXT_CHARS = 500
SAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")
# Roles of conversational rows. Chat templates render these three, and others fail or are dropped.
MESSAGE_ROLES = ("system", "user", "assistant")


def datasets_root(settings: Settings) -> Path:
    return settings.resolved_artifact_root / DATASETS_FOLDER


def safe_filename(filename: str | None) -> str:
    """Keep the last path component and replace characters outside [A-Za-z0-9._-]."""
    name = PurePath((filename or "").replace("\\", "/")).name
    name = SAFE_FILENAME.sub("_", name).lstrip(".")
    return name[:200]


def _shorten(value: Any) -> Any:
    if isinstance(value, str) and len(value) > SAMPLE_TEXT_CHARS:
        return value[:SAMPLE_TEXT_CHARS] + "..."
    if isinstance(value, list):
        return [{**message, "content": _shorten(message.get("content"))} if isinstance(message, dict) else message for message in value]
    return value


def _sample(pair: PreferencePair) -> dict[str, Any]:
    return {
        "prompt": _shorten(pair.prompt),
        "chosen": _shorten(pair.chosen),
        "rejected": _shorten(pair.rejected),
        "label": pair.label,
        "source_id": pair.source_id,
    }


def _format_error(error: DataFormatError) -> InvalidInput:
    field = "file"
    if error.location:
        field += f" {error.location}"
    if error.field:
        field += f" field {error.field}"
    return InvalidInput(str(error), code="invalid_dataset", field=field, value=error.problem, fix=error.fix or f"Expected {error.expected}.")


def store_upload(store: JobStore, settings: Settings, principal: Principal, data: bytes, filename: str | None, data_format: str) -> tuple[Dataset, bool]:
    """Validate and store an upload; return the dataset and whether it is new."""
    if len(data) > settings.max_upload_bytes:
        raise too_large(len(data), settings)
    name = safe_filename(filename)
    if not name:
        raise InvalidInput(
            f"invalid filename {filename!r}: it must have an extension such as .jsonl, .json, .parquet or .json.gz",
            code="invalid_filename",
            field="file",
            value=filename,
            fix="Send the file with its name, e.g. curl -F file=@train.jsonl.",
        )
    sha256 = hashlib.sha256(data).hexdigest()
    existing = get_dataset_row(store, sha256)
    if existing is not None:
        return existing, False

    try:
        pairs, report = read_preferences_bytes(data, name, data_format, max_bytes=settings.max_upload_decompressed_bytes)
    except DataFormatError as error:
        raise _format_error(error) from None
    _check_roles(pairs)
    if not pairs:
        raise InvalidInput(
            f"dataset {name} contains no usable pair: all {report.rows_read} rows were skipped "
            f"(first: {report.skipped[0].location}: {report.skipped[0].reason})" if report.skipped else f"dataset {name} contains no pair",
            code="invalid_dataset",
            field="file",
            value=name,
            fix="Fix the rows listed, or check that the format is right.",
        )

    folder = datasets_root(settings) / sha256
    path = folder / name
    _write_atomic(path, data)
    row = Dataset(
        id=sha256,
        sha256=sha256,
        filename=name,
        format=report.format,
        size_bytes=len(data),
        rows=report.rows_read,
        pairs=report.pairs,
        prompts=len({pair.prompt_id for pair in pairs}),
        skipped=len(report.skipped),
        skipped_rows=[{"location": s.location, "reason": s.reason} for s in report.skipped[:LISTED_SKIPPED_ROWS]],
        samples=[_sample(pair) for pair in pairs[:SAMPLE_PAIRS]],
        path=str(path),
        owner=principal.key_id,
        created_at=utcnow(),
    )
    try:
        with store.session() as session:
            session.add(row)
    except IntegrityError:
        # Another request stored the same bytes at the same moment; its row is the dataset.
        existing = get_dataset_row(store, sha256)
        if existing is None:
            raise
        return existing, False
    logger.info("dataset %s stored: %s", sha256, report.summary())
    return row, True


def _check_roles(pairs: list[PreferencePair]) -> None:
    """Raise 422 naming the first message whose role is not one that chat templates render."""
    for pair in pairs:
        for side in ("prompt", "chosen", "rejected"):
            messages = getattr(pair, side)
            if not isinstance(messages, list):
                continue
            for index, message in enumerate(messages):
                role = message.get("role") if isinstance(message, dict) else None
                if role not in MESSAGE_ROLES:
                    location = pair.source_id.rpartition(":")[2] or pair.source_id
                    raise InvalidInput(
                        f"file {location}: {side}[{index}].role is {role!r}, which is not a chat role; "
                        f"expected one of {', '.join(MESSAGE_ROLES)}",
                        code="invalid_dataset",
                        field=f"file {location} field {side}[{index}].role",
                        value=role,
                        fix=f"Rename the role to one of {', '.join(MESSAGE_ROLES)}.",
                    )


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def too_large(size: int, settings: Settings) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"upload of {size} bytes exceeds the limit of {settings.max_upload_bytes} bytes (W2S_MAX_UPLOAD_BYTES)",
        code="upload_too_large",
        field="file",
        value=size,
        fix="Compress the file with gzip or split it, or ask the operator to raise W2S_MAX_UPLOAD_BYTES.",
    )


def get_dataset_row(store: JobStore, dataset_id: str) -> Dataset | None:
    with store.session() as session:
        return session.get(Dataset, dataset_id)


def get_dataset(store: JobStore, dataset_id: str) -> Dataset:
    row = get_dataset_row(store, dataset_id)
    if row is None:
        raise NotFound(
            f"dataset {dataset_id} not found",
            code="dataset_not_found",
            field="dataset_id",
            value=dataset_id,
            fix="List datasets with GET /v1/datasets, or upload the file with POST /v1/datasets.",
        )
    return row


def list_datasets(store: JobStore, limit: int, offset: int) -> tuple[list[Dataset], int]:
    from sqlalchemy import func

    with store.session() as session:
        total = session.scalar(select(func.count()).select_from(Dataset)) or 0
        rows = list(session.scalars(select(Dataset).order_by(Dataset.created_at.desc(), Dataset.id).limit(limit).offset(offset)))
    return rows, total


def active_jobs_using(store: JobStore, kind: str, ref_id: str) -> list[str]:
    """Return the ids of queued or running jobs that reference this dataset or model."""
    with store.session() as session:
        return list(
            session.scalars(
                select(Job.id)
                .join(JobReference, JobReference.job_id == Job.id)
                .where(JobReference.kind == kind, JobReference.ref_id == ref_id, Job.state.notin_(TERMINAL_STATES))
            )
        )


def delete_dataset(store: JobStore, settings: Settings, principal: Principal, dataset_id: str) -> None:
    """Delete a dataset row and its file; rejected while a queued or running job uses it."""
    row = get_dataset(store, dataset_id)
    if row.owner != principal.key_id and not principal.is_admin:
        raise Forbidden(
            f"dataset {dataset_id} was uploaded by another API key; only its uploader or an admin may delete it",
            code="not_dataset_owner",
            field="dataset_id",
            value=dataset_id,
            fix="Ask the uploader or an operator with an admin key to delete it.",
        )
    users = active_jobs_using(store, "dataset", dataset_id)
    if users:
        raise Conflict(
            f"dataset {dataset_id} is used by {len(users)} queued or running job(s): {', '.join(users[:5])}",
            code="dataset_in_use",
            field="dataset_id",
            value=dataset_id,
            fix="Wait until those jobs finish, or cancel them, then delete the dataset.",
        )
    with store.session() as session:
        session.delete(session.get(Dataset, dataset_id))
    folder = datasets_root(settings) / row.sha256
    shutil.rmtree(folder, ignore_errors=True)
    logger.info("dataset %s deleted by key %s", dataset_id, principal.key_id)
