"""Schemas of the health routes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Liveness(BaseModel):
    """The process serves requests."""

    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """Every dependency responded: the job database and the broker."""

    status: Literal["ready"] = "ready"
    checks: dict[str, str] = Field(description="'ok' per dependency.", examples=[{"database": "ok", "broker": "ok"}])
