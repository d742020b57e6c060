"""Sending again the queued jobs whose broker message is gone.

A job row reads `queued`, but only the broker message makes a worker run it. Redis keeps messages
in memory, so a Redis restart without persistence (or one that loses the last second of its
append-only file) drops every queued message, and those jobs would wait forever. The reaper of
each worker calls `resend_lost_jobs` on every scan: it lists the jobs that should have a message
(queued jobs, the next stage of each pipeline, the closing task of a pipeline whose stages all
succeeded), reads the task messages in the broker's queues and its unacknowledged set, and sends
again the jobs that have none.

Sending a job twice is harmless: the second delivery finds the lease taken or the job finished
and is dropped (`workers.leases.acquire_lease`). A short Redis key (SET NX) keeps several
workers from sending the same job at the same scan.

Only the Redis broker is checked; the embedded broker keeps its messages in a SQLite file.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable

import redis
from sqlalchemy import select

from workers.celery_app import FINISH_PIPELINE_TASK, RUN_JOB_TASK
from workers.db import TERMINAL_STATES, Job, JobNotFound, JobState, JobStore, JobType, utcnow
from workers.settings import Settings

logger = logging.getLogger(__name__)

# kombu's Redis transport (5.x) stores messages of priority p > 0 in the list "<queue>\x06\x16<p>"
# and delivered, unacknowledged messages in the hash "unacked".
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)
UNACKED_KEY = "unacked"


@dataclass(frozen=True)
class Expected:
    """A message the broker should hold: `task` with first argument `job_id`, and the job to resend.

    `in_pipeline` jobs are resent with the rest of their pipeline's chain.
    """

    task: str
    job_id: str
    resend_id: str
    in_pipeline: bool = False


def expected_messages(store: JobStore, *, older_than_s: float) -> list[Expected]:
    """List the messages that jobs waiting longer than `older_than_s` seconds need.

    A job waits from its creation, or from the end of its pipeline's previous stage. Younger jobs
    are skipped because their message may still be on its way to the broker.
    """
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    expected: list[Expected] = []
    with store.session() as session:
        singles = session.scalars(
            select(Job.id).where(
                Job.state == JobState.QUEUED.value,
                Job.parent_id.is_(None),
                Job.type != JobType.PIPELINE.value,
                Job.created_at < cutoff,
            )
        )
        expected.extend(Expected(RUN_JOB_TASK, job_id, job_id) for job_id in singles)

        pipelines = session.scalars(
            select(Job).where(
                Job.type == JobType.PIPELINE.value,
                Job.parent_id.is_(None),
                Job.state.notin_(TERMINAL_STATES),
                Job.created_at < cutoff,
            )
        )
        for pipeline in pipelines:
            item = _pipeline_expected(pipeline, cutoff)
            if item is not None:
                expected.append(item)
    return expected


def _pipeline_expected(pipeline: Job, cutoff) -> Expected | None:
    children = list(pipeline.children)
    if not children:
        return None
    previous: Job | None = None
    for child in children:
        if child.state != JobState.SUCCEEDED.value:
            break
        previous = child
    else:
        # Every stage succeeded: the closing task on the cpu queue is due.
        if previous is not None and previous.finished_at is not None and previous.finished_at < cutoff:
            return Expected(FINISH_PIPELINE_TASK, pipeline.id, previous.id, in_pipeline=True)
        return None
    if child.state != JobState.QUEUED.value:
        return None  # running stages are watched by their lease; failed ones end the pipeline
    if previous is not None and (previous.finished_at is None or previous.finished_at >= cutoff):
        return None
    return Expected(RUN_JOB_TASK, child.id, child.id, in_pipeline=True)


def _first_argument(raw: Any) -> tuple[str | None, str | None]:
    """Return (task name, first argument) of one kombu Redis message, or Nones if it is not a task."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # entries of the unacked hash: [message, exchange, routing key]
            message = message[0]
        task = message["headers"]["task"]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return task, (str(args[0]) if args else None)
    except (ValueError, KeyError, IndexError, TypeError):
        return None, None


def broker_messages(client: redis.Redis, prefix: str, queues: Iterable[str]) -> set[tuple[str, str]]:
    """Return (task name, first argument) of every message queued or delivered and not yet acknowledged."""
    raws: list[Any] = []
    for queue in queues:
        for key in [queue] + [f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS]:
            raws.extend(client.lrange(prefix + key, 0, -1))
    raws.extend(client.hvals(prefix + UNACKED_KEY))
    found = set()
    for raw in raws:
        task, argument = _first_argument(raw)
        if task and argument:
            found.add((task, argument))
    return found


def resend_lost_jobs(store: JobStore, celery: Any, settings: Settings) -> list[str]:
    """Send again every job that waits longer than `resend_lost_after_s` with no broker message.

    Returns the ids of the jobs sent. Raises redis errors when the broker is unreachable.
    """
    if settings.embedded or not settings.resolved_broker_url.startswith(("redis://", "rediss://")):
        return []
    expected = expected_messages(store, older_than_s=settings.resend_lost_after_s)
    if not expected:
        return []

    from workers.submit import JobNotSubmittable, resubmit, submit_job

    client = redis.Redis.from_url(settings.resolved_broker_url, socket_connect_timeout=5, socket_timeout=10)
    try:
        present = broker_messages(client, settings.redis_key_prefix, [settings.gpu_queue, settings.cpu_queue])
        sent: list[str] = []
        for item in expected:
            if (item.task, item.job_id) in present:
                continue
            # Workers scan at the same interval; only the first to claim a job within the window sends it.
            claim = f"{settings.redis_key_prefix}w2s-resend:{item.job_id}"
            if not client.set(claim, "1", nx=True, ex=max(1, int(settings.resend_lost_after_s))):
                continue
            logger.warning(
                "job %s waited over %.0f s with no message in the broker (lost in a broker restart?); sending it again",
                item.job_id,
                settings.resend_lost_after_s,
                extra={"job_id": item.job_id},
            )
            try:
                if item.in_pipeline:
                    resubmit(item.resend_id, store=store, app=celery)
                else:
                    submit_job(item.job_id, store=store, app=celery)
            except (JobNotFound, JobNotSubmittable):
                continue  # finished or deleted since the database was read
            sent.append(item.job_id)
        return sent
    finally:
        client.close()
