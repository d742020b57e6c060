"""Turn (prompt, response) into model input, the same way for training, evaluation and scoring.

Rendering: conversational data (lists of messages) goes through the tokenizer's chat template when it
has one, and through a plain "role: content" transcript otherwise. Plain-text prompt and response
are concatenated as they are (GENIES prompts already end with "### Response:\\n").

Truncation to `max_length` tokens, special tokens included: the prompt is cut from the left, so the
text nearest the response survives. When the response alone does not fit, the last
`min_prompt_tokens` prompt tokens are kept and the response is cut from the right. Every cut is
counted, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import torch

Text = str | list[dict[str, Any]]

DEFAULT_MIN_PROMPT_TOKENS = 16


@dataclass(frozen=True)
class Encoded:
    input_ids: tuple[int, ...]
    truncated: bool


def _transcript(messages: list[dict[str, Any]]) -> str:
    return "".join(f"{m['role']}: {m['content']}\n\n" for m in messages)


class Renderer:
    """Renders and tokenizes items for one tokenizer and one max length."""

    def __init__(self, tokenizer: Any, max_length: int, min_prompt_tokens: int = DEFAULT_MIN_PROMPT_TOKENS):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.min_prompt_tokens = min_prompt_tokens
        self.prefix_ids, self.suffix_ids = self._special_tokens()
        self.budget = max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.budget < 2:
            raise ValueError(f"max_length={max_length} leaves no room for text after special tokens; raise it")
        self._tokenize = lru_cache(maxsize=65536)(self._tokenize_uncached)

    def _special_tokens(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Find the special tokens the tokenizer wraps a single text in ([CLS] … [SEP], <s> … </s>, none)."""
        probe = "probe"
        bare = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        full = self.tokenizer(probe)["input_ids"]
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                return tuple(full[:start]), tuple(full[start + len(bare) :])
        return (), ()

    def _tokenize_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(self, prompt: Text, response: Text) -> tuple[str, str]:
        """Return the prompt and response as the two strings that are tokenized."""
        if isinstance(prompt, str) and isinstance(response, str):
            return prompt, response
        prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        response_msgs = [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
        if getattr(self.tokenizer, "chat_template", None):
            full = self.tokenizer.apply_chat_template(prompt_msgs + response_msgs, tokenize=False)
            head = self.tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
            if full.startswith(head):
                return head, full[len(head) :]
            # Templates that rewrite earlier turns (e.g. dropping reasoning) break the prefix property.
            return "", full
        full = _transcript(prompt_msgs + response_msgs)
        head = _transcript(prompt_msgs)
        return head, full[len(head) :]

    def encode(self, prompt: Text, response: Text) -> Encoded:
        prompt_text, response_text = self.render(prompt, response)
        prompt_ids = self._tokenize(prompt_text) if prompt_text else ()
        response_ids = self._tokenize(response_text) if response_text else ()
        return self._fit(prompt_ids, response_ids)

    def encode_full_text(self, text: str) -> Encoded:
        """Encode a whole transcript (prompt and response already joined): the start is cut first."""
        return self._fit(self._tokenize(text), ())

    def _fit(self, prompt_ids: tuple[int, ...], response_ids: tuple[int, ...]) -> Encoded:
        budget = self.budget
        truncated = len(prompt_ids) + len(response_ids) > budget
        if truncated:
            keep_prompt = min(len(prompt_ids), self.min_prompt_tokens)
            if len(response_ids) <= budget - keep_prompt:
                prompt_ids = prompt_ids[len(prompt_ids) - (budget - len(response_ids)) :]
            else:
                prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :] if keep_prompt else ()
                response_ids = response_ids[: budget - len(prompt_ids)]
        return Encoded(self.prefix_ids + prompt_ids + response_ids + self.suffix_ids, truncated)

    def length(self, prompt: Text, response: Text) -> int:
        """Untruncated token count, special tokens included."""
        prompt_text, response_text = self.render(prompt, response)
        n = len(self._tokenize(prompt_text)) if prompt_text else 0
        n += len(self._tokenize(response_text)) if response_text else 0
        return n + len(self.prefix_ids) + len(self.suffix_ids)


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists to one length; returns (input_ids, attention_mask) as long tensors."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if side == "right":
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        else:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask
