"""Dynamic batching of scoring requests from concurrent clients for one loaded model.

Requests are queued as lists of token sequences. A background thread takes a batch when one of
these holds:

- the queued sequences fill the token budget;
- the queue contains at least as many requests as the previous batch did. That is the number of
  clients likely to send again right after their responses, so serial callers are not delayed and
  concurrent callers are not split into a tiny batch and a large one;
- the oldest queued request has waited `max_wait_s`.

A batch is the longest run of queued sequences, in arrival order, whose token counts sum to at
most the token budget (at least one sequence, so a request larger than the budget is split over
several batches). The batch is sorted by length and cut into forward passes whose padded size
(rows × longest row) stays within the budget, which keeps padding low. Arrival order decides which
sequences join a batch, so short sequences cannot starve long ones.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ml.serving.errors import BatcherClosed, QueueFull

logger = logging.getLogger(__name__)

# forward(sequences) -> (rewards [n], OOD distances [n] or None), in the order given.
ForwardFn = Callable[[list[Sequence[int]]], tuple[np.ndarray, np.ndarray | None]]

# Weight of the newest forward pass in the throughput estimate behind Retry-After.
THROUGHPUT_SMOOTHING = 0.2
MAX_RETRY_AFTER_S = 60


class Admission:
    """Bounded count of sequences queued or being scored, shared by every batcher of one engine."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._queued = 0
        self._throughput = 0.0  # sequences per second, smoothed over forward passes

    @property
    def queued(self) -> int:
        return self._queued

    def acquire(self, count: int) -> None:
        """Reserve room for `count` sequences, or raise QueueFull with a Retry-After estimate."""
        with self._lock:
            if self._queued + count > self.capacity:
                raise QueueFull(self._queued, count, self.capacity, self._retry_after_s())
            self._queued += count

    def release(self, count: int) -> None:
        with self._lock:
            self._queued -= count

    def record_throughput(self, sequences: int, seconds: float) -> None:
        if seconds <= 0:
            return
        rate = sequences / seconds
        with self._lock:
            if self._throughput == 0:
                self._throughput = rate
            else:
                self._throughput += THROUGHPUT_SMOOTHING * (rate - self._throughput)

    def _retry_after_s(self) -> int:
        # Seconds until the queue has drained at the recent throughput, at least 1 (HTTP's
        # Retry-After is whole seconds).
        if self._throughput <= 0:
            return 1
        return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(self._queued / self._throughput))))


@dataclass
class BatchResult:
    """Rewards and OOD distances of one request's sequences, in request order."""

    rewards: np.ndarray
    distances: np.ndarray | None


@dataclass(eq=False)
class _Request:
    sequences: list[Sequence[int]]
    future: concurrent.futures.Future
    enqueued_at: float
    rewards: np.ndarray = field(init=False)
    distances: np.ndarray | None = None
    next_index: int = 0  # first sequence not yet taken into a batch
    remaining: int = field(init=False)  # sequences not yet scored
    failed: bool = False

    def __post_init__(self) -> None:
        self.rewards = np.empty(len(self.sequences), dtype=np.float64)
        self.remaining = len(self.sequences)


class DynamicBatcher:
    """Queue and batch scoring requests for one model on one background thread."""

    def __init__(
        self,
        forward: ForwardFn,
        *,
        token_budget: int,
        max_wait_s: float,
        admission: Admission,
        execution_lock: threading.Lock | None = None,
        name: str = "model",
    ):
        self._forward = forward
        self.token_budget = token_budget
        self.max_wait_s = max_wait_s
        self._admission = admission
        # Forward passes of different models take turns, so they do not compete for the same cores.
        self._execution_lock = execution_lock or threading.Lock()
        self.name = name
        self._cond = threading.Condition()
        self._pending: collections.deque[_Request] = collections.deque()
        self._pending_tokens = 0
        self._expected_requests = 1
        self._closed = False
        self._stats = {"forward_passes": 0, "sequences": 0, "tokens": 0, "padded_tokens": 0, "forward_seconds": 0.0}
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, float]:
        """Totals since start: forward passes, sequences, real and padded tokens, seconds in forward."""
        return dict(self._stats)

    def submit(self, sequences: Sequence[Sequence[int]]) -> concurrent.futures.Future:
        """Queue one request; the future resolves to its `BatchResult`.

        Raises QueueFull when the engine's queue cannot take the sequences, and BatcherClosed
        after `close()`.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not sequences:
            future.set_result(BatchResult(np.empty(0), None))
            return future
        self._admission.acquire(len(sequences))
        request = _Request(list(sequences), future, time.monotonic())
        with self._cond:
            if self._closed:
                self._admission.release(len(sequences))
                raise BatcherClosed(f"batcher of {self.name} is closed")
            self._pending.append(request)
            self._pending_tokens += sum(len(s) for s in request.sequences)
            self._cond.notify()
        return future

    def close(self, wait: bool = False) -> None:
        """Stop taking requests; queued requests are still scored before the thread ends."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if wait:
            self._thread.join()

    # --- background thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                self._wait_for_batch()
                batch = self._take_batch()
            self._run(batch)

    def _wait_for_batch(self) -> None:
        """Wait (holding the condition) until a batch should start; see the module docstring."""
        while not self._closed:
            deadline = self._pending[0].enqueued_at + self.max_wait_s
            remaining = deadline - time.monotonic()
            if (
                self._pending_tokens >= self.token_budget
                or len(self._pending) >= self._expected_requests
                or remaining <= 0
            ):
                return
            self._cond.wait(remaining)

    def _take_batch(self) -> list[tuple[_Request, int]]:
        """Remove the longest arrival-order run of sequences within the token budget."""
        batch: list[tuple[_Request, int]] = []
        tokens = 0
        while self._pending:
            request = self._pending[0]
            if request.future.cancelled():
                # The client went away (its HTTP request was cancelled): drop what is still queued.
                untaken = len(request.sequences) - request.next_index
                self._pending_tokens -= sum(len(s) for s in request.sequences[request.next_index :])
                self._admission.release(untaken)
                self._pending.popleft()
                continue
            while request.next_index < len(request.sequences):
                length = len(request.sequences[request.next_index])
                if batch and tokens + length > self.token_budget:
                    self._pending_tokens -= tokens
                    return batch
                batch.append((request, request.next_index))
                tokens += length
                request.next_index += 1
            self._pending.popleft()
        self._pending_tokens -= tokens
        return batch

    def _run(self, batch: list[tuple[_Request, int]]) -> None:
        self._expected_requests = len({id(request) for request, _ in batch})
        batch.sort(key=lambda entry: len(entry[0].sequences[entry[1]]), reverse=True)
        start = 0
        while start < len(batch):
            longest = len(batch[start][0].sequences[batch[start][1]])
            rows = max(1, self.token_budget // max(longest, 1))
            chunk = batch[start : start + rows]
            start += len(chunk)
            self._run_chunk(chunk)

    def _run_chunk(self, chunk: list[tuple[_Request, int]]) -> None:
        sequences = [request.sequences[index] for request, index in chunk]
        began = time.perf_counter()
        try:
            with self._execution_lock:
                rewards, distances = self._forward(sequences)
        except Exception as error:  # a failed forward fails its requests, not the batcher
            logger.exception("model %s: forward pass of %d sequences failed", self.name, len(sequences))
            for request in {id(r): r for r, _ in chunk}.values():
                request.failed = True
                try:
                    request.future.set_exception(error)
                except concurrent.futures.InvalidStateError:
                    pass  # cancelled by its caller while being scored
            self._finish(chunk)
            return
        seconds = time.perf_counter() - began
        self._admission.record_throughput(len(sequences), seconds)
        self._stats["forward_passes"] += 1
        self._stats["sequences"] += len(sequences)
        self._stats["tokens"] += sum(len(s) for s in sequences)
        self._stats["padded_tokens"] += len(sequences) * max(len(s) for s in sequences)
        self._stats["forward_seconds"] += seconds
        for row, (request, index) in enumerate(chunk):
            request.rewards[index] = rewards[row]
            if distances is not None:
                if request.distances is None:
                    request.distances = np.empty(len(request.sequences), dtype=np.float64)
                request.distances[index] = distances[row]
        self._finish(chunk)

    def _finish(self, chunk: list[tuple[_Request, int]]) -> None:
        self._admission.release(len(chunk))
        for request, _ in chunk:
            request.remaining -= 1
            if request.remaining == 0 and not request.failed:
                try:
                    request.future.set_result(BatchResult(request.rewards, request.distances))
                except concurrent.futures.InvalidStateError:
                    pass  # cancelled by its caller while being scored
