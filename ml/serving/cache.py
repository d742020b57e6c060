"""Loaded reward models, kept by recent use within a memory budget, and the routing of aliases.

A model is loaded on first use, on one loader thread. When an alias moves to another model, the
model the alias pointed to keeps serving it while the new one loads. The alias switches once the
new model is ready, so no request waits for the load or is dropped. Requests already queued
on a model always finish on it: unloading a model only closes its batcher, which scores what is
queued before its thread ends.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ml.modeling import RewardModel, autocast, default_device, load_reward_model, resolve_precision, reward_forward
from ml.ood import OodSummary, load_ood_summary
from ml.render import Encoded, Renderer, pad_batch
from ml.serving.batcher import Admission, DynamicBatcher
from ml.serving.config import ServingConfig
from ml.serving.errors import ModelNotFound
from ml.serving.resolver import ModelRef, ModelResolver

logger = logging.getLogger(__name__)

# Architectures whose position ids start after the padding index, so max_position_embeddings
# counts two positions that no token can use.
POSITION_OFFSET_TYPES = ("roberta", "xlm-roberta", "mpnet", "camembert")
# Tokenizers without a length limit report a huge sentinel (1e30) as model_max_length.
UNSET_TOKENIZER_LIMIT = 10**8


def model_memory_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def serving_max_length(rm: RewardModel, config: ServingConfig) -> int:
    """Tokens per sequence for this model; see `ServingConfig.max_length`."""
    limits = []
    tokenizer_limit = getattr(rm.tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and tokenizer_limit < UNSET_TOKENIZER_LIMIT:
        limits.append(tokenizer_limit)
    positions = getattr(rm.model.config, "max_position_embeddings", None)
    if positions:
        offset = 2 if rm.model.config.model_type in POSITION_OFFSET_TYPES else 0
        limits.append(positions - offset)
    model_limit = min(limits) if limits else config.max_length_cap
    if config.max_length is not None:
        return min(config.max_length, model_limit)
    trained = (rm.metadata.get("training_config") or {}).get("max_length")
    return min(trained or config.max_length_cap, model_limit)


@dataclass(eq=False)
class ServedModel:
    """A loaded reward model with its rendering policy, statistics and batcher."""

    ref: ModelRef
    rm: RewardModel
    renderer: Renderer
    precision: str
    normalization: dict[str, float] | None
    ood: OodSummary | None
    memory_bytes: int
    loaded_at: datetime
    batcher: DynamicBatcher = field(init=False)
    # A fast tokenizer raises "Already borrowed" when two threads change its settings at once, so
    # encoding (inline on the event loop, or on a worker thread for large requests) takes turns.
    _encode_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def max_length(self) -> int:
        return self.renderer.max_length

    @property
    def base_model(self) -> str | None:
        return self.rm.metadata.get("base_model") or getattr(self.rm.model.config, "_name_or_path", None)

    def forward(self, sequences: list[Sequence[int]]) -> tuple[np.ndarray, np.ndarray | None]:
        """Score one padded batch; runs on the batcher thread."""
        device = self.rm.device
        ids, mask = pad_batch(sequences, self.rm.tokenizer.pad_token_id)
        layers = [self.ood.layer] if self.ood is not None else None
        with torch.inference_mode(), autocast(self.precision, device):
            out = reward_forward(self.rm.model, ids.to(device), mask.to(device), layers=layers)
        rewards = out.rewards.cpu().double().numpy()
        distances = None
        if self.ood is not None and out.pooled is not None:
            distances = self.ood.distances(out.pooled[0].cpu().numpy())
        return rewards, distances

    def encode(self, items: Sequence[str | tuple[Any, Any]]) -> list[Encoded]:
        """Encode full texts (str) or (prompt, response) pairs with the model's rendering policy."""
        encoded = []
        with self._encode_lock:
            for item in items:
                if isinstance(item, str):
                    encoded.append(self.renderer.encode_full_text(item))
                else:
                    prompt, response = item
                    encoded.append(self.renderer.encode(prompt, response))
        return encoded

    def info(self) -> dict[str, Any]:
        """Describe the model as served, with the batcher's totals."""
        return {**self.static_info, "batching": self.batcher.stats()}

    @functools.cached_property
    def static_info(self) -> dict[str, Any]:
        """Fields of `info` that do not change while the model is loaded (computed once per model)."""
        ood = None
        if self.ood is not None:
            ood = {
                "statistic": "ppca_mahalanobis",
                "threshold": self.ood.threshold,
                "percentile": self.ood.percentile,
                "layer": self.ood.layer,
                "components": int(self.ood.components.shape[0]),
                "n_reference": self.ood.n_reference,
                "n_heldout": self.ood.n_heldout,
            }
        return {
            "id": self.ref.id,
            "name": self.ref.name,
            "base_model": self.base_model,
            "architecture": type(self.rm.model).__name__,
            "precision": self.precision,
            "device": str(self.rm.device),
            "max_length": self.max_length,
            "normalization": self.normalization,
            "ood": ood,
            "memory_mb": round(self.memory_bytes / 2**20, 1),
            "loaded_at": self.loaded_at.isoformat(),
        }

    def close(self, wait: bool = False) -> None:
        """Close the batcher; queued requests still finish, and `wait` blocks until they have."""
        self.batcher.close(wait=wait)


def load_served_model(
    ref: ModelRef, config: ServingConfig, admission: Admission, execution_lock: threading.Lock
) -> ServedModel:
    """Load the model at `ref.path` and start its batcher."""
    device = torch.device(config.device) if config.device else default_device()
    began = time.perf_counter()
    rm = load_reward_model(
        ref.path, trust_remote_code=config.allow_remote_code, allow_pickle=config.allow_pickle, device=device
    )
    normalization = rm.metadata.get("normalization")
    ood = load_ood_summary(rm.metadata)
    served = ServedModel(
        ref=ref,
        rm=rm,
        renderer=Renderer(rm.tokenizer, serving_max_length(rm, config)),
        precision=resolve_precision(config.precision, device),
        normalization={"mean": float(normalization["mean"]), "std": float(normalization["std"])} if normalization else None,
        ood=ood,
        memory_bytes=model_memory_bytes(rm.model),
        loaded_at=datetime.now(timezone.utc),
    )
    served.batcher = DynamicBatcher(
        served.forward,
        token_budget=config.token_budget,
        max_wait_s=config.max_wait_ms / 1000,
        admission=admission,
        execution_lock=execution_lock,
        name=ref.id,
    )
    logger.info(
        "loaded model %s from %s in %.1f s: %s, %.0f MiB, max_length %d, OOD summary %s",
        ref.id,
        ref.path,
        time.perf_counter() - began,
        served.precision,
        served.memory_bytes / 2**20,
        served.max_length,
        "present" if ood is not None else "absent",
    )
    return served


Loader = Callable[[ModelRef, ServingConfig, Admission, threading.Lock], ServedModel]


class ModelCache:
    """Loaded models by id, least recently used first, within `config.memory_budget_mb`."""

    def __init__(self, resolver: ModelResolver, config: ServingConfig, admission: Admission, loader: Loader = load_served_model):
        self.resolver = resolver
        self.config = config
        self.admission = admission
        self._loader = loader
        self._lock = threading.Lock()
        self._execution_lock = threading.Lock()
        self._entries: collections.OrderedDict[str, ServedModel] = collections.OrderedDict()
        self._loading: dict[str, concurrent.futures.Future] = {}
        self._routes: dict[str, tuple[ModelRef, float]] = {}  # name -> (resolution, when, monotonic s)
        self._serving: dict[str, str] = {}  # name -> id of the model serving it now
        self._loader_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")

    def loaded(self) -> list[ServedModel]:
        with self._lock:
            return list(self._entries.values())

    def peek(self, name: str) -> ServedModel | None:
        """Return the loaded model for `name` without blocking, or None when a lookup or load is due."""
        with self._lock:
            route = self._routes.get(name)
            if route is None or time.monotonic() - route[1] > self.config.alias_refresh_s:
                return None
            served = self._entries.get(route[0].id)
            if served is None or served.batcher.closed:
                return None
            self._entries.move_to_end(route[0].id)
            self._serving[name] = route[0].id
            return served

    def get(self, name: str) -> ServedModel:
        """Return the model that serves `name`, loading it if needed. Blocks, so call it off the event loop."""
        ref = self._resolve(name)
        with self._lock:
            served = self._entries.get(ref.id)
            if served is not None and not served.batcher.closed:
                self._entries.move_to_end(ref.id)
                self._serving[name] = ref.id
                return served
            future = self._loading.get(ref.id)
            if future is None:
                future = self._loader_pool.submit(self._load, ref)
                self._loading[ref.id] = future
            previous_id = self._serving.get(name)
            previous = self._entries.get(previous_id) if previous_id not in (None, ref.id) else None
            if previous is not None and not previous.batcher.closed:
                # The alias moved: its previous model serves it until the new one is loaded.
                return previous
        served = future.result()
        with self._lock:
            if served.ref.id in self._entries:
                self._serving[name] = served.ref.id
        return served

    def _resolve(self, name: str) -> ModelRef:
        now = time.monotonic()
        with self._lock:
            route = self._routes.get(name)
        if route is not None and now - route[1] <= self.config.alias_refresh_s:
            return route[0]
        try:
            ref = self.resolver.resolve(name)
        except ModelNotFound:
            with self._lock:
                self._routes.pop(name, None)
            raise
        except Exception as error:
            if route is None:
                raise
            # NOTE: a registry outage keeps the last resolution; an alias moved meanwhile is missed.
            logger.warning("resolving model %r failed (%s); using its last resolution %s", name, error, route[0].id)
            return route[0]
        with self._lock:
            if route is not None and route[0].id != ref.id:
                logger.info("model name %r moved from %s to %s", name, route[0].id, ref.id)
            self._routes[name] = (ref, now)
        return ref

    def _load(self, ref: ModelRef) -> ServedModel:
        try:
            served = self._loader(ref, self.config, self.admission, self._execution_lock)
        except BaseException:
            logger.exception("loading model %s from %s failed", ref.id, ref.path)
            with self._lock:
                self._loading.pop(ref.id, None)
            raise
        with self._lock:
            self._loading.pop(ref.id, None)
            self._entries[ref.id] = served
            self._evict_locked(keep=ref.id)
        return served

    def _evict_locked(self, keep: str) -> None:
        budget = self.config.memory_budget_mb * 2**20
        total = sum(m.memory_bytes for m in self._entries.values())
        for model_id in list(self._entries):
            if total <= budget:
                break
            if model_id == keep:
                continue
            evicted = self._entries.pop(model_id)
            total -= evicted.memory_bytes
            evicted.close()
            for name in [n for n, served_id in self._serving.items() if served_id == model_id]:
                del self._serving[name]
            logger.info(
                "unloaded model %s (%.0f MiB) to stay within the memory budget of %d MiB",
                model_id,
                evicted.memory_bytes / 2**20,
                self.config.memory_budget_mb,
            )
        if total > budget:
            logger.warning(
                "model %s alone needs %.0f MiB, over the memory budget of %d MiB; it stays loaded while in use",
                keep,
                total / 2**20,
                self.config.memory_budget_mb,
            )

    def close(self) -> None:
        """Close every batcher (queued requests still finish) and stop the loader thread."""
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for served in entries:
            served.close(wait=True)
        self._loader_pool.shutdown(wait=False, cancel_futures=True)
