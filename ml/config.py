"""Job configurations: validated pydantic models shared by the CLI, the workers and the HTTP API.

This module imports neither torch nor transformers, so the API can validate a job before queueing
it. Every field carries one line of help with its unit and range; `describe_config` renders them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

Precision = Literal["auto", "fp32", "bf16"]
DataFormat = Literal["auto", "trl", "hh", "ranked"]


# Names become folder names and report keys, so they are one path segment of common characters.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _check_name(value: str) -> str:
    if not NAME_PATTERN.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid name: use 1 to 100 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit, because the name becomes a folder name and a report key"
        )
    return value


Name = Annotated[str, AfterValidator(_check_name)]


def _name_field(default: str | None = None, *, description: str) -> Any:
    """Build a name field: 1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit."""
    text = f"{description} Letters, digits, '.', '_' and '-', 1 to 100 characters."
    if default is None:
        return Field(description=text)
    return Field(default, description=text)


class _Strict(BaseModel):
    # Unknown keys are errors: a misspelt option silently falling back to its default would change
    # an experiment without anyone noticing.
    # NaN and infinity are rejected, because a NaN learning rate or λ would train garbage without an error.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class DatasetSpec(_Strict):
    """One preference dataset: a train file, a test file, or both."""

    name: Name = _name_field(description="Short name used in reports, e.g. 'us_history_fiction'.")
    train: str | None = Field(None, description="Path of the training file (JSONL, JSON, Parquet, optionally .gz).")
    test: str | None = Field(None, description="Path of the held-out test file, same formats.")
    format: DataFormat = Field("auto", description="Reader to use; 'auto' detects it from the fields.")
    max_train_prompts: int | None = Field(
        None, ge=1, le=10_000_000, description="Keep only the first N prompts of the train file (all when unset)."
    )
    max_test_prompts: int | None = Field(
        None, ge=1, le=10_000_000, description="Keep only the first N prompts of the test file (all when unset)."
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
    margin: float = Field(0.0, ge=0, le=100, description="Margin m subtracted from r_c - r_r inside the sigmoid, in reward units.")
    logconf_alpha: float = Field(
        0.0, ge=0, le=1, description="Full weight of the auxiliary confidence loss (Burns et al. 2023), 0 to 1; 0 turns it off."
    )
    logconf_warmup_frac: float = Field(
        0.2, ge=0, le=1, description="Share of total steps over which the confidence weight ramps linearly from 0 to logconf_alpha."
    )
    center_coef: float = Field(
        0.0, ge=0, le=100, description="Reward centering weight: adds coef * mean((r_c + r_r)^2); 0 turns it off."
    )


DEFAULT_LAMBDA_GRID = (0.0, 0.03, 0.1, 0.3)
MAX_LAMBDA = 1000.0
# Share of split B held out for choosing lambda when a pipeline has an arm with lambda="auto".
AUTO_VALIDATION_FRACTION = 0.2


class AnchorConfig(_Strict):
    """Representation Anchoring: keep pooled hidden states near the frozen pretrained model's.

    `lambda` (also accepted as `lam`) is a number, or "auto" in a pipeline: every value of
    `lambda_grid` is trained and the largest one whose source validation accuracy stays within
    `auto_tolerance` of the best candidate's is kept (see `ml.select`).
    """

    # `lambda` is a Python keyword, so the attribute is `lam`; configs may write either name.
    model_config = ConfigDict(populate_by_name=True)

    lam: float | Literal["auto"] = Field(
        0.0,
        validation_alias=AliasChoices("lambda", "lam"),
        description="Penalty weight lambda, 0 to 1000 (0 is naive weak-to-strong training), or 'auto' to choose it from source validation data.",
    )
    lambda_grid: list[Annotated[float, Field(ge=0, le=1000)]] = Field(
        default_factory=lambda: list(DEFAULT_LAMBDA_GRID),
        min_length=2,
        max_length=12,
        description="Candidates tried when lambda is 'auto', each 0 to 1000; include 0 so that no anchoring can win.",
    )
    auto_tolerance: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Accuracy (0 to 1) the chosen lambda may lose against the best candidate on source validation; unset: one bootstrap standard error of the best.",
    )
    tau: float = Field(0.0, ge=0, le=100, description="Drift tolerance tau: distances below it cost nothing; 0 is a plain penalty.")
    distance: Literal["relative_l2", "cosine"] = Field(
        "relative_l2", description="Per-example drift d: ||h - h0||^2 / ||h0||^2, or 1 - cos(h, h0)."
    )
    layers: list[int] = Field(
        default_factory=lambda: [-1],
        min_length=1,
        description="Hidden-state layers to anchor (Python indices into hidden_states; -1 is the last).",
    )

    @field_validator("lam", mode="before")
    @classmethod
    def _lambda_range(cls, value: Any) -> Any:
        # One message for every wrong value, instead of one error per member of the union type.
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_LAMBDA:
            raise ValueError(f"lambda must be a number from 0 to {MAX_LAMBDA:g}, or 'auto'; got {value!r}")
        return value

    @property
    def is_auto(self) -> bool:
        return self.lam == "auto"


class LoraSpec(_Strict):
    """Low-rank adapters (peft); merged into the weights before the model is saved."""

    r: int = Field(16, ge=1, le=1024, description="Adapter rank.")
    alpha: int = Field(32, ge=1, le=4096, description="Adapter scaling numerator (lora_alpha).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; peft's default for the architecture when unset."
    )


class TrainConfig(_Strict):
    """Fine-tuning settings of one reward model. Defaults follow common reward-model practice at small scale."""

    model: str = Field(description="Hub name, local model directory or .gguf file of the pretrained model.")
    epochs: float = Field(1.0, gt=0, le=100, description="Passes over the training pairs; fractions allowed.")
    max_steps: int | None = Field(None, ge=1, le=10_000_000, description="Stop after this many optimizer steps (overrides epochs).")
    learning_rate: float = Field(2e-5, gt=0, le=1, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, le=10, description="AdamW decoupled weight decay.")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Share of total steps of linear warm-up, then linear decay.")
    batch_size: int = Field(8, ge=1, le=4096, description="Pairs per device per forward pass.")
    grad_accum: int = Field(1, ge=1, le=1024, description="Forward passes accumulated per optimizer step.")
    max_length: int = Field(128, ge=16, le=8192, description="Max tokens of prompt + response; prompts are cut from the left.")
    max_grad_norm: float = Field(1.0, gt=0, le=1e6, description="Gradient clipping norm.")
    precision: Precision = Field("auto", description="'bf16' autocast, 'fp32', or 'auto' (bf16 where the hardware has it).")
    seed: int = Field(0, description="Seed of initialisation, data order and dropout.")
    dropout: bool = Field(False, description="Keep the model's dropout on during training (off is usual for reward models).")
    loss: LossConfig = Field(default_factory=LossConfig)
    anchor: AnchorConfig = Field(default_factory=AnchorConfig)
    l2sp_lambda: float = Field(
        0.0, ge=0, le=1e4, description="L2-SP baseline: weight on ||theta - theta_0||^2 summed over trained weights; 0 turns it off."
    )
    lora: LoraSpec | None = Field(None, description="Train low-rank adapters instead of all weights.")
    save_steps: int = Field(200, ge=1, le=10_000_000, description="Optimizer steps between checkpoints (used to resume a crashed job).")
    save_total_limit: int = Field(2, ge=1, le=100, description="Checkpoints kept on disk; older ones are deleted.")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers that transformers sends metrics to."
    )
    allow_remote_code: bool = Field(
        False,
        description="Ignored unless the operator enables trust_remote_code; kept so configs can state intent.",
    )


class ArmSpec(_Strict):
    """One student trained in a pipeline, e.g. naive, anchored, ceiling or L2-SP."""

    name: Name = _name_field(description="Row name in the report and folder name, e.g. 'anchored'.")
    labels: Literal["weak", "gold"] = Field("weak", description="'weak' labels from the weak model, or 'gold' (the ceiling).")
    anchor: AnchorConfig | None = Field(None, description="Overrides the student's anchor settings for this arm.")
    l2sp_lambda: float | None = Field(None, ge=0, le=1e4, description="Overrides the student's L2-SP weight for this arm.")


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
    max_length_cap: int = Field(512, ge=16, le=8192, description="Upper bound of the automatic eval length.")
    batch_size: int = Field(32, ge=1, le=4096, description="Sequences per forward pass during scoring.")
    bootstrap_samples: int = Field(1000, ge=100, le=100_000, description="Bootstrap resamples (over prompts) for 95 % intervals.")
    ece_bins: int = Field(10, ge=2, le=1000, description="Equal-width confidence bins for expected calibration error.")
    precision: Precision = Field("auto", description="Scoring precision.")
    seed: int = Field(0, description="Seed of the bootstrap.")
    candidates: bool = Field(
        False, description="Also report every lambda candidate of an 'auto' arm, to compare the chosen lambda with the others."
    )


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
    validation_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of split B prompts held out with gold labels as source validation data (validation.jsonl), 0 to <1."
    )
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
        if self.weak is not None and self.weak.anchor.is_auto:
            raise ValueError("weak.anchor.lambda='auto' is not supported: give the weak model a number (usually 0)")
        return self


class StudentTrainConfig(_Strict):
    """Stage 2 on its own: fine-tune a student on a labelled pairs file."""

    data: str = Field(description="Pairs file; soft labels are read from its 'label' field, gold when absent.")
    labels: Literal["weak", "gold"] = Field("weak", description="Use the file's weak labels, or ignore them (gold).")
    student: TrainConfig
    heldout: str | None = Field(None, description="In-distribution pairs for the reward normalisation statistics.")
    name: Name = _name_field("student", description="Name recorded in the model metadata.")

    @model_validator(mode="after")
    def _check_lambda(self) -> "StudentTrainConfig":
        if self.student.anchor.is_auto:
            raise ValueError(
                "student.anchor.lambda='auto' needs a pipeline (it trains several candidates and compares them on "
                "source validation data); give a number here, or run a pipeline"
            )
        return self


class LambdaCandidate(_Strict):
    """One trained candidate of an 'auto' arm: its lambda and model directory."""

    lam: float = Field(ge=0, le=MAX_LAMBDA, validation_alias=AliasChoices("lambda", "lam"), description="Anchor weight it was trained with.")
    model: str = Field(description="Reward model directory of the candidate.")


class SelectLambdaConfig(_Strict):
    """Choose the anchor weight of one arm from its trained candidates, using source validation data only.

    Rule: the largest lambda whose validation accuracy is at least the best candidate's minus the
    tolerance (one bootstrap standard error of the best when unset). Larger lambda keeps the student
    nearer its pretrained representations, which is what should transfer, so ties go to it.
    """

    name: Name = _name_field(description="Arm name, used in the selection file and the report.")
    candidates: list[LambdaCandidate] = Field(min_length=1, max_length=12)
    validation: str = Field(description="Gold-labelled source validation pairs (the weak stage's validation.jsonl).")
    pretrained: str | None = Field(None, description="Pretrained model to measure each candidate's drift on the validation inputs.")
    tolerance: float | None = Field(None, ge=0, le=1, description="Accuracy the chosen lambda may lose to the best; unset: one standard error.")
    max_length: int = Field(128, ge=16, le=8192, description="Tokens per sequence when scoring validation pairs.")
    batch_size: int = Field(32, ge=1, le=4096, description="Sequences per forward pass.")
    precision: Precision = Field("auto", description="Scoring precision.")
    bootstrap_samples: int = Field(1000, ge=100, le=100_000, description="Bootstrap resamples over prompts for the standard error.")
    seed: int = Field(0, description="Seed of the bootstrap.")


class EvaluateConfig(_Strict):
    """Stage 3 on its own: compare reward models on a source test set and shifted targets."""

    name: Name = _name_field("evaluation", description="Experiment name, used in the report title.")
    models: dict[str, str] = Field(min_length=1, description="Report row name -> reward model directory.")
    source: DatasetSpec
    targets: list[DatasetSpec] = Field(default_factory=list)
    baseline: str | None = Field(None, description="Model name PGR and gains are measured against (usually 'weak').")
    ceiling: str | None = Field(None, description="Model name used as the PGR ceiling.")
    pretrained: str | None = Field(None, description="Pretrained model directory to measure representation drift from.")
    selections: dict[str, str] = Field(
        default_factory=dict, description="Arm name -> selection.json of its lambda choice, quoted in the report."
    )
    eval: EvalConfig = Field(default_factory=EvalConfig)


class PipelineConfig(_Strict):
    """The whole weak-to-strong experiment: weak labels, students, shift report."""

    name: Name = _name_field("w2s", description="Experiment name, used in the report title and the default output folder.")
    source: DatasetSpec
    targets: Annotated[list[DatasetSpec], Field(min_length=1)] = Field(
        description="Shifted datasets evaluated out of distribution; at least one."
    )
    weak: TrainConfig = Field(description="Weak model (trained on gold split A).")
    student: TrainConfig = Field(description="Strong student settings shared by every arm.")
    arms: list[ArmSpec] = Field(
        default_factory=default_arms, min_length=1, description="Students to train and compare; names must be unique."
    )
    split_fraction: float = Field(0.5, gt=0, lt=1, description="Share of source prompts in gold split A.")
    split_seed: int = Field(0, description="Seed of the prompt-level A/B split.")
    validation_fraction: float | None = Field(
        None,
        ge=0,
        lt=1,
        description=f"Share of split B prompts held out as gold-labelled source validation data, 0 to <1; unset: {AUTO_VALIDATION_FRACTION} when an arm has lambda='auto', else 0.",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def arm_student(self, arm: ArmSpec) -> TrainConfig:
        """Return the student settings of one arm: the shared ones with the arm's overrides applied."""
        student = self.student.model_copy(deep=True)
        if arm.anchor is not None:
            student.anchor = arm.anchor.model_copy(deep=True)
        if arm.l2sp_lambda is not None:
            student.l2sp_lambda = arm.l2sp_lambda
        return student

    @property
    def has_auto_arm(self) -> bool:
        return any(self.arm_student(arm).anchor.is_auto for arm in self.arms)

    @property
    def source_validation_fraction(self) -> float:
        if self.validation_fraction is not None:
            return self.validation_fraction
        return AUTO_VALIDATION_FRACTION if self.has_auto_arm else 0.0

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
        if self.weak.anchor.is_auto:
            raise ValueError("weak.anchor.lambda='auto' is not supported: give the weak model a number (usually 0)")
        if self.has_auto_arm and self.source_validation_fraction == 0:
            raise ValueError(
                "validation_fraction is 0 but an arm has anchor.lambda='auto', which is chosen on source validation "
                f"data; set validation_fraction above 0 (e.g. {AUTO_VALIDATION_FRACTION}) or leave it unset"
            )
        return self

    def weak_label_config(self) -> WeakLabelConfig:
        return WeakLabelConfig(
            source=self.source,
            targets=self.targets,
            labeller="train",
            weak=self.weak,
            split_fraction=self.split_fraction,
            split_seed=self.split_seed,
            validation_fraction=self.source_validation_fraction,
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
        "select_lambda": SelectLambdaConfig,
    }


JOB_CONFIGS: dict[str, type[BaseModel]] = _job_configs()


def parse_job_config(job_type: str, data: dict) -> BaseModel:
    """Validate `data` as the config of `job_type`; raises KeyError for an unknown type."""
    if job_type not in JOB_CONFIGS:
        raise KeyError(f"unknown job type {job_type!r}; expected one of {sorted(JOB_CONFIGS)}")
    return JOB_CONFIGS[job_type].model_validate(data)


def describe_config(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Render one help line per field, recursing into nested configs and lists of them (as `arms[].name`)."""
    lines = []
    for name, field in model.model_fields.items():
        choices = getattr(field.validation_alias, "choices", None)
        name = str(choices[0]) if choices else name
        annotation = field.annotation
        nested = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if nested is not None:
            lines.extend(describe_config(nested, prefix=f"{prefix}{name}."))
            continue
        value = None if field.is_required() else field.get_default(call_default_factory=True)
        if isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            value = [v.model_dump(exclude_defaults=True) for v in value]
        default = "required" if field.is_required() else f"default {value!r}"
        lines.append(f"{prefix}{name}: {field.description or ''} ({default})")
        items = [arg for arg in getattr(annotation, "__args__", ()) if isinstance(arg, type) and issubclass(arg, BaseModel)]
        if getattr(annotation, "__origin__", None) is list and items:
            lines.extend(describe_config(items[0], prefix=f"{prefix}{name}[]."))
    return lines
