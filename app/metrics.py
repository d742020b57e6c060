"""Prometheus metrics of the API: requests and latencies per route, queue depth and jobs by state.

Each app has its own registry, so several apps in one process (tests) do not collide. The job
gauges are read from the job database when Prometheus scrapes GET /v1/metrics.
"""

from __future__ import annotations

import logging
import time
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workers.db import Job, JobState, JobStore

logger = logging.getLogger(__name__)


class JobCollector(Collector):
    """Jobs by state and type, and the queue depth (queued jobs that are not pipeline parents)."""

    def __init__(self, store: JobStore):
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        by_state = GaugeMetricFamily("w2s_jobs", "Jobs in the job database by state and type.", labels=["state", "type"])
        depth = GaugeMetricFamily("w2s_queue_depth", "Queued jobs waiting for a worker (pipeline stages counted, pipelines not).")
        try:
            with self.store.session() as session:
                rows = session.execute(select(Job.state, Job.type, func.count()).group_by(Job.state, Job.type)).all()
                queued = session.scalar(
                    select(func.count()).select_from(Job).where(Job.state == JobState.QUEUED.value, Job.type != "pipeline")
                ) or 0
        except SQLAlchemyError as error:
            logger.warning("metrics: job counts unavailable, database error: %s", error)
            return
        for state, job_type, count in rows:
            by_state.add_metric([state, job_type], count)
        depth.add_metric([], queued)
        yield by_state
        yield depth


class RequestMetrics:
    """ASGI middleware that counts requests and observes latencies by method, route and status."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry):
        self.app = app
        self.requests = Counter("w2s_http_requests", "HTTP requests.", ["method", "route", "status"], registry=registry)
        self.latency = Histogram(
            "w2s_http_request_duration_seconds", "Time to the response start, in seconds.", ["method", "route"], registry=registry
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_with_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                route = scope.get("route")
                # The route template, not the path, keeps ids out of the label values.
                template = getattr(route, "path", "unmatched")
                self.latency.labels(scope["method"], template).observe(time.perf_counter() - started)
                self.requests.labels(scope["method"], template, str(status["code"])).inc()
            await send(message)

        await self.app(scope, receive, send_with_status)
