"""Model registry routes: list, detail, download, register, aliases and delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Path, Query, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from app.api.deps import JobsKey, ModelsKey, SettingsDep, StoreDep
from app.errors import error_responses
from app.schemas.common import DEFAULT_PAGE_SIZE, MAX_OFFSET, MAX_PAGE_SIZE, Page
from app.schemas.models import AliasPublic, AliasSet, ModelPublic, ModelRegister
from app.services import models as service

router = APIRouter(prefix="/v1/models", tags=["models"])

ModelRef = Annotated[str, Path(description="Model id or alias.", max_length=100)]
AliasName = Annotated[str, Path(description="Alias, e.g. 'default'.", pattern=service.ALIAS_PATTERN)]


@router.get("", response_model=Page[ModelPublic], responses=error_responses(401, 403, 422, 503))
def list_models(
    store: StoreDep,
    principal: JobsKey,
    name: Annotated[str | None, Query(description="Only models with this name, e.g. 'anchored'.")] = None,
    job_id: Annotated[str | None, Query(description="Only models trained by this job.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Page[ModelPublic]:
    """List registered reward models with their lineage, newest first."""
    rows = store.list_models(name=name, job_id=job_id)
    aliases = service.aliases_by_model(store)
    items = [service.to_public(store, row, aliases) for row in rows[offset : offset + limit]]
    return Page[ModelPublic](items=items, total=len(rows), limit=limit, offset=offset)


@router.post(
    "",
    response_model=ModelPublic,
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": ModelPublic, "description": "This folder or Hub name was registered before; that model is returned."}}
    | error_responses(401, 403, 422, 503),
)
def register_model(body: ModelRegister, response: Response, settings: SettingsDep, store: StoreDep, principal: ModelsKey) -> ModelPublic:
    """Register a reward model trained elsewhere (a Hub name or a folder in W2S_MODEL_DIR) for scoring and weak labelling."""
    row, created = service.register_external(store, settings, principal, body)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return service.to_public(store, row)


@router.get("/aliases", response_model=list[AliasPublic], responses=error_responses(401, 403, 422, 503))
def list_aliases(store: StoreDep, principal: JobsKey) -> list[AliasPublic]:
    """List aliases and the models they point at."""
    return service.list_aliases(store)


@router.put("/aliases/{alias}", response_model=AliasPublic, responses=error_responses(401, 403, 422, 503))
def set_alias(alias: AliasName, body: AliasSet, store: StoreDep, principal: ModelsKey) -> AliasPublic:
    """Point an alias (e.g. 'default') at a model, atomically replacing its previous target."""
    return service.set_alias(store, principal, alias, body.model_id)


@router.delete("/aliases/{alias}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(401, 403, 404, 422, 503))
def delete_alias(alias: AliasName, store: StoreDep, principal: ModelsKey) -> Response:
    """Remove an alias; the model stays registered."""
    service.delete_alias(store, alias)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{model_id}", response_model=ModelPublic, responses=error_responses(401, 403, 404, 422, 503))
def get_model(model_id: ModelRef, store: StoreDep, principal: JobsKey) -> ModelPublic:
    """Return a model by id or alias, with its lineage and metrics."""
    return service.to_public(store, service.get_model(store, model_id))


@router.get(
    "/{model_id}/download",
    response_class=FileResponse,
    responses={200: {"description": "The model folder as a .tar.gz archive.", "content": {"application/gzip": {}}}}
    | error_responses(401, 403, 404, 409, 422, 503),
)
async def download_model(model_id: ModelRef, background: BackgroundTasks, store: StoreDep, principal: JobsKey) -> FileResponse:
    """Download the model folder as a .tar.gz archive."""
    row = await run_in_threadpool(service.get_model, store, model_id)
    archive = await run_in_threadpool(service.archive_model, row)
    background.add_task(archive.unlink, missing_ok=True)
    return FileResponse(archive, media_type="application/gzip", filename=f"{row.name}-{row.id}.tar.gz", background=background)


@router.delete("/{model_id}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(401, 403, 404, 409, 422, 503))
def delete_model(model_id: ModelRef, settings: SettingsDep, store: StoreDep, principal: ModelsKey) -> Response:
    """Delete a model, its aliases and, if it was trained here, its folder; 409 while a queued or running job uses it."""
    service.delete_model(store, settings, principal, model_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
