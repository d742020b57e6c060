"""Serving registered reward models: model cache, dynamic batcher and the scoring engine.

`ScoringEngine` is the one object the HTTP layer calls. It resolves a model name (id or alias)
through a `ModelResolver`, keeps recently used models loaded in a `ModelCache`, and scores
requests through one `DynamicBatcher` per loaded model. Nothing here imports `app/` or `workers/`.
"""

from ml.serving.config import ServingConfig
from ml.serving.engine import ScoredItem, ScoringEngine, ScoringResult, bradley_terry_matrix, split_conversation
from ml.serving.errors import ModelNotFound, QueueFull, RequestLimitExceeded, ServingError
from ml.serving.resolver import ModelRef, ModelResolver, StaticResolver

__all__ = [
    "ModelNotFound",
    "ModelRef",
    "ModelResolver",
    "QueueFull",
    "RequestLimitExceeded",
    "ScoredItem",
    "ScoringEngine",
    "ScoringResult",
    "ServingConfig",
    "ServingError",
    "StaticResolver",
    "bradley_terry_matrix",
    "split_conversation",
]
