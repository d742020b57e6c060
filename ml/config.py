"""Job configurations: validated pydantic models shared by the CLI, the workers and the HTTP API.

This module imports neither torch nor transformers, so the API can validate a job before queueing
it. Every field carries one line of help with its unit and range; `describe_config` renders them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Precision = Literal["auto", "fp32", "bf16"]
DataFormat = Literal["auto", "trl", "hh", "ranked"]


class _Strict(BaseModel):
    # Unknown keys are errors: a misspelt option silently falling back to its default would change
    # an experiment without anyone noticing.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DatasetSpec(_Strict):
    """One preference dataset: a train file, a test file, or both."""

    name: str = Field(description="Short name used in reports, e.g. 'us_history_fiction'.")
    train: str | None = Field(None, description="Path of the training file (JSONL, JSON, Parquet, optionally .gz).")
    test: str | None = Field(None, description="Path of the held-out test file, same formats.")
    format: DataFormat = Field("auto", description="Reader to use; 'auto' detects it from the fields.")
    max_train_prompts: int | None = Field(
        None, ge=1, description="Keep only the first N prompts of the train file (all when unset)."
    )
    max_test_prompts: int | None = Field(
        None, ge=1, description="Keep only the first N prompts of the test file (all when unset)."
    )

    @classmethod
    def genies(cls, root: str | Path, name: str, **limits: int | None) -> "DatasetSpec":
        """Build the spec of a GENIES distribution folder (`<root>/<name>/{train,test}.json.gz`)."""
        folder = Path(root) / name
        return cls(name=name, train=str(folder / "train.json.gz"), test=str(folder / "test.json.gz"), **limits)


class LossConfig(_Strict):
    """Preference loss of the student (see `ml.losses`)."""

    labels: Literal["soft", "hard"] = Field(
        "soft", description="'soft': Bradley-Terry on the weak probability p; 'hard': on 1[p > 0.5]."
    )
    margin: float = Field(0.0, ge=0, description="Margin m subtracted from r_c - r_r inside the sigmoid, in reward units.")
    logconf_alpha: float = Field(
        0.0, ge=0, le=1, description="Full weight of the auxiliary confidence loss (Burns et al. 2023), 0 to 1; 0 turns it off."
    )
    logconf_warmup_frac: float = Field(
        0.2, ge=0, le=1, description="Share of total steps over which the confidence weight ramps linearly from 0 to logconf_alpha."
    )
    center_coef: float = Field(
        0.0, ge=0, description="Reward centering weight: adds coef * mean((r_c + r_r)^2); 0 turns it off."
    )


class AnchorConfig(_Strict):
    """Representation Anchoring: keep pooled hidden states near the frozen pretrained model's."""

    lam: float = Field(0.0, ge=0, description="Penalty weight lambda; 0 is naive weak-to-strong training.")
    tau: float = Field(0.0, ge=0, description="Drift tolerance tau: distances below it cost nothing; 0 is a plain penalty.")
    distance: Literal["relative_l2", "cosine"] = Field(
        "relative_l2", description="Per-example drift d: ||h - h0||^2 / ||h0||^2, or 1 - cos(h, h0)."
    )
    layers: list[int] = Field(
        default_factory=lambda: [-1],
        min_length=1,
        description="Hidden-state layers to anchor (Python indices into hidden_states; -1 is the last).",
    )


class LoraSpec(_Strict):
    """Low-rank adapters (peft); merged into the weights before the model is saved."""

    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Adapter scaling numerator (lora_alpha).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; peft's default for the architecture when unset."
    )


class TrainConfig(_Strict):
    """Fine-tuning settings of one reward model. Defaults follow common reward-model practice at small scale."""

    model: str = Field(description="Hub name, local model directory or .gguf file of the pretrained model.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training pairs; fractions allowed.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    learning_rate: float = Field(2e-5, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay.")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Share of total steps of linear warm-up, then linear decay.")
    batch_size: int = Field(8, ge=1, description="Pairs per device per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Forward passes accumulated per optimizer step.")
    max_length: int = Field(128, ge=16, le=8192, description="Max tokens of prompt + response; prompts are cut from the left.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    precision: Precision = Field("auto", description="'bf16' autocast, 'fp32', or 'auto' (bf16 where the hardware has it).")
    seed: int = Field(0, description="Seed of initialisation, data order and dropout.")
    dropout: bool = Field(False, description="Keep the model's dropout on during training (off is usual for reward models).")
    loss: LossConfig = Field(default_factory=LossConfig)
    anchor: AnchorConfig = Field(default_factory=AnchorConfig)
    l2sp_lambda: float = Field(
        0.0, ge=0, description="L2-SP baseline: weight on ||theta - theta_0||^2 summed over trained weights; 0 turns it off."
    )
    lora: LoraSpec | None = Field(None, description="Train low-rank adapters instead of all weights.")
    save_steps: int = Field(200, ge=1, description="Optimizer steps between checkpoints (used to resume a crashed job).")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept on disk; older ones are deleted.")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers that transformers sends metrics to."
    )
    allow_remote_code: bool = Field(
        False,
        description="Ignored unless the operator enables trust_remote_code; kept so configs can state intent.",
    )


class ArmSpec(_Strict):
    """One student trained in a pipeline, e.g. naive, anchored, ceiling or L2-SP."""

    name: str = Field(description="Row name in the report, e.g. 'anchored'.")
    labels: Literal["weak", "gold"] = Field("weak", description="'weak' labels from the weak model, or 'gold' (the ceiling).")
    anchor: AnchorConfig | None = Field(None, description="Overrides the student's anchor settings for this arm.")
    l2sp_lambda: float | None = Field(None, ge=0, description="Overrides the student's L2-SP weight for this arm.")


def default_arms() -> list[ArmSpec]:
    # λ = 0.1: at λ = 1 on the relative distance, an MPNet student trained on 600 weak-labelled
    # us_history pairs stayed at cosine 0.999 from its pretrained states and lost 14 points of
    # in-distribution accuracy (bench/RESULTS.md), so the penalty left no room to learn.
    return [
        ArmSpec(name="naive", anchor=AnchorConfig(lam=0.0)),
        ArmSpec(name="anchored", anchor=AnchorConfig(lam=0.1)),
        ArmSpec(name="ceiling", labels="gold", anchor=AnchorConfig(lam=0.0)),
    ]


class EvalConfig(_Strict):
    """Evaluation settings: eval lengths, batch size, bootstrap and calibration bins."""

    max_length: int | None = Field(
        None,
        ge=16,
        le=8192,
        description="Tokens per eval sequence; unset means the 95th percentile of each eval set's lengths, capped at max_length_cap.",
    )
    max_length_cap: int = Field(512, ge=16, description="Upper bound of the automatic eval length.")
    batch_size: int = Field(32, ge=1, description="Sequences per forward pass during scoring.")
    bootstrap_samples: int = Field(1000, ge=100, description="Bootstrap resamples (over prompts) for 95 % intervals.")
    ece_bins: int = Field(10, ge=2, description="Equal-width confidence bins for expected calibration error.")
    precision: Precision = Field("auto", description="Scoring precision.")
    seed: int = Field(0, description="Seed of the bootstrap.")


class WeakLabelConfig(_Strict):
    """Stage 1: produce weak soft labels for split B of the source train set."""

    source: DatasetSpec
    targets: list[DatasetSpec] = Field(default_factory=list, description="Shifted datasets to report the weak model on.")
    labeller: Literal["train", "model", "data"] = Field(
        "train",
        description="'train' a weak model on gold split A; use an existing reward 'model'; or labels already in the 'data'.",
    )
    weak: TrainConfig | None = Field(None, description="Weak model training settings (labeller='train').")
    labeller_model: str | None = Field(None, description="Reward model directory or hub name (labeller='model').")
    split_fraction: float = Field(0.5, gt=0, lt=1, description="Share of source prompts in gold split A.")
    split_seed: int = Field(0, description="Seed of the prompt-level A/B split.")
    report_eval_sets: bool = Field(
        True, description="Also score the source test set and every target with the weak model (the pipeline's report does this itself)."
    )
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check_labeller(self) -> "WeakLabelConfig":
        if self.source.train is None:
            raise ValueError("source.train is missing: weak labelling needs the source train file to split into A and B")
        if self.labeller == "train" and self.weak is None:
            raise ValueError("weak is missing: labeller='train' needs weak.model (e.g. a MiniLM directory)")
        if self.labeller == "model" and not self.labeller_model:
            raise ValueError("labeller_model is missing: labeller='model' needs a reward model directory or hub name")
        return self


class StudentTrainConfig(_Strict):
    """Stage 2 on its own: fine-tune a student on a labelled pairs file."""

    data: str = Field(description="Pairs file; soft labels are read from its 'label' field, gold when absent.")
    labels: Literal["weak", "gold"] = Field("weak", description="Use the file's weak labels, or ignore them (gold).")
    student: TrainConfig
    heldout: str | None = Field(None, description="In-distribution pairs for the reward normalisation statistics.")
    name: str = Field("student", description="Name recorded in the model metadata.")


class EvaluateConfig(_Strict):
    """Stage 3 on its own: compare reward models on a source test set and shifted targets."""

    name: str = Field("evaluation", description="Experiment name, used in the report title.")
    models: dict[str, str] = Field(min_length=1, description="Report row name -> reward model directory.")
    source: DatasetSpec
    targets: list[DatasetSpec] = Field(default_factory=list)
    baseline: str | None = Field(None, description="Model name PGR and gains are measured against (usually 'weak').")
    ceiling: str | None = Field(None, description="Model name used as the PGR ceiling.")
    pretrained: str | None = Field(None, description="Pretrained model directory to measure representation drift from.")
    eval: EvalConfig = Field(default_factory=EvalConfig)


class PipelineConfig(_Strict):
    """The whole weak-to-strong experiment: weak labels, students, shift report."""

    name: str = Field("w2s", description="Experiment name, used in the report title.")
    source: DatasetSpec
    targets: Annotated[list[DatasetSpec], Field(min_length=1)] = Field(
        description="Shifted datasets evaluated out of distribution; at least one."
    )
    weak: TrainConfig = Field(description="Weak model (trained on gold split A).")
    student: TrainConfig = Field(description="Strong student settings shared by every arm.")
    arms: list[ArmSpec] = Field(default_factory=default_arms, min_length=1)
    split_fraction: float = Field(0.5, gt=0, lt=1, description="Share of source prompts in gold split A.")
    split_seed: int = Field(0, description="Seed of the prompt-level A/B split.")
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("arms")
    @classmethod
    def _unique_arm_names(cls, arms: list[ArmSpec]) -> list[ArmSpec]:
        names = [arm.name for arm in arms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"arm names must be unique; repeated: {duplicates}")
        if "weak" in names:
            raise ValueError("arm name 'weak' is reserved for the weak model's report row; rename the arm")
        return arms

    @model_validator(mode="after")
    def _check_source(self) -> "PipelineConfig":
        if self.source.train is None or self.source.test is None:
            raise ValueError("source needs both train and test files (train is split A/B, test is in-distribution)")
        for target in self.targets:
            if target.test is None:
                raise ValueError(f"targets[{target.name}].test is missing: a target is evaluated on its test file")
        return self

    def weak_label_config(self) -> WeakLabelConfig:
        return WeakLabelConfig(
            source=self.source,
            targets=self.targets,
            labeller="train",
            weak=self.weak,
            split_fraction=self.split_fraction,
            split_seed=self.split_seed,
            report_eval_sets=False,
            eval=self.eval,
        )


def _job_configs() -> dict[str, type[BaseModel]]:
    # Imported here because ml.serving.config is a sibling module that imports nothing of this one.
    from ml.serving.config import ScoreDatasetConfig

    return {
        "weak_label": WeakLabelConfig,
        "train": StudentTrainConfig,
        "evaluate": EvaluateConfig,
        "pipeline": PipelineConfig,
        "score_dataset": ScoreDatasetConfig,
    }


JOB_CONFIGS: dict[str, type[BaseModel]] = _job_configs()


def parse_job_config(job_type: str, data: dict) -> BaseModel:
    """Validate `data` as the config of `job_type`; raises KeyError for an unknown type."""
    if job_type not in JOB_CONFIGS:
        raise KeyError(f"unknown job type {job_type!r}; expected one of {sorted(JOB_CONFIGS)}")
    return JOB_CONFIGS[job_type].model_validate(data)


def describe_config(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Render one help line per field, recursing into nested configs."""
    lines = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        nested = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if nested is not None:
            lines.extend(describe_config(nested, prefix=f"{prefix}{name}."))
            continue
        default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
        lines.append(f"{prefix}{name}: {field.description or ''} ({default})")
    return lines
