"""Progress reporting and stop checks of a long ML run, for any caller.

The CLI runs jobs with a tqdm-backed context; a Celery worker passes its own context that writes
progress to the job row and reads the cancel flag. `ml/` never imports either side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)


class JobCancelled(RuntimeError):
    """Raised between steps when the job's context requests a stop."""


@dataclass
class RunContext:
    """Output folder, progress sink and stop check of one run.

    `progress(stage, step, total, metrics)` is called often (every optimizer step); sinks that write
    to a database rate-limit on their side. `should_stop()` is polled between steps.
    `resume_from` is a checkpoint folder root to resume training from, when the run was interrupted.
    """

    out_dir: Path
    progress: Callable[[str, int, int, dict[str, Any]], None] = lambda stage, step, total, metrics: None
    should_stop: Callable[[], bool] = lambda: False
    resume: bool = True
    job_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)

    def model_options(self) -> dict[str, bool]:
        """Keyword arguments for `load_reward_model` from the operator's switches in `extra`.

        Both stay off unless the process running the job (a worker configured by the operator)
        sets them; job configs cannot turn them on.
        """
        return {
            "trust_remote_code": bool(self.extra.get("allow_remote_code", False)),
            "allow_pickle": bool(self.extra.get("allow_pickle", False)),
        }

    def check_stop(self) -> None:
        if self.should_stop():
            raise JobCancelled(f"job {self.job_id or '(local)'} was cancelled")

    def child(self, name: str) -> "RunContext":
        """Context for a sub-stage writing under `out_dir/name`, sharing progress and stop check."""
        return RunContext(
            out_dir=self.out_dir / name,
            progress=self.progress,
            should_stop=self.should_stop,
            resume=self.resume,
            job_id=self.job_id,
            extra=self.extra,
        )
