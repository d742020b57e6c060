"""Shared fixtures: where the real data and the prepared model directories live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("W2S_SHARED_DATA", ROOT.parent / "shared" / "data"))
MODELS_DIR = Path(os.environ.get("W2S_MODEL_DIR", ROOT / "models"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real data folder not found at {SHARED_DATA}; set W2S_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def genies(shared_data: Path) -> Path:
    return shared_data / "genies"


def _model_dir(name: str) -> Path:
    path = MODELS_DIR / name
    if not (path / "config.json").is_file():
        pytest.fail(f"model directory {path} missing; run `w2s models prepare --dest {MODELS_DIR}`")
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return _model_dir("all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    return _model_dir("SmolLM2-135M-Instruct")
