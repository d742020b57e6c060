"""Model resolvers: from a model name (registered id or alias) to a model directory."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

from ml.serving.errors import ModelNotFound


@dataclass(frozen=True)
class ModelRef:
    """One registered model: its stable id, its directory, and its registered name if any."""

    id: str
    path: str
    name: str | None = None


class ModelResolver(Protocol):
    """Resolves a model id or alias; raises `ModelNotFound` for unknown names.

    An alias may point to another model on a later call: the cache then loads the new model and
    moves the alias once it is loaded. `resolve` is called from worker threads, never from the
    event loop, so it may block on a database.
    """

    def resolve(self, name: str) -> ModelRef: ...


class StaticResolver:
    """Models and aliases held in memory: for tests, benchmarks and single-machine deployments."""

    def __init__(self, models: dict[str, str] | None = None, aliases: dict[str, str] | None = None):
        self._lock = threading.Lock()
        self._models: dict[str, str] = dict(models or {})
        self._aliases: dict[str, str] = {}
        for alias, model_id in (aliases or {}).items():
            self.set_alias(alias, model_id)

    def add_model(self, model_id: str, path: str) -> None:
        with self._lock:
            self._models[model_id] = str(path)

    def set_alias(self, alias: str, model_id: str) -> None:
        """Point `alias` at `model_id`; raises ModelNotFound for an unknown id."""
        with self._lock:
            if model_id not in self._models:
                raise ModelNotFound(model_id)
            self._aliases[alias] = model_id

    def resolve(self, name: str) -> ModelRef:
        with self._lock:
            model_id = self._aliases.get(name, name)
            path = self._models.get(model_id)
        if path is None:
            raise ModelNotFound(name)
        return ModelRef(id=model_id, path=path, name=model_id)
