"""Operator policy on model folders: pickle checkpoints and remote code stay off unless enabled.

Loading a pickle checkpoint (`pytorch_model.bin` and the like) runs `torch.load`, and a config
with `auto_map` makes transformers import Python files shipped in the folder. Both can execute
code from the folder, so a folder that needs either is rejected with 422 when a client names it
(registration, job configs, scoring) unless the operator set W2S_ALLOW_PICKLE or
W2S_ALLOW_REMOTE_CODE. Requests cannot turn either switch on.
"""

from __future__ import annotations

import json
from pathlib import Path

from app.errors import InvalidInput
from workers.settings import Settings

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Files whose `auto_map` names Python code that transformers imports from the folder.
CODE_MAP_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json")


def pickle_only_weights(folder: Path) -> list[str]:
    """Return the names of the pickle checkpoints of `folder` when it has no safetensors weights."""
    if any(folder.glob("*.safetensors")):
        return []
    return sorted(path.name for path in folder.iterdir() if path.is_file() and path.name.endswith(PICKLE_SUFFIXES))


def remote_code_files(folder: Path) -> list[str]:
    """Return the names of the config files of `folder` that have an `auto_map` entry."""
    names = []
    for name in CODE_MAP_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # the loader reports an unreadable config with its own message
        if isinstance(config, dict) and config.get("auto_map"):
            names.append(name)
    return names


def check_model_folder(settings: Settings, path: str | Path, field: str, value: str) -> None:
    """Raise 422 when the model folder at `path` needs pickle loading or remote code that the operator has not enabled.

    `field` and `value` name the request field and the value the client sent, for the error body.
    Paths that are not folders (Hub names, .gguf files) pass; the loader checks those.
    """
    folder = Path(path)
    if not folder.is_dir():
        return
    if not settings.allow_pickle:
        pickles = pickle_only_weights(folder)
        if pickles:
            raise InvalidInput(
                f"{field}: model {value!r} has only pickle checkpoints ({', '.join(pickles)}) and no .safetensors weights; "
                "pickle loading is disabled on this server (W2S_ALLOW_PICKLE)",
                code="pickle_not_allowed",
                field=field,
                value=value,
                fix="Convert the weights to safetensors (model.save_pretrained(dir, safe_serialization=True)), "
                "or ask the operator to set W2S_ALLOW_PICKLE=true.",
            )
    if not settings.allow_remote_code:
        configs = remote_code_files(folder)
        if configs:
            raise InvalidInput(
                f"{field}: model {value!r} needs remote code (auto_map in {', '.join(configs)}), "
                "and trust_remote_code is disabled on this server (W2S_ALLOW_REMOTE_CODE)",
                code="remote_code_not_allowed",
                field=field,
                value=value,
                fix="Use a model of an architecture that transformers ships, or ask the operator to set W2S_ALLOW_REMOTE_CODE=true.",
            )
