"""Entry points of the job types, shared by the CLI and the Celery workers.

Each `run_*` function takes a validated config and a `RunContext` and returns a JSON-serialisable
dict of outputs: paths (relative names inside `ctx.out_dir` and absolute paths) and metrics.
Heavy imports (torch, transformers) happen inside the functions, so importing this module is cheap.

A pipeline is planned as a fixed sequence of stages whose outputs sit at known paths under the
pipeline's folder. The workers run the stages as a Celery chain, and the CLI runs them in-process
from the same plan.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ml.config import (
    EvaluateConfig,
    LambdaCandidate,
    PipelineConfig,
    SelectLambdaConfig,
    StudentTrainConfig,
    TrainConfig,
    WeakLabelConfig,
    parse_job_config,
)
from ml.context import RunContext

logger = logging.getLogger(__name__)

WEAK_STAGE = "weak"
EVAL_STAGE = "report"
LABELS_FILE = "labels.jsonl"
VALIDATION_FILE = "validation.jsonl"
SELECTION_FILE = "selection.json"
MODEL_SUBDIR = "model"


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline: its name, job type, config, and the folder it writes to."""

    name: str
    job_type: str
    config: BaseModel
    out_dir: Path


def candidate_name(arm: str, lam: float) -> str:
    """Report row and stage name of one lambda candidate of an 'auto' arm, e.g. 'anchored[lambda=0.03]'."""
    return f"{arm}[lambda={lam:g}]"


def plan_pipeline(cfg: PipelineConfig, out_dir: Path) -> list[Stage]:
    """Expand a pipeline into weak labelling, training stages, lambda selections and the evaluation.

    An arm with a numeric lambda is one training stage. An arm with lambda='auto' is one training
    stage per candidate of its grid, then a `select_lambda` stage that links the chosen candidate at
    `arms/<arm>/model`. Students with identical settings and labels are trained once: a candidate
    equal to another arm (lambda=0 and the naive arm, typically) reuses that arm's model.
    """
    out_dir = Path(out_dir)
    weak_dir = out_dir / WEAK_STAGE
    stages = [Stage(WEAK_STAGE, "weak_label", cfg.weak_label_config(), weak_dir)]
    trained: dict[str, tuple[str, str]] = {}  # training settings -> (row name, model dir)

    def train_stage(name: str, labels: str, student: TrainConfig, arm_dir: Path) -> tuple[str, str, bool]:
        """Plan one student unless an identical one is planned; return (row name, model dir, is new).

        The model's metadata name is its folder name, because row names such as 'anchored[lambda=0.1]'
        are not valid config names.
        """
        settings = student.model_dump(mode="json")
        # The grid and tolerance only matter to 'auto'; a fixed lambda trains the same without them.
        settings["anchor"] = {k: v for k, v in settings["anchor"].items() if k not in ("lambda_grid", "auto_tolerance")}
        key = json.dumps([labels, settings], sort_keys=True)
        if key in trained:
            return (*trained[key], False)
        train_cfg = StudentTrainConfig(
            data=str(weak_dir / LABELS_FILE), labels=labels, student=student, heldout=cfg.source.test, name=arm_dir.name
        )
        stages.append(Stage(f"train:{name}", "train", train_cfg, arm_dir))
        trained[key] = (name, str(arm_dir / MODEL_SUBDIR))
        return name, trained[key][1], True

    models = {"weak": str(weak_dir / MODEL_SUBDIR)}
    candidate_rows: dict[str, str] = {}
    selections: dict[str, str] = {}
    for arm in cfg.arms:
        student = cfg.arm_student(arm)
        arm_dir = out_dir / "arms" / arm.name
        if not student.anchor.is_auto:
            _, models[arm.name], _ = train_stage(arm.name, arm.labels, student, arm_dir)
            continue
        candidates = []
        for lam in sorted(set(student.anchor.lambda_grid)):
            fixed = student.model_copy(deep=True)
            fixed.anchor.lam = lam
            name = candidate_name(arm.name, lam)
            row, model_dir, new = train_stage(name, arm.labels, fixed, out_dir / "arms" / f"{arm.name}-lambda-{lam:g}")
            candidates.append(LambdaCandidate(lam=lam, model=model_dir))
            if new:
                candidate_rows[row] = model_dir
        select_cfg = SelectLambdaConfig(
            name=arm.name,
            candidates=candidates,
            validation=str(weak_dir / VALIDATION_FILE),
            pretrained=student.model,
            tolerance=student.anchor.auto_tolerance,
            max_length=student.max_length,
            batch_size=cfg.eval.batch_size,
            precision=student.precision,
            bootstrap_samples=cfg.eval.bootstrap_samples,
            seed=cfg.eval.seed,
        )
        stages.append(Stage(f"select:{arm.name}", "select_lambda", select_cfg, arm_dir))
        models[arm.name] = str(arm_dir / MODEL_SUBDIR)
        selections[arm.name] = str(arm_dir / SELECTION_FILE)
    if cfg.eval.candidates:
        models.update(candidate_rows)

    ceiling = next((arm.name for arm in cfg.arms if arm.labels == "gold"), None)
    eval_cfg = EvaluateConfig(
        name=cfg.name,
        models=models,
        source=cfg.source,
        targets=cfg.targets,
        baseline="weak",
        ceiling=ceiling,
        pretrained=cfg.student.model,
        selections=selections,
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


def run_select_lambda(cfg: SelectLambdaConfig, ctx: RunContext) -> dict[str, Any]:
    from ml.select import select_lambda

    return select_lambda(cfg, ctx)


def run_score_dataset(cfg: BaseModel, ctx: RunContext) -> dict[str, Any]:
    from ml.serving.batch import score_dataset

    return score_dataset(cfg, ctx)


_RUNNERS = {
    "weak_label": run_weak_label,
    "train": run_train,
    "evaluate": run_evaluate,
    "pipeline": run_pipeline,
    "score_dataset": run_score_dataset,
    "select_lambda": run_select_lambda,
}


def run_job(job_type: str, config: BaseModel | dict, ctx: RunContext) -> dict[str, Any]:
    """Validate `config` for `job_type` if it is a dict, then run the job."""
    if isinstance(config, dict):
        config = parse_job_config(job_type, config)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    return _RUNNERS[job_type](config, ctx)
