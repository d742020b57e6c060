"""Dataset routes: upload (validated and stored by content hash), list, detail, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.deps import JobsKey, SettingsDep, StoreDep
from app.errors import InvalidInput, error_responses
from app.limits import CountingReceive
from app.schemas.common import DEFAULT_PAGE_SIZE, MAX_OFFSET, MAX_PAGE_SIZE, Page
from app.schemas.datasets import DatasetDetail, DatasetPublic
from app.services import datasets as service

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

# Bytes the multipart envelope (boundaries, part headers, the 'format' field) may add to the file.
MULTIPART_ENVELOPE_BYTES = 64 * 1024

DatasetId = Annotated[str, Path(description="Dataset id (SHA-256 of the file).", max_length=64)]

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "JSONL, JSON or Parquet file, optionally gzip-compressed."},
                        "format": {"type": "string", "enum": ["auto", "trl", "hh", "ranked"], "default": "auto", "description": "Row format; 'auto' detects it."},
                    },
                }
            }
        },
    }
}


def _public(row) -> DatasetPublic:
    return DatasetPublic(
        id=row.id,
        reference=f"dataset:{row.id}",
        filename=row.filename,
        format=row.format,
        size_bytes=row.size_bytes,
        rows=row.rows,
        pairs=row.pairs,
        prompts=row.prompts,
        skipped=row.skipped,
        owner=row.owner,
        created_at=row.created_at,
    )


def _detail(row) -> DatasetDetail:
    return DatasetDetail(**_public(row).model_dump(), samples=row.samples or [], skipped_rows=row.skipped_rows or [])


@router.post(
    "",
    response_model=DatasetDetail,
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": DatasetDetail, "description": "The same file was uploaded before; its dataset is returned."}}
    | error_responses(401, 403, 413, 422, 503),
    openapi_extra=UPLOAD_BODY,
)
async def upload_dataset(request: Request, response: Response, settings: SettingsDep, store: StoreDep, principal: JobsKey) -> DatasetDetail:
    """Upload a preference file; it is validated, and the same bytes uploaded again return the same dataset."""
    declared = request.headers.get("content-length")
    # The multipart envelope adds a few hundred bytes to the file itself.
    max_body = settings.max_upload_bytes + MULTIPART_ENVELOPE_BYTES
    if declared and declared.isdigit() and int(declared) > max_body:
        raise service.too_large(int(declared), settings)
    # A body sent without Content-Length (chunked) is counted while it streams, so it cannot fill
    # the disk where the multipart parser spools the file.
    counted = Request(request.scope, CountingReceive(request.receive, max_body, lambda size: service.too_large(size, settings)))
    try:
        form = await counted.form(max_files=1, max_fields=4)
    except StarletteHTTPException as error:
        raise _multipart_error(error) from None
    try:
        upload = form.get("file")
        data_format = form.get("format") or "auto"
        if not isinstance(upload, UploadFile):
            raise InvalidInput(
                "file is missing: send the dataset as the multipart form field 'file'",
                code="missing_file",
                field="file",
                fix="curl -F file=@train.jsonl -H 'Authorization: Bearer <key>' <url>/v1/datasets",
            )
        if data_format not in ("auto", "trl", "hh", "ranked"):
            raise InvalidInput(
                f"format {data_format!r} is unknown",
                code="invalid_format",
                field="format",
                value=data_format,
                fix="Use one of auto, trl, hh, ranked.",
            )
        if upload.size is not None and upload.size > settings.max_upload_bytes:
            raise service.too_large(upload.size, settings)
        data = await upload.read()
        row, created = await run_in_threadpool(service.store_upload, store, settings, principal, data, upload.filename, data_format)
    finally:
        await form.close()
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return _detail(row)


def _multipart_error(error: StarletteHTTPException) -> InvalidInput:
    """Turn the multipart parser's 400 (too many files or fields, a malformed body) into a 422 naming the part."""
    detail = str(error.detail)
    if detail.startswith("Too many files"):
        return InvalidInput(
            f"file: {detail} An upload carries one dataset file.",
            code="too_many_files",
            field="file",
            fix="Send one file per request in the form field 'file'.",
        )
    if detail.startswith("Too many fields"):
        return InvalidInput(
            f"body: {detail} The form takes the fields 'file' and 'format'.",
            code="too_many_fields",
            field="body",
            fix="Send only the form fields 'file' and, optionally, 'format'.",
        )
    return InvalidInput(
        f"body: the multipart form could not be parsed: {detail}",
        code="invalid_multipart",
        field="body",
        fix="Send the dataset as multipart/form-data, e.g. curl -F file=@train.jsonl.",
    )


@router.get("", response_model=Page[DatasetPublic], responses=error_responses(401, 403, 422, 503))
def list_datasets(
    store: StoreDep,
    principal: JobsKey,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Page[DatasetPublic]:
    """List uploaded datasets, newest first."""
    rows, total = service.list_datasets(store, limit, offset)
    return Page[DatasetPublic](items=[_public(row) for row in rows], total=total, limit=limit, offset=offset)


@router.get("/{dataset_id}", response_model=DatasetDetail, responses=error_responses(401, 403, 404, 422, 503))
def get_dataset(dataset_id: DatasetId, store: StoreDep, principal: JobsKey) -> DatasetDetail:
    """Return a dataset's format, counts, sample pairs and skipped rows."""
    return _detail(service.get_dataset(store, dataset_id))


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(401, 403, 404, 409, 422, 503))
def delete_dataset(dataset_id: DatasetId, settings: SettingsDep, store: StoreDep, principal: JobsKey) -> Response:
    """Delete a dataset and its file; 409 while a queued or running job uses it."""
    service.delete_dataset(store, settings, principal, dataset_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
