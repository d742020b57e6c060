"""The job commands' config loading: ${VAR} expansion of shipped configs and --set overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ml.cli import apply_overrides, load_config_file
from ml.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_study_config_loads_with_seed_override():
    data = load_config_file(ROOT / "configs" / "study" / "cpu" / "mpnet" / "us_history_textbook__us_history_fiction.yaml")
    data = apply_overrides(data, ["student.seed=3", "eval.bootstrap_samples=200"])
    cfg = PipelineConfig.model_validate(data)
    assert cfg.student.seed == 3
    assert cfg.eval.bootstrap_samples == 200
    assert cfg.arm_student(cfg.arms[1]).anchor.is_auto
    assert cfg.source_validation_fraction == 0.2


def test_overrides_parse_yaml_values():
    data = apply_overrides({"student": {"model": "m"}}, ["student.anchor.lambda=auto", "student.anchor.lambda_grid=[0, 0.5]", "name=x"])
    assert data == {"student": {"model": "m", "anchor": {"lambda": "auto", "lambda_grid": [0, 0.5]}}, "name": "x"}


@pytest.mark.parametrize("item, message", [("student.seed", "expected KEY=VALUE"), ("name.sub=1", "name is not a mapping")])
def test_bad_override_names_the_problem(item, message):
    with pytest.raises(SystemExit, match=message):
        apply_overrides({"name": "x", "student": {}}, [item])


def test_loading_a_config_leaves_the_environment_alone(monkeypatch):
    monkeypatch.delenv("W2S_DATA_DIR", raising=False)
    monkeypatch.delenv("W2S_MODEL_DIR", raising=False)
    data = load_config_file(ROOT / "configs" / "quick" / "us_history_textbook__us_history_fiction.yaml")
    assert data["source"]["train"].startswith("../shared/data/")
    # The worker settings read these variables as allowed folders, so loading must not set them.
    assert "W2S_DATA_DIR" not in os.environ
    assert "W2S_MODEL_DIR" not in os.environ


def test_missing_config_file_is_named():
    with pytest.raises(SystemExit, match="config file nosuch.yaml not found"):
        load_config_file("nosuch.yaml")
