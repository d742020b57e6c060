"""Serving registered reward models: model cache, dynamic batcher and the scoring engine.

`ScoringEngine` is the one object the HTTP layer calls. It resolves a model name (id or alias)
through a `ModelResolver`, keeps recently used models loaded in a `ModelCache`, and scores
requests through one `DynamicBatcher` per loaded model. Nothing here imports `app/` or `workers/`.

Names are imported on first use, so `ml.serving.config` (settings and the batch-scoring job
config) can be imported without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ServingConfig": "ml.serving.config",
    "ScoreDatasetConfig": "ml.serving.config",
    "ScoredItem": "ml.serving.engine",
    "ScoringEngine": "ml.serving.engine",
    "ScoringResult": "ml.serving.engine",
    "bradley_terry_matrix": "ml.serving.engine",
    "split_conversation": "ml.serving.engine",
    "ModelNotFound": "ml.serving.errors",
    "QueueFull": "ml.serving.errors",
    "RequestLimitExceeded": "ml.serving.errors",
    "ServingError": "ml.serving.errors",
    "ModelRef": "ml.serving.resolver",
    "ModelResolver": "ml.serving.resolver",
    "StaticResolver": "ml.serving.resolver",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ml.serving' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
