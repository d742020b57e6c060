"""Schemas of the dataset routes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class SkippedRowPublic(BaseModel):
    """A row, or one pair of a ranked row, that the reader left out, and why."""

    location: str = Field(examples=["row 811 (response 2 over 1)"])
    reason: str = Field(examples=["the rejected response is empty"])


class DatasetPublic(BaseModel):
    """An uploaded preference file, stored once per content hash."""

    id: str = Field(description="Dataset id: the SHA-256 of the file as uploaded.")
    reference: str = Field(description="Value to put in a job config's dataset field: 'dataset:<id>'.")
    filename: str
    format: str = Field(description="Detected row format: 'trl', 'hh' or 'ranked'.")
    size_bytes: int = Field(description="Size of the file as uploaded (compressed if it is gzip).")
    rows: int = Field(description="Rows (lines or records) read.")
    pairs: int = Field(description="Preference pairs built from the rows.")
    prompts: int = Field(description="Distinct prompts.")
    skipped: int = Field(description="Rows or pairs left out; see skipped_rows in the detail.")
    owner: str | None = Field(description="Id of the API key that uploaded it first.")
    created_at: datetime


class DatasetDetail(DatasetPublic):
    """A dataset with a few sample pairs and the first skipped rows."""

    samples: list[dict[str, Any]] = Field(description="The first pairs: prompt, chosen, rejected (long texts shortened).")
    skipped_rows: list[SkippedRowPublic] = Field(description="The first skipped rows with their reasons.")
