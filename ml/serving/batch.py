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
import uuid
from pathlib import Path
from typing import Any

from ml.context import RunContext
from ml.data import read_preferences
from ml.serving.config import ScoreDatasetConfig, ServingConfig
from ml.serving.engine import ScoringEngine
from ml.serving.resolver import StaticResolver

logger = logging.getLogger(__name__)

# Items per engine request: progress and the cancel flag are checked between requests.
CHUNK_ITEMS = 512
MODEL_NAME = "model"


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


def write_results(path: Path, prompts: list[dict[str, Any]], scored: list[Any]) -> Path:
    """Write one JSON line per prompt; a temporary file is renamed into place, so no partial file remains."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # open() rather than tempfile, so the file gets the umask's permissions and not 0600.
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    cursor = 0
    try:
        with open(temporary, "x", encoding="utf-8") as handle:
            for entry in prompts:
                rows = []
                for response in entry["responses"]:
                    rows.append({"response": response, **vars(scored[cursor])})
                    cursor += 1
                best = max(range(len(rows)), key=lambda index: rows[index]["reward"])
                line = {"prompt_id": entry["prompt_id"], "prompt": entry["prompt"], "best": best, "responses": rows}
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


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

    path = write_results(ctx.out_dir / config.output, prompts, scored)

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
