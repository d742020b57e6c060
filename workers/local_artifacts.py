"""Finishing touches on a job's local output folder: manifest, checkpoint pruning, cleanup.

`ml/` writes each model to `<dir>.tmp` and renames it to `<dir>` once complete, so a model
directory that exists with its `w2s_metadata.json` is whole. The manifest written here follows the
same rule: a temporary file renamed into place.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

from workers.db import METADATA_FILE

logger = logging.getLogger(__name__)

MANIFEST_FILE = "job.json"
# Optimizer state saved by transformers.Trainer in each checkpoint (`optimizer.pt`, or
# `optimizer.bin` when saved through accelerate). AdamW keeps two moments per weight, so this is
# about twice the model size: over 1 GB for MPNet-base.
OPTIMIZER_STATE_FILES = ("optimizer.pt", "optimizer.bin")


def json_safe(value: Any) -> Any:
    """Convert outputs to plain JSON: paths to strings, NaN and infinity to None."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy and torch scalars
        return json_safe(value.item())
    return str(value)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file in the same folder and rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def find_checkpoints(out_dir: Path) -> list[Path]:
    return sorted(path for path in out_dir.rglob("checkpoint-*") if path.is_dir())


def remove_optimizer_state(out_dir: Path) -> int:
    """Delete the optimizer state from every checkpoint under `out_dir`; return the bytes freed."""
    freed = 0
    for checkpoint in find_checkpoints(out_dir):
        for name in OPTIMIZER_STATE_FILES:
            file = checkpoint / name
            if file.is_file():
                freed += file.stat().st_size
                file.unlink()
    return freed


def remove_checkpoints(out_dir: Path) -> int:
    """Delete every checkpoint under `out_dir`, so the next attempt trains from the start."""
    checkpoints = find_checkpoints(out_dir)
    for checkpoint in checkpoints:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return len(checkpoints)


def complete_model_dir(out_dir: Path) -> Path | None:
    """Return `<out_dir>/model` if it contains a complete model (its metadata file exists)."""
    model_dir = out_dir / "model"
    return model_dir if (model_dir / METADATA_FILE).is_file() else None


def remove_tree(path: Path, artifact_root: Path) -> bool:
    """Delete a job folder, refusing any path outside the artifact root."""
    path = path.resolve()
    if not path.is_relative_to(artifact_root.resolve()) or path == artifact_root.resolve():
        logger.error("not deleting %s: it is not a job folder under the artifact root %s", path, artifact_root)
        return False
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    return True
