"""Job id in every log line of a worker.

The id of the job being run is kept in a context variable; a logging filter copies it onto each
record as `job_id` ('-' outside a job), so library loggers (transformers, ml) get it too.
"""

from __future__ import annotations

import contextvars
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

current_job_id: contextvars.ContextVar[str] = contextvars.ContextVar("w2s_job_id", default="-")

LOG_FILE = "job.log"
LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] job=%(job_id)s %(name)s: %(message)s"


class JobIdFilter(logging.Filter):
    """Set `record.job_id` from the current job context unless the record already has one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "job_id"):
            record.job_id = current_job_id.get()
        return True


@contextmanager
def job_log_context(job_id: str) -> Iterator[None]:
    """Tag every log record emitted inside the block with `job_id`."""
    token = current_job_id.set(job_id)
    try:
        yield
    finally:
        current_job_id.reset(token)


class _OnlyJob(logging.Filter):
    def __init__(self, job_id: str):
        super().__init__()
        self.job_id = job_id

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "job_id", current_job_id.get()) == self.job_id


@contextmanager
def job_log_file(job_id: str, path: Path, level: int = logging.INFO) -> Iterator[None]:
    """Append the records of `job_id` emitted inside the block to `path` (the job's `job.log`).

    The handler sits on the root logger and keeps only this job's records, so library loggers
    (ml, transformers) reach the file too, and a second job in the same process does not.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(level)
    handler.addFilter(JobIdFilter())
    handler.addFilter(_OnlyJob(job_id))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def install_job_id_format(logger: logging.Logger, fmt: str = LOG_FORMAT) -> None:
    """Add the job id filter and format to every handler of `logger`."""
    for handler in logger.handlers:
        if not any(isinstance(existing, JobIdFilter) for existing in handler.filters):
            handler.addFilter(JobIdFilter())
        handler.setFormatter(logging.Formatter(fmt))
