"""Job routes: create, get, list, cancel, rerun, log lines, progress events and the report."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, AsyncIterator, Literal

from fastapi import APIRouter, Header, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse

from app.api.deps import CeleryDep, JobsKey, SettingsDep, StoreDep
from app.errors import error_responses
from app.schemas.common import DEFAULT_PAGE_SIZE, MAX_OFFSET, MAX_PAGE_SIZE, Page
from app.schemas.jobs import JobCreate, JobEvent, JobLogPage, JobPublic, JobStateName, JobTypeName
from app.services import jobs as service
from workers.db import TERMINAL_STATES

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobId = Annotated[str, Path(description="Job id.", max_length=36)]

# Seconds between keep-alive comments of the event stream, so proxies do not close an idle stream.
KEEPALIVE_S = 15.0
MAX_LOG_PAGE = 1000


@router.post(
    "",
    response_model=JobPublic,
    status_code=status.HTTP_202_ACCEPTED,
    responses={200: {"model": JobPublic, "description": "Replay: this Idempotency-Key already created the job returned."}}
    | error_responses(401, 403, 409, 422, 429, 503),
)
def create_job(
    body: JobCreate,
    response: Response,
    settings: SettingsDep,
    store: StoreDep,
    celery: CeleryDep,
    principal: JobsKey,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", description="Repeat a request with the same key to get the same job instead of a second one."),
    ] = None,
) -> JobPublic:
    """Validate and queue a job; 202 with the job, whose state is then queued."""
    job, created = service.create_and_submit(store, settings, celery, principal, body.type, body.config, idempotency_key)
    response.status_code = status.HTTP_202_ACCEPTED if created else status.HTTP_200_OK
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return service.public_job(store, job)


@router.get("", response_model=Page[JobPublic], responses=error_responses(401, 403, 422, 503))
def list_jobs(
    store: StoreDep,
    principal: JobsKey,
    state: Annotated[list[JobStateName] | None, Query(description="Only jobs in these states; repeat for several.")] = None,
    type: Annotated[JobTypeName | None, Query(description="Only jobs of this type.")] = None,
    owner: Annotated[str | None, Query(description="Only jobs of this API key id (admin keys only).")] = None,
    include_stages: Annotated[bool, Query(description="Also list pipeline stages as jobs of their own.")] = False,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Page[JobPublic]:
    """List the caller's jobs (every key's for an admin key), newest first."""
    page = service.list_visible_jobs(
        store, principal, states=state, job_type=type, owner=owner, include_stages=include_stages, limit=limit, offset=offset
    )
    refs = service.references_of(store, [job.id for job in page.jobs])
    items = [service.to_public(job, refs[job.id]) for job in page.jobs]
    return Page[JobPublic](items=items, total=page.total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobPublic, responses=error_responses(401, 403, 404, 422, 503))
def get_job(job_id: JobId, store: StoreDep, principal: JobsKey) -> JobPublic:
    """Return a job's state, progress, metrics, error and outputs."""
    return service.public_job(store, service.get_visible_job(store, principal, job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED, responses=error_responses(401, 403, 404, 409, 422, 503))
def cancel_job(job_id: JobId, store: StoreDep, celery: CeleryDep, principal: JobsKey) -> JobPublic:
    """Cancel a queued or running job; a running job stops after its current training step."""
    return service.public_job(store, service.cancel(store, celery, principal, job_id))


@router.post("/{job_id}/rerun", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED, responses=error_responses(401, 403, 404, 409, 422, 429, 503))
def rerun_job(job_id: JobId, settings: SettingsDep, store: StoreDep, celery: CeleryDep, principal: JobsKey) -> JobPublic:
    """Queue a new job with the type and config of a failed or cancelled job."""
    job = service.rerun(store, settings, celery, principal, job_id)
    return service.public_job(store, job)


@router.get("/{job_id}/logs", response_model=JobLogPage, responses=error_responses(401, 403, 404, 422, 503))
def job_logs(
    job_id: JobId,
    store: StoreDep,
    principal: JobsKey,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Index of the first line.")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_LOG_PAGE)] = 200,
) -> JobLogPage:
    """Return a page of the job's log lines, oldest first."""
    job = service.get_visible_job(store, principal, job_id)
    lines = service.log_lines(store, job)
    page = lines[offset : offset + limit]
    return JobLogPage(job_id=job.id, lines=page, offset=offset, next_offset=min(len(lines), offset + len(page)), total=len(lines))


def _event(name: str, data: JobEvent) -> str:
    return f"event: {name}\ndata: {data.model_dump_json()}\n\n"


def _snapshot(store, job_id: str) -> JobEvent:
    job = store.get_job(job_id)
    return JobEvent(job_id=job.id, state=job.state, progress=service.progress_of(job), error=service.error_of(job))


async def _events(request: Request, store, job_id: str, poll_s: float) -> AsyncIterator[str]:
    last_state = None
    last_progress = None
    last_sent = time.monotonic()
    while True:
        snapshot = await run_in_threadpool(_snapshot, store, job_id)
        progress = snapshot.progress.model_dump_json()
        if snapshot.state != last_state:
            yield _event("state", snapshot)
            last_state, last_sent = snapshot.state, time.monotonic()
        if progress != last_progress and snapshot.progress.stage is not None:
            yield _event("progress", snapshot)
            last_sent = time.monotonic()
        last_progress = progress
        if snapshot.state in TERMINAL_STATES:
            yield _event("end", snapshot)
            return
        if time.monotonic() - last_sent >= KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        if await request.is_disconnected():
            return
        await asyncio.sleep(poll_s)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-sent events: `state` when the state changes, `progress` on new progress, and a final `end` "
            "with the job's last state, after which the stream closes. Each `data` line is a JobEvent as JSON.",
            "content": {
                "text/event-stream": {
                    "schema": {"type": "string"},
                    "example": 'event: progress\ndata: {"job_id": "0b6f5f7c-...", "state": "running", "progress": {"stage": "weak/train", "step": 3, "total": 9, "fraction": 0.33, "metrics": {"loss": 0.69}, "updated_at": "2026-01-01T12:00:00Z"}, "error": null}\n\n',
                }
            },
        }
    }
    | error_responses(401, 403, 404, 422, 503),
)
async def job_events(job_id: JobId, request: Request, settings: SettingsDep, store: StoreDep, principal: JobsKey) -> StreamingResponse:
    """Stream the job's progress as server-sent events until it succeeds, fails or is cancelled."""
    await run_in_threadpool(service.get_visible_job, store, principal, job_id)
    return StreamingResponse(
        _events(request, store, job_id, settings.event_poll_interval_s),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/{job_id}/report",
    responses={
        200: {
            "description": "The report of a succeeded pipeline or evaluate job: JSON (default) or Markdown.",
            "content": {"application/json": {"schema": {"type": "object"}}, "text/markdown": {"schema": {"type": "string"}}},
        }
    }
    | error_responses(401, 403, 404, 409, 422, 503),
)
def job_report(
    job_id: JobId,
    settings: SettingsDep,
    store: StoreDep,
    principal: JobsKey,
    format: Annotated[Literal["json", "markdown"], Query(description="'json' (every number) or 'markdown' (tables).")] = "json",
) -> Response:
    """Return the report of a succeeded pipeline or evaluate job."""
    job = service.get_visible_job(store, principal, job_id)
    path = service.report_path(settings, job, format)
    if format == "markdown":
        return PlainTextResponse(path.read_text(encoding="utf-8"), media_type="text/markdown; charset=utf-8")
    return JSONResponse(json.loads(path.read_text(encoding="utf-8")))


@router.get(
    "/{job_id}/report/plots/{plot}",
    response_class=FileResponse,
    responses={200: {"description": "PNG plot of the report.", "content": {"image/png": {}}}} | error_responses(401, 403, 404, 409, 422, 503),
)
def job_report_plot(
    job_id: JobId,
    plot: Annotated[Literal["accuracy", "drift"], Path(description="'accuracy' (per model and set, with intervals) or 'drift'.")],
    settings: SettingsDep,
    store: StoreDep,
    principal: JobsKey,
) -> FileResponse:
    """Return a PNG plot of the report of a succeeded pipeline or evaluate job."""
    job = service.get_visible_job(store, principal, job_id)
    path = service.report_path(settings, job, plot)
    return FileResponse(path, media_type="image/png", filename=f"{job.id}-{plot}.png")
