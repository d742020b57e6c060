"""Choosing the anchor weight λ without target labels (`anchor.lambda = "auto"`).

A user deploying a reward model has no labels for the shift it will meet, so λ is chosen from source
data and the pretrained model alone. Every candidate λ of the arm's grid is trained on the same
weak labels. Each is then scored on a gold-labelled validation split held out of source split B.

Rule: let `best` be the highest validation accuracy among the candidates and `tol` the tolerance
(one bootstrap standard error of `best`, over prompts, unless the config gives one). The chosen λ is
the largest candidate with accuracy ≥ best − tol. A larger λ keeps the representations nearer the
pretrained ones, which is what the method expects to transfer. The rule takes as much of it as the
source data shows to cost nothing measurable in distribution.

The stage writes `selection.json` (every candidate's accuracy, interval and drift, the chosen λ and
the reason) and a `model` folder with the chosen candidate's files, so later stages read the arm's
model at the same path as any other arm's.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ml.config import SelectLambdaConfig
from ml.context import RunContext
from ml.data import read_preferences
from ml.metrics import bootstrap_accuracy_ci, bootstrap_standard_error, mean_cosine
from ml.modeling import default_device, load_reward_model, resolve_precision
from ml.scoring import score_pairs
from ml.train import TRAINING_LOG_FILE

logger = logging.getLogger(__name__)

SELECTION_FILE = "selection.json"
MODEL_DIR = "model"


def choose_lambda(candidates: list[dict[str, Any]], tolerance: float | None) -> tuple[dict[str, Any], str]:
    """Apply the rule to candidates carrying `lambda`, `accuracy` and `standard_error`; return (chosen, reason)."""
    best = max(candidates, key=lambda c: (c["accuracy"], -c["lambda"]))
    tol = best["standard_error"] if tolerance is None else tolerance
    tol_text = f"one standard error ({tol:.3f})" if tolerance is None else f"the configured tolerance ({tol:.3f})"
    eligible = [c for c in candidates if c["accuracy"] >= best["accuracy"] - tol - 1e-12]
    chosen = max(eligible, key=lambda c: c["lambda"])
    if chosen is best:
        reason = (
            f"lambda={chosen['lambda']:g} has the best source validation accuracy ({best['accuracy']:.3f}), and no larger "
            f"lambda is within {tol_text} of it"
        )
    else:
        reason = (
            f"lambda={chosen['lambda']:g} is the largest candidate whose source validation accuracy "
            f"({chosen['accuracy']:.3f}) is within {tol_text} of the best ({best['accuracy']:.3f} at lambda={best['lambda']:g})"
        )
    return chosen, reason


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # another file system, or links not allowed: copy the bytes instead
        shutil.copy2(source, destination)


def _place_chosen_model(out_dir: Path, chosen: Path) -> Path:
    """Make `out_dir/model` a plain folder with the chosen candidate's files, replaced atomically.

    The files are hard links where the file system allows them, so the copy costs no space, and
    `cp -r` or an upload of the folder copies ordinary files. The candidate's training log goes
    beside it, so the report draws the arm's training curve.
    """
    final = out_dir / MODEL_DIR
    staging = out_dir / f".{MODEL_DIR}.staging"
    previous = out_dir / f".{MODEL_DIR}.previous"
    for leftover in (staging, previous):
        if leftover.is_symlink() or leftover.is_file():
            leftover.unlink()
        elif leftover.exists():
            shutil.rmtree(leftover)
    shutil.copytree(chosen, staging, copy_function=_link_or_copy)
    if final.is_symlink():
        final.unlink()
    elif final.exists():
        final.rename(previous)
    staging.rename(final)
    if previous.exists():
        shutil.rmtree(previous)
    log = chosen.parent / TRAINING_LOG_FILE
    if log.is_file():
        shutil.copy2(log, out_dir / TRAINING_LOG_FILE)
    return final


def select_lambda(cfg: SelectLambdaConfig, ctx: RunContext) -> dict[str, Any]:
    """Score every candidate on the source validation pairs, apply the rule, write selection.json."""
    out_dir = ctx.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs, _ = read_preferences(cfg.validation)
    if any(p.label is not None for p in pairs):
        raise ValueError(f"{cfg.validation} carries weak 'label' fields; lambda is chosen on gold-labelled pairs only")
    prompt_ids = [p.prompt_id for p in pairs]
    device = default_device()
    precision = resolve_precision(cfg.precision, device)

    reference = None
    if cfg.pretrained:
        pretrained = load_reward_model(cfg.pretrained, device=device, **ctx.model_options())
        reference = score_pairs(pretrained, pairs, cfg.batch_size, cfg.max_length, precision, layers=[-1], desc="pretrained on validation")
        del pretrained
        gc.collect()

    rows = []
    for index, candidate in enumerate(sorted(cfg.candidates, key=lambda c: c.lam)):
        ctx.check_stop()
        rm = load_reward_model(candidate.model, device=device, **ctx.model_options())
        result = score_pairs(
            rm, pairs, cfg.batch_size, cfg.max_length, precision,
            layers=[-1] if reference is not None else None, desc=f"{cfg.name} lambda={candidate.lam:g} on validation",
        )
        correct = np.asarray(result.chosen) > np.asarray(result.rejected)
        accuracy, low, high = bootstrap_accuracy_ci(correct, prompt_ids, n_samples=cfg.bootstrap_samples, seed=cfg.seed)
        row = {
            "lambda": candidate.lam,
            "model": candidate.model,
            "accuracy": accuracy,
            "interval": [low, high],
            "standard_error": bootstrap_standard_error(correct, prompt_ids, cfg.bootstrap_samples, cfg.seed),
            "drift_cos": None,
        }
        if reference is not None:
            row["drift_cos"] = mean_cosine(result.pooled_chosen[0], reference.pooled_chosen[0])
        rows.append(row)
        ctx.progress("select_lambda", index + 1, len(cfg.candidates), {"lambda": candidate.lam, "accuracy": accuracy})
        del rm
        gc.collect()

    chosen, reason = choose_lambda(rows, cfg.tolerance)
    selection = {
        "arm": cfg.name,
        "rule": "largest lambda with validation accuracy >= best - tolerance",
        "tolerance": cfg.tolerance,
        "lambda": chosen["lambda"],
        "model": chosen["model"],
        "reason": reason,
        "validation": {"path": cfg.validation, "pairs": len(pairs), "prompts": len(set(prompt_ids)), "max_length": cfg.max_length},
        "candidates": rows,
    }
    (out_dir / SELECTION_FILE).write_text(json.dumps(selection, indent=2) + "\n")
    model_dir = _place_chosen_model(out_dir, Path(chosen["model"]))
    logger.info("%s: %s", cfg.name, reason)
    return {"selection": str(out_dir / SELECTION_FILE), "model_dir": str(model_dir), "lambda": chosen["lambda"], "reason": reason}
