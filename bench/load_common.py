"""Helpers of the load benchmarks: a uvicorn server subprocess, its peak memory, and latency percentiles."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.workers.worker_harness import free_port  # noqa: E402


@dataclass
class Server:
    """A `uvicorn MODULE` subprocess on 127.0.0.1 and its log file."""

    popen: subprocess.Popen
    url: str
    log: Path

    @classmethod
    def start(cls, module: str, env: dict[str, str], log: Path, timeout_s: float = 180.0) -> "Server":
        port = free_port()
        full_env = {key: value for key, value in os.environ.items() if not key.startswith("W2S_")}
        full_env.update(env, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        with log.open("wb") as output:
            popen = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", module, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                cwd=ROOT,
                env=full_env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        server = cls(popen=popen, url=f"http://127.0.0.1:{port}", log=log)
        server.wait_live(timeout_s)
        return server

    def wait_live(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"server exited with {self.popen.returncode} at startup:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v1/health/live", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server did not respond within {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """Stop this server by its process id: SIGTERM, then SIGKILL after 30 s."""
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)


@dataclass
class PeakRss:
    """Sampler of the resident memory of one process and its children, on a thread; `peak_mb` is the maximum."""

    pid: int
    interval_s: float = 0.1
    peak_bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> int:
        try:
            process = psutil.Process(self.pid)
            total = process.memory_info().rss
            for child in process.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            return 0
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def __enter__(self) -> "PeakRss":
        self.sample()

        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                self.sample()

        self._thread = threading.Thread(target=loop, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


def percentiles_ms(latencies_s: list[float]) -> dict[str, float | None]:
    if not latencies_s:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    values = np.asarray(latencies_s) * 1000
    return {
        "p50": round(float(np.percentile(values, 50)), 1),
        "p95": round(float(np.percentile(values, 95)), 1),
        "p99": round(float(np.percentile(values, 99)), 1),
        "max": round(float(values.max()), 1),
    }


def machine() -> dict[str, object]:
    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
