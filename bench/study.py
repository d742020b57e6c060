"""Transfer study: does Representation Anchoring transfer better than naive weak-to-strong training?

Every run is a pipeline job of the product, started with the CLI (`w2s pipeline --config ... --set
student.seed=K`), so an interrupted study continues where it stopped: finished stages are skipped
and training resumes from its last checkpoint. Each finished run appends one record to a results
file (JSON Lines, per-pair correctness included). The Transfer section of bench/RESULTS.md and its
plots are generated from that file alone.

    python bench/study.py configs                      # write configs/study/<plan>/<student>/<shift>.yaml
    python bench/study.py run --plan cpu --shifts us_history_textbook alpaca_low_quality --seeds 0 1 2 3 4
    python bench/study.py report                       # regenerate the Transfer section and plots

Plans: `cpu` is sized for a 2-core machine (a few hours for two shifts, MPNet only); `gpu` is the
full study (every shift, full test sets and lengths, MPNet everywhere and SmolLM2 on two shifts).
Arms per shift: weak alone; naive; anchored with lambda='auto' over a grid, every grid value
reported; L2-SP; the gold-label ceiling; the two length heuristics from the report. The weak model
and its labels are those of the first seed for every seed; a seed changes the student's head
initialisation and data order.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHIFTS_FILE = "${W2S_DATA_DIR}/genies/shifts.json"
RESULTS = ROOT / "bench" / "results" / "transfer.jsonl"
PLOTS = ROOT / "bench" / "plots"
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- transfer-study:begin -->", "<!-- transfer-study:end -->"

STUDENTS = {"mpnet": "all-mpnet-base-v2", "smollm2": "SmolLM2-135M-Instruct", "minilm": "all-MiniLM-L6-v2"}
# The decoder runs on the shift with the most room between the weak model and the ceiling. It also
# runs on the shift where every model, the ceiling too, was below chance out of distribution in a
# plain single-seed implementation of the protocol.
DECODER_SHIFTS = ("us_history_textbook", "alpaca_low_quality")
LAMBDA_GRID = [0.0, 0.01, 0.1, 1.0]
L2SP_LAMBDA = 0.1
HH = {"name": "hh_harmless", "test": "${W2S_DATA_DIR}/hh-rlhf/harmless-base/test.jsonl.gz", "format": "hh"}

# CPU plan: about 240 weak-labelled training pairs per student (30 steps of 8), 20 % of split B's
# prompts held out for choosing lambda, and about 120 test pairs per eval set, at 128 tokens.
PLANS: dict[str, dict[str, Any]] = {
    "cpu": {
        "students": ["mpnet"],
        "train_pairs": 600,
        "test_pairs": 120,
        "max_length": {"mpnet": 128},
        "eval_max_length": 128,
        "batch_size": 8,
    },
    # Checks the study's machinery in minutes (tests/bench/test_study.py); its numbers mean nothing.
    "smoke": {
        "students": ["minilm"],
        "train_pairs": 90,
        "test_pairs": 24,
        "max_length": {"minilm": 64},
        "eval_max_length": 64,
        "batch_size": 8,
        "lambda_grid": [0.0, 1.0],
        "l2sp": False,
    },
    "gpu": {
        "students": ["mpnet", "smollm2"],
        "train_pairs": None,
        "test_pairs": None,
        "max_length": {"mpnet": 512, "smollm2": 1024},
        "eval_max_length": None,
        "batch_size": 16,
    },
}


def _pairs_per_prompt(name: str) -> int:
    # GENIES distributions with four ranked responses give three pairs per prompt; the others one.
    return 1 if name.startswith(("alpaca_low", "alpaca_high", "alpaca_short", "alpaca_long", "shp_")) else 3


def _prompts(pairs: int | None, name: str) -> int | None:
    return None if pairs is None else max(1, pairs // _pairs_per_prompt(name))


def shift_config(plan: str, student: str, shift: dict[str, str]) -> dict[str, Any]:
    """Build the pipeline config of one shift under one plan, with ${W2S_DATA_DIR}/${W2S_MODEL_DIR} paths."""
    p = PLANS[plan]
    source, target = shift["source"], shift["target"]
    data = "${W2S_DATA_DIR}/genies"
    max_length = p["max_length"][student]
    train = {"epochs": 1, "max_length": max_length, "batch_size": p["batch_size"], "precision": "auto"}
    return {
        "name": f"study-{plan}-{student}-{source}__{target}",
        "source": {
            "name": source,
            "train": f"{data}/{source}/train.json.gz",
            "test": f"{data}/{source}/test.json.gz",
            "max_train_prompts": _prompts(p["train_pairs"], source),
            "max_test_prompts": _prompts(p["test_pairs"], source),
        },
        "targets": [
            {"name": target, "test": f"{data}/{target}/test.json.gz", "max_test_prompts": _prompts(p["test_pairs"], target)},
            {**HH, "max_test_prompts": p["test_pairs"]},
        ],
        "weak": {"model": "${W2S_MODEL_DIR}/all-MiniLM-L6-v2", **train, "epochs": 2, "max_length": min(max_length, 512)},
        "student": {"model": f"${{W2S_MODEL_DIR}}/{STUDENTS[student]}", **train, "seed": 0},
        "arms": [
            {"name": "naive", "anchor": {"lambda": 0.0}},
            {"name": "anchored", "anchor": {"lambda": "auto", "lambda_grid": p.get("lambda_grid", LAMBDA_GRID)}},
            *([{"name": "l2sp", "anchor": {"lambda": 0.0}, "l2sp_lambda": L2SP_LAMBDA}] if p.get("l2sp", True) else []),
            {"name": "ceiling", "labels": "gold", "anchor": {"lambda": 0.0}},
        ],
        "validation_fraction": 0.2,
        "eval": {
            "max_length": p["eval_max_length"],
            "max_length_cap": max_length,
            "batch_size": 32,
            "candidates": True,
        },
    }


def _shifts() -> list[dict[str, str]]:
    data_dir = os.environ.get("W2S_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    return json.loads(Path(SHIFTS_FILE.replace("${W2S_DATA_DIR}", data_dir)).read_text())


def config_path(plan: str, student: str, source: str) -> Path:
    shift = next(s for s in _shifts() if s["source"] == source)
    return ROOT / "configs" / "study" / plan / student / f"{shift['source']}__{shift['target']}.yaml"


def write_configs() -> list[Path]:
    written = []
    for plan, p in PLANS.items():
        for student in p["students"]:
            for shift in _shifts():
                if student == "smollm2" and shift["source"] not in DECODER_SHIFTS:
                    continue
                path = config_path(plan, student, shift["source"])
                path.parent.mkdir(parents=True, exist_ok=True)
                header = (
                    f"# Transfer study, plan '{plan}', student {student}: {shift['source']} -> {shift['target']} "
                    f"({shift['category']}).\n# Generated by `python bench/study.py configs`; edit bench/study.py, not this file.\n"
                )
                path.write_text(header + yaml.safe_dump(shift_config(plan, student, shift), sort_keys=False))
                written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# Running


def _recorded(results: Path) -> set[tuple]:
    if not results.is_file():
        return set()
    keys = set()
    for line in results.read_text().splitlines():
        r = json.loads(line)
        keys.add((r["plan"], r["student"], r["shift"], r["seed"]))
    return keys


def _bits(values: np.ndarray) -> str:
    return "".join("1" if v else "0" for v in values)


def collect(run_dir: Path, plan: str, student: str, shift: dict[str, str], seed: int, minutes: float, command: str) -> dict[str, Any]:
    """Turn one finished pipeline folder into a results record (per-pair correctness included)."""
    report = json.loads((run_dir / "report" / "report.json").read_text())
    scores = np.load(run_dir / "report" / "scores.npz")
    weak_metrics = json.loads((run_dir / "weak" / "metrics.json").read_text())
    sets = {s["name"]: {"role": s["role"], "pairs": s["n_pairs"], "max_length": s["max_length"], "truncated": s["n_truncated"]} for s in report["eval_sets"]}
    for name in sets:
        sets[name]["prompt_ids"] = [str(x) for x in scores[f"{name}/prompt_ids"]]

    models = {}
    for model, by_set in report["rows"].items():
        models[model] = {}
        for name, row in by_set.items():
            correct = scores[f"{model}/{name}/chosen"] > scores[f"{model}/{name}/rejected"]
            models[model][name] = {
                "accuracy": row["accuracy"],
                "ece": row.get("ece"),
                "drift_cos": row.get("drift_cosine"),
                "drift_cka": row.get("drift_cka"),
                "correct": _bits(correct),
            }

    reference = {
        row: {name: (entry or {}).get("accuracy") for name, entry in by_set.items()} for row, by_set in report["reference_rows"].items()
    }
    training = {
        name: {k: t.get(k) for k in ("pairs", "steps", "max_length", "precision", "anchor_lambda", "l2sp_lambda", "seed")}
        for name, t in report["settings"]["training"].items()
    }
    selection = report["settings"].get("lambda_selection", {}).get("anchored", {})

    return {
        "plan": plan,
        "student": student,
        "shift": shift["source"],
        "target": shift["target"],
        "category": shift["category"],
        "seed": seed,
        "minutes": round(minutes, 2),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.system()}, {_cores()} cores",
        "command": command,
        "run_dir": str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT) else str(run_dir),
        "weak": {k: weak_metrics.get(k) for k in ("pairs_a", "pairs_b", "pairs_validation", "weak_accuracy_b")},
        "training": training,
        "eval_precision": report["settings"].get("precision"),
        "selection": {
            "lambda": selection.get("lambda"),
            "reason": selection.get("reason"),
            "candidates": [
                {k: c.get(k) for k in ("lambda", "accuracy", "standard_error", "drift_cos")} for c in selection.get("candidates", [])
            ],
        },
        "sets": sets,
        "models": models,
        "reference": reference,
    }


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def run(plan: str, student: str, sources: list[str], seeds: list[int], out: Path, results: Path = RESULTS) -> None:
    shifts = {s["source"]: s for s in _shifts()}
    unknown = [s for s in sources if s not in shifts]
    if unknown:
        raise SystemExit(f"--shifts: unknown source {unknown}; expected sources from shifts.json: {sorted(shifts)}")
    done = _recorded(results)
    results.parent.mkdir(parents=True, exist_ok=True)
    for source in sources:
        shift = shifts[source]
        config = config_path(plan, student, source)
        if not config.is_file():
            raise SystemExit(f"{config} is missing; run `python bench/study.py configs` first")
        for seed in seeds:
            if (plan, student, source, seed) in done:
                print(f"skip {source} seed {seed}: already in {results}", flush=True)
                continue
            run_dir = out / plan / student / source / f"seed{seed}"
            first_weak = out / plan / student / source / f"seed{seeds[0]}" / "weak"
            if seed != seeds[0] and (first_weak / "model").is_dir() and not (run_dir / "weak").exists():
                # Same split, weak model and weak labels for every seed.
                shutil.copytree(first_weak, run_dir / "weak")
            command = [
                str(Path(sys.executable).parent / "w2s"), "pipeline", "--config", str(config.relative_to(ROOT)),
                "--out", str(run_dir), "--set", f"student.seed={seed}",
            ]
            start = time.perf_counter()
            if (run_dir / "outputs.json").is_file():
                # Finished earlier but not recorded (e.g. the recording step failed): record it now.
                print(f"record {source} seed {seed} from {run_dir}", flush=True)
                minutes = float("nan")
            else:
                print(f"run {source} seed {seed}: {' '.join(command)}", flush=True)
                subprocess.run(command, cwd=ROOT, check=True)
                minutes = (time.perf_counter() - start) / 60
            record = collect(run_dir, plan, student, shift, seed, minutes, " ".join(["w2s", *command[1:]]))
            with results.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            print(f"recorded {source} seed {seed} ({minutes:.1f} min)", flush=True)


# ---------------------------------------------------------------------------------------------
# Statistics over seeds and prompts


def _codes(prompt_ids: list[str]) -> tuple[np.ndarray, int]:
    _, codes = np.unique(np.asarray(prompt_ids), return_inverse=True)
    return codes.reshape(-1), int(codes.max()) + 1


def hierarchical_bootstrap(values: np.ndarray, prompt_ids: list[str], n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean over seeds of per-pair values [n_seeds, n_pairs], with a 95 % interval that resamples
    both the seeds and the test prompts (the same prompts for every seed), so it covers training
    noise and test-set noise together."""
    codes, groups = _codes(prompt_ids)
    n_seeds = values.shape[0]
    group_sums = np.stack([np.bincount(codes, weights=row, minlength=groups) for row in values])  # [S, G]
    sizes = np.bincount(codes, minlength=groups).astype(float)
    rng = np.random.default_rng(seed)
    drawn_prompts = rng.integers(0, groups, size=(n, groups))
    times = np.stack([np.bincount(row, minlength=groups) for row in drawn_prompts]).astype(float)  # [n, G]
    per_seed = (times @ group_sums.T) / (times @ sizes)[:, None]  # [n, S]
    drawn_seeds = rng.integers(0, n_seeds, size=(n, n_seeds))
    means = np.take_along_axis(per_seed, drawn_seeds, axis=1).mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(values.mean()), float(low), float(high)


def _correct(records: list[dict], model: str, set_name: str) -> np.ndarray | None:
    rows = []
    for r in records:
        entry = r["models"].get(model, {}).get(set_name)
        if entry is None:
            return None
        rows.append(np.frombuffer(entry["correct"].encode(), dtype=np.uint8) - ord("0"))
    return np.stack(rows).astype(float)


def _selected(records: list[dict]) -> list[float]:
    return [r["selection"]["lambda"] for r in records]


def summarize_shift(records: list[dict]) -> dict[str, Any]:
    """Per-arm means and intervals for one (plan, student, shift) over its seeds."""
    first = records[0]
    set_names = list(first["sets"])
    id_set = next(n for n in set_names if first["sets"][n]["role"] == "id")
    ood_sets = [n for n in set_names if n != id_set]
    prompt_ids = {n: first["sets"][n]["prompt_ids"] for n in set_names}
    models = [m for m in first["models"] if all(m in r["models"] for r in records)]
    out: dict[str, Any] = {"seeds": [r["seed"] for r in records], "id_set": id_set, "ood_sets": ood_sets, "arms": {}, "diffs": {}}

    for model in models:
        arm: dict[str, Any] = {}
        for n in set_names:
            c = _correct(records, model, n)
            arm[n] = hierarchical_bootstrap(c, prompt_ids[n])
            arm[f"{n}/seed_values"] = [float(x) for x in c.mean(axis=1)]
            for metric in ("ece", "drift_cka", "drift_cos"):
                vals = [r["models"][model][n].get(metric) for r in records]
                vals = [v for v in vals if v is not None]
                arm[f"{n}/{metric}"] = float(np.mean(vals)) if vals else None
        out["arms"][model] = arm
        if model != "naive" and "naive" in models:
            out["diffs"][model] = {
                n: hierarchical_bootstrap(_correct(records, model, n) - _correct(records, "naive", n), prompt_ids[n]) for n in set_names
            }
            out["diffs"][model].update(
                {f"{n}/seed_values": [float(x) for x in (_correct(records, model, n) - _correct(records, "naive", n)).mean(axis=1)] for n in set_names}
            )

    for row, by_set in first["reference"].items():
        out["arms"][row] = {n: (by_set.get(n), None, None) for n in set_names}

    # Ceiling lead over weak out of distribution decides whether PGR means anything.
    target = ood_sets[0]
    if "ceiling" in models and "weak" in models:
        lead = hierarchical_bootstrap(_correct(records, "ceiling", target) - _correct(records, "weak", target), prompt_ids[target])
        out["ceiling_lead"] = lead
        out["pgr_valid"] = lead[1] > 0
    return out


def _pgr(arms: dict, model: str, set_name: str) -> float | None:
    weak, ceiling, student = arms["weak"][set_name][0], arms["ceiling"][set_name][0], arms[model][set_name][0]
    return None if ceiling == weak else (student - weak) / (ceiling - weak)


# ---------------------------------------------------------------------------------------------
# Report


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _ci(t: tuple, signed: bool = False) -> str:
    est, low, high = t
    if low is None:
        return _pct(est, signed)
    return f"{_pct(est, signed)} [{_pct(low, signed)}, {_pct(high, signed)}]"


def _arm_order(models: list[str]) -> list[str]:
    fixed = ["weak", "naive", "anchored"]
    grid = sorted([m for m in models if m.startswith("anchored[")], key=lambda m: float(m.split("=")[1].rstrip("]")))
    tail = ["l2sp", "ceiling", "prefer longer", "prefer shorter"]
    return [m for m in fixed + grid + tail if m in models]


def _plot(groups: dict[tuple, dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(groups)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        s = groups[key]
        target = s["ood_sets"][0]
        for model in _arm_order(list(s["arms"])):
            arm = s["arms"][model]
            x, y = arm[s["id_set"]], arm[target]
            if x[0] is None or y[0] is None:
                continue
            xerr = None if x[1] is None else [[x[0] - x[1]], [x[2] - x[0]]]
            yerr = None if y[1] is None else [[y[0] - y[1]], [y[2] - y[0]]]
            marker = "s" if model.startswith("prefer") else "o"
            ax.errorbar(x[0], y[0], xerr=xerr, yerr=yerr, fmt=marker, capsize=3, label=model)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{key[2]} → {s['target']}\n({key[1]}, {len(s['seeds'])} seeds)", fontsize=10)
        ax.set_xlabel(f"ID accuracy ({s['id_set']})")
        ax.set_ylabel(f"OOD accuracy ({target})")
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    id_ood = out_dir / "transfer_id_vs_ood.png"
    fig.savefig(id_ood, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        s = groups[key]
        target = s["ood_sets"][0]
        for model in _arm_order(list(s["arms"])):
            arm = s["arms"][model]
            drift = arm.get(f"{target}/drift_cka")
            if drift is None:
                continue
            ax.scatter([drift], [arm[target][0]], label=model)
            ax.annotate(model, (drift, arm[target][0]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{key[2]} → {s['target']} ({key[1]})", fontsize=10)
        ax.set_xlabel(f"CKA to pretrained on {target} (1 = no drift)")
        ax.set_ylabel(f"OOD accuracy ({target})")
    fig.tight_layout()
    drift_plot = out_dir / "transfer_drift_vs_ood.png"
    fig.savefig(drift_plot, dpi=110)
    plt.close(fig)
    return [id_ood, drift_plot]


def load_records(path: Path = RESULTS) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        groups.setdefault((r["plan"], r["student"], r["shift"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in groups.items()}


def render(groups: dict[tuple, list[dict]], plots: list[Path], results_md: Path = RESULTS_MD, results: Path = RESULTS) -> str:
    summaries = {key: {**summarize_shift(recs), "target": recs[0]["target"]} for key, recs in groups.items()}
    lines = [
        BEGIN,
        "## Transfer study: anchored vs naive weak-to-strong on real shifts",
        "",
        f"Generated by `python bench/study.py report` from `{os.path.relpath(results, ROOT)}`; do not edit by hand. "
        "Each record in that file is one pipeline run (one shift, one seed) with its command, machine, date, "
        "sizes and per-pair correctness, so every number below can be recomputed from it.",
        "",
        "How to read: accuracies are % of test pairs ranked right (ties wrong), averaged over seeds. Brackets are 95 % "
        "intervals from a bootstrap that resamples seeds and test prompts together, so they cover training noise and "
        "test-set noise. 'vs naive' is the paired difference on the same test pairs. A difference is called a gain or "
        "a loss only when its interval excludes 0. lambda values use the pipeline's scale-free distance "
        "(||h − h0||² / ||h0||²), so they are not comparable with the reference script's.",
        "",
    ]
    for key, s in summaries.items():
        recs = groups[key]
        plan, student, shift = key
        r0 = recs[0]
        t = r0["training"]
        naive_t = t.get("naive", {})
        eval_sizes = ", ".join(f"{n} {v['max_length']} tokens ({v['pairs']} pairs)" for n, v in r0["sets"].items())
        run_minutes = ", ".join(f"{r['minutes']:.0f}" for r in recs)
        seed_command = r0["command"].replace(f"student.seed={r0['seed']}", "student.seed=K").replace(f"/seed{r0['seed']} ", "/seedK ")
        lines += [
            f"### {shift} → {s['target']} ({r0['category']}), {student}, plan '{plan}'",
            "",
            f"- Seeds: {', '.join(str(x) for x in s['seeds'])}. Weak MiniLM-L6 on {r0['weak']['pairs_a']} gold pairs "
            f"(split A); students on {naive_t.get('pairs')} weak-labelled pairs of split B, {naive_t.get('steps')} optimizer "
            f"steps, max length {naive_t.get('max_length')}, precision {naive_t.get('precision')}; "
            f"{r0['weak']['pairs_validation']} gold validation pairs held out of B choose lambda. Eval: {eval_sizes}.",
            f"- Minutes per run (all arms): {run_minutes}; machine: {r0['machine']}; dates "
            f"{recs[0]['date'][:10]} to {recs[-1]['date'][:10]}.",
            f"- Command per seed K: `{seed_command}`.",
        ]
        lead = s.get("ceiling_lead")
        if lead is not None:
            lines.append(
                f"- Ceiling minus weak on {s['ood_sets'][0]}: {_ci(lead, True)} points. PGR is "
                + ("reported (the ceiling's lead is outside its interval)." if s["pgr_valid"] else "not reported: the ceiling's lead is within noise, so PGR means nothing here.")
            )
        lines.append("")
        header = ["arm", f"ID {s['id_set']}"] + [f"OOD {n}" for n in s["ood_sets"]]
        header += [f"vs naive, {n}" for n in [s["id_set"], *s["ood_sets"]]]
        header += ["ECE OOD", "CKA OOD", "transfer gap"]
        if s.get("pgr_valid"):
            header.append("PGR OOD")
        body = []
        target = s["ood_sets"][0]
        for model in _arm_order(list(s["arms"])):
            arm = s["arms"][model]
            row = [model if model != "anchored" else "anchored (auto lambda)", _ci(arm[s["id_set"]])] + [_ci(arm[n]) for n in s["ood_sets"]]
            diffs = s["diffs"].get(model)
            row += [_ci(diffs[n], True) if diffs else "–" for n in [s["id_set"], *s["ood_sets"]]]
            row += [
                f"{arm.get(f'{target}/ece'):.3f}" if arm.get(f"{target}/ece") is not None else "–",
                f"{arm.get(f'{target}/drift_cka'):.3f}" if arm.get(f"{target}/drift_cka") is not None else "–",
                _pct(arm[s["id_set"]][0] - arm[target][0], True) if arm[s["id_set"]][0] is not None and arm[target][0] is not None else "–",
            ]
            if s.get("pgr_valid"):
                pgr = _pgr(s["arms"], model, target) if model not in ("weak", "ceiling") and not model.startswith("prefer") else None
                row.append("–" if pgr is None else f"{pgr:.2f}")
            body.append(row)
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        lines.append("")
        # Selection of lambda.
        chosen = _selected(recs)
        grid_models = [m for m in s["arms"] if m.startswith("anchored[")]
        ood_by_lambda = {0.0: s["arms"]["naive"][target][0]}
        ood_by_lambda.update({float(m.split("=")[1].rstrip("]")): s["arms"][m][target][0] for m in grid_models})
        best = max(ood_by_lambda, key=ood_by_lambda.get)
        per_seed = s["diffs"]["anchored"][f"{target}/seed_values"]
        lines += [
            f"lambda chosen per seed (source validation only): {', '.join(f'{x:g}' for x in chosen)}. "
            f"OOD accuracy on {target}: chosen {_pct(s['arms']['anchored'][target][0])}, naive {_pct(ood_by_lambda[0.0])}, "
            f"best grid lambda in hindsight ({best:g}) {_pct(ood_by_lambda[best])}. Chosen minus naive per seed: "
            f"{', '.join(_pct(x, True) for x in per_seed)} points (spread {_pct(max(per_seed) - min(per_seed))}).",
            "",
        ]
    lines += _overall(summaries)
    lines += [""] + [f"![{p.stem}]({os.path.relpath(p, results_md.parent)})" for p in plots] + ["", END]
    return "\n".join(lines)


def _overall(summaries: dict[tuple, dict]) -> list[str]:
    lines = ["### Averaged over the shifts run", ""]
    header = ["arm", "ID", "OOD (target)", "OOD (HH harmless)", "vs naive, ID", "vs naive, OOD", "vs naive, HH"]
    rows = []
    for model in ["weak", "naive", "anchored", "l2sp", "ceiling"]:
        vals = [[], [], [], [], [], []]
        for s in summaries.values():
            if model not in s["arms"]:
                continue
            target, hh = s["ood_sets"][0], s["ood_sets"][-1]
            arm = s["arms"][model]
            vals[0].append(arm[s["id_set"]][0])
            vals[1].append(arm[target][0])
            vals[2].append(arm[hh][0])
            d = s["diffs"].get(model)
            if d:
                vals[3].append(d[s["id_set"]][0])
                vals[4].append(d[target][0])
                vals[5].append(d[hh][0])
        if not vals[0]:
            continue
        rows.append(
            [model]
            + [_pct(float(np.mean(v))) for v in vals[:3]]
            + [_pct(float(np.mean(v)), True) if v else "–" for v in vals[3:]]
        )
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    lines.append(f"Shifts in this average: {', '.join(k[2] for k in summaries)} (mean of per-shift means).")
    return lines


def write_report(results: Path = RESULTS, results_md: Path = RESULTS_MD, plots_dir: Path = PLOTS) -> str:
    groups = load_records(results)
    summaries_for_plot = {key: {**summarize_shift(recs), "target": recs[0]["target"]} for key, recs in groups.items()}
    plots = _plot(summaries_for_plot, plots_dir)
    section = render(groups, plots, results_md, results)
    text = results_md.read_text() if results_md.is_file() else ""
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    results_md.write_text(text)
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("configs", help="Write the study's pipeline configs under configs/study/.")
    run_p = sub.add_parser("run", help="Run (or continue) the study and append finished runs to the results file.")
    run_p.add_argument("--plan", choices=sorted(PLANS), default="cpu")
    run_p.add_argument("--student", choices=sorted(STUDENTS), default="mpnet")
    run_p.add_argument("--shifts", nargs="+", required=True, help="Source names from shifts.json, e.g. us_history_textbook.")
    run_p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    run_p.add_argument("--out", type=Path, default=ROOT / "runs" / "study")
    run_p.add_argument("--results", type=Path, default=RESULTS, help="Results file (JSON Lines) to append to.")
    report_p = sub.add_parser("report", help="Regenerate the Transfer section of bench/RESULTS.md and its plots.")
    report_p.add_argument("--results", type=Path, default=RESULTS)
    report_p.add_argument("--markdown", type=Path, default=RESULTS_MD, help="Markdown file whose Transfer section is replaced.")
    report_p.add_argument("--plots", type=Path, default=PLOTS, help="Folder for the plots.")
    args = parser.parse_args()
    if args.command == "configs":
        for path in write_configs():
            print(path.relative_to(ROOT))
    elif args.command == "run":
        run(args.plan, args.student, args.shifts, args.seeds, args.out.resolve(), args.results.resolve())
    else:
        print(write_report(args.results.resolve(), args.markdown.resolve(), args.plots.resolve()))


if __name__ == "__main__":
    main()
