"""Settings of the job system, read from environment variables prefixed `W2S_`.

Every field has a one-line description with its unit. A worker on another machine joins the same
deployment by pointing `W2S_BROKER_URL`, `W2S_DATABASE_URL` and `W2S_ARTIFACT_ROOT` at the same
Redis, database and artifact store (see docs/workers.md).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# One day: a full MPNet or SmolLM training job on one GPU runs for hours, not days.
DEFAULT_TASK_TIME_LIMIT_S = 24 * 3600
# The Redis visibility timeout must exceed the longest task, so one more hour on top.
DEFAULT_VISIBILITY_TIMEOUT_S = DEFAULT_TASK_TIME_LIMIT_S + 3600


class Settings(BaseSettings):
    """Broker, database, artifact store, delivery limits and operator switches of the workers."""

    model_config = SettingsConfigDict(env_prefix="W2S_", env_file=None, extra="ignore")

    # --- Where things live -------------------------------------------------------------------
    var_dir: Path = Field(Path("./var"), description="Folder for the embedded broker, the SQLite job database and artifacts.")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the job database, e.g. postgresql+psycopg://user@host/w2s; "
        "default sqlite:///<var_dir>/jobs.sqlite.",
    )
    artifact_root: str | None = Field(
        None, description="Folder that job outputs and models are written under; default <var_dir>/artifacts."
    )
    data_dir: Path | None = Field(
        None, description="When set, dataset files of submitted jobs must lie inside this folder."
    )
    model_dir: Path | None = Field(
        None, description="When set, local model paths of submitted jobs must lie inside this folder."
    )
    allow_hub_models: bool = Field(
        False, description="Accept model names that are not local paths (downloaded from the Hugging Face Hub by the worker)."
    )

    # --- Celery ------------------------------------------------------------------------------
    broker_url: str | None = Field(
        None,
        description="Celery broker URL, e.g. redis://host:6379/0; unset runs the embedded broker "
        "(kombu's SQLAlchemy transport on sqlite:///<var_dir>/broker.sqlite, one machine only).",
    )
    result_backend: str | None = Field(
        None,
        description="Celery result backend URL; unset disables Celery results because job state and outputs live in the job database.",
    )
    redis_key_prefix: str = Field(
        "", description="Prefix of every Redis key the broker writes (kombu global_keyprefix); lets deployments share one Redis."
    )
    gpu_queue: str = Field("gpu", description="Queue of model work: weak labelling, training and evaluation.")
    cpu_queue: str = Field("cpu", description="Queue of light bookkeeping, such as closing a finished pipeline.")

    # --- Limits and delivery -----------------------------------------------------------------
    task_time_limit_s: int = Field(
        DEFAULT_TASK_TIME_LIMIT_S,
        ge=60,
        description="Seconds one attempt of a job may run; the job is then stopped and marked failed.",
    )
    task_kill_grace_s: int = Field(
        120, ge=1, description="Seconds between the soft time limit (job stops itself) and the hard kill of the pool process."
    )
    visibility_timeout_s: int = Field(
        DEFAULT_VISIBILITY_TIMEOUT_S,
        ge=60,
        description="Seconds Redis waits before redelivering an unacknowledged message; must exceed task_time_limit_s.",
    )
    max_attempts: int = Field(
        3, ge=1, description="Starts of a job (first run, redeliveries, retries) before it is marked failed."
    )
    lease_s: float = Field(
        120.0, gt=0, description="Seconds a job's lease lasts without a heartbeat; a job whose lease expired is requeued."
    )
    heartbeat_s: float = Field(20.0, gt=0, description="Seconds between lease renewals of a running job; well below lease_s.")
    reaper_interval_s: float = Field(
        10.0, gt=0, description="Seconds between scans of each worker for jobs whose lease expired."
    )
    resend_lost_after_s: float = Field(
        60.0,
        gt=0,
        description="Seconds a queued job may wait with no message in the Redis broker (lost in a restart) before a worker sends it again.",
    )
    progress_interval_s: float = Field(
        5.0, ge=0, description="Minimum seconds between two progress writes of one job to the database."
    )
    cancel_check_s: float = Field(
        1.0, ge=0, description="Minimum seconds between two reads of a running job's cancel flag."
    )
    max_transient_retries: int = Field(
        3, ge=0, description="Retries of a job after a transient error (database unavailable, CUDA out of memory)."
    )
    retry_backoff_s: float = Field(
        10.0, gt=0, description="Delay before the first transient retry, doubled on each further retry."
    )
    oom_halve_batch: bool = Field(
        True,
        description="On CUDA out of memory, retry with half the batch size and twice the gradient accumulation.",
    )
    auto_migrate: bool = Field(
        True, description="Apply database migrations when a worker starts (turn off where an operator migrates)."
    )

    # --- Operator switches -------------------------------------------------------------------
    allow_remote_code: bool = Field(
        False, description="Pass trust_remote_code=True to transformers for models that ship their own code."
    )
    allow_pickle: bool = Field(
        False, description="Allow loading pickled checkpoints (torch.load without weights_only)."
    )

    # --- HTTP API ------------------------------------------------------------------------------
    auth_disabled: bool = Field(
        False,
        description="Development mode: accept every request without an API key, as an admin; logged at startup.",
    )
    max_upload_bytes: int = Field(
        512 * 1024**2,
        ge=1,
        description="Bytes one dataset upload may have as sent (512 MiB, the client_max_body_size of docs/deployment.md).",
    )
    max_upload_decompressed_bytes: int = Field(
        2 * 1024**3,
        ge=1,
        description="Bytes a gzip dataset upload may expand to; the API holds it in memory while validating it.",
    )
    max_request_bytes: int = Field(
        1024**2,
        ge=1024,
        description="Bytes of a JSON request body of the jobs API (1 MiB); larger bodies get 413. Uploads have their own limit.",
    )
    max_queued_jobs: int = Field(
        100, ge=1, description="Queued top-level jobs at which new job requests get 429 (queue full)."
    )
    event_poll_interval_s: float = Field(
        1.0, gt=0, description="Seconds between two job database reads of the progress event stream (SSE)."
    )
    health_timeout_s: float = Field(
        3.0, gt=0, description="Seconds the readiness check waits for the database and for the broker."
    )

    # --- Scoring service (uvicorn app.scoring_main:app) -------------------------------------------
    scoring_token_budget: int = Field(
        8192, ge=1, description="Padded tokens (rows x longest row) per forward pass of the scoring batcher."
    )
    scoring_max_wait_ms: float = Field(
        5.0, ge=0, description="Milliseconds the oldest queued scoring request waits for others to join its batch."
    )
    scoring_max_queue: int = Field(
        4096, ge=1, description="Sequences queued or being scored; requests beyond it get 429 with Retry-After."
    )
    scoring_memory_budget_mb: int = Field(
        4096, ge=1, description="MiB of model weights the scorer keeps loaded; least recently used models beyond it are unloaded."
    )
    scoring_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Scoring precision: 'fp32', 'bf16' autocast, or 'auto' (bf16 where the CPU or GPU supports it)."
    )
    scoring_max_length: int | None = Field(
        None,
        ge=8,
        description="Tokens per scored sequence; unset uses each model's training max_length (else its tokenizer limit, at most 512).",
    )
    scoring_device: str | None = Field(None, description="Device of the scorer's models ('cpu', 'cuda', 'cuda:1'); unset picks CUDA when available.")
    scoring_max_body_bytes: int = Field(
        8 * 1024**2, ge=1, description="Bytes of one scoring request body; larger bodies get 413."
    )
    scoring_max_items: int = Field(512, ge=1, description="Items (or responses, or queries) per scoring request; more get 422.")
    scoring_max_chars: int = Field(
        4_000_000, ge=1, description="Characters of text per scoring request, summed over its items; more get 422."
    )
    scoring_max_tokens: int = Field(
        262_144,
        ge=1,
        description="Tokens per scoring request after truncation, summed over its items (512 items of 512 tokens); more get 422.",
    )
    scoring_alias_refresh_s: float = Field(
        2.0, ge=0, description="Seconds the scorer reuses an alias lookup before reading the registry again."
    )
    scoring_default_model: str | None = Field(
        None, description="Model id or alias that POST /get_reward scores with when the request names no model."
    )
    scoring_preload_models: list[str] = Field(
        default_factory=list, description="Model ids or aliases the scorer loads at startup, as a JSON list."
    )

    @model_validator(mode="after")
    def _check_timeouts(self) -> "Settings":
        if self.heartbeat_s >= self.lease_s:
            raise ValueError(
                f"heartbeat_s ({self.heartbeat_s}) must be below lease_s ({self.lease_s}), "
                "or a live job loses its lease between two heartbeats"
            )
        if self.visibility_timeout_s <= self.task_time_limit_s + self.task_kill_grace_s:
            raise ValueError(
                f"visibility_timeout_s ({self.visibility_timeout_s}) must exceed task_time_limit_s + task_kill_grace_s "
                f"({self.task_time_limit_s + self.task_kill_grace_s}), or Redis redelivers jobs that are still running"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.var_dir / 'jobs.sqlite').resolve()}"

    @property
    def resolved_artifact_root(self) -> Path:
        if self.artifact_root and "://" in self.artifact_root:
            # NOTE: the job runner writes to local paths only; URL roots need workers/artifacts.py.
            raise ValueError(f"artifact_root {self.artifact_root!r} is a URL; the job runner needs a local or mounted folder")
        return Path(self.artifact_root).resolve() if self.artifact_root else (self.var_dir / "artifacts").resolve()

    @property
    def embedded(self) -> bool:
        return self.broker_url is None

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.var_dir / 'broker.sqlite').resolve()}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read from the environment once."""
    return Settings()
