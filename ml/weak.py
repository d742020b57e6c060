"""Stage 1 of weak-to-strong: weak soft labels for split B of the source train set.

The source train prompts are split in two by a seeded prompt-level split: A (gold labels) and B.
A weak reward model trains on A only and labels B with

    p = P(chosen ≻ rejected) = σ(r_c − r_r),

so no label on B comes from a model that saw B. The labelled pairs go to `labels.jsonl` (TRL explicit
format with a `label` field), which the student trainer reads. With `validation_fraction` > 0, a
share of B's prompts is held out first and written with gold labels to `validation.jsonl`, the
source validation data that lambda='auto' is chosen on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ml.config import WeakLabelConfig
from ml.context import RunContext
from ml.data import PreferencePair, fingerprint, split_by_prompt, write_pairs_jsonl
from ml.metrics import pairwise_accuracy, preference_probs
from ml.modeling import default_device, load_reward_model, resolve_precision
from ml.scoring import score_pairs
from ml.train import load_limited, train_reward_model

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.jsonl"
VALIDATION_FILE = "validation.jsonl"


def _with_labels(pairs: list[PreferencePair], probs: np.ndarray) -> list[PreferencePair]:
    return [
        PreferencePair(
            prompt=p.prompt,
            chosen=p.chosen,
            rejected=p.rejected,
            prompt_id=p.prompt_id,
            source_id=p.source_id,
            label=float(np.clip(prob, 0.0, 1.0)),
            weight=p.weight,
            chosen_score=p.chosen_score,
            rejected_score=p.rejected_score,
        )
        for p, prob in zip(pairs, probs, strict=True)
    ]


def weak_label(cfg: WeakLabelConfig, ctx: RunContext) -> dict[str, Any]:
    """Label split B with a weak model (trained on A, or given), or take labels from the data."""
    out_dir = ctx.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    source = load_limited(cfg.source.train, cfg.source.format, cfg.source.max_train_prompts)

    if cfg.labeller == "data":
        missing = [p.source_id for p in source if p.label is None]
        if missing:
            raise ValueError(
                f"labeller='data' but {len(missing)} pairs of {cfg.source.train} have no 'label' field "
                f"(first: {missing[0]}); add labels or use labeller='train'"
            )
        labelled = source
        write_pairs_jsonl(labelled, out_dir / LABELS_FILE)
        agreement = float(np.mean([p.label > 0.5 for p in labelled]))
        return {"labels": str(out_dir / LABELS_FILE), "model_dir": None, "metrics": {"weak_accuracy_b": agreement, "pairs_b": len(labelled)}}

    split_a, split_b = split_by_prompt(source, fraction=cfg.split_fraction, seed=cfg.split_seed)
    validation: list[PreferencePair] = []
    if cfg.validation_fraction > 0:
        # Held out of B with its gold labels; only the choice of lambda='auto' reads it.
        validation, split_b = split_by_prompt(split_b, fraction=cfg.validation_fraction, seed=cfg.split_seed + 1)
        if not validation or not split_b:
            raise ValueError(
                f"validation_fraction={cfg.validation_fraction} leaves {len(validation)} validation and {len(split_b)} "
                f"training pairs in split B of {cfg.source.name}; use more source prompts or another fraction"
            )
        write_pairs_jsonl(validation, out_dir / VALIDATION_FILE)
    logger.info(
        "split %s: A %d pairs (gold, weak model), B %d pairs (weak labels), %d validation pairs (gold)",
        cfg.source.name, len(split_a), len(split_b), len(validation),
    )

    if cfg.labeller == "train":
        trained = train_reward_model(
            cfg.weak,
            split_a,
            labels="gold",
            ctx=ctx,
            stage="weak",
            heldout=load_limited(cfg.source.test, cfg.source.format, cfg.source.max_test_prompts) if cfg.source.test else [],
            metadata={
                "name": "weak",
                "data": [{"path": cfg.source.train, "sha256": fingerprint(cfg.source.train), "split": "A"}],
                "split": {"fraction": cfg.split_fraction, "seed": cfg.split_seed},
            },
            # The weak model's own drift is of no interest, so its anchor cache pass is skipped.
            anchor_mode="cached" if cfg.weak.anchor.lam > 0 else "off",
            progress_bars=ctx.extra.get("progress_bars", True),
        )
        model_dir = trained["model_dir"]
        max_length, precision = cfg.weak.max_length, cfg.weak.precision
    else:
        model_dir = cfg.labeller_model
        max_length, precision = cfg.eval.max_length or 512, cfg.eval.precision

    ctx.check_stop()
    rm = load_reward_model(model_dir, device=default_device(), **ctx.model_options())
    trained_on = set(rm.metadata.get("train_prompt_ids", []))
    overlap = trained_on & {p.prompt_id for p in split_b}
    if overlap:
        raise RuntimeError(
            f"the weak labeller was trained on {len(overlap)} prompts of split B; "
            "weak labels must come from a model that never saw B (check split_seed and the labeller)"
        )
    precision = resolve_precision(precision, rm.device)
    scores = score_pairs(rm, split_b, batch_size=cfg.eval.batch_size, max_length=max_length, precision=precision, progress=True, desc="weak labels")
    probs = preference_probs(scores.chosen, scores.rejected)
    labelled = _with_labels(split_b, probs)
    write_pairs_jsonl(labelled, out_dir / LABELS_FILE)

    metrics = {
        "weak_accuracy_b": pairwise_accuracy(scores.chosen, scores.rejected),
        "mean_label": float(np.mean(probs)),
        "pairs_a": len(split_a),
        "pairs_b": len(split_b),
        "pairs_validation": len(validation),
        "truncated_b": scores.n_truncated,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    ctx.progress("weak", 1, 1, metrics)
    logger.info("weak labels: accuracy on B %.3f over %d pairs", metrics["weak_accuracy_b"], len(split_b))

    if cfg.report_eval_sets:
        metrics["eval"] = _accuracy_on_eval_sets(rm, cfg, max_length, precision)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {"labels": str(out_dir / LABELS_FILE), "model_dir": str(model_dir), "metrics": metrics}


def _accuracy_on_eval_sets(rm, cfg: WeakLabelConfig, max_length: int, precision: str) -> dict[str, float]:
    sets = [(cfg.source.name, cfg.source.test, cfg.source.format, cfg.source.max_test_prompts)]
    sets += [(t.name, t.test, t.format, t.max_test_prompts) for t in cfg.targets]
    accuracies = {}
    for name, path, fmt, limit in sets:
        if path is None:
            continue
        pairs = load_limited(path, fmt, limit)
        scores = score_pairs(rm, pairs, batch_size=cfg.eval.batch_size, max_length=max_length, precision=precision, desc=name)
        accuracies[name] = pairwise_accuracy(scores.chosen, scores.rejected)
    return accuracies


