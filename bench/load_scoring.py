"""Load benchmark of the scoring service: many concurrent clients against one scorer process.

    python bench/load_scoring.py --clients 64 --requests 2000 --out load_scoring.json

It registers MiniLM-L6 (a pretrained backbone with a fresh reward head) in a new SQLite registry,
starts `uvicorn app.scoring_main:app` on a free port of 127.0.0.1, and sends `--requests` POST
/v1/score requests of `--items` GENIES items each from `--clients` concurrent aiohttp clients.
A 429 (scoring queue full) is the service's deliberate back-pressure: it is counted apart and
not retried. Every other non-200 response, transport error or malformed body counts as failed.
The result (failures, 429s, latency percentiles, throughput, the server's peak RSS) is printed
and written as JSON to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load_common import ROOT, PeakRss, Server, machine, percentiles_ms  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "all-MiniLM-L6-v2"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "genies" / "us_history_textbook" / "test.json.gz"
MAX_FAILURE_EXAMPLES = 10


def build_items(data: Path, count: int) -> list[dict[str, str]]:
    """Return `count` distinct (prompt, response) items from the chosen and rejected responses of `data`."""
    from ml.data import read_preferences

    pairs, _ = read_preferences(data)
    items: list[dict[str, str]] = []
    for pair in pairs:
        for response in (pair.chosen, pair.rejected):
            if isinstance(pair.prompt, str) and isinstance(response, str):
                items.append({"prompt": pair.prompt, "response": response})
        if len(items) >= count:
            break
    if not items:
        raise ValueError(f"{data} has no text pairs to score")
    return items[:count]


def prepare_registry(folder: Path, model_dir: Path) -> tuple[str, str, str]:
    """Create a SQLite registry with the model and a 'score' key; return (database URL, model id, key)."""
    from app.auth import DEVELOPMENT_PRINCIPAL, create_api_key
    from app.schemas.models import ModelRegister
    from app.services.models import register_external
    from workers.db import JobStore, upgrade_database
    from workers.settings import Settings

    database_url = f"sqlite:///{folder / 'jobs.sqlite'}"
    upgrade_database(database_url)
    settings = Settings(var_dir=folder, database_url=database_url, model_dir=model_dir.parent)
    store = JobStore(database_url, settings)
    model, _ = register_external(store, settings, DEVELOPMENT_PRINCIPAL, ModelRegister(name=model_dir.name, path=str(model_dir)))
    _, key = create_api_key(store, "load-benchmark", ["score"])
    return database_url, model.id, key


async def _client(
    session: aiohttp.ClientSession,
    url: str,
    bodies: list[dict[str, Any]],
    next_index: list[int],
    results: dict[str, Any],
    deadline: float,
) -> None:
    while next_index[0] < len(bodies) and time.perf_counter() < deadline:
        body = bodies[next_index[0]]
        next_index[0] += 1
        started = time.perf_counter()
        try:
            async with session.post(url, json=body) as response:
                payload = await response.read()
                elapsed = time.perf_counter() - started
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            results["failed"] += 1
            _example(results, f"{type(error).__name__}: {error}")
            continue
        if status == 429:
            results["rejected_429"] += 1
            continue
        if status != 200:
            results["failed"] += 1
            _example(results, f"HTTP {status}: {payload[:300].decode(errors='replace')}")
            continue
        rewards = [item.get("reward") for item in json.loads(payload).get("items", [])]
        if len(rewards) != len(body["items"]) or not all(isinstance(r, float) and math.isfinite(r) for r in rewards):
            results["failed"] += 1
            _example(results, f"malformed body: {payload[:300].decode(errors='replace')}")
            continue
        results["ok"] += 1
        results["latencies"].append(elapsed)


def _example(results: dict[str, Any], text: str) -> None:
    if len(results["failure_examples"]) < MAX_FAILURE_EXAMPLES:
        results["failure_examples"].append(text)


async def _load(url: str, key: str, bodies: list[dict[str, Any]], clients: int, timeout_s: float, time_limit_s: float) -> dict[str, Any]:
    results: dict[str, Any] = {"ok": 0, "rejected_429": 0, "failed": 0, "latencies": [], "failure_examples": []}
    next_index = [0]
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        started = time.perf_counter()
        deadline = started + time_limit_s
        await asyncio.gather(*[_client(session, f"{url}/v1/score", bodies, next_index, results, deadline) for _ in range(clients)])
        results["wall_s"] = time.perf_counter() - started
        results["sent"] = next_index[0]
    return results


def run(
    *,
    clients: int,
    requests: int,
    items_per_request: int,
    model_dir: Path,
    data: Path,
    precision: str = "auto",
    max_queue: int | None = None,
    max_length: int | None = None,
    request_timeout_s: float = 120.0,
    time_limit_s: float = 1800.0,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return its result; see the module docstring."""
    folder = Path(work_dir or tempfile.mkdtemp(prefix="w2s-load-scoring-"))
    folder.mkdir(parents=True, exist_ok=True)
    database_url, model_id, key = prepare_registry(folder, model_dir)
    pool = build_items(data, 64)
    bodies = [
        {"model": model_id, "items": [pool[(index * items_per_request + k) % len(pool)] for k in range(items_per_request)]}
        for index in range(requests)
    ]

    env = {
        "W2S_VAR_DIR": str(folder),
        "W2S_DATABASE_URL": database_url,
        "W2S_SCORING_PRECISION": precision,
        "W2S_SCORING_PRELOAD_MODELS": json.dumps([model_id]),
    }
    if max_length is not None:
        env["W2S_SCORING_MAX_LENGTH"] = str(max_length)
    if max_queue is not None:
        env["W2S_SCORING_MAX_QUEUE"] = str(max_queue)
        env["W2S_SCORING_MAX_ITEMS"] = str(min(max_queue, 512))
    server = Server.start("app.scoring_main:app", env, folder / "scorer.log")
    try:
        info = _model_info(server.url, key, model_id)
        with PeakRss(server.popen.pid) as memory:
            idle_mb = memory.peak_mb
            results = asyncio.run(_load(server.url, key, bodies, clients, request_timeout_s, time_limit_s))
        served_items = results["ok"] * items_per_request
        return {
            "benchmark": "load_scoring",
            "machine": machine(),
            "model": model_dir.name,
            "precision": info.get("precision"),
            "max_length": info.get("max_length"),
            "clients": clients,
            "requests": requests,
            "sent": results["sent"],
            "time_limit_s": time_limit_s,
            "items_per_request": items_per_request,
            "max_queue": max_queue,
            "ok": results["ok"],
            "rejected_429": results["rejected_429"],
            "failed": results["failed"],
            "failure_examples": results["failure_examples"],
            "latency_ms": percentiles_ms(results["latencies"]),
            "wall_s": round(results["wall_s"], 2),
            "throughput_requests_per_s": round(results["ok"] / results["wall_s"], 1),
            "throughput_items_per_s": round(served_items / results["wall_s"], 1),
            "server_rss_mb": {"loaded_idle": round(idle_mb, 1), "peak": round(memory.peak_mb, 1)},
            "server_exit_code": server.popen.poll(),
        }
    finally:
        server.stop()


def _model_info(url: str, key: str, model_id: str) -> dict[str, Any]:
    import httpx

    response = httpx.get(f"{url}/v1/score/models/{model_id}", headers={"Authorization": f"Bearer {key}"}, timeout=120)
    response.raise_for_status()
    return response.json()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64, help="concurrent HTTP clients")
    parser.add_argument("--requests", type=int, default=2000, help="requests sent in total")
    parser.add_argument("--items", type=int, default=4, help="items per request")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model folder to serve")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="preference file the items come from")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="W2S_SCORING_PRECISION of the server")
    parser.add_argument("--max-queue", type=int, default=None, help="W2S_SCORING_MAX_QUEUE of the server (sequences); default: the service default")
    parser.add_argument("--max-length", type=int, default=None, help="W2S_SCORING_MAX_LENGTH of the server (tokens); default: the model's limit, at most 512")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one request may take before it counts as failed")
    parser.add_argument("--time-limit", type=float, default=1800.0, help="seconds after which no new request is sent; the rest count as not sent")
    parser.add_argument("--out", type=Path, required=True, help="JSON file the result is written to")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(
        clients=args.clients,
        requests=args.requests,
        items_per_request=args.items,
        model_dir=args.model.resolve(),
        data=args.data,
        precision=args.precision,
        max_queue=args.max_queue,
        max_length=args.max_length,
        request_timeout_s=args.timeout,
        time_limit_s=args.time_limit,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(1 if outcome["failed"] else 0)
