"""Evaluation metrics for pairwise reward models, as pure numpy functions.

Every pair i has a reward for the chosen response r_c[i] and for the rejected one r_r[i]. The gold
label is always "chosen is preferred", so a model is correct on a pair when r_c[i] > r_r[i].

Pairs that share a prompt share a response and are not independent. Every interval here is
therefore a percentile bootstrap over prompts: each resample draws as many prompts as the data
has, with replacement, and keeps all pairs of every drawn prompt.

This module imports only numpy, so the API and the report can use it without torch.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Sequence

import numpy as np

ArrayLike = Sequence[float] | np.ndarray

# Upper bound on the elements of one (resamples x prompts) index block, so that memory stays near
# 32 MiB of int64 however many prompts an eval set has.
_MAX_BLOCK_ELEMENTS = 1 << 22


class Interval(NamedTuple):
    """Point estimate on the full data and the bootstrap percentile interval around it."""

    estimate: float
    low: float
    high: float


class PGRInterval(NamedTuple):
    """PGR on the full data, its bootstrap interval, and the share of resamples left out.

    A resample is left out when its ceiling and weak accuracies are equal, because PGR is undefined
    there. `estimate` is None when PGR is undefined on the full data. `low` and `high` are None when
    every resample was left out.
    """

    estimate: float | None
    low: float | None
    high: float | None
    skipped_fraction: float


# ---------------------------------------------------------------------------------------------
# Input checks


def _as_1d(values: ArrayLike, name: str, dtype: Any = np.float64) -> np.ndarray:
    array = np.asarray(values, dtype=dtype)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: at least one pair is needed")
    return array


def _check_same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays must have one entry per pair, but lengths differ: {lengths}")


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1 (e.g. 0.95), got {level}")


def _check_n_samples(n_samples: int) -> None:
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")


# ---------------------------------------------------------------------------------------------
# Point metrics


def pairwise_accuracy(r_c: ArrayLike, r_r: ArrayLike) -> float:
    """Return the share of pairs ranked correctly: mean_i 1[r_c[i] > r_r[i]].

    r_c and r_r have shape [n]. A tie (r_c == r_r) counts as wrong.
    """
    chosen = _as_1d(r_c, "r_c")
    rejected = _as_1d(r_r, "r_r")
    _check_same_length(r_c=chosen, r_r=rejected)
    return float(np.mean(chosen > rejected))


def preference_probs(r_c: ArrayLike, r_r: ArrayLike) -> np.ndarray:
    """Return the Bradley-Terry probability that chosen beats rejected: p[i] = σ(r_c[i] − r_r[i]).

    Inputs have shape [n] and so does the output. The sigmoid is evaluated as 1 / (1 + e^(−x)) for
    x ≥ 0 and e^x / (1 + e^x) for x < 0, so no exponent overflows.
    """
    chosen = _as_1d(r_c, "r_c")
    rejected = _as_1d(r_r, "r_r")
    _check_same_length(r_c=chosen, r_r=rejected)
    diff = chosen - rejected
    exp_neg_abs = np.exp(-np.abs(diff))
    return np.where(diff >= 0, 1.0 / (1.0 + exp_neg_abs), exp_neg_abs / (1.0 + exp_neg_abs))


def expected_calibration_error(p: ArrayLike, n_bins: int = 10) -> float:
    """Compute ECE = Σ_b (|b| / n) · |acc_b − conf_b| of preference probabilities p, shape [n].

    The prediction on pair i is "chosen wins" when p[i] > 0.5, so it is correct exactly then
    (p == 0.5 counts as wrong, like a tied reward). Its confidence is max(p, 1 − p). acc_b and
    conf_b are the mean correctness and mean confidence of the pairs in bin b.

    The bins split the confidence range [0.5, 1] into n_bins equal widths, because confidence
    never falls below 0.5 and bins over [0, 1] would leave the lower half empty. Bins are
    left-closed [lo, hi), except the last, which also contains 1. Empty bins add nothing.
    """
    probs = _as_1d(p, "p")
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    if np.any((probs < 0) | (probs > 1)) or np.any(np.isnan(probs)):
        raise ValueError("p must contain probabilities in [0, 1]")

    confidence = np.maximum(probs, 1.0 - probs)
    correct = (probs > 0.5).astype(np.float64)
    bin_index = np.floor((confidence - 0.5) * 2.0 * n_bins).astype(np.int64)
    bin_index = np.clip(bin_index, 0, n_bins - 1)

    counts = np.bincount(bin_index, minlength=n_bins)
    correct_sums = np.bincount(bin_index, weights=correct, minlength=n_bins)
    confidence_sums = np.bincount(bin_index, weights=confidence, minlength=n_bins)
    # |b| · |acc_b − conf_b| = |Σ correct − Σ confidence| over the bin, so empty bins give 0.
    return float(np.sum(np.abs(correct_sums - confidence_sums)) / counts.sum())


def pgr(student: float | None, weak: float | None, ceiling: float | None, min_gap: float = 1e-9) -> float | None:
    """Compute the performance gap recovered: (student − weak) / (ceiling − weak).

    0 means the student is no better than its weak supervisor, 1 means it matches the ceiling
    trained on gold labels. Returns None when any input is None or when |ceiling − weak| < min_gap,
    where the ratio is undefined.
    """
    if student is None or weak is None or ceiling is None:
        return None
    gap = ceiling - weak
    if abs(gap) < min_gap:
        return None
    return float((student - weak) / gap)


def transfer_gap(id_acc: float | None, ood_acc: float | None) -> float | None:
    """Return the in-distribution accuracy minus the out-of-distribution one (None if either is None)."""
    if id_acc is None or ood_acc is None:
        return None
    return float(id_acc - ood_acc)


def length_baseline(
    len_chosen: ArrayLike, len_rejected: ArrayLike, prefer: Literal["longer", "shorter"] = "longer"
) -> np.ndarray:
    """Return the per-pair correctness, shape [n] and dtype bool, of always picking the longer (or shorter) response.

    Lengths are in characters. Equal lengths count as wrong, like a tied reward.
    """
    chosen = _as_1d(len_chosen, "len_chosen")
    rejected = _as_1d(len_rejected, "len_rejected")
    _check_same_length(len_chosen=chosen, len_rejected=rejected)
    if prefer == "longer":
        return chosen > rejected
    if prefer == "shorter":
        return chosen < rejected
    raise ValueError(f"prefer must be 'longer' or 'shorter', got {prefer!r}")


# ---------------------------------------------------------------------------------------------
# Representation drift


def _as_2d(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must have shape [n, hidden], got {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    return array


def mean_cosine(h: np.ndarray, h0: np.ndarray, eps: float = 1e-12) -> float:
    """Average the row-wise cosine similarity: mean_i <h[i], h0[i]> / (||h[i]|| · ||h0[i]||).

    h and h0 have shape [n, hidden], where row i of both comes from the same sequence. 1 means
    every representation points where the pretrained one does. A row pair whose norm product is
    below eps counts as cosine 0.
    """
    current = _as_2d(h, "h")
    reference = _as_2d(h0, "h0")
    if current.shape != reference.shape:
        raise ValueError(f"h and h0 must have the same shape, got {current.shape} and {reference.shape}")

    dots = np.einsum("ij,ij->i", current, reference)
    norms = np.linalg.norm(current, axis=1) * np.linalg.norm(reference, axis=1)
    cosines = np.divide(dots, norms, out=np.zeros_like(dots), where=norms >= eps)
    return float(np.mean(cosines))


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Compute linear CKA = ||Yᵀ X||_F² / (||Xᵀ X||_F · ||Yᵀ Y||_F) on column-centred features.

    x has shape [n, d_x] and y has shape [n, d_y], where row i of both comes from the same
    sequence. The result lies in [0, 1] and is 1 for identical inputs. It does not change under
    orthogonal rotations or isotropic scaling of either input (Kornblith et al., 2019,
    "Similarity of Neural Network Representations Revisited").

    When n · (d_x + d_y) < d_x · d_y the n × n Gram form is cheaper and is used instead, with
    K = X Xᵀ and L = Y Yᵀ: CKA = Σ K ∘ L / (||K||_F · ||L||_F), which is equal because
    ||Yᵀ X||_F² = tr(K L). Returns NaN when either input is constant over rows.
    """
    features_x = _as_2d(x, "x")
    features_y = _as_2d(y, "y")
    if features_x.shape[0] != features_y.shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got {features_x.shape[0]} and {features_y.shape[0]}")

    features_x = features_x - features_x.mean(axis=0, keepdims=True)
    features_y = features_y - features_y.mean(axis=0, keepdims=True)
    n, dim_x = features_x.shape
    dim_y = features_y.shape[1]

    if n * (dim_x + dim_y) < dim_x * dim_y:
        gram_x = features_x @ features_x.T
        gram_y = features_y @ features_y.T
        cross = float(np.sum(gram_x * gram_y))
        norm_x = float(np.linalg.norm(gram_x))
        norm_y = float(np.linalg.norm(gram_y))
    else:
        cross = float(np.linalg.norm(features_y.T @ features_x) ** 2)
        norm_x = float(np.linalg.norm(features_x.T @ features_x))
        norm_y = float(np.linalg.norm(features_y.T @ features_y))

    denominator = norm_x * norm_y
    if denominator == 0.0:
        return float("nan")
    return cross / denominator


# ---------------------------------------------------------------------------------------------
# Bootstrap over prompts


def _group_codes(prompt_ids: Sequence[Any] | np.ndarray, n_pairs: int) -> tuple[np.ndarray, int]:
    """Map prompt ids (str or int, one per pair) to codes 0..G-1 and return (codes, G)."""
    ids = np.asarray(prompt_ids)
    if ids.ndim != 1 or len(ids) != n_pairs:
        raise ValueError(f"prompt_ids must have one entry per pair ({n_pairs}), got shape {ids.shape}")
    _, codes = np.unique(ids, return_inverse=True)
    codes = codes.reshape(-1)
    return codes, int(codes.max()) + 1


def _bootstrap_group_means(
    columns: np.ndarray, codes: np.ndarray, n_groups: int, n_samples: int, seed: int
) -> np.ndarray:
    """Resample prompts and return the per-pair mean of every column, shape [n_samples, k].

    columns has shape [n_pairs, k]. Each resample draws n_groups prompt indices with replacement.
    Its mean is (Σ over drawn prompts of the prompt's column sum) / (Σ of the prompt's pair count),
    which equals the mean over the concatenated pairs of the drawn prompts. Every column of a
    resample uses the same drawn prompts.
    """
    group_sums = np.stack(
        [np.bincount(codes, weights=columns[:, j], minlength=n_groups) for j in range(columns.shape[1])], axis=1
    )
    group_sizes = np.bincount(codes, minlength=n_groups).astype(np.float64)

    rng = np.random.default_rng(seed)
    means = np.empty((n_samples, columns.shape[1]))
    block = max(1, min(n_samples, _MAX_BLOCK_ELEMENTS // n_groups))
    for start in range(0, n_samples, block):
        rows = min(block, n_samples - start)
        drawn = rng.integers(0, n_groups, size=(rows, n_groups))
        # times_drawn[s, g] is how often resample s drew prompt g.
        flat = (np.arange(rows)[:, None] * n_groups + drawn).ravel()
        times_drawn = np.bincount(flat, minlength=rows * n_groups).reshape(rows, n_groups).astype(np.float64)
        means[start : start + rows] = (times_drawn @ group_sums) / (times_drawn @ group_sizes)[:, None]
    return means


def _percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    low, high = np.quantile(samples, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)


def bootstrap_accuracy_ci(
    correct: ArrayLike,
    prompt_ids: Sequence[Any] | np.ndarray,
    n_samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Estimate accuracy = mean(correct) with a bootstrap interval over prompts.

    correct (bool or 0/1) and prompt_ids have shape [n_pairs]. Returns (estimate, low, high), where
    estimate is the accuracy on all pairs and [low, high] the central `level` percentile interval
    of n_samples prompt resamples. The same seed gives the same interval.
    """
    _check_level(level)
    _check_n_samples(n_samples)
    values = _as_1d(correct, "correct")
    codes, n_groups = _group_codes(prompt_ids, len(values))

    samples = _bootstrap_group_means(values[:, None], codes, n_groups, n_samples, seed)[:, 0]
    low, high = _percentile_interval(samples, level)
    return Interval(float(values.mean()), low, high)


def bootstrap_standard_error(
    correct: ArrayLike, prompt_ids: Sequence[Any] | np.ndarray, n_samples: int = 1000, seed: int = 0
) -> float:
    """Standard deviation of accuracy over prompt resamples: the standard error of `mean(correct)`."""
    _check_n_samples(n_samples)
    values = _as_1d(correct, "correct")
    codes, n_groups = _group_codes(prompt_ids, len(values))
    samples = _bootstrap_group_means(values[:, None], codes, n_groups, n_samples, seed)[:, 0]
    return float(np.std(samples, ddof=1))


def paired_bootstrap_diff(
    correct_a: ArrayLike,
    correct_b: ArrayLike,
    prompt_ids: Sequence[Any] | np.ndarray,
    n_samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Estimate accuracy(A) − accuracy(B) on the same pairs with a paired bootstrap over prompts.

    All inputs have shape [n_pairs], and pair i must be the same pair for both models. Each resample
    evaluates both models on the same drawn prompts, so the interval accounts for their correlation.
    Returns (diff, low, high).
    """
    _check_level(level)
    _check_n_samples(n_samples)
    values_a = _as_1d(correct_a, "correct_a")
    values_b = _as_1d(correct_b, "correct_b")
    _check_same_length(correct_a=values_a, correct_b=values_b)
    codes, n_groups = _group_codes(prompt_ids, len(values_a))

    differences = values_a - values_b
    samples = _bootstrap_group_means(differences[:, None], codes, n_groups, n_samples, seed)[:, 0]
    low, high = _percentile_interval(samples, level)
    return Interval(float(differences.mean()), low, high)


def pgr_ci(
    correct_student: ArrayLike,
    correct_weak: ArrayLike,
    correct_ceiling: ArrayLike,
    prompt_ids: Sequence[Any] | np.ndarray,
    n_samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    min_gap: float = 1e-9,
) -> PGRInterval:
    """Estimate PGR with a bootstrap over prompts that draws the same prompts for all three models.

    All inputs have shape [n_pairs]. Resamples where |ceiling − weak| < min_gap have no PGR and
    are left out of the interval, and `skipped_fraction` reports their share. A large share means
    the interval describes only the resamples where the ceiling beats (or trails) the weak model.
    """
    _check_level(level)
    _check_n_samples(n_samples)
    student = _as_1d(correct_student, "correct_student")
    weak = _as_1d(correct_weak, "correct_weak")
    ceiling = _as_1d(correct_ceiling, "correct_ceiling")
    _check_same_length(correct_student=student, correct_weak=weak, correct_ceiling=ceiling)
    codes, n_groups = _group_codes(prompt_ids, len(student))

    estimate = pgr(float(student.mean()), float(weak.mean()), float(ceiling.mean()), min_gap=min_gap)
    samples = _bootstrap_group_means(np.stack([student, weak, ceiling], axis=1), codes, n_groups, n_samples, seed)
    student_acc, weak_acc, ceiling_acc = samples[:, 0], samples[:, 1], samples[:, 2]
    gaps = ceiling_acc - weak_acc
    defined = np.abs(gaps) >= min_gap
    skipped_fraction = float(1.0 - defined.mean())
    if not defined.any():
        return PGRInterval(estimate, None, None, skipped_fraction)

    ratios = (student_acc[defined] - weak_acc[defined]) / gaps[defined]
    low, high = _percentile_interval(ratios, level)
    return PGRInterval(estimate, low, high, skipped_fraction)


# ---------------------------------------------------------------------------------------------
# One model on one eval set


def summarize_model_on_set(
    r_chosen: ArrayLike,
    r_rejected: ArrayLike,
    prompt_ids: Sequence[Any] | np.ndarray,
    reps: np.ndarray | None = None,
    reps_pretrained: np.ndarray | None = None,
    *,
    n_samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    n_bins: int = 10,
) -> dict[str, Any]:
    """Compute the standard metrics of one model on one eval set as a JSON-ready dict.

    Keys:
      accuracy      share of pairs with r_c > r_r (ties wrong)
      accuracy_ci   [low, high], percentile bootstrap over prompts at `level`
      ece           expected calibration error of σ(r_c − r_r) with n_bins bins
      margin        mean of r_c − r_r, in the model's reward units
      mean_reward   mean of r_c and r_r over all 2n responses, in the model's reward units
      n_pairs, n_prompts
    When both reps and reps_pretrained are given ([n, hidden] pooled representations of this model
    and of the frozen pretrained model on the same sequences), also:
      drift_cosine  mean row-wise cosine similarity (1 = no drift)
      drift_cka     linear CKA (1 = no drift up to rotation and scale; NaN if an input is constant)
    """
    chosen = _as_1d(r_chosen, "r_chosen")
    rejected = _as_1d(r_rejected, "r_rejected")
    _check_same_length(r_chosen=chosen, r_rejected=rejected)
    _, n_prompts = _group_codes(prompt_ids, len(chosen))

    correct = chosen > rejected
    accuracy = bootstrap_accuracy_ci(correct, prompt_ids, n_samples=n_samples, seed=seed, level=level)
    summary: dict[str, Any] = {
        "accuracy": accuracy.estimate,
        "accuracy_ci": [accuracy.low, accuracy.high],
        "ece": expected_calibration_error(preference_probs(chosen, rejected), n_bins=n_bins),
        "margin": float(np.mean(chosen - rejected)),
        "mean_reward": float((chosen.sum() + rejected.sum()) / (2 * len(chosen))),
        "n_pairs": int(len(chosen)),
        "n_prompts": n_prompts,
    }
    if (reps is None) != (reps_pretrained is None):
        raise ValueError("reps and reps_pretrained must be given together (or neither) to measure drift")
    if reps is not None and reps_pretrained is not None:
        summary["drift_cosine"] = mean_cosine(reps, reps_pretrained)
        summary["drift_cka"] = linear_cka(reps, reps_pretrained)
    return summary
