"""Reward models: loading, the one forward pass every caller uses, and saving.

A reward model is a stock `AutoModelForSequenceClassification` with one label, so a directory this
module saves loads unchanged in TRL, RewardBench or plain transformers. What this module adds is a
forward pass that reads the reward at the right token whatever the padding:

- decoder heads (Llama, Qwen, GPT-2 ... with a `score` layer) read the last real token found from the
  attention mask. The stock classes search for the pad id instead, which lands one token early when
  pad and eos are the same token (SmolLM2) and the text ends with eos;
- encoder heads that pool the first token (BERT's pooler, the RoBERTa/MPNet classification head) read
  the first real token, so left padding gives the same reward as right padding;
- position ids always come from the attention mask, so left padding does not shift positions.

The same pass also returns masked-mean-pooled hidden states of chosen layers, which Representation
Anchoring and the drift metrics use.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

METADATA_FILE = "w2s_metadata.json"


class ModelLoadError(ValueError):
    """A reward model could not be loaded; the message names the source and the fix."""


@dataclass
class RewardModel:
    """A loaded reward model with its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: Any
    source: str
    metadata: dict[str, Any]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _resolve_source(name_or_path: str | os.PathLike) -> tuple[str, str | None]:
    """Split a `.gguf` file path into (folder, file name); other sources pass through."""
    text = str(name_or_path)
    if text.endswith(".gguf"):
        path = Path(text)
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {text!r} not found; give the path of an existing .gguf file")
        return str(path.parent), path.name
    path = Path(text).expanduser()
    looks_local = text.startswith((".", "/", "~")) or path.exists()
    if looks_local and not (path / "config.json").is_file():
        raise ModelLoadError(
            f"model directory {text!r} has no config.json; give a model directory "
            "(run `w2s models prepare` for the bundled ones) or a hub name"
        )
    return text, None


def ensure_pad_token(tokenizer: Any, config: Any) -> None:
    """Give decoders without a pad token one (their eos) in tokenizer and config."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("tokenizer has neither a pad nor an eos token; add a pad token to the tokenizer")
        tokenizer.pad_token = tokenizer.eos_token
    config.pad_token_id = tokenizer.pad_token_id


def load_reward_model(
    name_or_path: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device: str | torch.device | None = None,
) -> RewardModel:
    """Load a reward model (or a pretrained backbone with a fresh one-output head).

    `name_or_path` is a hub name, a local model directory or a `.gguf` file. `trust_remote_code` and
    `allow_pickle` (loading `.bin` checkpoints) stay off unless the operator's settings turn them on.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source, gguf_file = _resolve_source(name_or_path)
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        common["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        # A backbone without a trained head gets a freshly initialised one. transformers warns about
        # that on every load, so its logging is lowered while loading.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                source,
                num_labels=1,
                dtype=torch.float32,
                use_safetensors=None if allow_pickle or gguf_file else True,
                **common,
            )
        finally:
            hf_logging.set_verbosity(verbosity)
    except OSError as error:
        hint = "" if allow_pickle else " (pickle .bin checkpoints are refused unless the operator enables allow_pickle)"
        raise ModelLoadError(f"could not load model {str(name_or_path)!r}: {error}{hint}") from error

    ensure_pad_token(tokenizer, model.config)
    if device is not None:
        model.to(device)
    model.eval()
    metadata_path = Path(source) / METADATA_FILE
    metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
    return RewardModel(model=model, tokenizer=tokenizer, source=str(name_or_path), metadata=metadata)


# --- forward pass ------------------------------------------------------------------------------------


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, str]:
    """Find the base transformer inside a classification model and how its head pools."""
    base = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, base, None) if base else None
    if backbone is None:
        raise TypeError(f"{type(model).__name__} has no base model under {base!r}; unsupported architecture")
    if hasattr(model, "score"):
        return backbone, "last"
    if hasattr(model, "classifier") and getattr(backbone, "pooler", None) is not None:
        return backbone, "pooler"
    if hasattr(model, "classifier"):
        return backbone, "first"
    raise TypeError(f"{type(model).__name__} has neither a 'score' nor a 'classifier' head; unsupported architecture")


def unwrap(model: nn.Module) -> nn.Module:
    """Return the transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: Σ_t m_t h_t / Σ_t m_t, shape [B, H] from [B, T, H] and [B, T].

    Padded positions are zeroed with `where` rather than multiplied by 0, because padded rows of
    some attention kernels hold NaN and NaN * 0 is NaN.
    """
    keep = mask.unsqueeze(-1).bool()
    summed = torch.where(keep, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)).sum(dim=1)
    return summed / mask.sum(dim=1, keepdim=True).clamp(min=1).to(hidden.dtype)


@dataclass
class ForwardOutput:
    rewards: torch.Tensor  # [B], float32
    pooled: list[torch.Tensor] | None  # per requested layer, [B, H] float32


def reward_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Sequence[int] | None = None,
) -> ForwardOutput:
    """Compute one reward per sequence, reading the head at the token chosen from the attention mask.

    With `layers`, also return the masked mean over tokens of those hidden-state layers (indices into
    `hidden_states`, where 0 is the embeddings and -1 the last layer).
    """
    inner = unwrap(model)
    backbone, pooling = _backbone_and_head(inner)
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if inner.config.model_type != "mpnet":
        # MPNet derives positions from the pad id itself (already pad-aware) and takes no position_ids.
        kwargs["position_ids"] = position_ids
    if pooling == "pooler":
        # Call the encoder without its pooler; the pooler is applied below at the first real token.
        kwargs["output_hidden_states"] = layers is not None
        outputs = backbone(**kwargs)
    else:
        outputs = backbone(**kwargs, output_hidden_states=layers is not None)
    hidden = outputs.last_hidden_state
    batch = torch.arange(hidden.shape[0], device=hidden.device)

    if pooling == "last":
        last = attention_mask.shape[1] - 1 - attention_mask.flip(dims=[1]).long().argmax(dim=1)
        rewards = inner.score(hidden[batch, last])
    else:
        first = attention_mask.long().argmax(dim=1)
        token = hidden[batch, first]
        if pooling == "pooler":
            rewards = inner.classifier(inner.dropout(backbone.pooler.activation(backbone.pooler.dense(token))))
        else:
            rewards = inner.classifier(token.unsqueeze(1))

    pooled = None
    if layers is not None:
        states = outputs.hidden_states
        pooled = [masked_mean(states[layer], attention_mask).float() for layer in layers]
    return ForwardOutput(rewards=rewards.squeeze(-1).float(), pooled=pooled)


# --- precision ---------------------------------------------------------------------------------------


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map 'auto' to 'bf16' where the hardware runs it natively, else 'fp32'."""
    if precision in ("fp32", "bf16"):
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast(precision: str, device: torch.device):
    """Autocast context for 'bf16', a no-op context for 'fp32'."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- saving ------------------------------------------------------------------------------------------


def save_reward_model(model: nn.Module, tokenizer: Any, out_dir: Path, metadata: dict[str, Any]) -> Path:
    """Write a model directory that `AutoModelForSequenceClassification.from_pretrained` loads unchanged.

    LoRA adapters are merged first. Everything goes to a temporary folder beside `out_dir` and is
    renamed into place once the weights, tokenizer and metadata file are all written, so a reader never
    sees a partial directory: a directory with `w2s_metadata.json` in it is complete.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    # mkdtemp creates the folder as 0700; give the model directory the umask's usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        model.config.num_labels = 1
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        record = {"format_version": 1, "saved_at": datetime.now(timezone.utc).isoformat(), **metadata}
        (staging / METADATA_FILE).write_text(json.dumps(record, indent=2, default=str))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def is_complete_model_dir(path: Path) -> bool:
    return (Path(path) / METADATA_FILE).is_file() and (Path(path) / "config.json").is_file()
