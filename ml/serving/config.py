"""Settings of the scoring engine and the batch-scoring job config; imports neither torch nor ml.config.

`workers.settings.Settings` fills `ServingConfig` from W2S_SCORING_* variables. `ScoreDatasetConfig`
is importable from `ml.config` without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RESULTS_FILE = "rewards.jsonl"


@dataclass(frozen=True)
class ServingConfig:
    """Batching, queue, memory and precision settings of one `ScoringEngine`."""

    # Padded tokens per forward pass (rows × longest row). 8192 is 16 rows of 512 tokens, which
    # keeps the activations of a base-size encoder well under 1 GB.
    token_budget: int = 8192
    # Milliseconds the oldest queued request waits for others to join its batch.
    max_wait_ms: float = 5.0
    # Sequences queued or being scored across all models; a request that does not fit gets QueueFull.
    max_queue: int = 4096
    # Memory of loaded model weights (parameters and buffers), in MiB; least recently used models
    # beyond it are unloaded. The model in use stays loaded even when it alone exceeds the budget.
    memory_budget_mb: int = 4096
    # 'fp32', 'bf16' (autocast) or 'auto' (bf16 where the CPU or GPU supports it natively).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Tokens per sequence, special tokens included; None uses each model's training max_length
    # from its metadata, else the tokenizer's limit, capped at max_length_cap.
    max_length: int | None = None
    max_length_cap: int = 512
    # Tokens per request after truncation, summed over its items.
    max_request_tokens: int = 262144
    # Seconds an alias resolution is reused before the resolver is asked again.
    alias_refresh_s: float = 2.0
    # 'cpu', 'cuda', 'cuda:1' ...; None picks CUDA when available.
    device: str | None = None
    allow_remote_code: bool = False
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        positive = {
            "token_budget": self.token_budget,
            "max_queue": self.max_queue,
            "memory_budget_mb": self.memory_budget_mb,
            "max_length_cap": self.max_length_cap,
            "max_request_tokens": self.max_request_tokens,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1; got {value}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be at least 0; got {self.max_wait_ms}")
        if self.alias_refresh_s < 0:
            raise ValueError(f"alias_refresh_s must be at least 0; got {self.alias_refresh_s}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16'; got {self.precision!r}")
        if self.max_length is not None and self.max_length < 8:
            raise ValueError(f"max_length must be at least 8 tokens or unset; got {self.max_length}")


class ScoreDatasetConfig(BaseModel):
    """Job 'score_dataset': score every response of a dataset file with one reward model."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    model: str = Field(description="Reward model directory (or hub name) to score with.")
    data: str = Field(description="Dataset file (JSONL, JSON, Parquet, optionally .gz) in a format ml.data reads.")
    format: Literal["auto", "trl", "hh", "ranked"] = Field("auto", description="Reader to use; 'auto' detects it from the fields.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="'bf16' autocast, 'fp32', or 'auto' (bf16 where the hardware has it).")
    max_length: int | None = Field(
        None, ge=8, le=8192, description="Tokens per sequence; unset uses the model's training max_length."
    )
    token_budget: int = Field(8192, ge=64, le=1_048_576, description="Padded tokens (rows x longest row) per forward pass.")
    output: str = Field(RESULTS_FILE, pattern=r"^\w[\w.-]*$", description="Results file name inside the job folder.")
