"""Resolution of the dataset and model references in a job config to server paths.

Clients never name arbitrary server paths. A dataset field takes `dataset:<id>` (an upload) or a
path inside W2S_DATA_DIR, relative to it or absolute. A model field takes `model:<id or alias>`, a
folder inside W2S_MODEL_DIR, or a Hub name, which `workers.validation` checks against
W2S_ALLOW_HUB_MODELS. Anything else is a 422 naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import select

from app.errors import InvalidInput
from app.services.model_policy import check_model_folder
from workers.db import Dataset, JobStore, ModelAlias, RegisteredModel
from workers.settings import Settings

DATASET_PREFIX = "dataset:"
MODEL_PREFIX = "model:"
# The shipped config files write paths as ${W2S_DATA_DIR}/... and ${W2S_MODEL_DIR}/...; on the server
# these name its own allow-listed folders, so the variable is dropped and the rest is read relative
# to that folder.
FOLDER_VARIABLES = ("${W2S_DATA_DIR}/", "${W2S_MODEL_DIR}/")


def strip_folder_variable(value: str) -> str:
    """Turn '${W2S_DATA_DIR}/genies/x.json.gz' into 'genies/x.json.gz' (relative to the folder)."""
    for variable in FOLDER_VARIABLES:
        if value.startswith(variable):
            return value[len(variable):]
    return value

# Field paths of the dataset files and models of each job type. '*' is every list item or dict value.
DATASET_FIELDS: dict[str, list[tuple[str, ...]]] = {
    "pipeline": [("source", "train"), ("source", "test"), ("targets", "*", "train"), ("targets", "*", "test")],
    "weak_label": [("source", "train"), ("source", "test"), ("targets", "*", "train"), ("targets", "*", "test")],
    "train": [("data",), ("heldout",)],
    "evaluate": [("source", "train"), ("source", "test"), ("targets", "*", "train"), ("targets", "*", "test")],
    "score_dataset": [("data",)],
}
MODEL_FIELDS: dict[str, list[tuple[str, ...]]] = {
    "pipeline": [("weak", "model"), ("student", "model")],
    "weak_label": [("weak", "model"), ("labeller_model",)],
    "train": [("student", "model")],
    "evaluate": [("models", "*"), ("pretrained",)],
    "score_dataset": [("model",)],
}


@dataclass
class ResolvedConfig:
    """A config with server paths in place of references, and the ids it referenced."""

    config: dict[str, Any]
    dataset_ids: set[str] = field(default_factory=set)
    model_ids: set[str] = field(default_factory=set)


def _locations(node: Any, path: tuple[str, ...], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any, Any]]:
    """Yield (field path, container, key) for every string at `path`; other shapes are left to the schema check."""
    if not path:
        return
    head, rest = path[0], path[1:]
    if head == "*":
        if isinstance(node, list):
            keys = list(range(len(node)))
        elif isinstance(node, dict):
            keys = list(node)
        else:
            return
    else:
        if not isinstance(node, dict) or head not in node:
            return
        keys = [head]
    for key in keys:
        child = node[key]
        location = prefix + (str(key),)
        if rest:
            yield from _locations(child, rest, location)
        elif isinstance(child, str):
            yield location, node, key


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


class ReferenceResolver:
    """Replaces the references of one config, checking the allowed folders."""

    def __init__(self, store: JobStore, settings: Settings):
        self.store = store
        self.settings = settings

    def resolve(self, job_type: str, config: dict[str, Any]) -> ResolvedConfig:
        resolved = ResolvedConfig(config=_copy(config))
        for path in DATASET_FIELDS.get(job_type, []):
            for location, container, key in list(_locations(resolved.config, path)):
                container[key] = self._dataset(".".join(("config",) + location), container[key], resolved)
        for path in MODEL_FIELDS.get(job_type, []):
            for location, container, key in list(_locations(resolved.config, path)):
                container[key] = self._model(".".join(("config",) + location), container[key], resolved)
        return resolved

    def _dataset(self, field_name: str, value: str, resolved: ResolvedConfig) -> str:
        _require_text(field_name, value, "'dataset:<id>' or a path inside the data folder")
        value = strip_folder_variable(value)
        if value.startswith(DATASET_PREFIX):
            dataset_id = value[len(DATASET_PREFIX):]
            with self.store.session() as session:
                row = session.get(Dataset, dataset_id)
            if row is None:
                raise InvalidInput(
                    f"{field_name}: dataset {dataset_id!r} not found",
                    code="dataset_not_found",
                    field=field_name,
                    value=value,
                    fix="Upload the file with POST /v1/datasets and use the 'reference' it returns.",
                )
            resolved.dataset_ids.add(row.id)
            return row.path
        data_dir = self.settings.data_dir
        fix = "Upload the file with POST /v1/datasets and use 'dataset:<id>'"
        if data_dir is None:
            raise InvalidInput(
                f"{field_name}: server path {value!r} is not accepted because no data folder is configured (W2S_DATA_DIR)",
                code="path_not_allowed",
                field=field_name,
                value=value,
                fix=fix + ".",
            )
        path = Path(value).expanduser()
        path = path if path.is_absolute() else data_dir / path
        if not _inside(path, data_dir):
            raise InvalidInput(
                f"{field_name}: path {value!r} is outside the data folder {data_dir} (W2S_DATA_DIR)",
                code="path_not_allowed",
                field=field_name,
                value=value,
                fix=fix + ", or give a path inside the data folder.",
            )
        return str(path.resolve())

    def _model(self, field_name: str, value: str, resolved: ResolvedConfig) -> str:
        _require_text(field_name, value, "'model:<id or alias>' or a folder inside the model folder")
        value = strip_folder_variable(value)
        if value.startswith(MODEL_PREFIX):
            row = find_model(self.store, value[len(MODEL_PREFIX):])
            if row is None:
                raise InvalidInput(
                    f"{field_name}: model {value[len(MODEL_PREFIX):]!r} is neither a registered model id nor an alias",
                    code="model_not_found",
                    field=field_name,
                    value=value,
                    fix="List models with GET /v1/models, or register one with POST /v1/models.",
                )
            check_model_folder(self.settings, row.path, field_name, value)
            resolved.model_ids.add(row.id)
            return row.path
        model_dir = self.settings.model_dir
        path = Path(value).expanduser()
        looks_like_path = path.is_absolute() or value.startswith((".", "~")) or value.endswith(".gguf")
        if model_dir is not None and not path.is_absolute() and (model_dir / path).exists():
            path = model_dir / path
            looks_like_path = True
        if not looks_like_path:
            return value  # a Hub name; workers.validation checks W2S_ALLOW_HUB_MODELS
        if model_dir is None or not _inside(path, model_dir):
            where = f"outside the model folder {model_dir} (W2S_MODEL_DIR)" if model_dir else "not accepted because no model folder is configured (W2S_MODEL_DIR)"
            raise InvalidInput(
                f"{field_name}: model path {value!r} is {where}",
                code="path_not_allowed",
                field=field_name,
                value=value,
                fix="Use 'model:<id or alias>' of a registered model, or a folder inside the model folder.",
            )
        check_model_folder(self.settings, path, field_name, value)
        return str(path.resolve())


def _require_text(field_name: str, value: str, expected: str) -> None:
    # An empty path would resolve to the allowed folder itself and fail later with a confusing message.
    if not value.strip():
        raise InvalidInput(
            f"{field_name}: the value is an empty string; expected {expected}",
            code="empty_value",
            field=field_name,
            value=value,
            fix=f"Give {expected}.",
        )


def find_model(store: JobStore, id_or_alias: str) -> RegisteredModel | None:
    """Return the registered model with this id, or the one this alias points at."""
    with store.session() as session:
        row = session.get(RegisteredModel, id_or_alias)
        if row is None:
            alias = session.get(ModelAlias, id_or_alias)
            if alias is not None:
                row = session.get(RegisteredModel, alias.model_id)
        return row


def dataset_ids_of_paths(store: JobStore, paths: list[str]) -> list[str]:
    """Return the ids of uploaded datasets stored at these paths."""
    if not paths:
        return []
    with store.session() as session:
        return list(session.scalars(select(Dataset.id).where(Dataset.path.in_(paths))))


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value
