"""Stage 3: score every model on the in-distribution and shifted test sets and write the report."""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ml.config import EvaluateConfig
from ml.context import RunContext
from ml.data import PreferencePair
from ml.modeling import default_device, load_reward_model, resolve_precision
from ml.render import Renderer
from ml.report import EvalSetInfo, PairScores, build_report, format_table, write_report
from ml.scoring import score_pairs
from ml.train import TRAINING_LOG_FILE, load_limited

logger = logging.getLogger(__name__)

# Pairs per eval set on which representation drift is measured. Drift needs one extra pass of the
# pretrained model; a few hundred sequences pin the mean cosine and CKA down well enough.
DRIFT_PAIRS = 256
LENGTH_PERCENTILE = 95
SCORES_FILE = "scores.npz"


def _text_length(value: str | list[dict[str, Any]]) -> int:
    return len(value) if isinstance(value, str) else sum(len(m.get("content", "")) for m in value)


def eval_length(renderer: Renderer, pairs: list[PreferencePair], cfg: EvaluateConfig) -> tuple[int, int]:
    """Return the eval max length of a set and how many of its pairs exceed it.

    The length is the configured one, or the 95th percentile of the set's token lengths (chosen and
    rejected sequences) up to the cap. A pair counts as truncated when either sequence is longer.
    """
    chosen = np.array([renderer.length(p.prompt, p.chosen) for p in pairs])
    rejected = np.array([renderer.length(p.prompt, p.rejected) for p in pairs])
    if cfg.eval.max_length is not None:
        max_length = cfg.eval.max_length
    else:
        percentile = np.percentile(np.concatenate([chosen, rejected]), LENGTH_PERCENTILE)
        max_length = int(min(cfg.eval.max_length_cap, np.ceil(percentile)))
    return max_length, int(np.sum(np.maximum(chosen, rejected) > max_length))


def _training_curve(model_dir: str) -> list[dict[str, Any]]:
    log_path = Path(model_dir).resolve().parent / TRAINING_LOG_FILE
    if not log_path.is_file():
        return []
    points = []
    for record in json.loads(log_path.read_text()):
        if "drift" in record or "loss" in record:
            points.append({"step": record["step"], "drift": record.get("drift"), "loss": record.get("loss")})
    return points


def _write_scores(path: Path, scores: dict[str, dict[str, PairScores]], infos: dict[str, EvalSetInfo]) -> Path:
    """Save per-pair rewards (`<model>/<set>/chosen|rejected`) and prompt ids (`<set>/prompt_ids`),
    so paired comparisons between any two models can be recomputed later."""
    arrays: dict[str, np.ndarray] = {}
    for model, by_set in scores.items():
        for set_name, pair_scores in by_set.items():
            arrays[f"{model}/{set_name}/chosen"] = np.asarray(pair_scores.r_chosen)
            arrays[f"{model}/{set_name}/rejected"] = np.asarray(pair_scores.r_rejected)
    for set_name, info in infos.items():
        arrays[f"{set_name}/prompt_ids"] = np.asarray(info.prompt_ids)
    np.savez_compressed(path, **arrays)
    return path


def _training_summary(metadata: dict[str, Any]) -> dict[str, Any]:
    """Return the training facts a reader of the report needs: data size, length, precision, loss terms."""
    config = metadata.get("training_config") or {}
    metrics = metadata.get("train_metrics") or {}
    if not config:
        return {"trained_here": False}
    return {
        "base_model": metadata.get("base_model"),
        "labels": metadata.get("labels"),
        "pairs": metrics.get("pairs"),
        "steps": metrics.get("steps"),
        "epochs": config.get("epochs"),
        "max_length": config.get("max_length"),
        "truncated_sequences": metrics.get("truncated_sequences"),
        "precision": metrics.get("precision"),
        "anchor_lambda": (config.get("anchor") or {}).get("lam"),
        "anchor_distance": (config.get("anchor") or {}).get("distance"),
        "l2sp_lambda": config.get("l2sp_lambda"),
        "seed": config.get("seed"),
    }


def evaluate_models(cfg: EvaluateConfig, ctx: RunContext) -> dict[str, Any]:
    """Score each model on the source test set (ID) and every target test set (OOD); write the report."""
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    device = default_device()
    precision = resolve_precision(cfg.eval.precision, device)

    sets: dict[str, tuple[str, list[PreferencePair]]] = {
        cfg.source.name: ("id", load_limited(cfg.source.test, cfg.source.format, cfg.source.max_test_prompts))
    }
    for target in cfg.targets:
        if target.name in sets:
            raise ValueError(f"eval set name {target.name!r} is used twice; give each target a unique name")
        sets[target.name] = ("ood", load_limited(target.test, target.format, target.max_test_prompts))

    # Eval lengths come from the strong model's tokenizer when there is one, so all rows of one set
    # are cut at the same length.
    reference_source = cfg.pretrained or next(iter(cfg.models.values()))
    reference_tokenizer = load_reward_model(reference_source, **ctx.model_options()).tokenizer
    renderer = Renderer(reference_tokenizer, max_length=1 << 20)
    lengths = {name: eval_length(renderer, pairs, cfg) for name, (_, pairs) in sets.items()}
    max_lengths = {name: length for name, (length, _) in lengths.items()}
    truncated = {name: count for name, (_, count) in lengths.items()}

    pretrained_reps: dict[str, np.ndarray] = {}
    if cfg.pretrained:
        pretrained = load_reward_model(cfg.pretrained, device=device, **ctx.model_options())
        for name, (_, pairs) in sets.items():
            sample = pairs[:DRIFT_PAIRS]
            result = score_pairs(pretrained, sample, cfg.eval.batch_size, max_lengths[name], precision, layers=[-1], desc=f"pretrained {name}")
            pretrained_reps[name] = result.pooled_chosen[0]
        del pretrained
        gc.collect()

    scores: dict[str, dict[str, PairScores]] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    training: dict[str, dict[str, Any]] = {}
    total = len(cfg.models) * len(sets)
    done = 0
    for model_name, model_dir in cfg.models.items():
        ctx.check_stop()
        rm = load_reward_model(model_dir, device=device, **ctx.model_options())
        same_backbone = cfg.pretrained is not None and rm.metadata.get("base_model") == cfg.pretrained
        scores[model_name] = {}
        for set_name, (_, pairs) in sets.items():
            result = score_pairs(
                rm, pairs, cfg.eval.batch_size, max_lengths[set_name], precision,
                layers=[-1] if same_backbone else None, progress=True, desc=f"{model_name} on {set_name}",
            )
            reps = result.pooled_chosen[0][:DRIFT_PAIRS] if same_backbone else None
            scores[model_name][set_name] = PairScores(
                r_chosen=result.chosen,
                r_rejected=result.rejected,
                reps=reps,
                reps_pretrained=pretrained_reps.get(set_name) if same_backbone else None,
            )
            done += 1
            ctx.progress("evaluate", done, total, {"model": model_name, "set": set_name})
        curves[model_name] = _training_curve(model_dir)
        training[model_name] = _training_summary(rm.metadata)
        del rm
        gc.collect()

    infos = {
        name: EvalSetInfo(
            role=role,
            prompt_ids=[p.prompt_id for p in pairs],
            len_chosen=[_text_length(p.chosen) for p in pairs],
            len_rejected=[_text_length(p.rejected) for p in pairs],
            n_truncated=truncated[name],
            max_length=max_lengths[name],
        )
        for name, (role, pairs) in sets.items()
    }
    settings = {
        "models": dict(cfg.models),
        "pretrained": cfg.pretrained,
        "precision": precision,
        "eval_max_length": max_lengths,
        "eval_length_rule": "fixed" if cfg.eval.max_length else f"p{LENGTH_PERCENTILE} of token lengths, cap {cfg.eval.max_length_cap}",
        "source_test_prompts": cfg.source.max_test_prompts or "all",
        "target_test_prompts": {t.name: t.max_test_prompts or "all" for t in cfg.targets},
        "drift_pairs_per_set": DRIFT_PAIRS,
        "length_tokenizer": reference_source,
        "training": training,
        **ctx.extra.get("report_settings", {}),
    }
    selections = {arm: json.loads(Path(path).read_text()) for arm, path in cfg.selections.items()}
    if selections:
        settings["lambda_selection"] = {
            arm: {"lambda": sel["lambda"], "reason": sel["reason"], "candidates": sel["candidates"], "validation": sel["validation"]}
            for arm, sel in selections.items()
        }
    report = build_report(
        ctx.extra.get("experiment", cfg.name),
        settings,
        infos,
        scores,
        baseline=cfg.baseline if cfg.baseline in scores else None,
        ceiling=cfg.ceiling if cfg.ceiling in scores else None,
        training_curves=curves,
        n_samples=cfg.eval.bootstrap_samples,
        seed=cfg.eval.seed,
        n_bins=cfg.eval.ece_bins,
    )
    paths = write_report(report, ctx.out_dir)
    paths["scores"] = _write_scores(ctx.out_dir / SCORES_FILE, scores, infos)
    table = format_table(report)
    (ctx.out_dir / "report.txt").write_text(table + "\n")
    logger.info("report written to %s", ctx.out_dir)
    return {
        "report": {key: str(path) for key, path in paths.items()},
        "table": table,
        "metrics": {model: {s: row["accuracy"] for s, row in by_set.items()} for model, by_set in report.rows.items()},
    }
