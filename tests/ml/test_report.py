"""Tests of ml.report on a synthetic experiment: derived numbers, written files and validation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ml import metrics
from ml.report import (
    REFERENCE_ROWS,
    EvalSetInfo,
    PairScores,
    build_report,
    format_markdown,
    format_table,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODEL_ACCURACY = {"weak": 0.6, "naive": 0.65, "anchored": 0.7, "ceiling": 0.8}
SET_SHIFT = {"source": 0.0, "target_a": -0.1, "target_b": -0.05}
HIDDEN_SIZE = 12


def _eval_set(role: str, n_prompts: int, rng: np.random.Generator, max_length: int = 256) -> EvalSetInfo:
    n_pairs = 2 * n_prompts
    return EvalSetInfo(
        role=role,
        prompt_ids=np.repeat([f"q{i}" for i in range(n_prompts)], 2),
        len_chosen=rng.integers(50, 500, size=n_pairs),
        len_rejected=rng.integers(50, 500, size=n_pairs),
        n_truncated=3,
        max_length=max_length,
    )


def _scores(accuracy: float, n_pairs: int, rng: np.random.Generator, with_reps: bool) -> PairScores:
    correct = rng.random(n_pairs) < accuracy
    margin = np.abs(rng.normal(1.0, 0.5, size=n_pairs))
    r_rejected = rng.normal(size=n_pairs)
    r_chosen = r_rejected + np.where(correct, margin, -margin)
    if not with_reps:
        return PairScores(r_chosen, r_rejected)
    reps_pretrained = rng.normal(size=(2 * n_pairs, HIDDEN_SIZE))
    reps = reps_pretrained + 0.3 * rng.normal(size=reps_pretrained.shape)
    return PairScores(r_chosen, r_rejected, reps=reps, reps_pretrained=reps_pretrained)


def _experiment(set_roles: dict[str, str], seed: int = 0):
    rng = np.random.default_rng(seed)
    eval_sets = {name: _eval_set(role, 100, rng) for name, role in set_roles.items()}
    scores = {
        model: {
            name: _scores(accuracy + SET_SHIFT[name], 200, rng, with_reps=model != "weak")
            for name in set_roles
        }
        for model, accuracy in MODEL_ACCURACY.items()
    }
    return eval_sets, scores


SETTINGS = {"student": "SmolLM2-135M-Instruct", "precision": "bf16", "seeds": [0, 1], "max_test_prompts": 100}
CURVES = {
    "naive": [{"step": 20, "drift": 0.05, "loss": 0.6}, {"step": 10, "drift": 0.02, "loss": 0.7}],
    "anchored": [{"step": 10, "drift": 0.01, "loss": 0.7}, {"step": 20, "drift": 0.015}],
    "ceiling": [],
}


@pytest.fixture(scope="module")
def full_report():
    eval_sets, scores = _experiment({"source": "id", "target_a": "ood", "target_b": "ood"})
    report = build_report(
        "shift-test", SETTINGS, eval_sets, scores, baseline="weak", ceiling="ceiling", training_curves=CURVES
    )
    return report, eval_sets, scores


# ---------------------------------------------------------------------------------------------
# Derived numbers


def test_rows_cover_every_model_and_set(full_report):
    report, _, _ = full_report
    assert report.models == ["weak", "naive", "anchored", "ceiling"]
    assert [s.name for s in report.eval_sets] == ["source", "target_a", "target_b"]
    for model in report.models:
        assert set(report.rows[model]) == {"source", "target_a", "target_b"}


def test_id_set_listed_first():
    eval_sets, scores = _experiment({"target_a": "ood", "source": "id"})
    report = build_report("order", {}, eval_sets, scores, n_samples=100)
    assert [s.name for s in report.eval_sets] == ["source", "target_a"]


def test_accuracy_matches_metrics(full_report):
    report, _, scores = full_report
    pair_scores = scores["anchored"]["target_a"]
    expected = metrics.pairwise_accuracy(pair_scores.r_chosen, pair_scores.r_rejected)
    assert report.rows["anchored"]["target_a"]["accuracy"] == pytest.approx(expected)


def test_gain_is_paired_difference(full_report):
    report, _, _ = full_report
    row = report.rows["anchored"]["source"]
    weak_accuracy = report.rows["weak"]["source"]["accuracy"]
    assert row["gain_over_baseline"] == pytest.approx(row["accuracy"] - weak_accuracy)
    low, high = row["gain_over_baseline_ci"]
    assert low <= row["gain_over_baseline"] <= high


def test_baseline_row_has_no_gain(full_report):
    report, _, _ = full_report
    row = report.rows["weak"]["source"]
    assert row["gain_over_baseline"] is None
    assert row["pgr"] is None


def test_pgr_matches_point_formula(full_report):
    report, _, _ = full_report
    accuracy = {model: report.rows[model]["target_b"]["accuracy"] for model in report.models}
    expected = metrics.pgr(accuracy["naive"], accuracy["weak"], accuracy["ceiling"])
    row = report.rows["naive"]["target_b"]
    assert row["pgr"] == pytest.approx(expected)
    assert row["pgr_ci"][0] <= row["pgr"] <= row["pgr_ci"][1]
    assert 0.0 <= row["pgr_skipped_fraction"] <= 1.0


def test_ceiling_row_has_no_pgr(full_report):
    report, _, _ = full_report
    assert report.rows["ceiling"]["source"]["pgr"] is None
    assert report.rows["ceiling"]["source"]["gain_over_baseline"] is not None


def test_transfer_gap_per_ood_set(full_report):
    report, _, _ = full_report
    rows = report.rows["naive"]
    assert rows["source"]["transfer_gap"] is None
    assert rows["target_a"]["transfer_gap"] == pytest.approx(rows["source"]["accuracy"] - rows["target_a"]["accuracy"])


def test_pooled_ood_concatenates_sets(full_report):
    report, _, _ = full_report
    correct = np.concatenate([report.correct["anchored"]["target_a"], report.correct["anchored"]["target_b"]])
    pooled = report.pooled_ood["anchored"]
    assert pooled["accuracy"] == pytest.approx(correct.mean())
    assert pooled["n_pairs"] == 400
    # Prompt "q0" of target_a and "q0" of target_b are different prompts.
    assert pooled["n_prompts"] == 200
    assert pooled["transfer_gap"] == pytest.approx(report.rows["anchored"]["source"]["accuracy"] - pooled["accuracy"])


def test_reference_rows_match_length_baseline(full_report):
    report, eval_sets, _ = full_report
    info = eval_sets["target_a"]
    expected = metrics.length_baseline(info.len_chosen, info.len_rejected, prefer="shorter").mean()
    assert report.reference_rows["prefer shorter"]["target_a"]["accuracy"] == pytest.approx(expected)
    assert report.pooled_ood["prefer longer"] is not None


def test_drift_only_with_reps(full_report):
    report, _, _ = full_report
    assert report.rows["weak"]["source"]["drift_cosine"] is None
    anchored = report.rows["anchored"]["source"]
    assert 0.8 < anchored["drift_cosine"] < 1.0
    assert 0.8 < anchored["drift_cka"] < 1.0


def test_training_curves_sorted_by_step(full_report):
    report, _, _ = full_report
    assert [p["step"] for p in report.training_curves["naive"]] == [10, 20]
    assert report.training_curves["anchored"][1]["loss"] is None
    assert report.training_curves["ceiling"] == []


def test_no_ceiling_skips_pgr():
    eval_sets, scores = _experiment({"source": "id", "target_a": "ood"})
    report = build_report("no-ceiling", {}, eval_sets, scores, baseline="weak", ceiling=None, n_samples=200)
    assert all(report.rows[m][s]["pgr"] is None for m in report.models for s in ("source", "target_a"))
    assert "PGR is not reported" in format_markdown(report)


def test_no_baseline_skips_gains():
    eval_sets, scores = _experiment({"source": "id"})
    report = build_report("no-baseline", {}, eval_sets, scores, baseline=None, n_samples=200)
    assert report.rows["naive"]["source"]["gain_over_baseline"] is None
    assert report.pooled_ood == {}


def test_missing_lengths_give_empty_reference_rows():
    eval_sets, scores = _experiment({"source": "id", "target_a": "ood"})
    eval_sets["target_a"].len_chosen = None
    eval_sets["target_a"].len_rejected = None
    report = build_report("no-lengths", {}, eval_sets, scores, n_samples=200)
    assert report.reference_rows["prefer longer"]["target_a"] is None
    assert report.reference_rows["prefer longer"]["source"] is not None
    assert report.pooled_ood["prefer longer"] is None


# ---------------------------------------------------------------------------------------------
# Validation


def test_rejects_missing_eval_set_scores():
    eval_sets, scores = _experiment({"source": "id", "target_a": "ood"})
    del scores["naive"]["target_a"]
    with pytest.raises(ValueError, match="'naive'.*missing.*target_a"):
        build_report("bad", {}, eval_sets, scores)


def test_rejects_unknown_baseline():
    eval_sets, scores = _experiment({"source": "id"})
    with pytest.raises(ValueError, match="baseline model 'teacher' not found"):
        build_report("bad", {}, eval_sets, scores, baseline="teacher")


def test_rejects_two_id_sets():
    eval_sets, scores = _experiment({"source": "id", "target_a": "id"})
    with pytest.raises(ValueError, match="at most one eval set"):
        build_report("bad", {}, eval_sets, scores)


def test_rejects_reserved_model_name():
    eval_sets, scores = _experiment({"source": "id"})
    scores["prefer longer"] = scores.pop("naive")
    with pytest.raises(ValueError, match="reserved"):
        build_report("bad", {}, eval_sets, scores)


def test_rejects_wrong_number_of_rewards():
    eval_sets, scores = _experiment({"source": "id"})
    scores["naive"]["source"] = PairScores([1.0, 2.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="expected 200 rewards"):
        build_report("bad", {}, eval_sets, scores)


def test_rejects_nan_rewards():
    eval_sets, scores = _experiment({"source": "id"})
    scores["naive"]["source"].r_chosen[5] = np.nan
    with pytest.raises(ValueError, match="'naive' on 'source': 1 rewards are NaN"):
        build_report("bad", {}, eval_sets, scores)


# ---------------------------------------------------------------------------------------------
# Written files


def test_writes_all_four_files(full_report, tmp_path):
    report, _, _ = full_report
    paths = write_report(report, tmp_path / "out")
    assert set(paths) == {"json", "markdown", "accuracy_plot", "drift_plot"}
    for path in paths.values():
        assert path.is_file(), path


def test_json_loads_without_arrays(full_report, tmp_path):
    report, _, _ = full_report
    data = json.loads(write_report(report, tmp_path)["json"].read_text())
    assert data["name"] == "shift-test"
    assert data["settings"]["seeds"] == [0, 1]
    assert "correct" not in data
    row = data["rows"]["anchored"]["target_a"]
    assert isinstance(row["accuracy"], float)
    assert isinstance(row["n_pairs"], int)
    assert data["eval_sets"][0] == {
        "name": "source",
        "role": "id",
        "n_pairs": 200,
        "n_prompts": 100,
        "n_truncated": 3,
        "max_length": 256,
    }


def test_json_writes_nan_as_null(tmp_path):
    eval_sets, scores = _experiment({"source": "id"})
    constant = np.ones((400, HIDDEN_SIZE))
    scores["naive"]["source"].reps = constant
    report = build_report("nan", {}, eval_sets, scores, n_samples=100)
    data = json.loads(write_report(report, tmp_path)["json"].read_text())
    assert data["rows"]["naive"]["source"]["drift_cka"] is None


@pytest.mark.parametrize("key", ["accuracy_plot", "drift_plot"])
def test_png_files_valid(full_report, tmp_path, key):
    report, _, _ = full_report
    path = write_report(report, tmp_path)[key]
    content = path.read_bytes()
    assert content.startswith(PNG_SIGNATURE)
    assert len(content) > 10_000


def test_drift_plot_without_curves(tmp_path):
    eval_sets, scores = _experiment({"source": "id"})
    report = build_report("no-curves", {}, eval_sets, scores, n_samples=100)
    paths = write_report(report, tmp_path)
    assert paths["drift_plot"].read_bytes().startswith(PNG_SIGNATURE)
    assert "No training curves were recorded." in paths["markdown"].read_text()


def _main_table_rows(markdown: str) -> list[str]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Model |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1].strip())
    return rows


def test_markdown_one_row_per_model(full_report, tmp_path):
    report, _, _ = full_report
    markdown = write_report(report, tmp_path)["markdown"].read_text()
    assert _main_table_rows(markdown) == report.models + list(REFERENCE_ROWS)


def test_markdown_shows_settings_and_truncation(full_report):
    report, _, _ = full_report
    markdown = format_markdown(report)
    assert "SmolLM2-135M-Instruct" in markdown
    assert "**precision**: bf16" in markdown
    assert "target_a: 3 of 200 pairs had a sequence cut to 256 tokens." in markdown
    assert "measured on all 2 OOD sets pooled" in markdown


def test_format_table_lists_every_row(full_report):
    report, _, _ = full_report
    lines = format_table(report).splitlines()
    assert lines[0].startswith("model")
    row_names = [line.split("  ")[0].strip() for line in lines[1:-1]]
    assert row_names == report.models + list(REFERENCE_ROWS)


def test_modules_import_without_torch():
    code = (
        "import sys, ml.metrics, ml.report; "
        "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules); "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
