"""Batch scoring of a dataset file (`ml.serving.batch.score_dataset`) with a trained MiniLM reward model."""

from __future__ import annotations

import json

import pytest

from ml.context import JobCancelled, RunContext
from ml.data import write_pairs_jsonl
from ml.serving import ScoringEngine, ServingConfig, StaticResolver
from ml.serving.batch import score_dataset
from ml.serving.config import ScoreDatasetConfig
from ml.train import load_limited
from tests.ml.test_serving import TRAIN_MAX_LENGTH, build_serving_models


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, minilm_dir, genies):
    return build_serving_models(tmp_path_factory.getbasetemp() / "serving-models", minilm_dir, genies)[0]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, genies):
    pairs = load_limited(str(genies / "us_history_textbook" / "test.json.gz"), max_prompts=4)
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    write_pairs_jsonl(pairs, path)
    return path, pairs


def test_score_dataset_writes_one_row_per_prompt(model_dir, data_file, tmp_path):
    path, pairs = data_file
    config = ScoreDatasetConfig(model=str(model_dir), data=str(path), precision="fp32")
    outputs = score_dataset(config, RunContext(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "rewards.jsonl").read_text().splitlines()]

    prompt_ids = list(dict.fromkeys(p.prompt_id for p in pairs))
    assert [row["prompt_id"] for row in rows] == prompt_ids
    assert outputs["prompts"] == len(prompt_ids)
    assert outputs["responses"] == sum(len(row["responses"]) for row in rows)
    assert outputs["model"]["max_length"] == TRAIN_MAX_LENGTH
    for row in rows:
        responses = {r["response"] for r in row["responses"]}
        expected = {p.chosen for p in pairs if p.prompt_id == row["prompt_id"]} | {p.rejected for p in pairs if p.prompt_id == row["prompt_id"]}
        assert responses == expected
        rewards = [r["reward"] for r in row["responses"]]
        assert row["best"] == rewards.index(max(rewards))
        assert all(r["ood"] is not None and r["normalized"] is not None for r in row["responses"])


def test_score_dataset_matches_engine(model_dir, data_file, tmp_path):
    path, pairs = data_file
    score_dataset(ScoreDatasetConfig(model=str(model_dir), data=str(path), precision="fp32"), RunContext(tmp_path))
    row = json.loads((tmp_path / "rewards.jsonl").read_text().splitlines()[0])
    engine = ScoringEngine(StaticResolver({"m": str(model_dir)}), ServingConfig(precision="fp32"))
    try:
        direct = engine.score_sync("m", [(row["prompt"], r["response"]) for r in row["responses"]])
    finally:
        engine.close()
    assert [r["reward"] for r in row["responses"]] == pytest.approx(direct.rewards, abs=1e-5)


def test_score_dataset_stops_when_cancelled(model_dir, data_file, tmp_path):
    path, _ = data_file
    config = ScoreDatasetConfig(model=str(model_dir), data=str(path), precision="fp32")
    with pytest.raises(JobCancelled):
        score_dataset(config, RunContext(tmp_path, should_stop=lambda: True))
    assert not (tmp_path / "rewards.jsonl").exists()


def test_score_dataset_config_rejects_path_as_output():
    with pytest.raises(ValueError, match="output"):
        ScoreDatasetConfig(model="m", data="d.jsonl", output="../escape.jsonl")
