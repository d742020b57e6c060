"""Batch scoring of items and preference pairs with a loaded reward model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ml.data import PreferencePair
from ml.modeling import RewardModel, autocast, resolve_precision, reward_forward
from ml.render import Encoded, Renderer, Text, pad_batch

logger = logging.getLogger(__name__)


@dataclass
class ScoreResult:
    """Rewards in input order, how many inputs were truncated, and optional pooled states."""

    rewards: np.ndarray  # [N] float64
    n_truncated: int
    precision: str
    pooled: list[np.ndarray] | None = None  # per requested layer, [N, H] float32


@dataclass
class PairScores:
    chosen: np.ndarray
    rejected: np.ndarray
    n_truncated: int  # sequences (not pairs) that lost tokens
    precision: str
    n_truncated_pairs: int = 0  # pairs in which the chosen or the rejected sequence lost tokens
    pooled_chosen: list[np.ndarray] | None = None
    pooled_rejected: list[np.ndarray] | None = None

    @property
    def margins(self) -> np.ndarray:
        return self.chosen - self.rejected


@torch.inference_mode()
def score_encoded(
    rm: RewardModel,
    encoded: Sequence[Encoded],
    batch_size: int = 32,
    precision: str = "fp32",
    padding_side: str = "right",
    layers: Sequence[int] | None = None,
    progress: bool = False,
    desc: str = "score",
) -> ScoreResult:
    """Score already-encoded sequences, batched by similar length to cut padding."""
    device = rm.device
    precision = resolve_precision(precision, device)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids), reverse=True)
    rewards = np.empty(len(encoded), dtype=np.float64)
    pooled = None
    was_training = rm.model.training
    rm.model.eval()
    try:
        batches = range(0, len(order), batch_size)
        for start in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            index = order[start : start + batch_size]
            ids, mask = pad_batch([encoded[i].input_ids for i in index], rm.tokenizer.pad_token_id, padding_side)
            with autocast(precision, device):
                out = reward_forward(rm.model, ids.to(device), mask.to(device), layers=layers)
            rewards[index] = out.rewards.cpu().double().numpy()
            if out.pooled is not None:
                if pooled is None:
                    pooled = [np.empty((len(encoded), p.shape[1]), dtype=np.float32) for p in out.pooled]
                for store, value in zip(pooled, out.pooled):
                    store[index] = value.cpu().numpy()
    finally:
        rm.model.train(was_training)
    n_truncated = sum(1 for e in encoded if e.truncated)
    return ScoreResult(rewards=rewards, n_truncated=n_truncated, precision=precision, pooled=pooled)


def score(
    rm: RewardModel,
    items: Iterable[tuple[Text, Text]],
    batch_size: int = 32,
    max_length: int = 512,
    precision: str = "fp32",
    padding_side: str = "right",
    layers: Sequence[int] | None = None,
    progress: bool = False,
) -> ScoreResult:
    """Return one reward per (prompt, response) item, in input order."""
    renderer = Renderer(rm.tokenizer, max_length)
    encoded = [renderer.encode(prompt, response) for prompt, response in items]
    result = score_encoded(rm, encoded, batch_size, precision, padding_side, layers, progress)
    if result.n_truncated:
        logger.info("%d of %d items were truncated to %d tokens", result.n_truncated, len(encoded), max_length)
    return result


def score_pairs(
    rm: RewardModel,
    pairs: Sequence[PreferencePair],
    batch_size: int = 32,
    max_length: int = 512,
    precision: str = "fp32",
    layers: Sequence[int] | None = None,
    progress: bool = False,
    desc: str = "score pairs",
) -> PairScores:
    """Score the chosen and the rejected response of every pair in one batched pass."""
    renderer = Renderer(rm.tokenizer, max_length)
    encoded = [renderer.encode(p.prompt, p.chosen) for p in pairs]
    encoded += [renderer.encode(p.prompt, p.rejected) for p in pairs]
    result = score_encoded(rm, encoded, batch_size, precision, layers=layers, progress=progress, desc=desc)
    n = len(pairs)
    pooled = result.pooled
    return PairScores(
        chosen=result.rewards[:n],
        rejected=result.rewards[n:],
        n_truncated=result.n_truncated,
        precision=result.precision,
        n_truncated_pairs=sum(1 for i in range(n) if encoded[i].truncated or encoded[n + i].truncated),
        pooled_chosen=None if pooled is None else [p[:n] for p in pooled],
        pooled_rejected=None if pooled is None else [p[n:] for p in pooled],
    )


def token_lengths(tokenizer: Any, pairs: Sequence[PreferencePair]) -> np.ndarray:
    """Untruncated token counts of every chosen and rejected sequence (chosen first)."""
    renderer = Renderer(tokenizer, max_length=1 << 20)
    lengths = [renderer.length(p.prompt, p.chosen) for p in pairs]
    lengths += [renderer.length(p.prompt, p.rejected) for p in pairs]
    return np.asarray(lengths)
