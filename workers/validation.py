"""Checks a job config before it is queued: schema (pydantic) and the files and models it names.

A job that would fail on its first line because a path is wrong should fail at submission, with
the field named, and not minutes later on a GPU worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ml.config import (
    DatasetSpec,
    EvaluateConfig,
    PipelineConfig,
    SelectLambdaConfig,
    StudentTrainConfig,
    TrainConfig,
    WeakLabelConfig,
    parse_job_config,
)
from ml.serving.config import ScoreDatasetConfig
from workers.settings import Settings


@dataclass(frozen=True)
class FieldError:
    """One invalid field: its dotted path in the config (e.g. 'student.anchor.lam') and the reason."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class JobConfigError(ValueError):
    """A job config failed validation; `errors` names each invalid field."""

    def __init__(self, errors: list[FieldError]):
        self.errors = errors
        super().__init__("invalid job config: " + "; ".join(str(error) for error in errors))


def _field_path(location: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in location) or "config"


def validate_job_config(job_type: str, data: dict[str, Any], settings: Settings, *, check_paths: bool = True) -> BaseModel:
    """Parse `data` as the config of `job_type` and check that its files and models exist.

    Raises JobConfigError listing every invalid field.
    """
    if not isinstance(data, dict):
        raise JobConfigError([FieldError("config", f"expected a JSON object, got {type(data).__name__}")])
    try:
        config = parse_job_config(job_type, data)
    except KeyError as exc:
        raise JobConfigError([FieldError("type", str(exc.args[0]))]) from None
    except ValidationError as exc:
        errors = [FieldError(_field_path(error["loc"]), error["msg"]) for error in exc.errors()]
        raise JobConfigError(errors) from None

    if check_paths:
        errors = _PathChecker(settings).check(config)
        if errors:
            raise JobConfigError(errors)
    return config


def _is_inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


class _PathChecker:
    """Collects errors for dataset files and models that are missing or outside the allowed folders."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.errors: list[FieldError] = []

    def check(self, config: BaseModel) -> list[FieldError]:
        if isinstance(config, PipelineConfig):
            self._dataset("source", config.source)
            for index, target in enumerate(config.targets):
                self._dataset(f"targets.{index}", target)
            self._train("weak", config.weak)
            self._train("student", config.student)
        elif isinstance(config, WeakLabelConfig):
            self._dataset("source", config.source)
            for index, target in enumerate(config.targets):
                self._dataset(f"targets.{index}", target)
            if config.weak is not None:
                self._train("weak", config.weak)
            if config.labeller_model:
                self._model("labeller_model", config.labeller_model)
        elif isinstance(config, StudentTrainConfig):
            self._file("data", config.data)
            if config.heldout:
                self._file("heldout", config.heldout)
            self._train("student", config.student)
        elif isinstance(config, EvaluateConfig):
            for name, path in config.models.items():
                self._model(f"models.{name}", path)
            self._dataset("source", config.source)
            for index, target in enumerate(config.targets):
                self._dataset(f"targets.{index}", target)
            if config.pretrained:
                self._model("pretrained", config.pretrained)
        elif isinstance(config, ScoreDatasetConfig):
            self._file("data", config.data)
            self._model("model", config.model)
        elif isinstance(config, SelectLambdaConfig):
            self._file("validation", config.validation)
            for index, candidate in enumerate(config.candidates):
                self._model(f"candidates.{index}.model", candidate.model)
            if config.pretrained:
                self._model("pretrained", config.pretrained)
        return self.errors

    def _dataset(self, field: str, spec: DatasetSpec) -> None:
        if spec.train:
            self._file(f"{field}.train", spec.train)
        if spec.test:
            self._file(f"{field}.test", spec.test)

    def _train(self, field: str, train: TrainConfig) -> None:
        self._model(f"{field}.model", train.model)

    def _file(self, field: str, value: str) -> None:
        path = Path(value).expanduser()
        if not path.is_file():
            self.errors.append(FieldError(field, f"dataset file {value} not found"))
            return
        data_dir = self.settings.data_dir
        if data_dir is not None and not _is_inside(path, data_dir):
            self.errors.append(
                FieldError(field, f"dataset file {value} is outside the allowed data folder {data_dir} (W2S_DATA_DIR)")
            )

    def _model(self, field: str, value: str) -> None:
        path = Path(value).expanduser()
        if path.exists():
            model_dir = self.settings.model_dir
            if model_dir is not None and not _is_inside(path, model_dir):
                self.errors.append(
                    FieldError(field, f"model path {value} is outside the allowed model folder {model_dir} (W2S_MODEL_DIR)")
                )
            return
        # 'org/name' could be a Hub id or a missing relative folder; these forms are always paths.
        looks_like_path = path.is_absolute() or value.startswith((".", "~")) or value.endswith(".gguf")
        if looks_like_path:
            self.errors.append(FieldError(field, f"model path {value} not found"))
        elif not self.settings.allow_hub_models:
            self.errors.append(
                FieldError(
                    field,
                    f"model {value!r} is not a local path and Hub downloads are disabled; "
                    "give a model directory or set W2S_ALLOW_HUB_MODELS=true",
                )
            )
