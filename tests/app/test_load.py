"""Shortened runs of the load benchmarks (bench/load_scoring.py, bench/load_jobs.py).

They check correctness under concurrency, not speed: no request may fail other than with a
deliberate 429, and no accepted job may be lost. The speed figures belong to the full runs
recorded in docs/RELIABILITY.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import load_jobs, load_scoring

pytestmark = pytest.mark.slow


def test_scoring_under_concurrent_clients(tmp_path: Path, minilm_dir: Path, genies: Path) -> None:
    result = load_scoring.run(
        clients=8,
        requests=100,
        items_per_request=2,
        model_dir=minilm_dir,
        data=genies / "us_history_textbook" / "test.json.gz",
        precision="fp32",
        max_length=128,
        work_dir=tmp_path / "scoring",
    )

    assert result["failed"] == 0, result["failure_examples"]
    assert result["sent"] == 100
    assert result["ok"] + result["rejected_429"] == 100
    # The default queue (4096 sequences) has room for 8 clients x 4 items, so nothing is rejected here.
    assert result["rejected_429"] == 0
    assert result["server_exit_code"] is None
    assert result["latency_ms"]["p50"] is not None
    assert result["server_rss_mb"]["peak"] > 0


def test_scoring_back_pressure_is_429_only(tmp_path: Path, minilm_dir: Path, genies: Path) -> None:
    """With a queue of 8 sequences, 8 clients of 4 items overflow it: the surplus gets 429, nothing fails."""
    result = load_scoring.run(
        clients=8,
        requests=100,
        items_per_request=4,
        model_dir=minilm_dir,
        data=genies / "us_history_textbook" / "test.json.gz",
        precision="fp32",
        max_length=128,
        max_queue=8,
        work_dir=tmp_path / "scoring-429",
    )

    assert result["failed"] == 0, result["failure_examples"]
    assert result["sent"] == 100
    assert result["ok"] + result["rejected_429"] == 100
    assert result["rejected_429"] > 0
    assert result["ok"] > 0


def test_job_burst_loses_no_job(tmp_path: Path, genies: Path) -> None:
    jobs = 20
    result = load_jobs.run(
        jobs=jobs,
        workers=1,
        pairs=20,
        data=genies / "us_history_textbook" / "test.json.gz",
        max_queued_jobs=12,
        drain_timeout_s=600,
        work_dir=tmp_path / "jobs",
    )

    assert result["failed_requests"] == 0, result["failure_examples"]
    assert result["accepted"] + result["rejected_429"] == jobs
    assert result["accepted"] >= 12
    assert result["lost"] == 0, result["lost_examples"]
    assert result["drained"]
    assert result["job_states"] == {"succeeded": result["accepted"]}
