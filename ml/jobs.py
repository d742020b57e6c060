"""Entry points of the four job types, shared by the CLI and the Celery workers.

Each `run_*` function takes a validated config and a `RunContext` and returns a JSON-serialisable
dict of outputs: paths (relative names inside `ctx.out_dir` and absolute paths) and metrics.
Heavy imports (torch, transformers) happen inside the functions, so importing this module is cheap.

A pipeline is planned as a fixed sequence of stages whose outputs sit at known paths under the
pipeline's folder. The workers run the stages as a Celery chain, and the CLI runs them in-process
from the same plan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ml.config import (
    EvaluateConfig,
    PipelineConfig,
    StudentTrainConfig,
    WeakLabelConfig,
    parse_job_config,
)
from ml.context import RunContext

logger = logging.getLogger(__name__)

WEAK_STAGE = "weak"
EVAL_STAGE = "report"
LABELS_FILE = "labels.jsonl"
MODEL_SUBDIR = "model"


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline: its name, job type, config, and the folder it writes to."""

    name: str
    job_type: str
    config: BaseModel
    out_dir: Path


def plan_pipeline(cfg: PipelineConfig, out_dir: Path) -> list[Stage]:
    """Expand a pipeline into weak labelling, one training stage per arm, and the evaluation."""
    out_dir = Path(out_dir)
    weak_dir = out_dir / WEAK_STAGE
    stages = [Stage(WEAK_STAGE, "weak_label", cfg.weak_label_config(), weak_dir)]

    models = {"weak": str(weak_dir / MODEL_SUBDIR)}
    for arm in cfg.arms:
        student = cfg.student.model_copy(deep=True)
        if arm.anchor is not None:
            student.anchor = arm.anchor
        if arm.l2sp_lambda is not None:
            student.l2sp_lambda = arm.l2sp_lambda
        arm_dir = out_dir / "arms" / arm.name
        train_cfg = StudentTrainConfig(
            data=str(weak_dir / LABELS_FILE),
            labels=arm.labels,
            student=student,
            heldout=cfg.source.test,
            name=arm.name,
        )
        stages.append(Stage(f"train:{arm.name}", "train", train_cfg, arm_dir))
        models[arm.name] = str(arm_dir / MODEL_SUBDIR)

    ceiling = next((arm.name for arm in cfg.arms if arm.labels == "gold"), None)
    eval_cfg = EvaluateConfig(
        name=cfg.name,
        models=models,
        source=cfg.source,
        targets=cfg.targets,
        baseline="weak",
        ceiling=ceiling,
        pretrained=cfg.student.model,
        eval=cfg.eval,
    )
    stages.append(Stage(EVAL_STAGE, "evaluate", eval_cfg, out_dir / EVAL_STAGE))
    return stages


def run_weak_label(cfg: WeakLabelConfig, ctx: RunContext) -> dict[str, Any]:
    from ml.weak import weak_label

    return weak_label(cfg, ctx)


def run_train(cfg: StudentTrainConfig, ctx: RunContext) -> dict[str, Any]:
    from ml.train import train_student

    return train_student(cfg, ctx)


def run_evaluate(cfg: EvaluateConfig, ctx: RunContext) -> dict[str, Any]:
    from ml.evaluate import evaluate_models

    return evaluate_models(cfg, ctx)


def run_pipeline(cfg: PipelineConfig, ctx: RunContext) -> dict[str, Any]:
    """Run every stage of `plan_pipeline` in this process and return each stage's outputs."""
    outputs: dict[str, Any] = {}
    for stage in plan_pipeline(cfg, ctx.out_dir):
        logger.info("pipeline %s: stage %s starts", cfg.name, stage.name)
        stage_ctx = RunContext(
            out_dir=stage.out_dir,
            progress=ctx.progress,
            should_stop=ctx.should_stop,
            resume=ctx.resume,
            job_id=ctx.job_id,
            extra=ctx.extra,
        )
        outputs[stage.name] = run_job(stage.job_type, stage.config, stage_ctx)
    outputs["report"] = outputs[EVAL_STAGE]
    return outputs


def run_score_dataset(cfg: BaseModel, ctx: RunContext) -> dict[str, Any]:
    from ml.serving.batch import score_dataset

    return score_dataset(cfg, ctx)


_RUNNERS = {
    "weak_label": run_weak_label,
    "train": run_train,
    "evaluate": run_evaluate,
    "pipeline": run_pipeline,
    "score_dataset": run_score_dataset,
}


def run_job(job_type: str, config: BaseModel | dict, ctx: RunContext) -> dict[str, Any]:
    """Validate `config` for `job_type` if it is a dict, then run the job."""
    if isinstance(config, dict):
        config = parse_job_config(job_type, config)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    return _RUNNERS[job_type](config, ctx)
