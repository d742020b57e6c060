"""Benchmark: scoring service throughput and latency over HTTP, against a naive loop and the ceiling.

For each model, in one run so the ratios share the machine's state:

1. in-process, the same items the HTTP clients send:
   - naive loop: tokenize one item and run one stock HF forward (`model(**inputs).logits`) per item;
   - ceiling: the raw batched forward (`ml.modeling.reward_forward`) on pre-tokenized items,
     sorted by length and cut by the same token budget as the server;
   - one forward of a single pre-tokenized item (the latency floor of a one-item request);
   - batch invariance: max |reward alone − reward in a batch| in fp32 and bf16;
2. over HTTP, against `uvicorn app.scoring_main:app` in a subprocess on 127.0.0.1: 1, 8 and 32
   concurrent clients in one asyncio process (aiohttp), each sending requests back to back for a
   fixed time; items/s, p50 and p99 request latency, and the CPU seconds of the load generator
   and of the server;
3. single-request latency: one client, one item per request, sequential.

The served model is the prepared model directory plus a metadata file with normalization and an
OOD summary fitted on GENIES pairs, so the HTTP path includes the OOD distance computation.

Usage: python bench/serving.py [--models models/all-MiniLM-L6-v2 models/all-mpnet-base-v2]
       [--clients 1 8 32] [--request-items 1 8] [--duration 8] [--max-length 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ml.modeling import autocast, load_reward_model, resolve_precision, reward_forward  # noqa: E402
from ml.ood import OOD_LAYER, fit_ood_summary  # noqa: E402
from ml.render import Renderer, pad_batch  # noqa: E402
from ml.scoring import score  # noqa: E402
from ml.train import load_limited  # noqa: E402

GENIES = ROOT.parent / "shared" / "data" / "genies" / "us_history_textbook"
WORK = ROOT / "var" / "bench" / "serving"
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Scoring service throughput"
TOKEN_BUDGET = 8192
# Reference and held-out sequences of the bench models' OOD summaries; small, because the summary's
# quality does not matter here, only the cost of computing the distance.
OOD_REFERENCE_PAIRS = 96
OOD_HELDOUT_PAIRS = 32
STARTUP_TIMEOUT_S = 180
CEILING_ROWS = (8, 16, 32, 64)


# --- setup ----------------------------------------------------------------------------------------


def workload(n_items: int) -> list[tuple[str, str]]:
    """Distinct (prompt, response) items from the GENIES us_history_textbook test set."""
    pairs = load_limited(str(GENIES / "test.json.gz"))
    items = list(dict.fromkeys([(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]))
    return items[:n_items]


def prepare_bench_model(model_dir: Path, max_length: int, precision: str) -> Path:
    """Write a model folder of links to `model_dir` plus metadata with normalization and an OOD summary."""
    target = WORK / "models" / model_dir.name
    if (target / "w2s_metadata.json").is_file():
        return target
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for source in model_dir.iterdir():
        (target / source.name).symlink_to(source.resolve())

    rm = load_reward_model(model_dir)
    train = load_limited(str(GENIES / "train.json.gz"))[:OOD_REFERENCE_PAIRS]
    heldout = load_limited(str(GENIES / "test.json.gz"))[-OOD_HELDOUT_PAIRS:]

    def pooled(pairs):
        result = score(rm, [(p.prompt, p.chosen) for p in pairs], max_length=max_length, precision=precision, layers=[OOD_LAYER])
        return result.rewards, result.pooled[0]

    _, reference = pooled(train)
    rewards, held = pooled(heldout)
    summary = fit_ood_summary(reference, held, components=32)
    metadata = {
        "format_version": 1,
        "base_model": str(model_dir),
        "training_config": {"max_length": max_length},
        "normalization": {"mean": float(rewards.mean()), "std": float(rewards.std() or 1.0), "n": int(rewards.size)},
        "ood": summary.to_dict(),
        "note": "benchmark copy of an untrained head; the statistics only exercise the serving path",
    }
    (target / "w2s_metadata.json").write_text(json.dumps(metadata))
    return target


# --- in-process measurements ----------------------------------------------------------------------


def naive_loop(rm, items, max_length: int, precision: str) -> float:
    """Items/s of one tokenizer call and one stock HF forward per item."""
    device = rm.device
    began = time.perf_counter()
    with torch.inference_mode():
        for prompt, response in items:
            inputs = rm.tokenizer(prompt + response, truncation=True, max_length=max_length, return_tensors="pt")
            with autocast(precision, device):
                rm.model(**inputs.to(device)).logits.float().item()
    return len(items) / (time.perf_counter() - began)


def batches_within_budget(encoded, budget: int, max_rows: int | None = None) -> list[list[int]]:
    """Indices sorted by length (longest first) and cut so rows × longest row stays within `budget`."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    batches, start = [], 0
    while start < len(order):
        rows = max(1, budget // len(encoded[order[start]]))
        rows = min(rows, max_rows) if max_rows else rows
        batches.append(order[start : start + rows])
        start += rows
    return batches


def batched_rewards(rm, encoded, precision: str, budget: int, max_rows: int | None = None) -> np.ndarray:
    rewards = np.empty(len(encoded))
    with torch.inference_mode():
        for batch in batches_within_budget(encoded, budget, max_rows):
            ids, mask = pad_batch([encoded[i] for i in batch], rm.tokenizer.pad_token_id)
            with autocast(precision, rm.device):
                rewards[batch] = reward_forward(rm.model, ids, mask).rewards.double().numpy()
    return rewards


def ceiling(rm, encoded, precision: str, budget: int, repeats: int) -> tuple[float, int]:
    """Best items/s of the raw batched forward on pre-tokenized items, and the batch rows that gave it.

    No HTTP and no tokenization. Batches are capped at 8, 16, 32 and 64 rows (and by the token
    budget), because on a CPU the largest batch is not always the fastest per item.
    """
    batched_rewards(rm, encoded[:64], precision, budget)  # warm-up
    best = (0.0, 0)
    for max_rows in CEILING_ROWS:
        began = time.perf_counter()
        for _ in range(repeats):
            batched_rewards(rm, encoded, precision, budget, max_rows)
        best = max(best, (repeats * len(encoded) / (time.perf_counter() - began), max_rows))
    return best


def single_forward_ms(rm, encoded, precision: str) -> float:
    """Median milliseconds of one forward pass of one pre-tokenized item."""
    times = []
    with torch.inference_mode():
        for sequence in encoded:
            ids, mask = pad_batch([sequence], rm.tokenizer.pad_token_id)
            began = time.perf_counter()
            with autocast(precision, rm.device):
                reward_forward(rm.model, ids, mask).rewards.item()
            times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)


def batch_difference(rm, encoded, precision: str, std: float) -> float:
    """Max |reward alone − reward inside a length-mixed batch|, in units of the rewards' std."""
    alone = np.array([batched_rewards(rm, [sequence], precision, TOKEN_BUDGET)[0] for sequence in encoded])
    together = batched_rewards(rm, encoded, precision, TOKEN_BUDGET)
    return float(np.abs(alone - together).max() / std)


# --- HTTP -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, read from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Server:
    """A scorer subprocess serving the bench models from a throwaway registry, without auth."""

    def __init__(self, model_dirs: dict[str, Path], precision: str, max_wait_ms: float):
        from app.services.models import set_alias
        from app.auth import DEVELOPMENT_PRINCIPAL
        from workers.db import JobStore, upgrade_database
        from workers.settings import Settings

        # One folder per server: workers.db caches one engine per database URL in this process, so a
        # database file deleted and recreated under the same URL would be written through a stale engine.
        folder = WORK / "server" / "-".join(sorted(model_dirs))
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        url = f"sqlite:///{folder / 'jobs.sqlite'}"
        upgrade_database(url)
        store = JobStore(url, Settings(var_dir=folder, database_url=url))
        for name, path in model_dirs.items():
            set_alias(store, DEVELOPMENT_PRINCIPAL, name, store.register_model(name, path).id)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "W2S_VAR_DIR": str(folder),
            "W2S_DATABASE_URL": url,
            "W2S_AUTH_DISABLED": "true",
            "W2S_SCORING_PRECISION": precision,
            "W2S_SCORING_TOKEN_BUDGET": str(TOKEN_BUDGET),
            "W2S_SCORING_MAX_WAIT_MS": str(max_wait_ms),
            "W2S_SCORING_PRELOAD_MODELS": json.dumps(list(model_dirs)),
            "HF_HUB_OFFLINE": "1",
        }
        self.log = (folder / "scorer.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.scoring_main:app", "--host", "127.0.0.1", "--port", str(self.port),
             "--no-access-log", "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        import urllib.request

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"scorer exited with {self.process.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/health/live", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"scorer did not start within {STARTUP_TIMEOUT_S} s; see {self.log.name}")

    def batching(self, model: str) -> dict:
        """Return the batcher totals the server reports for `model`."""
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/v1/score/models/{model}", timeout=30) as response:
            return json.loads(response.read())["batching"]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


async def load(url: str, model: str, items, clients: int, request_items: int, duration_s: float, server_pid: int) -> dict:
    """Run `clients` back-to-back senders and measure the window of `duration_s` after a warm-up.

    Senders run through the warm-up and the window without pause, so the window measures the steady
    state. Throughput counts the items of requests that completed inside the window, and latency
    percentiles are over those requests. CPU seconds are read at the window's start and end.
    """
    import aiohttp

    warm_up_s = min(2.0, duration_s / 4)
    began = time.perf_counter()
    window_start = began + warm_up_s
    window_end = window_start + duration_s
    completed: list[tuple[float, float, bool]] = []  # (finished at, latency, succeeded)
    cpu: dict[str, float] = {}

    async def sender(session, offset: int) -> None:
        cursor = offset * request_items
        while time.perf_counter() < window_end:
            batch = [items[(cursor + i) % len(items)] for i in range(request_items)]
            cursor += clients * request_items
            body = {"model": model, "items": [{"prompt": p, "response": r} for p, r in batch]}
            sent = time.perf_counter()
            async with session.post(f"{url}/v1/score", json=body) as response:
                await response.read()
                succeeded = response.status == 200
            finished = time.perf_counter()
            completed.append((finished, finished - sent, succeeded))

    async def read_cpu(at: float, label: str) -> None:
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        cpu[f"loadgen_{label}"] = own_cpu_seconds()
        cpu[f"server_{label}"] = cpu_seconds(server_pid)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(
            read_cpu(window_start, "start"),
            read_cpu(window_end, "end"),
            *(sender(session, i) for i in range(clients)),
        )
    inside = [(latency, ok) for finished, latency, ok in completed if window_start <= finished < window_end]
    latencies = [latency for latency, _ in inside]
    return {
        "clients": clients,
        "request_items": request_items,
        "items_per_s": request_items * sum(ok for _, ok in inside) / duration_s,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
        "requests": len(inside),
        "failures": sum(not ok for _, ok in inside),
        "loadgen_cpu_s": cpu["loadgen_end"] - cpu["loadgen_start"],
        "server_cpu_s": cpu["server_end"] - cpu["server_start"],
        "window_s": duration_s,
    }


# --- report ---------------------------------------------------------------------------------------


def bench_model(model_dir: Path, args) -> dict:
    precision = resolve_precision(args.precision, torch.device("cpu"))
    served_dir = prepare_bench_model(model_dir, args.max_length, precision)
    items = workload(args.items)
    rm = load_reward_model(model_dir)
    renderer = Renderer(rm.tokenizer, args.max_length)
    encoded = [renderer.encode(p, r).input_ids for p, r in items]
    std = float(json.loads((served_dir / "w2s_metadata.json").read_text())["normalization"]["std"])

    ceiling_items_per_s, ceiling_rows = ceiling(rm, encoded, precision, TOKEN_BUDGET, repeats=args.ceiling_repeats)
    result = {
        "ceiling_items_per_s": ceiling_items_per_s,
        "ceiling_rows": ceiling_rows,
        "model": model_dir.name,
        "precision": precision,
        "items": len(items),
        "mean_tokens": float(np.mean([len(e) for e in encoded])),
        "naive_items_per_s": naive_loop(rm, items[: args.naive_items], args.max_length, precision),
        "single_forward_ms": single_forward_ms(rm, encoded[: args.latency_requests], precision),
        "batch_difference_std": {p: batch_difference(rm, encoded[:32], p, std) for p in ("fp32", "bf16")},
    }
    print(json.dumps(result), flush=True)
    del rm

    server = Server({model_dir.name: served_dir}, precision, args.max_wait_ms)
    try:
        runs = []
        for request_items in args.request_items:
            for clients in args.clients:
                before = server.batching(model_dir.name)
                run = asyncio.run(load(server.url, model_dir.name, items, clients, request_items, args.duration, server.process.pid))
                # The batcher totals include the warm-up and the requests finishing after the window.
                after = server.batching(model_dir.name)
                passes = max(after["forward_passes"] - before["forward_passes"], 1)
                run["rows_per_forward"] = (after["sequences"] - before["sequences"]) / passes
                run["padding_efficiency"] = (after["tokens"] - before["tokens"]) / max(after["padded_tokens"] - before["padded_tokens"], 1)
                runs.append(run)
                print(json.dumps(run), flush=True)
        single = asyncio.run(load(server.url, model_dir.name, items[: args.latency_requests], 1, 1, args.duration, server.process.pid))
    finally:
        server.stop()
    result["http"] = runs
    result["single_request"] = single
    return result


def markdown(results: list[dict], args) -> str:
    lines = [
        SECTION,
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} by `python bench/serving.py` on {platform.machine()}, "
        f"{os.cpu_count()} CPU cores shared by the server, the load generator and the in-process baselines "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads). Items are GENIES us_history_textbook "
        f"test pairs, cut to {args.max_length} tokens; token budget {TOKEN_BUDGET}, max wait {args.max_wait_ms} ms; "
        f"each HTTP configuration was measured over a {args.duration} s window after a warm-up, with the clients sending "
        "without pause throughout. Naive loop: one tokenizer call and one stock HF forward per item. Ceiling: "
        "`reward_forward` on pre-tokenized items sorted by length, same token budget, in-process. Load generator: "
        "one asyncio process with aiohttp. CPU seconds are those of the load generator and of the server within the "
        "window; rows/forward is the server's mean batch size. The server runs without authentication (one "
        "database lookup per request when keys are checked). The server used close to 2 CPU seconds per second "
        "in every configuration, one sequential client included.",
        "",
    ]
    for result in results:
        lines += [
            f"### {result['model']} ({result['precision']}, mean {result['mean_tokens']:.0f} tokens per item)",
            "",
            f"Naive loop {result['naive_items_per_s']:.1f} items/s; ceiling {result['ceiling_items_per_s']:.1f} items/s "
            f"(best of batches capped at {', '.join(map(str, CEILING_ROWS))} rows: {result['ceiling_rows']}); "
            f"one forward of one item {result['single_forward_ms']:.1f} ms (median).",
            "",
            "| items/request | clients | items/s | vs ceiling | vs naive | p50 ms | p99 ms | failed | rows/forward | load-gen CPU s | server CPU s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for run in result["http"]:
            lines.append(
                f"| {run['request_items']} | {run['clients']} | {run['items_per_s']:.1f} | "
                f"{run['items_per_s'] / result['ceiling_items_per_s']:.2f} | {run['items_per_s'] / result['naive_items_per_s']:.1f} | "
                f"{run['p50_ms']:.1f} | {run['p99_ms']:.1f} | {run['failures']} | {run['rows_per_forward']:.1f} | "
                f"{run['loadgen_cpu_s']:.1f} | {run['server_cpu_s']:.1f} |"
            )
        single = result["single_request"]
        lines += [
            "",
            f"Single request (1 client, 1 item): p50 {single['p50_ms']:.1f} ms, p99 {single['p99_ms']:.1f} ms, "
            f"{single['p50_ms'] / result['single_forward_ms']:.2f} times one forward.",
            f"Batch invariance (max |alone − batched| / reward std, 32 items of mixed length): "
            f"fp32 {result['batch_difference_std']['fp32']:.1e}, bf16 {result['batch_difference_std']['bf16']:.1e}.",
            "",
        ]
    return "\n".join(lines)


def write_section(text: str) -> None:
    """Replace this benchmark's section of bench/RESULTS.md, or append it; other sections stay."""
    existing = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n"
    start = existing.find(SECTION)
    if start == -1:
        updated = existing.rstrip("\n") + "\n\n" + text
    else:
        following = existing.find("\n## ", start + len(SECTION))
        updated = existing[:start] + text + ("\n" + existing[following + 1 :] if following != -1 else "")
    RESULTS.write_text(updated.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["models/all-MiniLM-L6-v2", "models/all-mpnet-base-v2"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32], help="Concurrent HTTP clients per run.")
    parser.add_argument("--request-items", nargs="+", type=int, default=[1, 8], help="Items per HTTP request.")
    parser.add_argument("--duration", type=float, default=8.0, help="Seconds each HTTP configuration is measured.")
    parser.add_argument("--max-length", type=int, default=128, help="Tokens per item.")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="Server batcher max wait, milliseconds.")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--items", type=int, default=256, help="Distinct items in the workload.")
    parser.add_argument("--naive-items", type=int, default=96, help="Items the naive loop scores.")
    parser.add_argument("--ceiling-repeats", type=int, default=1, help="Passes over the workload per ceiling batch size.")
    parser.add_argument("--latency-requests", type=int, default=48, help="Items of the single-request latency runs.")
    parser.add_argument("--no-write", action="store_true", help="Print the section instead of writing bench/RESULTS.md.")
    args = parser.parse_args()

    results = [bench_model(ROOT / model if not Path(model).is_absolute() else Path(model), args) for model in args.models]
    (WORK / "results.json").write_text(json.dumps(results, indent=1))
    text = markdown(results, args)
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
