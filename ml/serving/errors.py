"""Errors of the scoring engine; the HTTP layer maps each to one status."""

from __future__ import annotations


class ServingError(Exception):
    """Base of the errors the scoring engine raises on purpose."""


class ModelNotFound(ServingError, LookupError):
    """No registered model has the requested id or alias."""

    def __init__(self, name: str, detail: str | None = None):
        super().__init__(detail or f"model {name!r} not found: no registered model has this id or alias")
        self.name = name


class QueueFull(ServingError):
    """The scoring queue cannot take the request's sequences now."""

    def __init__(self, queued: int, requested: int, capacity: int, retry_after_s: int):
        super().__init__(
            f"scoring queue is full: {queued} sequences are queued, this request adds {requested}, "
            f"the limit is {capacity}"
        )
        self.queued = queued
        self.requested = requested
        self.capacity = capacity
        self.retry_after_s = retry_after_s


class RequestLimitExceeded(ServingError):
    """A request exceeds a size limit (items, characters or tokens)."""

    def __init__(self, limit_name: str, limit: int, received: int, unit: str):
        super().__init__(f"request has {received} {unit}, over the limit of {limit} {unit} ({limit_name})")
        self.limit_name = limit_name
        self.limit = limit
        self.received = received
        self.unit = unit


class BatcherClosed(ServingError):
    """The model's batcher was closed because the model was unloaded; look the model up again."""
