"""Frozen-model representations for Representation Anchoring, computed once and cached.

The frozen pretrained model's pooled hidden states depend only on the input tokens, so they are
computed in one pass before training instead of running a second model every step. Rows are keyed
by a hash of the exact token ids (which includes the truncation), so a cache saved to disk is reused
on resume only when the inputs are the same.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ml.modeling import autocast, reward_forward
from ml.render import Encoded, pad_batch

logger = logging.getLogger(__name__)


def sequence_key(ids: Sequence[int]) -> str:
    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()


class AnchorCache:
    """Pooled frozen states h0 of every training sequence: one [N, H] tensor per anchored layer."""

    def __init__(self, keys: list[str], states: list[torch.Tensor], layers: list[int]):
        self.keys = keys
        self.row = {key: i for i, key in enumerate(keys)}
        self.states = states
        self.layers = layers

    @classmethod
    @torch.inference_mode()
    def build(
        cls,
        model: nn.Module,
        sequences: Sequence[Encoded],
        layers: list[int],
        pad_id: int,
        precision: str,
        batch_size: int = 32,
    ) -> "AnchorCache":
        """Run `model` (still at its pretrained weights) once over the unique sequences."""
        keys = list(dict.fromkeys(sequence_key(s.input_ids) for s in sequences))
        by_key = {sequence_key(s.input_ids): s.input_ids for s in sequences}
        order = sorted(range(len(keys)), key=lambda i: len(by_key[keys[i]]), reverse=True)
        device = next(model.parameters()).device
        states: list[torch.Tensor] | None = None
        was_training = model.training
        model.eval()
        try:
            for start in tqdm(range(0, len(order), batch_size), desc="anchor cache", unit="batch", leave=False):
                index = order[start : start + batch_size]
                ids, mask = pad_batch([by_key[keys[i]] for i in index], pad_id)
                with autocast(precision, device):
                    pooled = reward_forward(model, ids.to(device), mask.to(device), layers=layers).pooled
                if states is None:
                    states = [torch.empty(len(keys), p.shape[1]) for p in pooled]
                for store, value in zip(states, pooled):
                    store[index] = value.cpu()
        finally:
            model.train(was_training)
        return cls(keys, states or [], layers)

    def lookup(self, sequences: Sequence[Sequence[int]], device: torch.device) -> list[torch.Tensor]:
        rows = torch.tensor([self.row[sequence_key(ids)] for ids in sequences])
        return [state[rows].to(device) for state in self.states]

    def save(self, path: Path) -> None:
        tensors = {f"layer_{i}": state.contiguous() for i, state in enumerate(self.states)}
        save_file(tensors, str(path), metadata={"keys": ",".join(self.keys), "layers": ",".join(map(str, self.layers))})

    @classmethod
    def load(cls, path: Path) -> "AnchorCache | None":
        from safetensors import safe_open

        if not Path(path).is_file():
            return None
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
        tensors = load_file(str(path))
        layers = [int(x) for x in meta["layers"].split(",")]
        states = [tensors[f"layer_{i}"] for i in range(len(layers))]
        return cls(meta["keys"].split(","), states, layers)

    def covers(self, sequences: Sequence[Encoded], layers: list[int]) -> bool:
        return self.layers == layers and all(sequence_key(s.input_ids) in self.row for s in sequences)


class FrozenEncoder:
    """Uncached alternative: a frozen copy of the pretrained model run on every step.

    Costs a second forward pass per step; kept to check the cache against and for the benchmark.
    """

    def __init__(self, model: nn.Module, layers: list[int], precision: str):
        self.model = copy.deepcopy(model).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.layers = layers
        self.precision = precision

    @torch.inference_mode()
    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        with autocast(self.precision, input_ids.device):
            return reward_forward(self.model, input_ids, attention_mask, layers=self.layers).pooled
