"""Batch scoring of a whole dataset file as a job: one reward per response, for best-of-n and filtering.

The file is read with `ml.data.read_preferences` (trl, hh or ranked rows). Every distinct response
of a prompt (chosen and rejected sides of its pairs) is scored once, through the same engine,
rendering policy, normalization and OOD statistic as the scoring service. The results file is JSON
Lines with one row per prompt:

    {"prompt_id": "...", "prompt": ..., "best": 0,
     "responses": [{"response": ..., "reward": 1.2, "normalized": 0.4, "ood_distance": 18.1,
                    "ood": false, "truncated": false, "tokens": 57}, ...]}

NOTE: unscored best-of-n candidates (a prompt with a plain list of responses) are not a format
`ml.data` reads, because the ranked format needs a score per response to form pairs.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ml.config import DataFormat, Precision
from ml.context import RunContext
from ml.data import read_preferences
from ml.serving.config import ServingConfig
from ml.serving.engine import ScoringEngine
from ml.serving.resolver import StaticResolver

logger = logging.getLogger(__name__)

RESULTS_FILE = "rewards.jsonl"
# Items per engine request: progress and the cancel flag are checked between requests.
CHUNK_ITEMS = 512
MODEL_NAME = "model"


class ScoreDatasetConfig(BaseModel):
    """Job 'score_dataset': score every response of a dataset file with one reward model."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(description="Reward model directory (or hub name) to score with.")
    data: str = Field(description="Dataset file (JSONL, JSON, Parquet, optionally .gz) in a format ml.data reads.")
    format: DataFormat = Field("auto", description="Reader to use; 'auto' detects it from the fields.")
    precision: Precision = Field("auto", description="'bf16' autocast, 'fp32', or 'auto' (bf16 where the hardware has it).")
    max_length: int | None = Field(
        None, ge=8, le=8192, description="Tokens per sequence; unset uses the model's training max_length."
    )
    token_budget: int = Field(8192, ge=64, description="Padded tokens (rows x longest row) per forward pass.")
    output: str = Field(RESULTS_FILE, pattern=r"^[\w.-]+$", description="Results file name inside the job folder.")


def _key(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


def collect_responses(pairs: list[Any]) -> list[dict[str, Any]]:
    """Group the distinct responses of every prompt, in file order."""
    prompts: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        entry = prompts.setdefault(pair.prompt_id, {"prompt_id": pair.prompt_id, "prompt": pair.prompt, "responses": {}})
        for response in (pair.chosen, pair.rejected):
            entry["responses"].setdefault(_key(response), response)
    return [
        {"prompt_id": entry["prompt_id"], "prompt": entry["prompt"], "responses": list(entry["responses"].values())}
        for entry in prompts.values()
    ]


def score_dataset(config: ScoreDatasetConfig, ctx: RunContext) -> dict[str, Any]:
    """Score every response of `config.data` and write the results file into `ctx.out_dir`."""
    pairs, report = read_preferences(config.data, format=config.format)
    report.log(logger)
    prompts = collect_responses(pairs)
    items = [(entry["prompt"], response) for entry in prompts for response in entry["responses"]]
    if not items:
        raise ValueError(f"{config.data}: no responses to score; the import report lists the skipped rows")

    serving = ServingConfig(
        token_budget=config.token_budget,
        max_wait_ms=0.0,
        max_queue=max(CHUNK_ITEMS, 1),
        precision=config.precision,
        max_length=config.max_length,
        max_request_tokens=CHUNK_ITEMS * 8192,
    )
    engine = ScoringEngine(StaticResolver({MODEL_NAME: config.model}), serving)
    scored = []
    try:
        model_info: dict[str, Any] = {}
        for start in range(0, len(items), CHUNK_ITEMS):
            ctx.check_stop()
            result = engine.score_sync(MODEL_NAME, items[start : start + CHUNK_ITEMS])
            scored.extend(result.items)
            model_info = result.model
            ctx.progress("score", len(scored), len(items), {})
    finally:
        engine.close()

    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.out_dir / config.output
    cursor = 0
    handle = tempfile.NamedTemporaryFile("w", dir=ctx.out_dir, prefix=f".{config.output}.", delete=False, encoding="utf-8")
    try:
        with handle:
            for entry in prompts:
                rows = []
                for response in entry["responses"]:
                    rows.append({"response": response, **vars(scored[cursor])})
                    cursor += 1
                best = max(range(len(rows)), key=lambda index: rows[index]["reward"])
                line = {"prompt_id": entry["prompt_id"], "prompt": entry["prompt"], "best": best, "responses": rows}
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise

    rewards = [item.reward for item in scored]
    outputs = {
        "results": config.output,
        "results_path": str(path),
        "prompts": len(prompts),
        "responses": len(scored),
        "truncated": sum(item.truncated for item in scored),
        "ood": sum(bool(item.ood) for item in scored),
        "mean_reward": sum(rewards) / len(rewards),
        "model": {key: model_info.get(key) for key in ("id", "base_model", "precision", "max_length", "normalization")},
    }
    logger.info(
        "scored %d responses of %d prompts from %s into %s (%d truncated, %d flagged OOD)",
        outputs["responses"],
        outputs["prompts"],
        config.data,
        path,
        outputs["truncated"],
        outputs["ood"],
    )
    return outputs
