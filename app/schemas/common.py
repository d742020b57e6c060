"""Schemas shared by several resources."""

from __future__ import annotations

from typing import Generic, TypeVar

from pydantic import BaseModel, Field

Item = TypeVar("Item")

# Page sizes of list routes: default and maximum items per page.
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
# Largest offset of list routes. Databases store offsets as 64-bit integers, and SQLite raises
# OverflowError on larger Python ints. No list here comes near a billion items.
MAX_OFFSET = 1_000_000_000


class Page(BaseModel, Generic[Item]):
    """One page of a list, with the number of matching items before paging."""

    items: list[Item]
    total: int = Field(description="Matching items before paging.")
    limit: int = Field(description="Maximum items per page, as requested.")
    offset: int = Field(description="Items skipped before this page.")
