"""Schemas of the job routes: creation, state and progress, log pages and progress events."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobTypeName = Literal["weak_label", "train", "evaluate", "pipeline", "score_dataset"]
JobStateName = Literal["queued", "running", "succeeded", "failed", "cancelled"]

PIPELINE_EXAMPLE = {
    "type": "pipeline",
    "config": {
        "name": "history-shift",
        "source": {
            "name": "us_history_textbook",
            "train": "dataset:3f1c9a0b7d2e4f6a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a",
            "test": "genies/us_history_textbook/test.json.gz",
            "max_train_prompts": 24,
            "max_test_prompts": 12,
        },
        "targets": [{"name": "us_history_fiction", "test": "genies/us_history_fiction/test.json.gz"}],
        "weak": {"model": "all-MiniLM-L6-v2", "max_length": 64},
        "student": {"model": "model:default", "max_length": 64},
        "arms": [{"name": "anchored", "anchor": {"lam": 1.0}}],
        "eval": {"max_length": 64, "bootstrap_samples": 200},
    },
}


class JobCreate(BaseModel):
    """Request to create a job: its type and config (see `ml/config.py` for every field).

    Dataset fields take `dataset:<id>` (an uploaded dataset) or a path inside the operator's
    data folder (W2S_DATA_DIR). Model fields take `model:<id or alias>`, a folder inside the
    model folder (W2S_MODEL_DIR) or, when the operator allows it, a Hugging Face Hub name.
    """

    model_config = ConfigDict(json_schema_extra={"examples": [PIPELINE_EXAMPLE]})

    type: JobTypeName = Field(description="Job type.")
    config: dict[str, Any] = Field(description="Config of the job type: PipelineConfig, WeakLabelConfig, StudentTrainConfig or EvaluateConfig.")


class JobProgress(BaseModel):
    """Latest progress report of the running stage."""

    stage: str | None = Field(None, description="Stage and step kind, e.g. 'train:anchored/train'.")
    step: int | None = None
    total: int | None = None
    fraction: float | None = Field(None, description="step / total of the current stage, 0 to 1.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Latest metrics, e.g. loss and learning rate.")
    updated_at: datetime | None = None


class JobError(BaseModel):
    """Why a job failed: exception type, message, and the stage and source line."""

    type: str
    message: str | None = None
    where: str | None = None


class JobStage(BaseModel):
    """One stage of a pipeline, run as a child job."""

    id: str
    stage_name: str | None
    type: str
    state: JobStateName


class JobPublic(BaseModel):
    """A job as the API returns it."""

    id: str
    type: JobTypeName
    state: JobStateName
    config: dict[str, Any] = Field(description="The validated config, with dataset and model references resolved to server paths.")
    owner: str | None = Field(description="Id of the API key that created the job.")
    parent_id: str | None = Field(None, description="Pipeline of a stage job.")
    stage_name: str | None = None
    progress: JobProgress
    error: JobError | None = None
    stages: list[JobStage] = Field(default_factory=list, description="Stages of a pipeline, in run order.")
    outputs: dict[str, Any] | None = Field(None, description="Output paths and metrics once the job succeeded.")
    attempts: int = Field(description="Starts of the job by a worker so far.")
    cancel_requested: bool
    datasets: list[str] = Field(default_factory=list, description="Ids of the uploaded datasets the job reads.")
    models: list[str] = Field(default_factory=list, description="Ids of the registered models the job reads.")
    rerun_of: str | None = Field(None, description="Job this one reruns.")
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class JobLogPage(BaseModel):
    """A page of a job's log lines (a pipeline's lines are its stages' lines, prefixed with the stage)."""

    job_id: str
    lines: list[str]
    offset: int = Field(description="Index of the first line of this page.")
    next_offset: int = Field(description="Offset of the next page; equals total when this page is the last.")
    total: int = Field(description="Lines in the log so far.")


class JobEvent(BaseModel):
    """Data of one server-sent event of GET /v1/jobs/{job_id}/events.

    Event names: `state` (the state changed; sent first), `progress` (new progress), and `end`
    (the job reached succeeded, failed or cancelled; the stream closes after it).
    """

    job_id: str
    state: JobStateName
    progress: JobProgress
    error: JobError | None = None
