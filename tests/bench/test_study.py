"""The transfer study's machinery on a real (tiny) run: CLI jobs, results records, generated section."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import study  # noqa: E402
from ml.select import choose_lambda  # noqa: E402


def test_hierarchical_bootstrap_covers_seed_spread():
    rng = np.random.default_rng(0)
    prompt_ids = [str(i // 3) for i in range(300)]
    steady = (rng.random((5, 300)) < 0.7).astype(float)
    mean, low, high = study.hierarchical_bootstrap(steady, prompt_ids, n=500)
    assert low < mean < high
    assert abs(mean - steady.mean()) < 1e-12
    # Seeds that disagree a lot widen the interval beyond what the prompts alone give.
    shifted = steady.copy()
    shifted[0] = 1.0
    shifted[1] = 0.0
    _, low2, high2 = study.hierarchical_bootstrap(shifted, prompt_ids, n=500)
    assert high2 - low2 > high - low


# Two seeds of five small MiniLM pipelines: minutes on a quiet 2-core machine, longer when shared.
@pytest.mark.timeout(2400)
def test_smoke_study_records_runs_and_generates_the_section(tmp_path):
    results = tmp_path / "transfer.jsonl"
    run = [sys.executable, "bench/study.py", "run", "--plan", "smoke", "--student", "minilm",
           "--shifts", "us_history_textbook", "--seeds", "0", "1", "--out", str(tmp_path / "runs"), "--results", str(results)]
    subprocess.run(run, cwd=ROOT, check=True, timeout=1200)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["seed"] for r in records] == [0, 1]
    # Same weak labels for every seed; the students differ by seed.
    assert records[0]["weak"] == records[1]["weak"]
    assert records[0]["models"]["weak"]["us_history_fiction"]["correct"] == records[1]["models"]["weak"]["us_history_fiction"]["correct"]
    assert set(records[0]["sets"]) == {"us_history_textbook", "us_history_fiction", "hh_harmless"}
    assert {"naive", "anchored", "anchored[lambda=1]", "ceiling"} <= set(records[0]["models"])
    assert records[0]["selection"]["lambda"] in (0.0, 1.0)
    assert records[0]["selection"]["reason"]

    # The 'auto' arm of seed 0: gold validation pairs held out of B, and the rule applied to them.
    run_dir = tmp_path / "runs" / "smoke" / "minilm" / "us_history_textbook" / "seed0"
    validation = [json.loads(line) for line in (run_dir / "weak" / "validation.jsonl").read_text().splitlines()]
    labels = [json.loads(line) for line in (run_dir / "weak" / "labels.jsonl").read_text().splitlines()]
    assert validation and all("label" not in row for row in validation)
    assert not {row["prompt_id"] for row in validation} & {row["prompt_id"] for row in labels}
    selection = json.loads((run_dir / "arms" / "anchored" / "selection.json").read_text())
    candidates = {c["lambda"]: c for c in selection["candidates"]}
    assert set(candidates) == {0.0, 1.0}
    assert selection["lambda"] == choose_lambda(selection["candidates"], tolerance=None)[0]["lambda"]
    assert Path(candidates[0.0]["model"]).parent.name == "naive"
    # The arm's model is a plain folder holding the chosen candidate's files.
    arm_model = run_dir / "arms" / "anchored" / "model"
    assert arm_model.is_dir()
    assert not arm_model.is_symlink()
    chosen_weights = Path(candidates[selection["lambda"]]["model"]) / "model.safetensors"
    assert filecmp.cmp(arm_model / "model.safetensors", chosen_weights, shallow=False)
    assert (run_dir / "arms" / "anchored" / "training_log.json").is_file()
    report_md = (run_dir / "report" / "report.md").read_text()
    assert "## Choice of lambda" in report_md
    assert selection["reason"] in report_md

    # A second invocation finds both seeds recorded and runs nothing.
    again = subprocess.run(run, cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    assert again.stdout.count("skip us_history_textbook") == 2

    markdown = tmp_path / "RESULTS.md"
    markdown.write_text("# Results\n\nkept text\n")
    subprocess.run(
        [sys.executable, "bench/study.py", "report", "--results", str(results), "--markdown", str(markdown), "--plots", str(tmp_path / "plots")],
        cwd=ROOT, check=True, capture_output=True, timeout=300,
    )
    text = markdown.read_text()
    assert text.startswith("# Results\n\nkept text")
    assert study.BEGIN in text
    assert study.END in text
    assert (tmp_path / "plots" / "transfer_id_vs_ood.png").stat().st_size > 0
    # The naive row's ID accuracy is the mean of the two records' accuracies.
    naive_id = np.mean([r["models"]["naive"]["us_history_textbook"]["accuracy"] for r in records])
    row = next(line for line in text.splitlines() if line.startswith("| naive |"))
    assert row.split("|")[2].strip().startswith(f"{100 * naive_id:.1f}")
