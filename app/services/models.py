"""Model registry: lineage, external registration, aliases, archives and deletion."""

from __future__ import annotations

import logging
import shutil
import tarfile
import tempfile
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select

from app.auth import Principal
from app.errors import Conflict, InvalidInput, NotFound
from app.schemas.models import AliasPublic, ModelLineage, ModelPublic, ModelRegister
from app.services.datasets import active_jobs_using
from app.services.model_policy import check_model_folder
from app.services.references import MODEL_PREFIX, dataset_ids_of_paths, find_model
from workers.db import JobStore, ModelAlias, RegisteredModel, utcnow
from workers.settings import Settings

logger = logging.getLogger(__name__)

ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


def model_not_found(id_or_alias: str) -> NotFound:
    return NotFound(
        f"model {id_or_alias} not found: no registered model has this id or alias",
        code="model_not_found",
        field="model_id",
        value=id_or_alias,
        fix="List models with GET /v1/models.",
    )


def get_model(store: JobStore, id_or_alias: str) -> RegisteredModel:
    row = find_model(store, id_or_alias)
    if row is None:
        raise model_not_found(id_or_alias)
    return row


def aliases_by_model(store: JobStore) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    with store.session() as session:
        for row in session.scalars(select(ModelAlias).order_by(ModelAlias.alias)):
            result.setdefault(row.model_id, []).append(row.alias)
    return result


def _dataset_paths(config: dict[str, Any]) -> list[str]:
    paths: list[str] = []
    for key in ("data", "heldout"):
        if isinstance(config.get(key), str):
            paths.append(config[key])
    specs = [config.get("source")] + list(config.get("targets") or [])
    for spec in specs:
        if isinstance(spec, dict):
            paths.extend(spec[key] for key in ("train", "test") if isinstance(spec.get(key), str))
    return paths


def lineage_of(store: JobStore, row: RegisteredModel) -> ModelLineage:
    stored = row.lineage or {}
    source = stored.get("source", "trained")
    config = stored.get("config") if isinstance(stored.get("config"), dict) else None
    datasets: list[str] = []
    weak_labeller = None
    if config is not None:
        datasets = _dataset_paths(config)
        if stored.get("job_type") == "weak_label":
            weak_labeller = config.get("labeller_model")
        elif stored.get("pipeline_id"):
            # A pipeline's students learn from the labels of the pipeline's weak stage.
            weak = [m for m in store.list_models(name="weak") if (m.lineage or {}).get("pipeline_id") == stored["pipeline_id"]]
            weak_labeller = weak[0].id if weak else None
    return ModelLineage(
        source=source,
        base_model=row.base_model,
        weak_labeller=weak_labeller,
        datasets=datasets,
        dataset_ids=dataset_ids_of_paths(store, datasets),
        job_id=stored.get("job_id", row.job_id),
        pipeline_id=stored.get("pipeline_id"),
        stage=stored.get("stage"),
        config=config,
        registered_by=stored.get("registered_by"),
    )


def to_public(store: JobStore, row: RegisteredModel, aliases: dict[str, list[str]] | None = None) -> ModelPublic:
    aliases = aliases if aliases is not None else aliases_by_model(store)
    return ModelPublic(
        id=row.id,
        reference=f"{MODEL_PREFIX}{row.id}",
        name=row.name,
        path=row.path,
        aliases=aliases.get(row.id, []),
        lineage=lineage_of(store, row),
        metrics=row.metrics or {},
        job_id=row.job_id,
        created_at=row.created_at,
    )


def register_external(store: JobStore, settings: Settings, principal: Principal, request: ModelRegister) -> tuple[RegisteredModel, bool]:
    """Register a Hub model or a folder inside W2S_MODEL_DIR; return the row and whether it is new."""
    if request.hub_name is not None:
        if not settings.allow_hub_models:
            raise InvalidInput(
                f"hub_name {request.hub_name!r}: Hub models are disabled on this server (W2S_ALLOW_HUB_MODELS=false)",
                code="hub_models_disabled",
                field="hub_name",
                value=request.hub_name,
                fix="Register a folder inside the model folder with 'path', or ask the operator to allow Hub models.",
            )
        location, source = request.hub_name, "hub"
    else:
        location, source = str(_model_folder(settings, request.path or "")), "directory"

    with store.session() as session:
        existing = session.scalars(select(RegisteredModel).where(RegisteredModel.path == location)).first()
        if existing is not None:
            return existing, False
        row = RegisteredModel(
            id=str(uuid.uuid4()),
            name=request.name,
            path=location,
            base_model=request.base_model,
            lineage={"source": source, "registered_by": principal.key_id},
            metrics={},
            job_id=None,
            created_at=utcnow(),
        )
        session.add(row)
    logger.info("model %s (%s) registered from %s %s by key %s", row.id, row.name, source, location, principal.key_id)
    return row, True


def _model_folder(settings: Settings, value: str) -> Path:
    model_dir = settings.model_dir
    if model_dir is None:
        raise InvalidInput(
            f"path {value!r}: no model folder is configured (W2S_MODEL_DIR), so no server path is accepted",
            code="path_not_allowed",
            field="path",
            value=value,
            fix="Ask the operator to set W2S_MODEL_DIR, or register a Hub model with 'hub_name'.",
        )
    path = Path(value)
    path = (path if path.is_absolute() else model_dir / path).resolve()
    if not path.is_relative_to(model_dir.resolve()):
        raise InvalidInput(
            f"path {value!r} is outside the model folder {model_dir} (W2S_MODEL_DIR)",
            code="path_not_allowed",
            field="path",
            value=value,
            fix="Give a folder inside the model folder, relative to it.",
        )
    if not (path / "config.json").is_file():
        raise InvalidInput(
            f"path {value!r}: {path} is not a model folder (no config.json)",
            code="not_a_model_folder",
            field="path",
            value=value,
            fix="Give a folder written by save_pretrained, with config.json and the weights.",
        )
    check_model_folder(settings, path, "path", value)
    return path


def set_alias(store: JobStore, principal: Principal, alias: str, model_id: str) -> AliasPublic:
    """Point `alias` at a model in one transaction, so readers see the old or the new model, never none."""
    with store.session() as session:
        if session.get(RegisteredModel, model_id) is None:
            raise InvalidInput(
                f"model_id {model_id!r}: no registered model has this id",
                code="model_not_found",
                field="model_id",
                value=model_id,
                fix="List models with GET /v1/models.",
            )
        row = session.get(ModelAlias, alias)
        if row is None:
            row = ModelAlias(alias=alias, model_id=model_id, updated_at=utcnow(), updated_by=principal.key_id)
            session.add(row)
        else:
            row.model_id = model_id
            row.updated_at = utcnow()
            row.updated_by = principal.key_id
    logger.info("alias %s now points at model %s (key %s)", alias, model_id, principal.key_id)
    return AliasPublic(alias=alias, model_id=model_id, updated_at=row.updated_at, updated_by=row.updated_by)


def list_aliases(store: JobStore) -> list[AliasPublic]:
    with store.session() as session:
        rows = list(session.scalars(select(ModelAlias).order_by(ModelAlias.alias)))
    return [AliasPublic(alias=r.alias, model_id=r.model_id, updated_at=r.updated_at, updated_by=r.updated_by) for r in rows]


def delete_alias(store: JobStore, alias: str) -> None:
    with store.session() as session:
        row = session.get(ModelAlias, alias)
        if row is None:
            raise NotFound(f"alias {alias!r} not found", code="alias_not_found", field="alias", value=alias, fix="List aliases with GET /v1/models/aliases.")
        session.delete(row)


def delete_model(store: JobStore, settings: Settings, principal: Principal, id_or_alias: str) -> None:
    """Delete a registry row, its aliases and, for a model trained here, its folder."""
    row = get_model(store, id_or_alias)
    users = active_jobs_using(store, "model", row.id)
    if users:
        raise Conflict(
            f"model {row.id} is used by {len(users)} queued or running job(s): {', '.join(users[:5])}",
            code="model_in_use",
            field="model_id",
            value=row.id,
            fix="Wait until those jobs finish, or cancel them, then delete the model.",
        )
    with store.session() as session:
        session.execute(delete(ModelAlias).where(ModelAlias.model_id == row.id))
        session.execute(delete(RegisteredModel).where(RegisteredModel.id == row.id))
    path = Path(row.path)
    # Folders of external models belong to the operator; only folders this service wrote are deleted.
    if (row.lineage or {}).get("source", "trained") == "trained" and path.is_dir() and path.resolve().is_relative_to(settings.resolved_artifact_root):
        shutil.rmtree(path, ignore_errors=True)
    logger.info("model %s (%s) deleted by key %s", row.id, row.name, principal.key_id)


def archive_model(row: RegisteredModel) -> Path:
    """Write the model folder to a temporary .tar.gz and return its path; the caller deletes it."""
    path = Path(row.path)
    if not path.is_dir():
        raise Conflict(
            f"model {row.id} has no local folder to download ({row.path})",
            code="model_not_downloadable",
            field="model_id",
            value=row.id,
            fix="Download a Hub model from the Hugging Face Hub itself.",
        )
    handle = tempfile.NamedTemporaryFile(prefix=f"w2s-model-{row.id}-", suffix=".tar.gz", delete=False)
    handle.close()
    # compresslevel 1: safetensors weights barely compress, so higher levels only cost time.
    with tarfile.open(handle.name, "w:gz", compresslevel=1) as archive:
        archive.add(path, arcname=path.name if path.name != "model" else f"{row.name}-{row.id[:8]}")
    return Path(handle.name)
