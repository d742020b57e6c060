"""Benchmark: cost of Representation Anchoring per training step, and throughput against TRL.

Three measurements on real GENIES pairs, all in one run so the ratios share the machine's state:

1. step time, interleaved plain / anchored (cached) / anchored (frozen copy every step), same batches
   in each round, reporting median and interquartile range per arm and the median ratio;
2. peak resident memory of a short training run per arm, each in its own subprocess;
3. training pairs/s of our trainer and of TRL's RewardTrainer on the same model, data, batch size,
   max length and precision, alternating runs.

Usage: python bench/anchor_step.py --model models/all-mpnet-base-v2 [--rounds 20] [--trl-steps 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ml.anchor import AnchorCache, FrozenEncoder  # noqa: E402
from ml.config import AnchorConfig, TrainConfig  # noqa: E402
from ml.modeling import load_reward_model, resolve_precision  # noqa: E402
from ml.render import Renderer  # noqa: E402
from ml.train import AnchoredRewardTrainer, PairCollator, PairDataset, disable_dropout, encode_pairs, load_limited  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "genies" / "us_history_textbook" / "train.json.gz"
# TRL's RewardTrainer drops pairs longer than max_length instead of truncating them, so the
# throughput comparison uses a set whose sequences all fit in 128 tokens (arc_easy: its first 160
# pairs are at most 120 MPNet tokens): both trainers then see the same pairs at the same lengths.
SHORT_DATA = ROOT.parent / "shared" / "data" / "genies" / "arc_easy" / "train.json.gz"


def _setup(model_dir: str, n_pairs: int, batch_size: int, max_length: int, precision: str):
    from transformers import TrainingArguments

    rm = load_reward_model(model_dir)
    disable_dropout(rm.model)
    precision = resolve_precision(precision, rm.device)
    pairs = load_limited(str(DATA))[:n_pairs]
    chosen, rejected = encode_pairs(Renderer(rm.tokenizer, max_length), pairs)
    dataset = PairDataset(chosen, rejected, [1.0] * len(pairs))
    cfg = TrainConfig(model=model_dir, batch_size=batch_size, max_length=max_length, anchor=AnchorConfig(lam=1.0))
    args = TrainingArguments(
        output_dir="/tmp/w2s-bench", use_cpu=not torch.cuda.is_available(), bf16=precision == "bf16",
        report_to="none", remove_unused_columns=False, per_device_train_batch_size=batch_size, learning_rate=2e-5,
    )
    collator = PairCollator(rm.tokenizer.pad_token_id)
    trainer = AnchoredRewardTrainer(
        model=rm.model, args=args, train_dataset=dataset, data_collator=collator, train_config=cfg, anchor_source=None
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which the benchmark bypasses
    batches = [collator([dataset[i] for i in range(s, s + batch_size)]) for s in range(0, len(dataset) - batch_size + 1, batch_size)]
    return rm, trainer, batches, chosen + rejected, precision


def _step(trainer: AnchoredRewardTrainer, batch) -> float:
    start = time.perf_counter()
    trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    return time.perf_counter() - start


def step_times(model_dir: str, rounds: int, batch_size: int, max_length: int, precision: str) -> dict:
    rm, trainer, batches, sequences, precision = _setup(model_dir, (rounds + 2) * batch_size, batch_size, max_length, precision)
    start = time.perf_counter()
    cache = AnchorCache.build(rm.model, sequences, [-1], rm.tokenizer.pad_token_id, precision)
    cache_seconds = time.perf_counter() - start
    frozen = FrozenEncoder(rm.model, [-1], precision)
    arms = {"plain": (None, 0.0), "anchored_cached": (cache, 1.0), "anchored_frozen_copy": (frozen, 1.0)}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for warmup in batches[:2]:
        for source, lam in arms.values():
            trainer.anchor_source = source
            _step(trainer, warmup)
    for batch in batches[2 : 2 + rounds]:
        for name, (source, lam) in arms.items():
            trainer.anchor_source = source
            trainer.train_config.anchor.lam = lam
            times[name].append(_step(trainer, batch))
    summary = {}
    for name, values in times.items():
        q = statistics.quantiles(values, n=4)
        summary[name] = {"median_s": statistics.median(values), "q1_s": q[0], "q3_s": q[2], "n": len(values)}
    ratios = [a / p for a, p in zip(times["anchored_cached"], times["plain"])]
    ratios_frozen = [a / p for a, p in zip(times["anchored_frozen_copy"], times["plain"])]
    return {
        "arms": summary,
        "ratio_cached_over_plain": {"median": statistics.median(ratios), "q1": statistics.quantiles(ratios, n=4)[0], "q3": statistics.quantiles(ratios, n=4)[2]},
        "ratio_frozen_over_plain": {"median": statistics.median(ratios_frozen)},
        "cache_build_s": cache_seconds,
        "cache_sequences": len(set(map(tuple, (s.input_ids for s in sequences)))),
        "precision": precision,
    }


def memory_child(arm: str, model_dir: str, steps: int, batch_size: int, max_length: int, precision: str) -> None:
    rm, trainer, batches, sequences, precision = _setup(model_dir, (steps + 1) * batch_size, batch_size, max_length, precision)
    if arm == "anchored_cached":
        trainer.anchor_source = AnchorCache.build(rm.model, sequences, [-1], rm.tokenizer.pad_token_id, precision)
    elif arm == "anchored_frozen_copy":
        trainer.anchor_source = FrozenEncoder(rm.model, [-1], precision)
    # Reset the peak-RSS counter (Linux clear_refs "5") so that model loading does not set the peak.
    Path("/proc/self/clear_refs").write_text("5")
    for batch in batches[:steps]:
        _step(trainer, batch)
    status = Path("/proc/self/status").read_text()
    peak_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    print(json.dumps({"peak_rss_gb": peak_kb / 1e6}))


def peak_memory(model_dir: str, batch_size: int, max_length: int, precision: str, steps: int = 4) -> dict:
    results = {}
    for arm in ("plain", "anchored_cached", "anchored_frozen_copy"):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", arm, "--model", model_dir, "--batch-size", str(batch_size),
             "--max-length", str(max_length), "--precision", precision, "--steps", str(steps)],
            capture_output=True, text=True, check=True,
        )
        results[arm] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_gb"]
    return results


def _ours_pairs_per_s(model_dir: str, pairs, steps: int, batch_size: int, max_length: int, precision: str) -> float:
    from ml.context import RunContext
    from ml.train import train_reward_model

    import tempfile

    cfg = TrainConfig(model=model_dir, max_steps=steps, batch_size=batch_size, max_length=max_length, precision=precision, save_steps=100000)
    with tempfile.TemporaryDirectory() as tmp:
        result = train_reward_model(cfg, pairs, "gold", RunContext(Path(tmp)), "bench", anchor_mode="off", progress_bars=False)
    # Both sides are timed by the Trainer's own train_runtime: the training loop only, without
    # model loading, tokenization or saving.
    return steps * batch_size / result["metrics"]["train_runtime_s"]


def _trl_pairs_per_s(model_dir: str, pairs, steps: int, batch_size: int, max_length: int, precision: str) -> float:
    import tempfile

    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    rm = load_reward_model(model_dir)
    disable_dropout(rm.model)
    if rm.tokenizer.eos_token is None:
        # TRL appends eos to every text; BERT-style tokenizers have none, so use their [SEP].
        rm.tokenizer.eos_token = rm.tokenizer.sep_token
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    with tempfile.TemporaryDirectory() as tmp:
        args = RewardConfig(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch_size, max_length=max_length,
            bf16=precision == "bf16", use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no",
            learning_rate=2e-5, logging_steps=1000, disable_tqdm=True,
            gradient_checkpointing=False,  # RewardConfig turns it on by default; MPNet does not support it
        )
        trainer = RewardTrainer(model=rm.model, args=args, train_dataset=Dataset.from_list(rows), processing_class=rm.tokenizer)
        output = trainer.train()
    return steps * batch_size / output.metrics["train_runtime"]


def versus_trl(model_dir: str, steps: int, batch_size: int, max_length: int, precision: str, rounds: int = 2) -> dict:
    precision = resolve_precision(precision, torch.device("cpu"))
    pairs = load_limited(str(SHORT_DATA))[: steps * batch_size]
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(_ours_pairs_per_s(model_dir, pairs, steps, batch_size, max_length, precision))
        theirs.append(_trl_pairs_per_s(model_dir, pairs, steps, batch_size, max_length, precision))
    return {"ours_pairs_per_s": ours, "trl_pairs_per_s": theirs, "ratio_median": statistics.median(ours) / statistics.median(theirs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "all-mpnet-base-v2"))
    parser.add_argument("--rounds", type=int, default=20, help="Interleaved rounds of plain/anchored steps.")
    parser.add_argument("--batch-size", type=int, default=8, help="Pairs per step.")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--trl-steps", type=int, default=20, help="Steps per throughput run (0 skips TRL).")
    parser.add_argument("--steps", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--only-trl", action="store_true", help="Run only the throughput comparison with TRL.")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="Write the results as JSON here.")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.memory_child:
        memory_child(args.memory_child, args.model, args.steps, args.batch_size, args.max_length, args.precision)
        return

    results = {
        "command": " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "model": args.model,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
    }
    if not args.only_trl:
        results["step_time"] = step_times(args.model, args.rounds, args.batch_size, args.max_length, args.precision)
        results["peak_memory_gb"] = peak_memory(args.model, args.batch_size, args.max_length, args.precision)
    if args.trl_steps:
        results["versus_trl"] = versus_trl(args.model, args.trl_steps, args.batch_size, args.max_length, args.precision)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
