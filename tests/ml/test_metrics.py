"""Tests of ml.metrics against hand-computed values and known properties of the bootstrap."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from ml import metrics


# ---------------------------------------------------------------------------------------------
# Point metrics


def test_accuracy_counts_ties_wrong():
    r_c = [1.0, 2.0, 0.5, 3.0]
    r_r = [0.0, 2.0, 0.7, -1.0]
    # Correct, tie, wrong, correct: 2 of 4.
    assert metrics.pairwise_accuracy(r_c, r_r) == pytest.approx(0.5)


def test_accuracy_rejects_length_mismatch():
    with pytest.raises(ValueError, match="lengths differ"):
        metrics.pairwise_accuracy([1.0, 2.0], [0.0])


def test_accuracy_rejects_empty_input():
    with pytest.raises(ValueError, match="empty"):
        metrics.pairwise_accuracy([], [])


def test_preference_probs_values():
    probs = metrics.preference_probs([0.0, 1.0, 0.0], [0.0, 0.0, 2.0])
    assert probs[0] == pytest.approx(0.5)
    assert probs[1] == pytest.approx(1.0 / (1.0 + math.exp(-1.0)))
    assert probs[2] == pytest.approx(1.0 / (1.0 + math.exp(2.0)))


def test_preference_probs_extreme_margins_stay_finite():
    with np.errstate(over="raise"):
        probs = metrics.preference_probs([1000.0, -1000.0], [-1000.0, 1000.0])
    assert probs[0] == 1.0
    assert probs[1] == 0.0


def test_ece_two_bins_hand_computed():
    # Confidences 0.9 (right), 0.6 (right), 0.8 (wrong, p < 0.5), 0.7 (right).
    # Bin [0.5, 0.75): 0.6 and 0.7, acc 1, conf 0.65 -> 2/4 * 0.35.
    # Bin [0.75, 1]: 0.9 and 0.8, acc 0.5, conf 0.85 -> 2/4 * 0.35.
    ece = metrics.expected_calibration_error([0.9, 0.6, 0.2, 0.7], n_bins=2)
    assert ece == pytest.approx(0.35)


def test_ece_ten_bins_hand_computed():
    # Confidences 0.92, 0.81, 0.73 (wrong), 0.63, 0.57, 0.93 in bins of width 0.05 from 0.5.
    # Bin [0.90, 0.95): 0.92 and 0.93, acc 1, conf 0.925 -> 2/6 * 0.075 = 0.025.
    # Singletons: |1 - 0.81| + |0 - 0.73| + |1 - 0.63| + |1 - 0.57| = 1.72, times 1/6.
    p = [0.92, 0.81, 0.27, 0.63, 0.57, 0.93]
    assert metrics.expected_calibration_error(p, n_bins=10) == pytest.approx(0.025 + 1.72 / 6)


def test_ece_edges_and_half():
    # p = 1 falls in the last bin (acc 1, conf 1), p = 0.5 is wrong with confidence 0.5.
    assert metrics.expected_calibration_error([1.0, 0.0], n_bins=10) == pytest.approx(0.5)
    assert metrics.expected_calibration_error([0.5], n_bins=10) == pytest.approx(0.5)


def test_ece_perfectly_confident_and_right_is_zero():
    assert metrics.expected_calibration_error([1.0, 1.0, 1.0]) == 0.0


def test_ece_rejects_values_outside_unit_interval():
    with pytest.raises(ValueError, match="probabilities"):
        metrics.expected_calibration_error([0.5, 1.2])


def test_pgr_hand_computed():
    assert metrics.pgr(0.7, 0.6, 0.8) == pytest.approx(0.5)
    assert metrics.pgr(0.55, 0.6, 0.8) == pytest.approx(-0.25)
    assert metrics.pgr(0.9, 0.6, 0.8) == pytest.approx(1.5)


def test_pgr_none_without_gap_or_ceiling():
    assert metrics.pgr(0.7, 0.6, 0.6) is None
    assert metrics.pgr(0.7, 0.6, 0.6 + 1e-12) is None
    assert metrics.pgr(0.7, 0.6, None) is None


def test_transfer_gap():
    assert metrics.transfer_gap(0.8, 0.65) == pytest.approx(0.15)
    assert metrics.transfer_gap(0.8, None) is None


def test_length_baseline_ties_wrong():
    longer = metrics.length_baseline([10, 5, 7], [3, 9, 7], prefer="longer")
    shorter = metrics.length_baseline([10, 5, 7], [3, 9, 7], prefer="shorter")
    assert longer.tolist() == [True, False, False]
    assert shorter.tolist() == [False, True, False]


def test_length_baseline_rejects_unknown_preference():
    with pytest.raises(ValueError, match="prefer"):
        metrics.length_baseline([1], [2], prefer="random")


# ---------------------------------------------------------------------------------------------
# Representation drift


def test_mean_cosine_hand_computed():
    h = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    h0 = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, -1.0]])
    # Cosines 1, 1/sqrt(2), -1.
    assert metrics.mean_cosine(h, h0) == pytest.approx((1.0 + 1.0 / math.sqrt(2.0) - 1.0) / 3.0)


def test_mean_cosine_zero_row_counts_zero():
    h = np.array([[0.0, 0.0], [1.0, 0.0]])
    h0 = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert metrics.mean_cosine(h, h0) == pytest.approx(0.5)


def test_mean_cosine_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        metrics.mean_cosine(np.ones((3, 2)), np.ones((3, 4)))


@pytest.mark.parametrize("n, hidden", [(200, 16), (20, 300)])
def test_cka_identical_is_one(n, hidden):
    x = np.random.default_rng(0).normal(size=(n, hidden))
    assert metrics.linear_cka(x, x) == pytest.approx(1.0)


@pytest.mark.parametrize("n, hidden", [(200, 16), (20, 300)])
def test_cka_rotation_and_scale_invariant(n, hidden):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, hidden))
    y = x @ rng.normal(size=(hidden, hidden)) + rng.normal(size=(n, hidden))
    rotation, _ = np.linalg.qr(rng.normal(size=(hidden, hidden)))
    reference = metrics.linear_cka(x, y)
    assert 0.0 < reference < 1.0
    assert metrics.linear_cka(x @ rotation, y) == pytest.approx(reference)
    assert metrics.linear_cka(x, 7.5 * y) == pytest.approx(reference)
    assert metrics.linear_cka(x + 3.0, y) == pytest.approx(reference)


def test_cka_gram_and_feature_forms_agree():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 40))
    y = rng.normal(size=(30, 40))
    # 30 * 80 < 40 * 40 is false, so the feature form runs. Padding with zero columns keeps CKA
    # but switches to the Gram form.
    feature_form = metrics.linear_cka(x, y)
    gram_form = metrics.linear_cka(np.hstack([x, np.zeros((30, 200))]), np.hstack([y, np.zeros((30, 200))]))
    assert gram_form == pytest.approx(feature_form)


def test_cka_hand_computed_one_dimension():
    # With one feature each, CKA is the squared Pearson correlation.
    x = np.array([[1.0], [2.0], [3.0], [4.0]])
    y = np.array([[1.0], [3.0], [2.0], [4.0]])
    correlation = np.corrcoef(x[:, 0], y[:, 0])[0, 1]
    assert metrics.linear_cka(x, y) == pytest.approx(correlation**2)


def test_cka_constant_input_is_nan():
    assert math.isnan(metrics.linear_cka(np.ones((5, 3)), np.arange(15.0).reshape(5, 3)))


# ---------------------------------------------------------------------------------------------
# Bootstrap over prompts


def _pairs(n_prompts: int, pairs_per_prompt: int, accuracy: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    correct = rng.random(n_prompts * pairs_per_prompt) < accuracy
    prompt_ids = np.repeat([f"p{i}" for i in range(n_prompts)], pairs_per_prompt)
    return correct, prompt_ids


def test_bootstrap_contains_estimate():
    correct, prompt_ids = _pairs(300, 2, 0.7, seed=0)
    estimate, low, high = metrics.bootstrap_accuracy_ci(correct, prompt_ids)
    assert estimate == pytest.approx(correct.mean())
    assert low < estimate < high


def test_bootstrap_narrows_with_more_prompts():
    small = metrics.bootstrap_accuracy_ci(*_pairs(50, 2, 0.7, seed=1))
    large = metrics.bootstrap_accuracy_ci(*_pairs(2000, 2, 0.7, seed=1))
    assert large.high - large.low < 0.5 * (small.high - small.low)


def test_bootstrap_grouping_widens_correlated_ci():
    # Every prompt repeats one outcome on 4 pairs, so there are only 200 independent outcomes.
    rng = np.random.default_rng(3)
    correct = np.repeat(rng.random(200) < 0.7, 4)
    grouped = metrics.bootstrap_accuracy_ci(correct, np.repeat(np.arange(200), 4))
    independent = metrics.bootstrap_accuracy_ci(correct, np.arange(800))
    assert grouped.estimate == independent.estimate
    assert grouped.high - grouped.low > 1.5 * (independent.high - independent.low)


def test_bootstrap_deterministic_by_seed():
    correct, prompt_ids = _pairs(100, 3, 0.6, seed=4)
    first = metrics.bootstrap_accuracy_ci(correct, prompt_ids, seed=7)
    second = metrics.bootstrap_accuracy_ci(correct, prompt_ids, seed=7)
    other = metrics.bootstrap_accuracy_ci(correct, prompt_ids, seed=8)
    assert first == second
    assert (first.low, first.high) != (other.low, other.high)


def test_bootstrap_blocks_match_single_block(monkeypatch):
    # Drawing the resamples in several blocks must not change the result for a given seed.
    correct, prompt_ids = _pairs(100, 2, 0.6, seed=5)
    whole = metrics.bootstrap_accuracy_ci(correct, prompt_ids, n_samples=300)
    monkeypatch.setattr(metrics, "_MAX_BLOCK_ELEMENTS", 100 * 300)
    also_whole = metrics.bootstrap_accuracy_ci(correct, prompt_ids, n_samples=300)
    monkeypatch.setattr(metrics, "_MAX_BLOCK_ELEMENTS", 100 * 7)
    blocked = metrics.bootstrap_accuracy_ci(correct, prompt_ids, n_samples=300)
    assert whole == also_whole
    assert blocked.estimate == whole.estimate
    # Different blocking draws different numbers, but the interval stays close.
    assert abs(blocked.low - whole.low) < 0.03
    assert abs(blocked.high - whole.high) < 0.03


def test_bootstrap_is_fast():
    correct, prompt_ids = _pairs(375, 2, 0.7, seed=6)
    start = time.perf_counter()
    metrics.bootstrap_accuracy_ci(correct, prompt_ids, n_samples=1000)
    assert time.perf_counter() - start < 0.5


def test_bootstrap_rejects_misaligned_prompt_ids():
    with pytest.raises(ValueError, match="one entry per pair"):
        metrics.bootstrap_accuracy_ci([True, False], ["a"])


def test_bootstrap_rejects_invalid_level():
    with pytest.raises(ValueError, match="level"):
        metrics.bootstrap_accuracy_ci([True, False], ["a", "b"], level=95)


def test_paired_diff_with_itself_is_zero():
    correct, prompt_ids = _pairs(100, 2, 0.6, seed=7)
    assert metrics.paired_bootstrap_diff(correct, correct, prompt_ids) == (0.0, 0.0, 0.0)


def test_paired_diff_hand_computed_estimate():
    a = [True, True, False, True]
    b = [False, True, False, False]
    diff, low, high = metrics.paired_bootstrap_diff(a, b, ["x", "x", "y", "z"])
    assert diff == pytest.approx(0.5)
    assert low <= diff <= high


def test_paired_diff_narrower_than_unpaired():
    # B equals A except on about 3 % of pairs, so the paired interval is far narrower than either
    # model's own accuracy interval.
    rng = np.random.default_rng(8)
    a = rng.random(600) < 0.7
    b = a.copy()
    flip = rng.random(600) < 0.03
    b[flip] = ~b[flip]
    prompt_ids = np.repeat(np.arange(300), 2)
    paired = metrics.paired_bootstrap_diff(a, b, prompt_ids)
    single = metrics.bootstrap_accuracy_ci(a, prompt_ids)
    assert paired.high - paired.low < 0.6 * (single.high - single.low)


def test_pgr_ci_matches_point_pgr():
    rng = np.random.default_rng(9)
    prompt_ids = np.repeat(np.arange(400), 2)
    weak = rng.random(800) < 0.6
    student = rng.random(800) < 0.7
    ceiling = rng.random(800) < 0.8
    result = metrics.pgr_ci(student, weak, ceiling, prompt_ids)
    assert result.estimate == pytest.approx(metrics.pgr(student.mean(), weak.mean(), ceiling.mean()))
    assert result.low < result.estimate < result.high
    assert result.skipped_fraction == 0.0


def test_pgr_ci_all_skipped_when_ceiling_equals_weak():
    correct, prompt_ids = _pairs(50, 2, 0.6, seed=10)
    result = metrics.pgr_ci(~correct, correct, correct, prompt_ids)
    assert result.estimate is None
    assert result.low is None
    assert result.high is None
    assert result.skipped_fraction == 1.0


def test_pgr_ci_reports_skipped_share():
    # Ceiling and weak differ on one prompt only, so resamples that miss it have no PGR.
    n_prompts = 20
    prompt_ids = np.repeat(np.arange(n_prompts), 2)
    weak = np.zeros(2 * n_prompts, dtype=bool)
    ceiling = weak.copy()
    ceiling[:2] = True
    student = weak.copy()
    student[0] = True
    result = metrics.pgr_ci(student, weak, ceiling, prompt_ids, n_samples=2000)
    assert result.estimate == pytest.approx(0.5)
    # Probability that a resample of 20 misses one given prompt: (19/20)^20 ≈ 0.358.
    assert result.skipped_fraction == pytest.approx((19 / 20) ** 20, abs=0.04)
    assert result.low == pytest.approx(0.5)
    assert result.high == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# Summary of one model on one set


def test_summary_keys_and_values():
    r_c = np.array([1.0, 2.0, 0.0, 3.0])
    r_r = np.array([0.0, 2.0, 1.0, 1.0])
    summary = metrics.summarize_model_on_set(r_c, r_r, ["a", "a", "b", "c"], n_samples=200)
    assert set(summary) == {"accuracy", "accuracy_ci", "ece", "margin", "mean_reward", "n_pairs", "n_prompts"}
    assert summary["accuracy"] == pytest.approx(0.5)
    assert summary["margin"] == pytest.approx((1 + 0 - 1 + 2) / 4)
    assert summary["mean_reward"] == pytest.approx((6 + 4) / 8)
    assert summary["n_pairs"] == 4
    assert summary["n_prompts"] == 3
    assert len(summary["accuracy_ci"]) == 2


def test_summary_drift_with_reps():
    rng = np.random.default_rng(11)
    reps = rng.normal(size=(8, 5))
    summary = metrics.summarize_model_on_set(
        rng.normal(size=4), rng.normal(size=4), ["a", "b", "c", "d"], reps, reps.copy(), n_samples=100
    )
    assert summary["drift_cosine"] == pytest.approx(1.0)
    assert summary["drift_cka"] == pytest.approx(1.0)


def test_summary_rejects_one_sided_reps():
    with pytest.raises(ValueError, match="together"):
        metrics.summarize_model_on_set([1.0], [0.0], ["a"], reps=np.ones((2, 3)))

