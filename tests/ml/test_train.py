"""Anchored training and weak labelling on real GENIES slices with MiniLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ml.anchor import AnchorCache, FrozenEncoder
from ml.config import AnchorConfig, DatasetSpec, TrainConfig, WeakLabelConfig
from ml.context import JobCancelled, RunContext
from ml.data import read_preferences, split_by_prompt
from ml.modeling import default_device, load_reward_model
from ml.render import Renderer
from ml.train import AnchoredRewardTrainer, PairCollator, PairDataset, encode_pairs, load_limited, train_reward_model
from ml.weak import weak_label

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pairs(genies: Path):
    return load_limited(str(genies / "us_history_textbook" / "train.json.gz"), max_prompts=6)


def _config(model: Path, **overrides) -> TrainConfig:
    base = dict(model=str(model), max_steps=3, batch_size=4, max_length=48, precision="fp32", save_steps=1000, seed=3)
    base.update(overrides)
    return TrainConfig(**base)


def _weights(model_dir: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def test_zero_lambda_reproduces_naive_training(minilm_dir, pairs, tmp_path):
    cfg = _config(minilm_dir, anchor=AnchorConfig(lam=0.0))
    naive = train_reward_model(cfg, pairs, "gold", RunContext(tmp_path / "naive"), "naive", anchor_mode="off", progress_bars=False)
    zero = train_reward_model(cfg, pairs, "gold", RunContext(tmp_path / "zero"), "zero", anchor_mode="cached", progress_bars=False)

    assert any("drift" in record for record in zero["history"]), "the λ = 0 run still measures drift"
    assert not any("drift" in record for record in naive["history"])
    naive_weights, zero_weights = _weights(naive["model_dir"]), _weights(zero["model_dir"])
    assert naive_weights.keys() == zero_weights.keys()
    for name in naive_weights:
        assert torch.equal(naive_weights[name], zero_weights[name]), name


def test_anchoring_changes_training(minilm_dir, pairs, tmp_path):
    settings = dict(learning_rate=2e-4, max_steps=5, warmup_ratio=0.0)
    cfg = _config(minilm_dir, anchor=AnchorConfig(lam=20.0), **settings)
    anchored = train_reward_model(cfg, pairs, "gold", RunContext(tmp_path / "a"), "anchored", progress_bars=False)
    plain = train_reward_model(_config(minilm_dir, **settings), pairs, "gold", RunContext(tmp_path / "p"), "plain", progress_bars=False)
    drift_anchored = [r["drift"] for r in anchored["history"] if "drift" in r]
    drift_plain = [r["drift"] for r in plain["history"] if "drift" in r]

    assert drift_anchored[1] == pytest.approx(drift_plain[1]), "one step in, the runs have seen the same gradients"
    assert drift_anchored[-1] < 0.8 * drift_plain[-1]


def _trainer(model, cfg, dataset, source, tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False)
    return AnchoredRewardTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=PairCollator(0), train_config=cfg, anchor_source=source
    )


@pytest.mark.parametrize("distance", ["relative_l2", "cosine"])
def test_cached_and_uncached_anchor_give_same_loss(minilm_dir, pairs, tmp_path, distance):
    cfg = _config(minilm_dir, anchor=AnchorConfig(lam=2.0, distance=distance, layers=[-1, -3]))
    rm = load_reward_model(minilm_dir)
    renderer = Renderer(rm.tokenizer, cfg.max_length)
    chosen, rejected = encode_pairs(renderer, pairs[:8])
    dataset = PairDataset(chosen, rejected, [1.0] * len(chosen))
    cache = AnchorCache.build(rm.model, chosen + rejected, cfg.anchor.layers, rm.tokenizer.pad_token_id, "fp32")
    frozen = FrozenEncoder(rm.model, cfg.anchor.layers, "fp32")

    torch.manual_seed(0)
    with torch.no_grad():
        for param in rm.model.parameters():
            param.add_(1e-3 * torch.randn_like(param))  # move the student away from the pretrained weights

    batch = PairCollator(rm.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    cached_loss = _trainer(rm.model, cfg, dataset, cache, tmp_path / "c").compute_loss(rm.model, batch)
    uncached_trainer = _trainer(rm.model, cfg, dataset, frozen, tmp_path / "u")
    uncached_loss = uncached_trainer.compute_loss(rm.model, batch)
    plain_loss = _trainer(rm.model, cfg.model_copy(update={"anchor": AnchorConfig(lam=0.0)}), dataset, None, tmp_path / "n").compute_loss(
        rm.model, batch
    )

    assert cached_loss.item() == pytest.approx(uncached_loss.item(), rel=1e-5)
    assert cached_loss.item() > plain_loss.item(), "the anchor term is non-zero after the weights moved"


def test_cache_saved_and_reused(minilm_dir, pairs, tmp_path):
    rm = load_reward_model(minilm_dir)
    chosen, rejected = encode_pairs(Renderer(rm.tokenizer, 48), pairs[:4])
    cache = AnchorCache.build(rm.model, chosen + rejected, [-1], rm.tokenizer.pad_token_id, "fp32")
    cache.save(tmp_path / "cache.safetensors")
    loaded = AnchorCache.load(tmp_path / "cache.safetensors")

    assert loaded.covers(chosen + rejected, [-1])
    assert not loaded.covers(chosen + rejected, [-2])
    longer, _ = encode_pairs(Renderer(rm.tokenizer, 64), pairs[:4])
    assert not loaded.covers(longer, [-1]), "a different truncation is a different key"
    assert torch.equal(loaded.states[0], cache.states[0])


def test_cancel_stops_between_steps(minilm_dir, pairs, tmp_path):
    calls = {"steps": 0}

    def should_stop() -> bool:
        calls["steps"] += 1
        return calls["steps"] >= 2

    ctx = RunContext(tmp_path / "run", should_stop=should_stop)
    with pytest.raises(JobCancelled):
        train_reward_model(_config(minilm_dir, max_steps=10), pairs, "gold", ctx, "cancelled", progress_bars=False)
    assert not (tmp_path / "run" / "model").exists()
    assert calls["steps"] == 2


def test_weak_labels_come_from_model_that_never_saw_b(minilm_dir, genies, tmp_path):
    source = DatasetSpec.genies(genies, "us_history_textbook", max_train_prompts=8, max_test_prompts=4)
    cfg = WeakLabelConfig(
        source=source,
        weak=_config(minilm_dir, max_steps=2),
        split_seed=5,
        report_eval_sets=False,
    )
    outputs = weak_label(cfg, RunContext(tmp_path, extra={"progress_bars": False}))

    labelled, _ = read_preferences(outputs["labels"])
    all_pairs = load_limited(source.train, max_prompts=8)
    split_a, split_b = split_by_prompt(all_pairs, fraction=0.5, seed=5)
    metadata = json.loads((Path(outputs["model_dir"]) / "w2s_metadata.json").read_text())

    assert [p.source_id for p in labelled] == [p.source_id for p in split_b]
    assert set(metadata["train_prompt_ids"]) == {p.prompt_id for p in split_a}
    assert not set(metadata["train_prompt_ids"]) & {p.prompt_id for p in labelled}
    assert all(0.0 <= p.label <= 1.0 for p in labelled)
    assert len({round(p.label, 6) for p in labelled}) > 1, "soft labels, not a constant"
    assert 0.0 <= outputs["metrics"]["weak_accuracy_b"] <= 1.0


def test_weak_labels_missing_in_data_rejected(minilm_dir, genies, tmp_path):
    cfg = WeakLabelConfig(source=DatasetSpec.genies(genies, "arc_easy", max_train_prompts=4), labeller="data")
    with pytest.raises(ValueError, match="no 'label' field"):
        weak_label(cfg, RunContext(tmp_path))


def test_device_default_is_cpu_here():
    assert default_device().type in ("cpu", "cuda")


def test_rerun_with_changed_settings_rejected(minilm_dir, pairs, tmp_path):
    cfg = _config(minilm_dir, max_steps=1)
    first = train_reward_model(cfg, pairs, "gold", RunContext(tmp_path), "naive", anchor_mode="off", progress_bars=False)
    again = train_reward_model(cfg, pairs, "gold", RunContext(tmp_path), "naive", anchor_mode="off", progress_bars=False)
    assert again["model_dir"] == first["model_dir"]

    with pytest.raises(ValueError, match=r"trained with other settings \(seed: 3 -> 4\); write to another output folder"):
        train_reward_model(_config(minilm_dir, max_steps=1, seed=4), pairs, "gold", RunContext(tmp_path), "naive", anchor_mode="off", progress_bars=False)
