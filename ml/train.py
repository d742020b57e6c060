"""Reward-model fine-tuning on transformers' Trainer, with Representation Anchoring.

`AnchoredRewardTrainer` replaces only the loss; mixed precision, gradient accumulation, checkpoints,
resuming, multi-GPU (through accelerate) and LoRA (through peft) come from transformers and peft.

Total loss per batch, with Δ = r_c − r_r and the terms of `ml.losses`:
    L = BT(Δ; p) [or the confidence loss] + coef·mean((r_c + r_r)²)
        + λ·mean(max(0, d − τ)) + λ_sp·Σ‖θ − θ₀‖²
where d is the drift of the pooled hidden states from the frozen pretrained model's.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from ml import losses
from ml.anchor import AnchorCache, FrozenEncoder
from ml.config import StudentTrainConfig, TrainConfig
from ml.context import JobCancelled, RunContext
from ml.data import PreferencePair, fingerprint, read_preferences
from ml.modeling import (
    RewardModel,
    default_device,
    is_complete_model_dir,
    load_reward_model,
    resolve_precision,
    reward_forward,
    save_reward_model,
)
from ml.ood import summarize_training_set
from ml.render import Encoded, Renderer, pad_batch
from ml.scoring import score_pairs

logger = logging.getLogger(__name__)

ANCHOR_CACHE_FILE = "anchor_cache.safetensors"
TRAINING_LOG_FILE = "training_log.json"
NORMALIZATION_PAIRS = 128  # held-out pairs scored for the reward mean/std stored with the model


class PairDataset(torch.utils.data.Dataset):
    """Encoded training pairs with their target probability p that chosen is preferred."""

    def __init__(self, chosen: list[Encoded], rejected: list[Encoded], targets: list[float]):
        self.chosen, self.rejected, self.targets = chosen, rejected, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"chosen": self.chosen[index].input_ids, "rejected": self.rejected[index].input_ids, "p": self.targets[index]}


class PairCollator:
    """Pads chosen then rejected sequences into one batch of 2B rows (right padding)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        sequences = [f["chosen"] for f in features] + [f["rejected"] for f in features]
        ids, mask = pad_batch(sequences, self.pad_id)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "p": torch.tensor([f["p"] for f in features], dtype=torch.float32),
            "sequences": sequences,
        }


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


class AnchoredRewardTrainer(Trainer):
    """Trainer whose loss is the preference loss plus the optional regularizers of `TrainConfig`.

    The drift d of the anchored layers is computed whenever `anchor_source` is given, also at λ = 0,
    so naive runs log the same drift curve; it enters the loss only when λ > 0.
    """

    def __init__(
        self,
        *args: Any,
        train_config: TrainConfig,
        anchor_source: AnchorCache | FrozenEncoder | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.train_config = train_config
        self.anchor_source = anchor_source
        self._parts: dict[str, list[float]] = defaultdict(list)
        self._l2sp_reference: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if train_config.l2sp_lambda > 0:
            self._l2sp_reference = [
                (param, param.detach().clone())
                for name, param in self.model.named_parameters()
                if param.requires_grad and not _is_head_parameter(name)
            ]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.train_config
        layers = cfg.anchor.layers if self.anchor_source is not None else None
        # accelerate applies mixed precision by wrapping model.forward, which reward_forward does not
        # call (it runs the backbone and the head itself), so autocast is entered here.
        with self.accelerator.autocast():
            out = reward_forward(model, inputs["input_ids"], inputs["attention_mask"], layers=layers)
        half = inputs["p"].shape[0]
        r_c, r_r = out.rewards[:half], out.rewards[half:]
        delta = r_c - r_r
        p = inputs["p"] if cfg.loss.labels == "soft" else losses.hard_labels(inputs["p"])

        if cfg.loss.logconf_alpha > 0:
            weight = losses.logconf_weight(
                self.state.global_step, self.state.max_steps, cfg.loss.logconf_alpha, cfg.loss.logconf_warmup_frac
            )
            loss = losses.logconf_loss(delta, p, weight, cfg.loss.margin)
            self._parts["logconf_weight"].append(weight)
        else:
            loss = losses.bradley_terry_loss(delta, p, cfg.loss.margin)
        self._parts["loss_pref"].append(loss.item())
        self._parts["accuracy"].append((delta > 0).float().mean().item())

        if cfg.loss.center_coef > 0:
            center = losses.centering_loss(r_c, r_r, cfg.loss.center_coef)
            loss = loss + center
            self._parts["loss_center"].append(center.item())

        if self.anchor_source is not None:
            if isinstance(self.anchor_source, AnchorCache):
                frozen = self.anchor_source.lookup(inputs["sequences"], out.rewards.device)
            else:
                frozen = self.anchor_source.states(inputs["input_ids"], inputs["attention_mask"])
            drift = losses.anchor_drift(out.pooled, frozen, cfg.anchor.distance)
            self._parts["drift"].append(drift.mean().item())
            if cfg.anchor.lam > 0:
                penalty = losses.anchor_penalty(drift, cfg.anchor.lam, cfg.anchor.tau)
                loss = loss + penalty
                self._parts["loss_anchor"].append(penalty.item())

        if self._l2sp_reference:
            params, params0 = zip(*self._l2sp_reference)
            penalty = losses.l2sp_penalty(list(params), list(params0), cfg.l2sp_lambda)
            loss = loss + penalty
            self._parts["loss_l2sp"].append(penalty.item())

        return (loss, out) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # Loss parts are averaged over the steps since the last log, like the Trainer's own loss.
        for name, values in self._parts.items():
            if values:
                logs[name] = float(np.mean(values))
        self._parts.clear()
        super().log(logs, *args, **kwargs)


def _is_head_parameter(name: str) -> bool:
    return any(part in name for part in ("classifier", "score", "pooler"))


class RunContextCallback(TrainerCallback):
    """Forwards training progress to the run context and stops between steps when asked to."""

    def __init__(self, ctx: RunContext, stage: str):
        self.ctx = ctx
        self.stage = stage
        self.history: list[dict[str, float]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ctx.check_stop()

    def on_log(self, args, state, control, logs=None, **kwargs):
        record = {"step": state.global_step, **{k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}}
        self.history.append(record)
        self.ctx.progress(self.stage, state.global_step, state.max_steps, record)


def encode_pairs(renderer: Renderer, pairs: Sequence[PreferencePair]) -> tuple[list[Encoded], list[Encoded]]:
    chosen = [renderer.encode(p.prompt, p.chosen) for p in pairs]
    rejected = [renderer.encode(p.prompt, p.rejected) for p in pairs]
    return chosen, rejected


def _targets(pairs: Sequence[PreferencePair], labels: str) -> list[float]:
    if labels == "gold":
        return [1.0] * len(pairs)
    missing = sum(1 for p in pairs if p.label is None)
    if missing:
        raise ValueError(
            f"{missing} of {len(pairs)} training pairs have no weak label; "
            "run weak labelling first or set labels='gold'"
        )
    return [float(p.label) for p in pairs]


def _latest_checkpoint(folder: Path) -> Path | None:
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return checkpoints[-1] if checkpoints else None


def _strip_optimizer_state(folder: Path) -> None:
    """Delete optimizer and scheduler state of kept checkpoints once training has finished."""
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        for path in folder.glob(f"checkpoint-*/{name}"):
            path.unlink()


def _apply_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    spec = cfg.lora
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
    )
    return get_peft_model(model, lora)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _check_same_settings(stage: str, model_dir: Path, saved: dict[str, Any] | None, cfg: TrainConfig) -> None:
    """Raise when a finished model in the output folder was trained with other settings than `cfg`.

    Without this, re-running into the same folder with a changed config (say another seed) would
    silently report the old model. Models saved without their settings are not checked.
    """
    if saved is None:
        return
    old = _flatten(saved)
    new = _flatten(json.loads(json.dumps(cfg.model_dump(), default=str)))
    changed = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    if changed:
        raise ValueError(
            f"{stage}: {model_dir} was trained with other settings ({'; '.join(changed[:5])}); "
            "write to another output folder (--out), or pass --restart to train again"
        )


def train_reward_model(
    cfg: TrainConfig,
    pairs: Sequence[PreferencePair],
    labels: str,
    ctx: RunContext,
    stage: str,
    heldout: Sequence[PreferencePair] = (),
    metadata: dict[str, Any] | None = None,
    anchor_mode: str = "cached",
    progress_bars: bool = True,
) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `pairs` and save it to `ctx.out_dir / "model"`.

    `labels` is 'weak' (each pair's soft label p) or 'gold' (p = 1 for every pair). `anchor_mode`
    'cached' precomputes the frozen states once, 'frozen' runs a frozen copy every step and 'off'
    skips drift entirely. Returns the model path, training metrics and the logged history.
    """
    out_dir = ctx.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    final_dir = out_dir / "model"
    if is_complete_model_dir(final_dir) and ctx.resume:
        saved = json.loads((final_dir / "w2s_metadata.json").read_text())
        _check_same_settings(stage, final_dir, saved.get("training_config"), cfg)
        logger.info("%s: model already complete at %s, skipping training", stage, final_dir)
        log_path = out_dir / TRAINING_LOG_FILE
        history = json.loads(log_path.read_text()) if log_path.is_file() else []
        return {"model_dir": str(final_dir), "history": history, "metrics": saved.get("train_metrics", {})}
    if not pairs:
        raise ValueError(f"{stage}: no training pairs; check the dataset path and its prompt limits")

    set_seed(cfg.seed)
    device = default_device()
    precision = resolve_precision(cfg.precision, device)
    rm = load_reward_model(cfg.model, device=device, **ctx.model_options())
    if not cfg.dropout:
        disable_dropout(rm.model)
    renderer = Renderer(rm.tokenizer, cfg.max_length)
    chosen, rejected = encode_pairs(renderer, pairs)
    n_truncated = sum(e.truncated for e in chosen + rejected)
    dataset = PairDataset(chosen, rejected, _targets(pairs, labels))

    anchor_source: AnchorCache | FrozenEncoder | None = None
    if anchor_mode == "cached":
        cache_path = out_dir / ANCHOR_CACHE_FILE
        cache = AnchorCache.load(cache_path)
        if cache is None or not cache.covers(chosen + rejected, cfg.anchor.layers):
            cache = AnchorCache.build(
                rm.model, chosen + rejected, cfg.anchor.layers, rm.tokenizer.pad_token_id, precision, batch_size=32
            )
            cache.save(cache_path)
        anchor_source = cache
    elif anchor_mode == "frozen":
        anchor_source = FrozenEncoder(rm.model, cfg.anchor.layers, precision)

    model = _apply_lora(rm.model, cfg) if cfg.lora else rm.model
    steps_per_epoch = math.ceil(len(dataset) / (cfg.batch_size * cfg.grad_accum))
    args = TrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a share of total steps in transformers 5
        lr_scheduler_type="linear",
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        bf16=precision == "bf16",
        use_cpu=device.type == "cpu",
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=max(1, min(10, steps_per_epoch // 10)),
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=list(cfg.report_to) or "none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not progress_bars,
    )
    callback = RunContextCallback(ctx, stage)
    trainer = AnchoredRewardTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=PairCollator(rm.tokenizer.pad_token_id),
        callbacks=[callback],
        train_config=cfg,
        anchor_source=anchor_source,
    )
    resume = _latest_checkpoint(out_dir / "checkpoints") if ctx.resume else None
    if resume is not None:
        logger.info("%s: resuming from %s", stage, resume)
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except JobCancelled:
        logger.info("%s: cancelled at step %d", stage, trainer.state.global_step)
        raise

    trained = trainer.model
    if cfg.lora:
        trained = trained.merge_and_unload()
    trained.eval()
    rm = RewardModel(model=trained, tokenizer=rm.tokenizer, source=cfg.model, metadata={})

    normalization = None
    ood_summary = None
    if heldout:
        sample = list(heldout[:NORMALIZATION_PAIRS])
        scores = score_pairs(rm, sample, max_length=cfg.max_length, precision=precision, desc="normalization")
        values = np.concatenate([scores.chosen, scores.rejected])
        normalization = {"mean": float(values.mean()), "std": float(values.std() or 1.0), "n": int(values.size)}
        ood_summary = summarize_training_set(rm, pairs, sample, cfg.max_length, precision, seed=cfg.seed)

    train_metrics = {
        "train_loss": float(result.training_loss),
        "train_runtime_s": float(result.metrics.get("train_runtime", 0.0)),
        "steps": int(trainer.state.global_step),
        "pairs": len(dataset),
        "truncated_sequences": int(n_truncated),
        "precision": precision,
    }
    record = {
        "base_model": cfg.model,
        "training_config": cfg.model_dump(),
        "labels": labels,
        "normalization": normalization,
        "ood": ood_summary,
        "train_metrics": train_metrics,
        "train_prompt_ids": sorted({p.prompt_id for p in pairs}),
        **(metadata or {}),
    }
    save_reward_model(trained, rm.tokenizer, final_dir, record)
    (out_dir / TRAINING_LOG_FILE).write_text(json.dumps(callback.history, indent=1))
    _strip_optimizer_state(out_dir / "checkpoints")
    logger.info("%s: saved %s (%d steps, loss %.4f)", stage, final_dir, train_metrics["steps"], train_metrics["train_loss"])
    return {"model_dir": str(final_dir), "history": callback.history, "metrics": train_metrics}


def load_limited(path: str, fmt: str = "auto", max_prompts: int | None = None) -> list[PreferencePair]:
    """Read a preference file and keep the pairs of its first `max_prompts` prompts."""
    pairs, report = read_preferences(path, format=fmt)
    report.log(logger)
    if max_prompts is None:
        return pairs
    kept: list[PreferencePair] = []
    seen: dict[str, None] = {}
    for pair in pairs:
        if pair.prompt_id not in seen:
            if len(seen) == max_prompts:
                break
            seen[pair.prompt_id] = None
        kept.append(pair)
    return kept


def train_student(cfg: StudentTrainConfig, ctx: RunContext) -> dict[str, Any]:
    """Train one student on a labelled pairs file (job type 'train')."""
    pairs = load_limited(cfg.data)
    heldout = load_limited(cfg.heldout) if cfg.heldout else []
    metadata = {"name": cfg.name, "data": [{"path": cfg.data, "sha256": fingerprint(cfg.data)}]}
    weak_meta = Path(cfg.data).parent / "model" / "w2s_metadata.json"
    if cfg.labels == "weak" and weak_meta.is_file():
        metadata["weak_labeller"] = json.loads(weak_meta.read_text()).get("base_model")
    result = train_reward_model(
        cfg.student, pairs, cfg.labels, ctx, stage=f"train:{cfg.name}", heldout=heldout, metadata=metadata,
        progress_bars=ctx.extra.get("progress_bars", True),
    )
    return result
