"""Schemas of the scoring service: /v1/score, /v1/compare, /get_reward and model info."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ml.serving.engine import split_conversation


class Message(BaseModel):
    """One chat message."""

    # Chat templates render these three roles. Others fail inside the template or are dropped.
    role: Literal["system", "user", "assistant"] = Field(description="'system', 'user' or 'assistant'.")
    content: str


Text = str | list[Message]


def text_value(value: Text) -> str | list[dict[str, Any]]:
    """Convert a schema text (string or messages) to what `ml.render.Renderer` takes."""
    return value if isinstance(value, str) else [message.model_dump() for message in value]


def text_chars(value: Text | None) -> int:
    if value is None:
        return 0
    return len(value) if isinstance(value, str) else sum(len(message.content) for message in value)


class ScoreItem(BaseModel):
    """One item to score: a prompt and a response, or a whole conversation whose last message is scored."""

    model_config = ConfigDict(extra="forbid")

    prompt: Text | None = Field(None, description="Prompt text, or the prompt's messages.")
    response: Text | None = Field(None, description="Response text, or the response's messages.")
    messages: list[Message] | None = Field(
        None, description="Whole conversation; its last message must have role 'assistant' and is the scored response."
    )

    @model_validator(mode="after")
    def _one_form(self) -> "ScoreItem":
        pair = self.prompt is not None or self.response is not None
        if self.messages is not None and pair:
            raise ValueError("give either prompt and response, or messages, not both")
        if self.messages is None:
            if self.prompt is None or self.response is None:
                raise ValueError("give both prompt and response, or messages")
            return self
        split_conversation([message.model_dump() for message in self.messages])
        return self

    def to_input(self) -> tuple[Any, Any]:
        """Return the (prompt, response) pair the engine scores."""
        if self.messages is not None:
            return split_conversation([message.model_dump() for message in self.messages])
        return text_value(self.prompt), text_value(self.response)

    def chars(self) -> int:
        if self.messages is not None:
            return sum(len(message.content) for message in self.messages)
        return text_chars(self.prompt) + text_chars(self.response)


class ScoreRequest(BaseModel):
    """Request to score items with one reward model."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "default",
                    "items": [
                        {"prompt": "What is the capital of France?", "response": "Paris."},
                        {
                            "messages": [
                                {"role": "user", "content": "What is the capital of France?"},
                                {"role": "assistant", "content": "Lyon."},
                            ]
                        },
                    ],
                }
            ]
        },
    )

    model: str = Field(min_length=1, max_length=200, description="Registered model id or alias.")
    items: list[ScoreItem] = Field(min_length=1, description="Items to score; at most W2S_SCORING_MAX_ITEMS.")


class ItemScore(BaseModel):
    """Scores of one item."""

    reward: float = Field(description="Raw reward: the model's head output.")
    normalized: float | None = Field(
        None, description="(reward - mean) / std with the mean and std of held-out rewards stored at training time; null without them."
    )
    ood_distance: float | None = Field(
        None, description="Mahalanobis distance of the item's pooled representation from the training set (see docs/scoring.md)."
    )
    ood: bool | None = Field(None, description="ood_distance above the model's threshold; null when the model has no OOD summary.")
    truncated: bool = Field(description="The item was longer than max_length tokens and was cut (prompt from the left first).")
    tokens: int = Field(description="Tokens scored, after truncation, special tokens included.")


class ScoreResponse(BaseModel):
    """One score per item, in request order."""

    model: str = Field(description="Id of the registered model that scored the items (an alias resolves to one).")
    max_length: int = Field(description="Tokens per item; longer items were truncated.")
    truncated_items: int = Field(description="Items that were truncated to max_length.")
    items: list[ItemScore]


class CompareRequest(BaseModel):
    """Request to compare two or more responses to one prompt."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"model": "default", "prompt": "Name a prime number.", "responses": ["7", "8", "I don't know."]}]
        },
    )

    model: str = Field(min_length=1, max_length=200, description="Registered model id or alias.")
    prompt: Text = Field(description="Prompt text, or the prompt's messages.")
    responses: list[Text] = Field(min_length=2, description="Responses to compare; at most W2S_SCORING_MAX_ITEMS.")


class CompareResponse(BaseModel):
    """Rewards of each response and the Bradley-Terry probabilities between them."""

    model: str
    max_length: int
    truncated_items: int
    items: list[ItemScore] = Field(description="Scores of the responses, in request order.")
    probabilities: list[list[float]] = Field(
        description="probabilities[i][j] = sigmoid(reward_i - reward_j): the probability that response i beats response j."
    )
    best: int = Field(description="Index of the response with the highest reward (the first one on ties).")


class GetRewardRequest(BaseModel):
    """OpenRLHF remote reward request: full texts (prompt and response joined); other fields are ignored."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={"examples": [{"query": ["Human: Name a prime number.\n\nAssistant: 7"], "prompts": ["..."], "labels": [""]}]},
    )

    query: list[str] = Field(min_length=1, description="Full texts to score, as OpenRLHF sends them.")
    model: str | None = Field(
        None, min_length=1, max_length=200, description="Model id or alias; default: the 'model' query parameter, then W2S_SCORING_DEFAULT_MODEL."
    )


class GetRewardResponse(BaseModel):
    """OpenRLHF remote reward response."""

    rewards: list[float] = Field(description="One reward per query, raw or normalized as requested.")
    scores: list[float] = Field(description="The same values, for OpenRLHF's dynamic filtering and logs.")
    extra_logs: dict[str, list[float]] = Field(
        default_factory=dict, description="Per-query values OpenRLHF logs: ood_distance when the model has an OOD summary."
    )


class OodInfo(BaseModel):
    """The model's OOD statistic and threshold."""

    statistic: str = Field(description="'ppca_mahalanobis': Mahalanobis distance under a probabilistic PCA covariance.")
    threshold: float = Field(description="Distance above which an item is flagged ood.")
    percentile: float = Field(description="Percentile of held-out in-distribution distances that set the threshold.")
    layer: int = Field(description="Hidden-state layer whose token mean is the pooled representation.")
    components: int = Field(description="Principal components kept.")
    n_reference: int = Field(description="Training sequences the summary was fitted on.")
    n_heldout: int = Field(description="Held-out sequences the threshold was set on.")


class Normalization(BaseModel):
    mean: float
    std: float


class BatchingStats(BaseModel):
    """Totals of the model's batcher since it was loaded."""

    forward_passes: int
    sequences: int
    tokens: int = Field(description="Tokens of the scored sequences.")
    padded_tokens: int = Field(description="Rows x longest row, summed over forward passes; tokens / padded_tokens is the padding efficiency.")
    forward_seconds: float = Field(description="Seconds spent in forward passes.")


class ScoringModelInfo(BaseModel):
    """A model as the scorer serves it."""

    id: str
    name: str | None = None
    base_model: str | None = None
    architecture: str
    precision: str = Field(description="'fp32' or 'bf16' (autocast).")
    device: str
    max_length: int = Field(description="Tokens per item; longer items are truncated.")
    normalization: Normalization | None = None
    ood: OodInfo | None = None
    memory_mb: float = Field(description="MiB of weights in memory.")
    loaded_at: datetime
    batching: BatchingStats | None = None


class ScoringModels(BaseModel):
    """Models loaded in the scorer now, most recently used last."""

    items: list[ScoringModelInfo]
