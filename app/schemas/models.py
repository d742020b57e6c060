"""Schemas of the model registry routes."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ModelSource = Literal["trained", "hub", "directory"]


class ModelLineage(BaseModel):
    """Lineage of a model: base model, weak labeller, datasets, config and job."""

    source: ModelSource = Field(description="'trained' by a job here, or registered from the 'hub' or a 'directory'.")
    base_model: str | None = Field(None, description="Pretrained model the reward model was fine-tuned from.")
    weak_labeller: str | None = Field(None, description="Id (or path) of the weak model whose labels trained this model.")
    datasets: list[str] = Field(default_factory=list, description="Dataset files of the training job (server paths).")
    dataset_ids: list[str] = Field(default_factory=list, description="Ids of uploaded datasets among them.")
    job_id: str | None = None
    pipeline_id: str | None = None
    stage: str | None = None
    config: dict[str, Any] | None = Field(None, description="Config of the job that trained the model.")
    registered_by: str | None = Field(None, description="API key that registered an external model.")


class ModelPublic(BaseModel):
    """A registered reward model."""

    id: str
    reference: str = Field(description="Value to put in a job config's model field: 'model:<id>'.")
    name: str
    path: str = Field(description="Model directory on the server, or the Hub name of a hub model.")
    aliases: list[str] = Field(default_factory=list)
    lineage: ModelLineage
    metrics: dict[str, Any] = Field(default_factory=dict)
    job_id: str | None = None
    created_at: datetime | None = None


class ModelRegister(BaseModel):
    """Request to register a reward model that was not trained here; give exactly one of hub_name and path."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"name": "minilm-rm", "path": "all-MiniLM-L6-v2"}, {"name": "deberta-rm", "hub_name": "OpenAssistant/reward-model-deberta-v3-large-v2"}]}
    )

    name: str = Field(min_length=1, max_length=200)
    hub_name: str | None = Field(None, max_length=300, description="Hugging Face Hub name (needs W2S_ALLOW_HUB_MODELS=true).")
    path: str | None = Field(None, max_length=1000, description="Folder inside the model folder W2S_MODEL_DIR, relative to it or absolute.")
    base_model: str | None = Field(None, max_length=300, description="Pretrained model it was fine-tuned from, if known.")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelRegister":
        if (self.hub_name is None) == (self.path is None):
            raise ValueError("give exactly one of hub_name and path")
        return self


class AliasSet(BaseModel):
    """Request to point an alias at a model."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"model_id": "6f1f0c1e-8f0e-4c55-9a59-3c0a0d8e2b11"}]})

    model_id: str = Field(description="Id of the registered model.")


class AliasPublic(BaseModel):
    """An alias and the model it points at."""

    alias: str
    model_id: str
    updated_at: datetime | None = None
    updated_by: str | None = None
