"""Scoring engine: dynamic batcher, model cache, batch invariance and the OOD statistic.

The real-model tests use a MiniLM reward model trained for a few steps on GENIES pairs (so its
metadata has normalization statistics and an OOD summary), and a copy whose head bias is 1.0
higher, so a reward tells which of the two models produced it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ml.config import TrainConfig
from ml.context import RunContext
from ml.modeling import load_reward_model, save_reward_model
from ml.ood import OodSummary, fit_ood_summary, load_ood_summary
from ml.serving import (
    ModelNotFound,
    QueueFull,
    RequestLimitExceeded,
    ScoringEngine,
    ServingConfig,
    StaticResolver,
    bradley_terry_matrix,
    split_conversation,
)
from ml.serving.batcher import Admission, DynamicBatcher
from ml.serving.cache import ModelCache
from ml.train import load_limited, train_reward_model

BIAS_SHIFT = 1.0
TRAIN_MAX_LENGTH = 64


# --- real models ----------------------------------------------------------------------------------


def build_serving_models(root: Path, minilm_dir: Path, genies: Path) -> tuple[Path, Path]:
    """Train model A once per test session (reused from `root`) and write model B = A with bias + 1."""
    model_a, model_b = root / "model-a", root / "model-b"
    if (model_b / "w2s_metadata.json").is_file():
        return model_a, model_b
    pairs = load_limited(str(genies / "us_history_textbook" / "train.json.gz"), max_prompts=6)
    heldout = load_limited(str(genies / "us_history_textbook" / "test.json.gz"), max_prompts=8)
    cfg = TrainConfig(
        model=str(minilm_dir), max_steps=3, batch_size=4, max_length=TRAIN_MAX_LENGTH, precision="fp32",
        learning_rate=1e-4, save_steps=1000, seed=3,
    )
    result = train_reward_model(cfg, pairs, "gold", RunContext(root / "train-a"), "serving", heldout=heldout, anchor_mode="off", progress_bars=False)
    (root / "train-a" / "model").rename(model_a)
    assert result["model_dir"]

    rm = load_reward_model(model_a)
    with torch.no_grad():
        rm.model.classifier.bias += BIAS_SHIFT
    metadata = {k: v for k, v in rm.metadata.items() if k not in ("format_version", "saved_at")}
    metadata["normalization"] = {**metadata["normalization"], "mean": metadata["normalization"]["mean"] + BIAS_SHIFT}
    save_reward_model(rm.model, rm.tokenizer, model_b, metadata)
    return model_a, model_b


@pytest.fixture(scope="session")
def serving_models(tmp_path_factory, minilm_dir, genies) -> tuple[Path, Path]:
    return build_serving_models(tmp_path_factory.getbasetemp() / "serving-models", minilm_dir, genies)


@pytest.fixture(scope="module")
def items(genies) -> list[tuple[str, str]]:
    """Items of very different lengths: GENIES test pairs, a one-word reply and an over-long one."""
    pairs = load_limited(str(genies / "us_history_textbook" / "test.json.gz"), max_prompts=5)
    chosen = list(dict.fromkeys([(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]))[:6]
    short = [("Name a colour.", "Blue."), ("Hi", "Hello!")]
    long = [(pairs[0].prompt * 3, pairs[0].chosen * 5)]
    return chosen + short + long


def _engine(model_dir: Path, precision: str = "fp32", **settings) -> ScoringEngine:
    return ScoringEngine(StaticResolver({"a": str(model_dir)}), ServingConfig(precision=precision, **settings))


def _scores_alone_and_mixed(engine: ScoringEngine, items) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    alone = np.array([engine.score_sync("a", [item]).rewards[0] for item in items])
    together = np.array(engine.score_sync("a", items).rewards)

    async def concurrent():
        # Mixed requests of 1 to 3 items arrive together, so the batcher pads them with each other.
        starts, start = [], 0
        while start < len(items):
            starts.append(start)
            start += 1 + len(starts) % 3
        bounds = list(zip(starts, starts[1:] + [len(items)]))
        results = await asyncio.gather(*(engine.score("a", items[lo:hi]) for lo, hi in bounds))
        return np.concatenate([result.rewards for result in results])

    mixed = asyncio.run(concurrent())
    return alone, together, mixed


def test_fp32_scores_do_not_depend_on_batch(serving_models, items):
    engine = _engine(serving_models[0], "fp32")
    try:
        alone, together, mixed = _scores_alone_and_mixed(engine, items)
        std = engine.cache.get("a").normalization["std"]
    finally:
        engine.close()
    tolerance = 1e-4 * std
    assert np.abs(together - alone).max() <= tolerance
    assert np.abs(mixed - alone).max() <= tolerance


def test_bf16_batch_difference_is_bounded(serving_models, items):
    # bf16 rounds activations to 8 mantissa bits, so padding changes the rounding; docs/scoring.md
    # records the measured size (bench/serving.py measures it on MiniLM and MPNet).
    engine = _engine(serving_models[0], "bf16")
    try:
        alone, together, mixed = _scores_alone_and_mixed(engine, items)
        std = engine.cache.get("a").normalization["std"]
    finally:
        engine.close()
    difference = max(np.abs(together - alone).max(), np.abs(mixed - alone).max())
    print(f"bf16: max |alone - batched| = {difference:.3g} = {difference / std:.3g} std")
    assert difference <= 0.1 * std


def test_scores_match_plain_forward(serving_models, items):
    from ml.scoring import score

    engine = _engine(serving_models[0], "fp32")
    try:
        served = engine.score_sync("a", items)
    finally:
        engine.close()
    rm = load_reward_model(serving_models[0])
    reference = score(rm, items, batch_size=1, max_length=TRAIN_MAX_LENGTH, precision="fp32")
    assert np.allclose(served.rewards, reference.rewards, atol=1e-5)
    assert served.model["max_length"] == TRAIN_MAX_LENGTH, "serving length defaults to the training max_length"


def test_results_report_truncation_and_normalization(serving_models, items):
    engine = _engine(serving_models[0], "fp32")
    try:
        result = engine.score_sync("a", items)
    finally:
        engine.close()
    long_item, short_item = result.items[-1], result.items[-2]
    norm = result.model["normalization"]
    assert long_item.truncated is True
    assert long_item.tokens == TRAIN_MAX_LENGTH
    assert short_item.truncated is False
    assert short_item.normalized == pytest.approx((short_item.reward - norm["mean"]) / norm["std"])
    assert all(item.ood_distance is not None and item.ood is not None for item in result.items)


def test_request_token_limit(serving_models, items):
    engine = _engine(serving_models[0], "fp32", max_request_tokens=100)
    try:
        with pytest.raises(RequestLimitExceeded, match=r"over the limit of 100 tokens"):
            engine.score_sync("a", items)
    finally:
        engine.close()


def test_unknown_model_raises(serving_models):
    engine = _engine(serving_models[0])
    try:
        with pytest.raises(ModelNotFound, match="'nope' not found"):
            engine.score_sync("nope", [("a", "b")])
    finally:
        engine.close()


def test_trained_metadata_has_ood_summary(serving_models, genies):
    metadata = json.loads((serving_models[0] / "w2s_metadata.json").read_text())
    summary = load_ood_summary(metadata)
    assert summary is not None
    assert summary.n_heldout == 2 * len(load_limited(str(genies / "us_history_textbook" / "test.json.gz"), max_prompts=8))
    assert summary.threshold > 0
    assert metadata["ood"]["statistic"] == "ppca_mahalanobis"


def test_ood_distance_higher_off_distribution(serving_models, genies):
    in_domain = load_limited(str(genies / "us_history_textbook" / "test.json.gz"), max_prompts=20)[8:20]
    shifted = load_limited(str(genies / "code_easy" / "test.json.gz"), max_prompts=12)
    engine = _engine(serving_models[0], "fp32")
    try:
        near = engine.score_sync("a", [(p.prompt, p.chosen) for p in in_domain])
        far = engine.score_sync("a", [(p.prompt, p.chosen) for p in shifted])
    finally:
        engine.close()
    near_distance = np.median([item.ood_distance for item in near.items])
    far_distance = np.median([item.ood_distance for item in far.items])
    assert far_distance > near_distance
    assert sum(item.ood for item in far.items) > sum(item.ood for item in near.items)


# --- OOD statistic on synthetic data --------------------------------------------------------------


def _gaussian(rng, n, scales, shift=0.0):
    return rng.normal(size=(n, scales.size)) * scales + shift


def test_ood_threshold_flags_about_one_percent():
    rng = np.random.default_rng(0)
    # Variances decay geometrically, as the spectra of encoder representations do.
    scales = 3.0 * 0.9 ** np.arange(48)
    summary = fit_ood_summary(_gaussian(rng, 2000, scales), _gaussian(rng, 1000, scales), components=16)
    fresh = summary.distances(_gaussian(rng, 5000, scales))
    shifted = summary.distances(_gaussian(rng, 500, scales, shift=0.5))

    assert 0.002 <= np.mean(fresh > summary.threshold) <= 0.03
    assert np.mean(shifted > summary.threshold) > 0.9
    # d² of a Gaussian sample follows χ² with H degrees of freedom: mean H.
    assert np.mean(fresh**2) == pytest.approx(48, rel=0.1)


def test_ood_summary_survives_json():
    rng = np.random.default_rng(1)
    scales = np.linspace(2.0, 0.5, 16)
    summary = fit_ood_summary(_gaussian(rng, 200, scales), _gaussian(rng, 50, scales), components=4)
    restored = OodSummary.from_dict(json.loads(json.dumps(summary.to_dict())))
    probe = _gaussian(rng, 20, scales)
    assert np.allclose(restored.distances(probe), summary.distances(probe), rtol=1e-4)
    assert restored.threshold == summary.threshold


def test_ood_small_reference_sample():
    # Fewer rows than dimensions: the residual variance is floored instead of being 0.
    rng = np.random.default_rng(2)
    summary = fit_ood_summary(rng.normal(size=(5, 32)), rng.normal(size=(4, 32)))
    assert np.isfinite(summary.distances(rng.normal(size=(3, 32)))).all()
    assert np.isfinite(summary.threshold)


def test_ood_rejects_wrong_width():
    rng = np.random.default_rng(3)
    summary = fit_ood_summary(rng.normal(size=(20, 8)), rng.normal(size=(5, 8)))
    with pytest.raises(ValueError, match=r"expected \[N, 8\]"):
        summary.distances(rng.normal(size=(2, 9)))


# --- batcher with a stand-in forward --------------------------------------------------------------


class RecordingForward:
    """Forward pass that returns the sum of each sequence's ids and records the batches it saw."""

    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[list[int]] = []
        self.gate = gate

    def __call__(self, sequences):
        if self.gate is not None:
            self.gate.wait(timeout=10)
        self.batches.append([len(s) for s in sequences])
        return np.array([float(sum(s)) for s in sequences]), None


def _sequence(length: int, start: int = 1) -> list[int]:
    return list(range(start, start + length))


def test_batcher_respects_token_budget_and_sorts():
    forward = RecordingForward()
    batcher = DynamicBatcher(forward, token_budget=100, max_wait_s=0.0, admission=Admission(1000))
    sequences = [_sequence(n, start=n) for n in (5, 60, 7, 30, 90, 12, 1, 45)]
    result = batcher.submit(sequences).result(timeout=10)
    batcher.close(wait=True)

    assert result.rewards.tolist() == [float(sum(s)) for s in sequences]
    for batch in forward.batches:
        assert len(batch) * max(batch) <= 100 or len(batch) == 1
        assert batch == sorted(batch, reverse=True)


def test_batcher_oversized_sequence_runs_alone():
    forward = RecordingForward()
    batcher = DynamicBatcher(forward, token_budget=10, max_wait_s=0.0, admission=Admission(100))
    result = batcher.submit([_sequence(50), _sequence(3)]).result(timeout=10)
    batcher.close(wait=True)
    assert result.rewards.tolist() == [float(sum(_sequence(50))), 6.0]
    assert [50] in forward.batches


def test_batcher_groups_requests_that_arrive_while_busy():
    gate = threading.Event()
    forward = RecordingForward(gate)
    batcher = DynamicBatcher(forward, token_budget=1000, max_wait_s=0.0, admission=Admission(100))
    first = batcher.submit([_sequence(4)])
    time.sleep(0.05)  # the batcher is now blocked in the first forward pass
    others = [batcher.submit([_sequence(3 + i)]) for i in range(3)]
    gate.set()
    for future in [first, *others]:
        future.result(timeout=10)
    batcher.close(wait=True)
    assert forward.batches == [[4], [5, 4, 3]]


def test_batcher_waits_for_as_many_requests_as_last_time():
    forward = RecordingForward()
    batcher = DynamicBatcher(forward, token_budget=1000, max_wait_s=0.3, admission=Admission(100))
    batcher._expected_requests = 3  # as after a batch of three concurrent requests
    started = time.monotonic()
    futures = [batcher.submit([_sequence(2)])]
    time.sleep(0.05)
    futures += [batcher.submit([_sequence(2)]) for _ in range(2)]
    for future in futures:
        future.result(timeout=10)
    grouped_after = time.monotonic() - started
    assert forward.batches == [[2, 2, 2]]
    assert grouped_after < 0.25, "the batch starts once three requests are queued, before max_wait"

    started = time.monotonic()
    batcher._expected_requests = 3
    batcher.submit([_sequence(2)]).result(timeout=10)
    waited = time.monotonic() - started
    batcher.close(wait=True)
    assert waited >= 0.25, "a lone request waits up to max_wait for others"


def test_batcher_serial_requests_do_not_wait():
    forward = RecordingForward()
    batcher = DynamicBatcher(forward, token_budget=1000, max_wait_s=0.5, admission=Admission(100))
    started = time.monotonic()
    for _ in range(3):
        batcher.submit([_sequence(2)]).result(timeout=10)
    elapsed = time.monotonic() - started
    batcher.close(wait=True)
    assert elapsed < 0.4, "after a batch of one request, the next single request starts at once"


def test_queue_full_raises_with_retry_after():
    gate = threading.Event()
    admission = Admission(4)
    batcher = DynamicBatcher(RecordingForward(gate), token_budget=100, max_wait_s=0.0, admission=admission)
    accepted = batcher.submit([_sequence(2)] * 3)
    with pytest.raises(QueueFull) as caught:
        batcher.submit([_sequence(2)] * 2)
    gate.set()
    accepted.result(timeout=10)
    batcher.close(wait=True)

    assert caught.value.retry_after_s >= 1
    assert caught.value.queued == 3
    assert "the limit is 4" in str(caught.value)
    assert admission.queued == 0


def test_failed_forward_fails_only_its_requests():
    calls = {"n": 0}

    def forward(sequences):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return np.zeros(len(sequences)), None

    admission = Admission(10)
    batcher = DynamicBatcher(forward, token_budget=100, max_wait_s=0.0, admission=admission)
    with pytest.raises(RuntimeError, match="boom"):
        batcher.submit([_sequence(2)]).result(timeout=10)
    assert batcher.submit([_sequence(2)]).result(timeout=10).rewards.tolist() == [0.0]
    batcher.close(wait=True)
    assert admission.queued == 0


def test_closed_batcher_finishes_queued_requests():
    gate = threading.Event()
    batcher = DynamicBatcher(RecordingForward(gate), token_budget=100, max_wait_s=0.0, admission=Admission(10))
    queued = [batcher.submit([_sequence(2)]) for _ in range(3)]
    batcher.close()
    gate.set()
    assert all(future.result(timeout=10).rewards.tolist() == [3.0] for future in queued)


# --- model cache with a stand-in loader -----------------------------------------------------------


class FakeLoader:
    """Loads stand-in models of a given size; `gates` holds loads of some ids until released."""

    def __init__(self, sizes_mb: dict[str, int]):
        self.sizes_mb = sizes_mb
        self.gates: dict[str, threading.Event] = {}
        self.loads: list[str] = []

    def __call__(self, ref, config, admission, execution_lock):
        if ref.id in self.gates:
            self.gates[ref.id].wait(timeout=10)
        self.loads.append(ref.id)
        batcher = SimpleNamespace(closed=False)
        model = SimpleNamespace(ref=ref, memory_bytes=self.sizes_mb[ref.id] * 2**20, batcher=batcher)
        model.close = lambda wait=False: setattr(batcher, "closed", True)
        return model


def _cache(resolver, loader, budget_mb: int, refresh_s: float = 0.0) -> ModelCache:
    config = ServingConfig(memory_budget_mb=budget_mb, alias_refresh_s=refresh_s)
    return ModelCache(resolver, config, Admission(10), loader=loader)


def test_cache_evicts_least_recently_used():
    resolver = StaticResolver({"a": "/a", "b": "/b", "c": "/c"})
    loader = FakeLoader({"a": 40, "b": 40, "c": 40})
    cache = _cache(resolver, loader, budget_mb=100)
    a = cache.get("a")
    cache.get("b")
    cache.get("a")  # a is now more recent than b
    cache.get("c")

    assert [m.ref.id for m in cache.loaded()] == ["a", "c"]
    assert a.batcher.closed is False
    cache.get("b")
    assert loader.loads == ["a", "b", "c", "b"]
    cache.close()


def test_cache_keeps_model_over_budget_in_use():
    loader = FakeLoader({"big": 500})
    cache = _cache(StaticResolver({"big": "/big"}), loader, budget_mb=100)
    assert cache.get("big").ref.id == "big"
    assert [m.ref.id for m in cache.loaded()] == ["big"]
    cache.close()


def test_alias_keeps_old_model_until_new_one_loaded():
    resolver = StaticResolver({"a": "/a", "b": "/b"}, aliases={"prod": "a"})
    loader = FakeLoader({"a": 10, "b": 10})
    loader.gates["b"] = threading.Event()
    cache = _cache(resolver, loader, budget_mb=1000)
    assert cache.get("prod").ref.id == "a"

    resolver.set_alias("prod", "b")
    assert cache.get("prod").ref.id == "a", "the old model answers while the new one loads"
    loader.gates["b"].set()
    deadline = time.monotonic() + 10
    while cache.get("prod").ref.id != "b":
        assert time.monotonic() < deadline, "the alias never switched to the new model"
        time.sleep(0.01)
    assert cache.peek("prod") is None or cache.peek("prod").ref.id == "b"
    cache.close()


def test_alias_lookup_is_cached_for_refresh_interval():
    resolver = StaticResolver({"a": "/a", "b": "/b"}, aliases={"prod": "a"})
    cache = _cache(resolver, FakeLoader({"a": 10, "b": 10}), budget_mb=1000, refresh_s=60)
    cache.get("prod")
    resolver.set_alias("prod", "b")
    assert cache.peek("prod").ref.id == "a"
    assert cache.get("prod").ref.id == "a"
    cache.close()


# --- helpers --------------------------------------------------------------------------------------


def test_bradley_terry_matrix():
    matrix = np.array(bradley_terry_matrix([1.0, 0.0, -800.0]))
    assert matrix[0, 1] == pytest.approx(1 / (1 + np.exp(-1.0)))
    assert np.allclose(np.diag(matrix), 0.5)
    assert np.allclose(matrix + matrix.T, 1.0)
    assert matrix[2, 0] == 0.0, "large differences saturate without overflow"


def test_split_conversation():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert split_conversation(messages) == ([messages[0]], [messages[1]])
    with pytest.raises(ValueError, match="must have role 'assistant'"):
        split_conversation(list(reversed(messages)))
    with pytest.raises(ValueError, match="at least 2 messages"):
        split_conversation(messages[1:])
