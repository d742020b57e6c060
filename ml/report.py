"""Build, write and print the evaluation report of a weak-to-strong experiment.

`build_report` takes the raw per-pair rewards of every model on every eval set and computes all
derived numbers. These are accuracy with bootstrap intervals over prompts, gain over the baseline
(usually the weak model) with a paired interval, PGR when a ceiling model exists, transfer gap,
calibration, representation drift, and two length heuristics as reference rows. `write_report`
saves the result as report.json, report.md, accuracy.png and drift.png. `format_table` renders a
short plain-text table for a terminal.

This module imports only numpy and matplotlib (Agg canvas, no pyplot), never torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ml import metrics

REFERENCE_ROWS = ("prefer longer", "prefer shorter")
ROLES = ("id", "ood")

REPORT_JSON = "report.json"
REPORT_MARKDOWN = "report.md"
ACCURACY_PLOT = "accuracy.png"
DRIFT_PLOT = "drift.png"

_MISSING = "—"
_REFERENCE_HATCHES = {"prefer longer": "//", "prefer shorter": "\\\\"}


# ---------------------------------------------------------------------------------------------
# Inputs and the report structure


@dataclass
class PairScores:
    """Rewards of one model on one eval set, one entry per pair in the eval set's pair order.

    `reps` and `reps_pretrained` are optional pooled representations, shape [n, hidden], of this
    model and of the frozen pretrained model on the same sequences. Given together, they add the
    drift_cosine and drift_cka metrics.
    """

    r_chosen: Sequence[float] | np.ndarray
    r_rejected: Sequence[float] | np.ndarray
    reps: np.ndarray | None = None
    reps_pretrained: np.ndarray | None = None


@dataclass
class EvalSetInfo:
    """One eval set as it was scored: its role, the prompt of each pair, lengths and truncation.

    Every model is scored on the same pairs in the same order, so `prompt_ids` (one per pair) is
    shared by all models' `PairScores`. `len_chosen` and `len_rejected` are response lengths in
    characters for the length reference rows. `n_truncated` counts pairs in which the chosen or
    the rejected sequence was cut to `max_length` tokens.
    """

    role: Literal["id", "ood"]
    prompt_ids: Sequence[str] | np.ndarray
    len_chosen: Sequence[int] | np.ndarray | None = None
    len_rejected: Sequence[int] | np.ndarray | None = None
    n_truncated: int = 0
    max_length: int | None = None


@dataclass
class EvalSetSummary:
    """Size, role and truncation of one eval set, as shown in the report."""

    name: str
    role: str
    n_pairs: int
    n_prompts: int
    n_truncated: int
    max_length: int | None


@dataclass
class Report:
    """All numbers of one evaluation, ready to write or print.

    Row dicts are JSON-ready. `rows[model][set]` contains the keys of
    `metrics.summarize_model_on_set` (drift_cosine and drift_cka are None without representations)
    plus:
      gain_over_baseline, gain_over_baseline_ci  accuracy minus the baseline's on the same pairs,
                                                 paired bootstrap over prompts (None for the baseline)
      pgr, pgr_ci, pgr_skipped_fraction          see `metrics.pgr_ci` (None for the baseline, the
                                                 ceiling, or without a ceiling)
      transfer_gap                               ID accuracy minus this set's (None on the ID set)
    `reference_rows[name][set]` contains accuracy, accuracy_ci, n_pairs, n_prompts and transfer_gap of
    a length heuristic, or None when the set has no lengths.
    `pooled_ood[row]` contains the same numbers on all OOD sets concatenated, for models and reference
    rows alike, and is empty without OOD sets.
    `correct[model][set]` is the per-pair correctness (bool array) and is not written to JSON.
    """

    name: str
    settings: dict[str, Any]
    eval_sets: list[EvalSetSummary]
    models: list[str]
    baseline: str | None
    ceiling: str | None
    rows: dict[str, dict[str, dict[str, Any]]]
    reference_rows: dict[str, dict[str, dict[str, Any] | None]]
    pooled_ood: dict[str, dict[str, Any] | None]
    training_curves: dict[str, list[dict[str, Any]]]
    bootstrap: dict[str, Any]
    ece_bins: int
    correct: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def id_set(self) -> str | None:
        """Name of the in-distribution eval set, or None when every set is OOD."""
        return next((s.name for s in self.eval_sets if s.role == "id"), None)

    @property
    def ood_sets(self) -> list[str]:
        return [s.name for s in self.eval_sets if s.role == "ood"]

    def to_dict(self) -> dict[str, Any]:
        """Return every number of the report as plain JSON types, without the per-pair arrays."""
        return _to_builtin(
            {
                "name": self.name,
                "settings": self.settings,
                "eval_sets": [vars(s) for s in self.eval_sets],
                "models": self.models,
                "baseline": self.baseline,
                "ceiling": self.ceiling,
                "rows": self.rows,
                "reference_rows": self.reference_rows,
                "pooled_ood": self.pooled_ood,
                "training_curves": self.training_curves,
                "bootstrap": self.bootstrap,
                "ece_bins": self.ece_bins,
            }
        )


def _to_builtin(value: Any) -> Any:
    """Convert numpy scalars and arrays, tuples and paths to JSON types. NaN and ±inf become None."""
    if isinstance(value, Mapping):
        return {str(key): _to_builtin(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_builtin(item) for item in value]
    if isinstance(value, np.ndarray):
        return [_to_builtin(item) for item in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


# ---------------------------------------------------------------------------------------------
# Building the report


def _validate_inputs(
    eval_sets: Mapping[str, EvalSetInfo],
    scores: Mapping[str, Mapping[str, PairScores]],
    baseline: str | None,
    ceiling: str | None,
) -> list[str]:
    """Raise ValueError on inconsistent inputs and return the set names, the ID set first."""
    if not eval_sets:
        raise ValueError("eval_sets is empty: the report needs at least one eval set")
    if not scores:
        raise ValueError("scores is empty: the report needs at least one model")

    for set_name, info in eval_sets.items():
        if info.role not in ROLES:
            raise ValueError(f"eval set {set_name!r} has invalid role {info.role!r}; expected 'id' or 'ood'")
        n_pairs = len(info.prompt_ids)
        if n_pairs == 0:
            raise ValueError(f"eval set {set_name!r} has no pairs")
        if (info.len_chosen is None) != (info.len_rejected is None):
            raise ValueError(f"eval set {set_name!r}: give both len_chosen and len_rejected, or neither")
        if info.len_chosen is not None and not len(info.len_chosen) == len(info.len_rejected) == n_pairs:
            raise ValueError(
                f"eval set {set_name!r}: len_chosen and len_rejected must have one entry per pair ({n_pairs})"
            )
    id_sets = [name for name, info in eval_sets.items() if info.role == "id"]
    if len(id_sets) > 1:
        raise ValueError(f"at most one eval set can have role 'id', got {id_sets}")

    for model, by_set in scores.items():
        if model in REFERENCE_ROWS:
            raise ValueError(f"model name {model!r} is reserved for a length reference row; rename the model")
        missing = [name for name in eval_sets if name not in by_set]
        unknown = [name for name in by_set if name not in eval_sets]
        if missing or unknown:
            raise ValueError(f"model {model!r}: scores missing for eval sets {missing}, unknown eval sets {unknown}")
        for set_name, pair_scores in by_set.items():
            n_pairs = len(eval_sets[set_name].prompt_ids)
            if not len(pair_scores.r_chosen) == len(pair_scores.r_rejected) == n_pairs:
                raise ValueError(
                    f"model {model!r} on {set_name!r}: expected {n_pairs} rewards per side, got "
                    f"{len(pair_scores.r_chosen)} chosen and {len(pair_scores.r_rejected)} rejected"
                )
            rewards = np.concatenate([np.asarray(pair_scores.r_chosen, float), np.asarray(pair_scores.r_rejected, float)])
            n_invalid = int(np.sum(~np.isfinite(rewards)))
            if n_invalid:
                raise ValueError(
                    f"model {model!r} on {set_name!r}: {n_invalid} rewards are NaN or infinite; check the scoring run"
                )

    for role, model in (("baseline", baseline), ("ceiling", ceiling)):
        if model is not None and model not in scores:
            raise ValueError(f"{role} model {model!r} not found in scores; models are {sorted(scores)}")
    if baseline is not None and baseline == ceiling:
        raise ValueError(f"baseline and ceiling must be different models, both are {baseline!r}")

    return id_sets + [name for name, info in eval_sets.items() if info.role == "ood"]


def _normalize_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]] | None) -> dict[str, list[dict[str, Any]]]:
    """Keep step, drift and loss of every logged point, sorted by step. Missing values become None."""
    normalized: dict[str, list[dict[str, Any]]] = {}
    for model, points in (curves or {}).items():
        rows = []
        for point in points:
            if "step" not in point:
                raise ValueError(f"training curve of {model!r} has a point without 'step': {dict(point)}")
            rows.append(
                {
                    "step": int(point["step"]),
                    "drift": None if point.get("drift") is None else float(point["drift"]),
                    "loss": None if point.get("loss") is None else float(point["loss"]),
                }
            )
        normalized[model] = sorted(rows, key=lambda row: row["step"])
    return normalized


@dataclass
class _Comparison:
    """Per-pair data of one eval set (or of all OOD sets pooled) for every table row."""

    prompt_codes: np.ndarray
    correct: dict[str, np.ndarray]
    probs: dict[str, np.ndarray]
    reference: dict[str, np.ndarray | None]


def _comparison_for_set(
    info: EvalSetInfo, scores: Mapping[str, Mapping[str, PairScores]], set_name: str
) -> _Comparison:
    _, codes = np.unique(np.asarray(info.prompt_ids), return_inverse=True)
    correct = {}
    probs = {}
    for model, by_set in scores.items():
        r_chosen = np.asarray(by_set[set_name].r_chosen, dtype=np.float64)
        r_rejected = np.asarray(by_set[set_name].r_rejected, dtype=np.float64)
        correct[model] = r_chosen > r_rejected
        probs[model] = metrics.preference_probs(r_chosen, r_rejected)
    reference: dict[str, np.ndarray | None] = {}
    for row_name in REFERENCE_ROWS:
        if info.len_chosen is None:
            reference[row_name] = None
        else:
            prefer = "longer" if row_name == "prefer longer" else "shorter"
            reference[row_name] = metrics.length_baseline(info.len_chosen, info.len_rejected, prefer=prefer)
    return _Comparison(codes.reshape(-1), correct, probs, reference)


def _pool_comparisons(parts: list[_Comparison]) -> _Comparison:
    """Concatenate the pairs of several eval sets, keeping prompts of different sets apart."""
    offsets = np.cumsum([0] + [int(part.prompt_codes.max()) + 1 for part in parts[:-1]])
    codes = np.concatenate([part.prompt_codes + offset for part, offset in zip(parts, offsets)])
    models = parts[0].correct.keys()
    correct = {model: np.concatenate([part.correct[model] for part in parts]) for model in models}
    probs = {model: np.concatenate([part.probs[model] for part in parts]) for model in models}
    reference: dict[str, np.ndarray | None] = {}
    for row_name in REFERENCE_ROWS:
        arrays = [part.reference[row_name] for part in parts]
        reference[row_name] = None if any(a is None for a in arrays) else np.concatenate(arrays)
    return _Comparison(codes, correct, probs, reference)


def _baseline_metrics(
    model: str,
    comparison: _Comparison,
    baseline: str | None,
    ceiling: str | None,
    bootstrap: dict[str, Any],
) -> dict[str, Any]:
    """Compute gain over the baseline and PGR of one model; None where they do not apply."""
    result: dict[str, Any] = {
        "gain_over_baseline": None,
        "gain_over_baseline_ci": None,
        "pgr": None,
        "pgr_ci": None,
        "pgr_skipped_fraction": None,
    }
    if baseline is None or model == baseline:
        return result

    gain = metrics.paired_bootstrap_diff(
        comparison.correct[model], comparison.correct[baseline], comparison.prompt_codes, **bootstrap
    )
    result["gain_over_baseline"] = gain.estimate
    result["gain_over_baseline_ci"] = [gain.low, gain.high]

    if ceiling is not None and model != ceiling:
        recovered = metrics.pgr_ci(
            comparison.correct[model],
            comparison.correct[baseline],
            comparison.correct[ceiling],
            comparison.prompt_codes,
            **bootstrap,
        )
        result["pgr"] = recovered.estimate
        result["pgr_ci"] = None if recovered.low is None else [recovered.low, recovered.high]
        result["pgr_skipped_fraction"] = recovered.skipped_fraction
    return result


def _accuracy_entry(correct: np.ndarray, codes: np.ndarray, bootstrap: dict[str, Any]) -> dict[str, Any]:
    accuracy = metrics.bootstrap_accuracy_ci(correct, codes, **bootstrap)
    return {
        "accuracy": accuracy.estimate,
        "accuracy_ci": [accuracy.low, accuracy.high],
        "n_pairs": int(len(correct)),
        "n_prompts": int(codes.max()) + 1,
        "transfer_gap": None,
    }


def _reference_metrics(correct: np.ndarray | None, codes: np.ndarray, bootstrap: dict[str, Any]) -> dict[str, Any] | None:
    return None if correct is None else _accuracy_entry(correct, codes, bootstrap)


def _pooled_model_metrics(
    model: str, pooled: _Comparison, baseline: str | None, ceiling: str | None, bootstrap: dict[str, Any], n_bins: int
) -> dict[str, Any]:
    entry = _accuracy_entry(pooled.correct[model], pooled.prompt_codes, bootstrap)
    entry["ece"] = metrics.expected_calibration_error(pooled.probs[model], n_bins=n_bins)
    entry.update(_baseline_metrics(model, pooled, baseline, ceiling, bootstrap))
    return entry


def _fill_transfer_gaps(
    rows: Mapping[str, Mapping[str, dict[str, Any] | None]],
    pooled_ood: Mapping[str, dict[str, Any] | None],
    id_name: str,
    ood_names: list[str],
) -> None:
    """Set transfer_gap = ID accuracy − OOD accuracy on every OOD entry and pooled entry of each row."""
    for row_name, by_set in rows.items():
        id_entry = by_set[id_name]
        if id_entry is None:
            continue
        targets = [by_set[s] for s in ood_names] + [pooled_ood.get(row_name)]
        for target in targets:
            if target is not None:
                target["transfer_gap"] = metrics.transfer_gap(id_entry["accuracy"], target["accuracy"])


def build_report(
    name: str,
    settings: Mapping[str, Any],
    eval_sets: Mapping[str, EvalSetInfo],
    scores: Mapping[str, Mapping[str, PairScores]],
    baseline: str | None = "weak",
    ceiling: str | None = None,
    training_curves: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    *,
    n_samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    n_bins: int = 10,
) -> Report:
    """Compute every number of the report from per-pair rewards.

    `scores[model][set]` must exist for every model and eval set. `baseline` (None to skip gains
    and PGR) and `ceiling` (None to skip PGR) name models in `scores`. `training_curves[model]` is
    a list of {"step", "drift", "loss"} points from the training log and may be empty. Every
    bootstrap uses n_samples resamples over prompts with the same seed, so rows of one set are
    resampled alike. Raises ValueError on inconsistent inputs, naming the model or set.
    """
    set_names = _validate_inputs(eval_sets, scores, baseline, ceiling)
    models = list(scores)
    bootstrap = {"n_samples": n_samples, "seed": seed, "level": level}
    comparisons = {set_name: _comparison_for_set(eval_sets[set_name], scores, set_name) for set_name in set_names}

    summaries = []
    rows: dict[str, dict[str, dict[str, Any]]] = {model: {} for model in models}
    reference_rows: dict[str, dict[str, dict[str, Any] | None]] = {row: {} for row in REFERENCE_ROWS}
    for set_name in set_names:
        info = eval_sets[set_name]
        comparison = comparisons[set_name]
        summaries.append(
            EvalSetSummary(
                name=set_name,
                role=info.role,
                n_pairs=len(info.prompt_ids),
                n_prompts=int(comparison.prompt_codes.max()) + 1,
                n_truncated=int(info.n_truncated),
                max_length=info.max_length,
            )
        )
        for model in models:
            pair_scores = scores[model][set_name]
            row = metrics.summarize_model_on_set(
                pair_scores.r_chosen,
                pair_scores.r_rejected,
                comparison.prompt_codes,
                pair_scores.reps,
                pair_scores.reps_pretrained,
                n_bins=n_bins,
                **bootstrap,
            )
            row.setdefault("drift_cosine", None)
            row.setdefault("drift_cka", None)
            row.update(_baseline_metrics(model, comparison, baseline, ceiling, bootstrap))
            row["transfer_gap"] = None
            rows[model][set_name] = row
        for row_name in REFERENCE_ROWS:
            reference_rows[row_name][set_name] = _reference_metrics(
                comparison.reference[row_name], comparison.prompt_codes, bootstrap
            )

    ood_names = [s for s in set_names if eval_sets[s].role == "ood"]
    pooled_ood: dict[str, dict[str, Any] | None] = {}
    if ood_names:
        pooled = _pool_comparisons([comparisons[s] for s in ood_names])
        for model in models:
            pooled_ood[model] = _pooled_model_metrics(model, pooled, baseline, ceiling, bootstrap, n_bins)
        for row_name in REFERENCE_ROWS:
            pooled_ood[row_name] = _reference_metrics(pooled.reference[row_name], pooled.prompt_codes, bootstrap)

    id_name = set_names[0] if eval_sets[set_names[0]].role == "id" else None
    if id_name is not None:
        _fill_transfer_gaps({**rows, **reference_rows}, pooled_ood, id_name, ood_names)

    correct = {model: {s: comparisons[s].correct[model] for s in set_names} for model in models}
    return Report(
        name=name,
        settings=dict(settings),
        eval_sets=summaries,
        models=models,
        baseline=baseline,
        ceiling=ceiling,
        rows=rows,
        reference_rows=reference_rows,
        pooled_ood=pooled_ood,
        training_curves=_normalize_curves(training_curves),
        bootstrap={"unit": "prompt", **bootstrap},
        ece_bins=n_bins,
        correct=correct,
    )


# ---------------------------------------------------------------------------------------------
# Text formatting


def _fmt(value: float | None, digits: int = 3, signed: bool = False, missing: str = _MISSING) -> str:
    if value is None or not math.isfinite(value):
        return missing
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _fmt_ci(
    value: float | None, ci: Sequence[float] | None, digits: int = 3, signed: bool = False, missing: str = _MISSING
) -> str:
    text = _fmt(value, digits, signed, missing)
    if value is None or ci is None:
        return text
    return f"{text} [{_fmt(ci[0], digits, signed, missing)}, {_fmt(ci[1], digits, signed, missing)}]"


def _headline(report: Report, row_name: str) -> dict[str, Any] | None:
    """Return the entry that the gain, PGR and transfer-gap columns show for a row.

    That entry is the pooled OOD one when OOD sets exist, otherwise the ID set's.
    """
    if report.ood_sets:
        return report.pooled_ood.get(row_name)
    by_set = report.rows.get(row_name) or report.reference_rows.get(row_name) or {}
    return by_set.get(report.id_set) if report.id_set else None


def _headline_label(report: Report) -> str:
    if not report.ood_sets:
        return f"the ID set {report.id_set}"
    if len(report.ood_sets) == 1:
        return f"the OOD set {report.ood_sets[0]}"
    return f"all {len(report.ood_sets)} OOD sets pooled"


def _set_entry(report: Report, row_name: str, set_name: str) -> dict[str, Any] | None:
    if row_name in report.rows:
        return report.rows[row_name][set_name]
    return report.reference_rows[row_name][set_name]


def _table_row_names(report: Report) -> list[str]:
    return report.models + list(REFERENCE_ROWS)


def _escape_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_escape_cell(cell) for cell in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines.extend("| " + " | ".join(_escape_cell(cell) for cell in row) + " |" for row in body)
    return lines


def _main_table(report: Report) -> list[str]:
    percent = round(100 * report.bootstrap["level"])
    baseline = report.baseline or "baseline"
    header = ["Model"]
    header += [f"{s.name} ({s.role.upper()}) acc [{percent} % CI]" for s in report.eval_sets]
    header += [
        f"Gain over {baseline} [CI]",
        "PGR [CI]",
        "Transfer gap",
        "ECE ID / OOD",
        "Drift cos (ID)",
        "Drift CKA (ID)",
    ]

    body = []
    for row_name in _table_row_names(report):
        cells = [row_name]
        for summary in report.eval_sets:
            entry = _set_entry(report, row_name, summary.name)
            cells.append(_MISSING if entry is None else _fmt_ci(entry["accuracy"], entry["accuracy_ci"]))
        headline = _headline(report, row_name) or {}
        cells.append(_fmt_ci(headline.get("gain_over_baseline"), headline.get("gain_over_baseline_ci"), signed=True))
        cells.append(_fmt_ci(headline.get("pgr"), headline.get("pgr_ci"), digits=2))
        cells.append(_fmt(headline.get("transfer_gap"), signed=True))

        is_model = row_name in report.rows
        id_entry = report.rows[row_name][report.id_set] if is_model and report.id_set else {}
        ood_entry = report.pooled_ood.get(row_name) if is_model else None
        cells.append(f"{_fmt(id_entry.get('ece'))} / {_fmt((ood_entry or {}).get('ece'))}" if is_model else _MISSING)
        cells.append(_fmt(id_entry.get("drift_cosine")))
        cells.append(_fmt(id_entry.get("drift_cka")))
        body.append(cells)
    caption = f"Gain, PGR and transfer gap are measured on {_headline_label(report)}."
    if len(report.ood_sets) > 1:
        caption += " The OOD ECE is pooled over all OOD sets."
    return _markdown_table(header, body) + ["", caption]


def _detail_table(report: Report) -> list[str]:
    baseline = report.baseline or "baseline"
    header = [
        "Model",
        "Eval set",
        "Accuracy [CI]",
        f"Gain over {baseline} [CI]",
        "PGR [CI]",
        "PGR resamples skipped",
        "Transfer gap",
        "ECE",
        "Margin",
        "Mean reward",
        "Drift cos",
        "Drift CKA",
    ]
    body = []
    for model in report.models:
        for summary in report.eval_sets:
            row = report.rows[model][summary.name]
            skipped = row["pgr_skipped_fraction"]
            body.append(
                [
                    model,
                    summary.name,
                    _fmt_ci(row["accuracy"], row["accuracy_ci"]),
                    _fmt_ci(row["gain_over_baseline"], row["gain_over_baseline_ci"], signed=True),
                    _fmt_ci(row["pgr"], row["pgr_ci"], digits=2),
                    _MISSING if skipped is None else f"{100 * skipped:.1f} %",
                    _fmt(row["transfer_gap"], signed=True),
                    _fmt(row["ece"]),
                    _fmt(row["margin"], signed=True),
                    _fmt(row["mean_reward"], signed=True),
                    _fmt(row["drift_cosine"]),
                    _fmt(row["drift_cka"]),
                ]
            )
    return _markdown_table(header, body)


def _eval_set_table(report: Report) -> list[str]:
    header = ["Eval set", "Role", "Pairs", "Prompts", "Truncated pairs", "Max length (tokens)"]
    body = []
    for s in report.eval_sets:
        share = 100 * s.n_truncated / s.n_pairs
        body.append(
            [
                s.name,
                s.role.upper(),
                str(s.n_pairs),
                str(s.n_prompts),
                f"{s.n_truncated} ({share:.1f} %)",
                _MISSING if s.max_length is None else str(s.max_length),
            ]
        )
    return _markdown_table(header, body)


def _selection_lines(selections: Mapping[str, Any]) -> list[str]:
    """Render one paragraph and one table per arm whose lambda was chosen by the 'auto' rule."""
    lines = []
    for arm, sel in selections.items():
        val = sel.get("validation", {})
        lines += [
            f"**{arm}**: chose lambda = {sel['lambda']:g}. {sel['reason']}. Source validation: {val.get('pairs')} gold pairs "
            f"from {val.get('prompts')} prompts held out of split B; no target data was used.",
            "",
        ]
        body = [
            [
                f"{c['lambda']:g}" + (" (chosen)" if c["lambda"] == sel["lambda"] else ""),
                _fmt_ci(c["accuracy"], c["interval"]),
                _fmt(c["standard_error"]),
                _fmt(c.get("drift_cos"), 4),
            ]
            for c in sel["candidates"]
        ]
        lines += _markdown_table(["lambda", "Validation accuracy (95 % CI)", "Std. error", "Drift cos"], body)
        lines.append("")
    return lines


def _settings_lines(settings: Mapping[str, Any]) -> list[str]:
    if not settings:
        return ["No settings recorded."]
    lines = []
    for key, value in settings.items():
        if key == "lambda_selection":
            continue
        text = value if isinstance(value, str) else json.dumps(_to_builtin(value), sort_keys=True)
        lines.append(f"- **{key}**: {text}")
    return lines


def _method_lines(report: Report) -> list[str]:
    bootstrap = report.bootstrap
    percent = round(100 * bootstrap["level"])
    lines = [
        f"- Accuracy is the share of pairs with r(chosen) > r(rejected), and ties count as wrong. Intervals are "
        f"{percent} % percentile bootstraps over prompts ({bootstrap['n_samples']} resamples, seed "
        f"{bootstrap['seed']}), because pairs that share a prompt are not independent.",
        f"- Gain over {report.baseline or 'the baseline'} is the accuracy difference on the same pairs, with a "
        "paired bootstrap that resamples the same prompts for both models.",
    ]
    if report.ceiling is not None:
        lines.append(
            f"- PGR = (student - {report.baseline}) / ({report.ceiling} - {report.baseline}), on accuracy. Its interval "
            "resamples the same prompts for all three models and leaves out resamples where the ceiling and the "
            "baseline tie."
        )
    else:
        lines.append("- PGR is not reported because no ceiling model was given.")
    lines += [
        "- Transfer gap is ID accuracy minus OOD accuracy.",
        f"- ECE uses {report.ece_bins} equal-width bins of confidence max(p, 1 - p) over [0.5, 1], "
        "with p = sigmoid(r(chosen) - r(rejected)).",
        "- Drift cos is the mean cosine similarity and drift CKA the linear CKA between the model's pooled "
        "representations and the frozen pretrained model's on the same sequences. 1 means no drift.",
        "- 'prefer longer' and 'prefer shorter' pick the response with more or fewer characters (ties wrong).",
    ]
    if len(report.ood_sets) > 1:
        lines.append("- Pooled OOD numbers concatenate the pairs of all OOD sets, so larger sets weigh more.")
    return lines


def _curve_lines(report: Report) -> list[str]:
    curves = {model: points for model, points in report.training_curves.items() if points}
    if not curves:
        return ["No training curves were recorded."]
    lines = []
    for model, points in curves.items():
        last = points[-1]
        lines.append(
            f"- {model}: {len(points)} points up to step {last['step']}, last drift {_fmt(last['drift'], 4)}, "
            f"last loss {_fmt(last['loss'], 4)}"
        )
    return lines


def format_markdown(report: Report) -> str:
    """Render the report as Markdown: the main table, per-set details, eval sets, settings and method."""
    lines = [f"# Evaluation report: {report.name}", ""]
    lines.append(f"![accuracy per eval set]({ACCURACY_PLOT})")
    lines.append("")
    lines += _main_table(report)
    lines += ["", "## Per eval set", ""]
    lines += _detail_table(report)
    lines += ["", "## Eval sets", ""]
    lines += _eval_set_table(report)
    lines.append("")
    for s in report.eval_sets:
        if s.n_truncated:
            limit = "the eval max length" if s.max_length is None else f"{s.max_length} tokens"
            lines.append(f"- {s.name}: {s.n_truncated} of {s.n_pairs} pairs had a sequence cut to {limit}.")
    if report.settings.get("lambda_selection"):
        lines += ["", "## Choice of lambda", ""]
        lines += _selection_lines(report.settings["lambda_selection"])
    lines += ["", "## Settings", ""]
    lines += _settings_lines(report.settings)
    lines += ["", "## Method", ""]
    lines += _method_lines(report)
    lines += ["", "## Drift over training", "", f"![drift over training]({DRIFT_PLOT})", ""]
    lines += _curve_lines(report)
    return "\n".join(lines) + "\n"


def format_table(report: Report) -> str:
    """Render a compact plain-text table for a terminal: accuracy per set, gain, PGR and transfer gap."""
    label = _headline_label(report)
    header = ["model"] + [f"{s.name} ({s.role})" for s in report.eval_sets]
    header += [f"gain vs {report.baseline or 'baseline'}", "PGR", "gap"]
    body = []
    for row_name in _table_row_names(report):
        cells = [row_name]
        for summary in report.eval_sets:
            entry = _set_entry(report, row_name, summary.name)
            cells.append("-" if entry is None else _fmt_ci(entry["accuracy"], entry["accuracy_ci"], missing="-"))
        headline = _headline(report, row_name) or {}
        cells.append(_fmt(headline.get("gain_over_baseline"), signed=True, missing="-"))
        cells.append(_fmt(headline.get("pgr"), digits=2, missing="-"))
        cells.append(_fmt(headline.get("transfer_gap"), signed=True, missing="-"))
        body.append(cells)

    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header] + body]
    percent = round(100 * report.bootstrap["level"])
    lines.append(f"Accuracy with {percent} % CI over prompts. Gain, PGR and gap on {label}.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figures


def _model_colors(report: Report) -> dict[str, str]:
    """Give every model the same matplotlib cycle colour in both figures."""
    return {model: f"C{index % 10}" for index, model in enumerate(report.models)}


def _plot_accuracy(report: Report, path: Path) -> None:
    """Draw grouped bars of accuracy per eval set and row, with CI error bars and a chance line."""
    row_names = _table_row_names(report)
    set_names = [s.name for s in report.eval_sets]
    width = 0.8 / len(row_names)
    positions = np.arange(len(set_names))
    colors = _model_colors(report)

    figure = Figure(figsize=(max(6.0, 1.6 * len(set_names) * max(1, len(row_names) / 4)), 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, row_name in enumerate(row_names):
        entries = [_set_entry(report, row_name, s) for s in set_names]
        heights = np.array([np.nan if e is None else e["accuracy"] for e in entries])
        lows = np.array([0.0 if e is None else e["accuracy"] - e["accuracy_ci"][0] for e in entries])
        highs = np.array([0.0 if e is None else e["accuracy_ci"][1] - e["accuracy"] for e in entries])
        is_reference = row_name in REFERENCE_ROWS
        if is_reference:
            style = {"color": "0.75", "edgecolor": "0.35", "hatch": _REFERENCE_HATCHES[row_name]}
        else:
            style = {"color": colors[row_name]}
        axes.bar(
            positions + (index - (len(row_names) - 1) / 2) * width,
            heights,
            width,
            yerr=np.vstack([lows, highs]),
            capsize=3,
            label=row_name,
            **style,
        )
    axes.axhline(0.5, color="black", linestyle="--", linewidth=1, label="chance")
    axes.set_xticks(positions, [f"{s.name}\n({s.role.upper()})" for s in report.eval_sets])
    axes.set_ylim(0.0, 1.0)
    axes.set_ylabel(f"pairwise accuracy ({round(100 * report.bootstrap['level'])} % CI)")
    axes.set_title(report.name)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.savefig(path, dpi=120, bbox_inches="tight")


def _plot_drift(report: Report, path: Path) -> None:
    """Draw drift and loss over training steps per model, or an empty-state note without curves."""
    curves = {model: points for model, points in report.training_curves.items() if points}
    figure = Figure(figsize=(9, 4))
    FigureCanvasAgg(figure)
    if not curves:
        axes = figure.add_subplot()
        axes.set_axis_off()
        axes.text(0.5, 0.5, "No training curves recorded", ha="center", va="center", fontsize=14)
        figure.savefig(path, dpi=100)
        return

    drift_axes, loss_axes = figure.subplots(1, 2)
    colors = _model_colors(report)
    for model, points in curves.items():
        for axes, key in ((drift_axes, "drift"), (loss_axes, "loss")):
            logged = [(p["step"], p[key]) for p in points if p[key] is not None]
            if logged:
                steps, values = zip(*logged)
                marker = "." if len(logged) < 50 else None
                axes.plot(steps, values, marker=marker, color=colors.get(model), label=model)
    for axes, label in ((drift_axes, "representation drift (training log)"), (loss_axes, "training loss")):
        axes.set_xlabel("optimizer step")
        axes.set_ylabel(label)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small")
        else:
            axes.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axes.transAxes)
    figure.suptitle(f"{report.name}: drift over training")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------
# Writing


def write_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md, accuracy.png and drift.png into out_dir and return their paths.

    The JSON contains every number of `Report.to_dict` (NaN written as null) but not the per-pair
    correctness arrays. out_dir is created if missing, and existing files are overwritten.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / REPORT_JSON,
        "markdown": out_dir / REPORT_MARKDOWN,
        "accuracy_plot": out_dir / ACCURACY_PLOT,
        "drift_plot": out_dir / DRIFT_PLOT,
    }
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(format_markdown(report), encoding="utf-8")
    _plot_accuracy(report, paths["accuracy_plot"])
    _plot_drift(report, paths["drift_plot"])
    return paths
