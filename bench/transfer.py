"""Benchmark: first transfer numbers, naive vs anchored vs ceiling on one shift over several seeds.

Runs the pipeline of a shift config once per seed. Only the student seed changes: the A/B split and
the weak model stay those of the first seed, so every seed's students learn from the same weak
labels. Prints per-seed ID and OOD accuracy of every arm, and the paired difference anchored − naive
on the same pairs with a 95 % bootstrap interval over prompts.

Usage:
    python bench/transfer.py --config configs/quick/us_history_textbook__us_history_fiction.yaml \
        --seeds 0 1 2 --out runs/bench-transfer
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ml.cli import load_config_file  # noqa: E402
from ml.config import PipelineConfig  # noqa: E402
from ml.context import RunContext  # noqa: E402
from ml.jobs import WEAK_STAGE, run_pipeline  # noqa: E402
from ml.metrics import bootstrap_accuracy_ci, paired_bootstrap_diff  # noqa: E402


def _correct(scores: np.lib.npyio.NpzFile, model: str, set_name: str) -> np.ndarray:
    return scores[f"{model}/{set_name}/chosen"] > scores[f"{model}/{set_name}/rejected"]


def run(config_path: str, seeds: list[int], out: Path, samples: int) -> dict:
    base = PipelineConfig.model_validate(load_config_file(config_path))
    results = {"config": config_path, "seeds": {}}
    for seed in seeds:
        cfg = base.model_copy(deep=True)
        cfg.student.seed = seed
        seed_dir = out / f"seed{seed}"
        first_weak = out / f"seed{seeds[0]}" / WEAK_STAGE
        if seed != seeds[0] and first_weak.is_dir() and not (seed_dir / WEAK_STAGE).exists():
            # Same split and weak model for every seed: reuse seed 0's weak stage.
            shutil.copytree(first_weak, seed_dir / WEAK_STAGE)
        start = time.perf_counter()
        run_pipeline(cfg, RunContext(seed_dir, extra={"experiment": f"{cfg.name} seed {seed}"}))
        minutes = (time.perf_counter() - start) / 60

        scores = np.load(seed_dir / "report" / "scores.npz")
        id_set, ood_set = cfg.source.name, cfg.targets[0].name
        prompts = {s: scores[f"{s}/prompt_ids"] for s in (id_set, ood_set)}
        row = {"minutes": round(minutes, 1)}
        for model in ["weak"] + [arm.name for arm in cfg.arms]:
            for role, set_name in (("id", id_set), ("ood", ood_set)):
                est, low, high = bootstrap_accuracy_ci(_correct(scores, model, set_name), prompts[set_name], n_samples=samples)
                row[f"{model}_{role}"] = [round(est, 4), round(low, 4), round(high, 4)]
        for role, set_name in (("id", id_set), ("ood", ood_set)):
            diff = paired_bootstrap_diff(
                _correct(scores, "anchored", set_name), _correct(scores, "naive", set_name), prompts[set_name], n_samples=samples
            )
            row[f"anchored_minus_naive_{role}"] = [round(v, 4) for v in diff]
        results["seeds"][seed] = row
        print(json.dumps({seed: row}), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quick/us_history_textbook__us_history_fiction.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench-transfer")
    parser.add_argument("--bootstrap-samples", type=int, default=2000)
    args = parser.parse_args()
    results = run(args.config, args.seeds, Path(args.out), args.bootstrap_samples)
    results.update(
        command=" ".join(sys.argv),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=f"{platform.machine()}, {sys.platform}",
    )
    Path(args.out, "transfer.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
