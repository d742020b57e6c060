"""anchor.lambda = "auto": the selection rule and the pipeline plan (tests/bench/test_study.py runs it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ml.config import PipelineConfig, StudentTrainConfig
from ml.jobs import plan_pipeline
from ml.select import choose_lambda


def _candidate(lam: float, accuracy: float, se: float = 0.02) -> dict:
    return {"lambda": lam, "accuracy": accuracy, "standard_error": se}


def test_rule_takes_largest_lambda_within_one_standard_error():
    rows = [_candidate(0.0, 0.80), _candidate(0.03, 0.81), _candidate(0.1, 0.795), _candidate(0.3, 0.70)]
    chosen, reason = choose_lambda(rows, tolerance=None)
    # best 0.81 ± 0.02: 0.1 (0.795) is within it, 0.3 (0.70) is not.
    assert chosen["lambda"] == 0.1
    assert "0.810 at lambda=0.03" in reason
    assert "one standard error" in reason


def test_rule_fixed_tolerance():
    rows = [_candidate(0.0, 0.80), _candidate(0.1, 0.78), _candidate(0.3, 0.77)]
    assert choose_lambda(rows, tolerance=0.0)[0]["lambda"] == 0.0
    assert choose_lambda(rows, tolerance=0.025)[0]["lambda"] == 0.1
    assert choose_lambda(rows, tolerance=0.05)[0]["lambda"] == 0.3
    chosen, reason = choose_lambda([_candidate(0.0, 0.6), _candidate(1.0, 0.9)], tolerance=0.01)
    assert chosen["lambda"] == 1.0
    assert "has the best source validation accuracy" in reason


def _pipeline(genies: Path, minilm: Path, **changes) -> PipelineConfig:
    data = {
        "name": "auto-lambda",
        "source": {
            "name": "us_history_textbook",
            "train": str(genies / "us_history_textbook" / "train.json.gz"),
            "test": str(genies / "us_history_textbook" / "test.json.gz"),
            "max_train_prompts": 30,
            "max_test_prompts": 10,
        },
        "targets": [{"name": "us_history_fiction", "test": str(genies / "us_history_fiction" / "test.json.gz"), "max_test_prompts": 10}],
        "weak": {"model": str(minilm), "max_steps": 2, "max_length": 64, "batch_size": 8, "precision": "fp32"},
        "student": {"model": str(minilm), "max_steps": 2, "max_length": 64, "batch_size": 8, "precision": "fp32"},
        "arms": [
            {"name": "naive", "anchor": {"lambda": 0}},
            {"name": "anchored", "anchor": {"lambda": "auto", "lambda_grid": [0, 0.1, 1.0]}},
            {"name": "ceiling", "labels": "gold", "anchor": {"lambda": 0}},
        ],
        "eval": {"batch_size": 16, "max_length": 64, "bootstrap_samples": 200, "candidates": True},
    }
    data.update(changes)
    return PipelineConfig.model_validate(data)


def test_plan_trains_each_distinct_student_once(genies, minilm_dir, tmp_path):
    cfg = _pipeline(genies, minilm_dir)
    stages = plan_pipeline(cfg, tmp_path)
    names = [stage.name for stage in stages]
    # lambda=0 of the auto arm is the naive arm: trained once, under the naive arm's name.
    assert names == [
        "weak", "train:naive", "train:anchored[lambda=0.1]", "train:anchored[lambda=1]",
        "select:anchored", "train:ceiling", "report",
    ]
    select = stages[names.index("select:anchored")].config
    assert [(c.lam, Path(c.model).parent.name) for c in select.candidates] == [
        (0.0, "naive"), (0.1, "anchored-lambda-0.1"), (1.0, "anchored-lambda-1"),
    ]
    assert cfg.source_validation_fraction == 0.2
    report_models = stages[-1].config.models
    assert set(report_models) == {"weak", "naive", "anchored", "ceiling", "anchored[lambda=0.1]", "anchored[lambda=1]"}


def test_auto_lambda_config_errors_name_the_field(genies, minilm_dir):
    with pytest.raises(ValidationError, match="validation_fraction is 0 but an arm has anchor.lambda='auto'"):
        _pipeline(genies, minilm_dir, validation_fraction=0.0)
    with pytest.raises(ValidationError, match="lambda must be a number from 0 to 1000, or 'auto'; got -1"):
        _pipeline(genies, minilm_dir, arms=[{"name": "a", "anchor": {"lambda": -1}}])
    with pytest.raises(ValidationError, match="needs a pipeline"):
        StudentTrainConfig.model_validate({"data": "x.jsonl", "student": {"model": "m", "anchor": {"lambda": "auto"}}})


def test_chosen_model_placed_as_plain_folder(tmp_path):
    from ml.select import _place_chosen_model

    for lam in ("0", "1"):
        candidate = tmp_path / f"anchored-lambda-{lam}"
        (candidate / "model").mkdir(parents=True)
        (candidate / "model" / "model.safetensors").write_text(f"weights {lam}")
        (candidate / "training_log.json").write_text(f"[{lam}]")
    arm = tmp_path / "anchored"
    arm.mkdir()

    placed = _place_chosen_model(arm, tmp_path / "anchored-lambda-0" / "model")
    # A re-run that chooses another lambda replaces the folder.
    placed = _place_chosen_model(arm, tmp_path / "anchored-lambda-1" / "model")

    assert placed == arm / "model"
    assert placed.is_dir()
    assert not placed.is_symlink()
    assert (placed / "model.safetensors").read_text() == "weights 1"
    assert (arm / "training_log.json").read_text() == "[1]"
    assert sorted(p.name for p in arm.iterdir()) == ["model", "training_log.json"]
