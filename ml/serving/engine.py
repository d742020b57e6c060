"""The scoring engine: rewards, normalized rewards and OOD flags for items of a named model."""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ml.render import Encoded
from ml.serving.batcher import Admission, BatchResult
from ml.serving.cache import ModelCache, ServedModel
from ml.serving.config import ServingConfig
from ml.serving.errors import BatcherClosed, RequestLimitExceeded
from ml.serving.resolver import ModelResolver

logger = logging.getLogger(__name__)

# One item: a full text (prompt and response already joined), or a (prompt, response) pair where
# each side is a string or a list of {"role", "content"} messages.
ScoreInput = str | tuple[Any, Any]

# Retries of a request whose model was unloaded between lookup and submit.
CLOSED_BATCHER_RETRIES = 3
# Requests with more items are tokenized on a worker thread, so they do not stall the event loop
# (a few milliseconds per 32 items of a few hundred tokens with a fast tokenizer, an estimate).
INLINE_ENCODE_ITEMS = 32


@dataclass
class ScoredItem:
    """Scores of one item."""

    reward: float
    normalized: float | None  # (reward - mean) / std with the training-time statistics
    ood_distance: float | None
    ood: bool | None  # ood_distance above the model's threshold; None without an OOD summary
    truncated: bool
    tokens: int  # after truncation, special tokens included


@dataclass
class ScoringResult:
    """Scored items in request order and the model that scored them."""

    model: dict[str, Any]  # `ServedModel.static_info`, shared by every result of the model: do not modify
    items: list[ScoredItem]

    @property
    def rewards(self) -> list[float]:
        return [item.reward for item in self.items]

    @property
    def truncated(self) -> int:
        return sum(item.truncated for item in self.items)


def split_conversation(messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split a conversation into the prompt messages and the final assistant message that is scored.

    Raises ValueError unless the last message has role 'assistant' and at least one message
    precedes it.
    """
    if len(messages) < 2:
        raise ValueError(
            f"a conversation needs at least 2 messages (a prompt and the assistant reply); got {len(messages)}"
        )
    last = messages[-1]
    if last.get("role") != "assistant":
        raise ValueError(f"the last message of a conversation is scored and must have role 'assistant'; got {last.get('role')!r}")
    return list(messages[:-1]), [dict(last)]


def bradley_terry_matrix(rewards: Sequence[float]) -> list[list[float]]:
    """Return P[i][j] = σ(r_i − r_j), the Bradley-Terry probability that response i beats response j."""
    values = np.asarray(rewards, dtype=np.float64)
    difference = values[:, None] - values[None, :]
    # 0.5 * (1 + tanh(x / 2)) is σ(x) without overflow for large |x|.
    return (0.5 * (1.0 + np.tanh(difference / 2.0))).tolist()


class ScoringEngine:
    """Scores items with named models through the cache and the per-model batchers."""

    def __init__(self, resolver: ModelResolver, config: ServingConfig | None = None, cache: ModelCache | None = None):
        self.config = config or ServingConfig()
        self.admission = Admission(self.config.max_queue)
        self.cache = cache or ModelCache(resolver, self.config, self.admission)

    # --- models ---------------------------------------------------------------------------------

    async def model(self, name: str) -> ServedModel:
        """Return the loaded model that serves `name`; the first use loads it on a worker thread."""
        served = self.cache.peek(name)
        if served is None:
            served = await asyncio.to_thread(self.cache.get, name)
        return served

    async def model_info(self, name: str) -> dict[str, Any]:
        return (await self.model(name)).info()

    # --- scoring --------------------------------------------------------------------------------

    async def score(self, name: str, items: Sequence[ScoreInput]) -> ScoringResult:
        """Score `items` with model `name`; raises ModelNotFound, RequestLimitExceeded or QueueFull."""
        for _ in range(CLOSED_BATCHER_RETRIES):
            served = await self.model(name)
            if len(items) > INLINE_ENCODE_ITEMS:
                encoded = await asyncio.to_thread(self._encode, served, items)
            else:
                encoded = self._encode(served, items)
            try:
                future = served.batcher.submit([e.input_ids for e in encoded])
            except BatcherClosed:
                continue  # unloaded between lookup and submit: look the model up again
            result = await asyncio.wrap_future(future)
            return self._result(served, encoded, result)
        raise RuntimeError(f"model {name!r} was unloaded {CLOSED_BATCHER_RETRIES} times while a request was submitted")

    def score_sync(self, name: str, items: Sequence[ScoreInput]) -> ScoringResult:
        """Score from a plain thread (batch jobs, benchmarks); same errors as `score`."""
        for _ in range(CLOSED_BATCHER_RETRIES):
            served = self.cache.get(name)
            encoded = self._encode(served, items)
            try:
                future = served.batcher.submit([e.input_ids for e in encoded])
            except BatcherClosed:
                continue
            return self._result(served, encoded, future.result())
        raise RuntimeError(f"model {name!r} was unloaded {CLOSED_BATCHER_RETRIES} times while a request was submitted")

    def _encode(self, served: ServedModel, items: Sequence[ScoreInput]) -> list[Encoded]:
        encoded = served.encode(items)
        tokens = sum(len(e.input_ids) for e in encoded)
        if tokens > self.config.max_request_tokens:
            raise RequestLimitExceeded("max_request_tokens", self.config.max_request_tokens, tokens, "tokens")
        return encoded

    @staticmethod
    def _result(served: ServedModel, encoded: list[Encoded], result: BatchResult) -> ScoringResult:
        normalization = served.normalization
        threshold = served.ood.threshold if served.ood is not None else None
        items = []
        for index, sequence in enumerate(encoded):
            reward = float(result.rewards[index])
            distance = float(result.distances[index]) if result.distances is not None else None
            items.append(
                ScoredItem(
                    reward=reward,
                    normalized=(reward - normalization["mean"]) / normalization["std"] if normalization else None,
                    ood_distance=distance if distance is None or math.isfinite(distance) else None,
                    ood=bool(distance > threshold) if distance is not None and threshold is not None else None,
                    truncated=sequence.truncated,
                    tokens=len(sequence.input_ids),
                )
            )
        return ScoringResult(model=served.static_info, items=items)

    def close(self) -> None:
        """Finish queued requests and stop every batcher thread."""
        self.cache.close()
