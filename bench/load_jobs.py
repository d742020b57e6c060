"""Load benchmark of the jobs API: a burst of small evaluate jobs over HTTP, drained by real workers.

    python bench/load_jobs.py --jobs 200 --workers 1 --out load_jobs.json

It starts its own `redis-server` on a free port, `uvicorn app.main:app` on 127.0.0.1 over a new
SQLite job database, and `--workers` Celery worker subprocesses. It then sends `--jobs` POST
/v1/jobs requests at once: each requests an evaluate job of MiniLM-L6 (pretrained backbone, fresh
reward head) on a `--pairs`-pair slice of a GENIES test file. Every request must be accepted
(202) or refused with 429 (queue full, W2S_MAX_QUEUED_JOBS); anything else counts as failed.
It waits until every accepted job is finished and reports a job as lost when it is missing or
not finished by `--drain-timeout`. The result is printed and written as JSON to `--out`.
Only the processes it started are stopped, by process id.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load_common import ROOT, Server, machine  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "genies" / "us_history_textbook" / "test.json.gz"
MODELS_DIR = ROOT / "models"
MODEL = "all-MiniLM-L6-v2"
FINAL_STATES = {"succeeded", "failed", "cancelled"}
MAX_FAILURE_EXAMPLES = 10


def write_slice(data: Path, pairs: int, folder: Path) -> Path:
    """Write the first `pairs` pairs of `data` as JSON Lines into `folder` and return the file."""
    from ml.data import read_preferences, write_pairs_jsonl

    rows, _ = read_preferences(data)
    if len(rows) < pairs:
        raise ValueError(f"{data} has {len(rows)} pairs, fewer than --pairs {pairs}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"slice_{pairs}.jsonl"
    write_pairs_jsonl(rows[:pairs], path)
    return path


def evaluate_request(data_file: str) -> dict[str, Any]:
    return {
        "type": "evaluate",
        "config": {
            "name": "load",
            "models": {"minilm": MODEL},
            "source": {"name": "slice", "test": data_file},
            "eval": {"max_length": 64, "batch_size": 32, "bootstrap_samples": 100, "precision": "fp32"},
        },
    }


async def _burst(url: str, key: str, body: dict[str, Any], jobs: int) -> dict[str, Any]:
    results: dict[str, Any] = {"accepted": [], "rejected_429": 0, "failed": 0, "failure_examples": [], "statuses": {}}
    headers = {"Authorization": f"Bearer {key}"}
    timeout = aiohttp.ClientTimeout(total=300)

    async def submit(session: aiohttp.ClientSession) -> None:
        try:
            async with session.post(f"{url}/v1/jobs", json=body) as response:
                payload = await response.read()
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            results["failed"] += 1
            _example(results, f"{type(error).__name__}: {error}")
            return
        results["statuses"][str(status)] = results["statuses"].get(str(status), 0) + 1
        if status in (201, 202):
            results["accepted"].append(json.loads(payload)["id"])
        elif status == 429:
            results["rejected_429"] += 1
        else:
            results["failed"] += 1
            _example(results, f"HTTP {status}: {payload[:300].decode(errors='replace')}")

    async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=aiohttp.TCPConnector(limit=jobs)) as session:
        started = time.perf_counter()
        await asyncio.gather(*[submit(session) for _ in range(jobs)])
        results["burst_s"] = time.perf_counter() - started
    return results


def _example(results: dict[str, Any], text: str) -> None:
    if len(results["failure_examples"]) < MAX_FAILURE_EXAMPLES:
        results["failure_examples"].append(text)


def _wait_drained(client: httpx.Client, timeout_s: float) -> bool:
    """Poll the jobs list until no job is queued or running; return False on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = client.get("/v1/jobs", params={"state": ["queued", "running"], "limit": 1})
        response.raise_for_status()
        if response.json()["total"] == 0:
            return True
        time.sleep(1)
    return False


def _final_states(client: httpx.Client, job_ids: list[str]) -> dict[str, str]:
    states = {}
    for job_id in job_ids:
        response = client.get(f"/v1/jobs/{job_id}")
        states[job_id] = response.json()["state"] if response.status_code == 200 else f"HTTP {response.status_code}"
    return states


def run(
    *,
    jobs: int,
    workers: int,
    pairs: int,
    data: Path,
    max_queued_jobs: int = 100,
    drain_timeout_s: float = 1800.0,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return its result; see the module docstring."""
    from app.auth import create_api_key
    from tests.workers.worker_harness import Deployment, RedisServer, settings_env

    folder = Path(work_dir or tempfile.mkdtemp(prefix="w2s-load-jobs-"))
    folder.mkdir(parents=True, exist_ok=True)
    data_dir = folder / "data"
    slice_file = write_slice(data, pairs, data_dir)

    redis_server = RedisServer.start_new(folder / "redis")
    deployment = None
    server = None
    try:
        deployment = Deployment.create(
            folder / "deployment",
            broker="redis",
            broker_url=redis_server.url,
            data_dir=data_dir,
            model_dir=MODELS_DIR,
            max_queued_jobs=max_queued_jobs,
        )
        _, key = create_api_key(deployment.store, "load-benchmark", ["jobs"])
        for index in range(workers):
            deployment.start_worker(f"load{index + 1}")
        server = Server.start("app.main:app", settings_env(deployment.settings), folder / "api.log")

        started = time.perf_counter()
        burst = asyncio.run(_burst(server.url, key, evaluate_request(slice_file.name), jobs))
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            drained = _wait_drained(client, drain_timeout_s)
            drain_s = time.perf_counter() - started
            states = _final_states(client, burst["accepted"])

        lost = [job_id for job_id, state in states.items() if state not in FINAL_STATES]
        counts: dict[str, int] = {}
        for state in states.values():
            counts[state] = counts.get(state, 0) + 1
        finished = counts.get("succeeded", 0)
        return {
            "benchmark": "load_jobs",
            "machine": machine(),
            "jobs": jobs,
            "workers": workers,
            "pairs_per_job": pairs,
            "max_queued_jobs": max_queued_jobs,
            "accepted": len(burst["accepted"]),
            "rejected_429": burst["rejected_429"],
            "failed_requests": burst["failed"],
            "failure_examples": burst["failure_examples"],
            "http_statuses": burst["statuses"],
            "burst_s": round(burst["burst_s"], 2),
            "job_states": counts,
            "lost": len(lost),
            "lost_examples": lost[:MAX_FAILURE_EXAMPLES],
            "drained": drained,
            "drain_s": round(drain_s, 1),
            "seconds_per_job": round(drain_s / finished, 2) if finished else None,
        }
    finally:
        if server is not None:
            server.stop()
        if deployment is not None:
            deployment.close()
        redis_server.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="evaluate jobs submitted at once")
    parser.add_argument("--workers", type=int, default=1, help="Celery worker processes (one job at a time each)")
    parser.add_argument("--pairs", type=int, default=20, help="preference pairs each job evaluates")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="preference file the slice is cut from")
    parser.add_argument("--max-queued", type=int, default=100, help="W2S_MAX_QUEUED_JOBS of the API: queued jobs before 429")
    parser.add_argument("--drain-timeout", type=float, default=1800.0, help="seconds to wait for every accepted job to finish")
    parser.add_argument("--out", type=Path, required=True, help="JSON file the result is written to")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(
        jobs=args.jobs,
        workers=args.workers,
        pairs=args.pairs,
        data=args.data,
        max_queued_jobs=args.max_queued,
        drain_timeout_s=args.drain_timeout,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(1 if outcome["failed_requests"] or outcome["lost"] else 0)
