"""Row schemas of the preference formats: detection and conversion of one row into pairs.

This module converts one decoded row (a dict) at a time and does no file I/O. `ml.data`
reads the containers, numbers the rows and turns the results of this module into
`PreferencePair`, `SkippedRow` and `DataFormatError` objects.

- "trl": the TRL preference format. `chosen` and `rejected` are strings or lists of
  {"role", "content"} messages, with an explicit `prompt` or with the prompt left implicit.
- "hh": Anthropic HH-RLHF rows, whose `chosen` and `rejected` are whole
  "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts that differ in the last reply.
- "ranked": a prompt with several scored responses (GENIES `responses: {text: score}`,
  UltraFeedback `completions`), expanded to every (higher, lower) pair.

Two kinds of failure leave this module. `RowFieldError` means the row is malformed and the
file cannot be read as the format. `PairProblem` is returned in place of a pair that is
well-formed but unusable for training (an empty response, two equal responses), which the
reader skips or, in strict mode, raises.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"

# Keys of a completion in UltraFeedback-style rows, in order of preference.
COMPLETION_TEXT_KEYS = ("response", "text")
COMPLETION_SCORE_KEYS = ("overall_score", "score", "rating")

# Number of leading rows whose fields decide the format.
DETECTION_ROWS = 20

MESSAGES_EXPECTED = 'a list of {"role": str, "content": str} messages'
TEXT_OR_MESSAGES_EXPECTED = f"a string or {MESSAGES_EXPECTED}"


class RowFieldError(Exception):
    """A malformed field that makes the row unreadable in its format.

    `field` is a path into the row such as "chosen[2].content", or None when the row as a
    whole is wrong.
    """

    def __init__(self, field: str | None, problem: str, expected: str, fix: str | None = None):
        super().__init__(problem)
        self.field = field
        self.problem = problem
        self.expected = expected
        self.fix = fix


@dataclass
class ParsedPair:
    """Fields of one preference pair read from a row, before ids are filled in.

    `location_suffix` distinguishes the pairs of one row, e.g. " (response 2 over 1)". `prompt_id`
    and `source_id` are None unless the row stores them.
    """

    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    location_suffix: str = ""
    prompt_id: str | None = None
    source_id: str | None = None
    label: float | None = None
    weight: float = 1.0
    chosen_score: float | None = None
    rejected_score: float | None = None


@dataclass
class PairProblem:
    """A well-formed pair that cannot be used for training, and why."""

    location_suffix: str
    field: str | None
    reason: str
    expected: str


def describe_value(value: Any) -> str:
    """Describe a value for an error message: its JSON type and a shortened repr."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {value}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {shorten(value)!r}"
    if isinstance(value, (list, tuple)):
        return f"array of {len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, dict):
        return f"object with fields {sorted(map(str, value))}"
    return type(value).__name__


def shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_number(value: Any) -> bool:
    """Return True for a finite int or float. Booleans are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value)


def prompt_id_for(prompt: str | list[dict]) -> str:
    """Return the sha1 hex digest of a prompt, so that equal prompts share an id."""
    if isinstance(prompt, str):
        text = prompt
    else:
        text = json.dumps(prompt, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def pair_prompt_id(prompt: str | list[dict], chosen: str | list[dict], rejected: str | list[dict]) -> str:
    """Return the hash of the prompt, or of the two responses if the prompt is empty.

    Without the fallback, every pair of a file without prompts would share one id, and
    splitting by prompt would put them all on one side.
    """
    if prompt:
        return prompt_id_for(prompt)
    return prompt_id_for(json.dumps([chosen, rejected], ensure_ascii=False, sort_keys=True))


def implicit_prompt(chosen: str, rejected: str) -> str:
    """Guess the prompt embedded at the start of two texts, to derive a prompt id from it.

    The guess is the common prefix of the texts, cut back to its last line break so that
    replies which start with the same words do not change it.
    """
    length = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        length += 1
    prefix = chosen[:length]
    line_end = prefix.rfind("\n")
    if line_end >= 0:
        prefix = prefix[: line_end + 1]
    # NOTE: this is a heuristic. Two pairs of one prompt whose replies share a first line
    # (or texts with no line break before the replies) can still get different ids.
    return prefix


# ---------------------------------------------------------------- detection


def looks_like_hh(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(HH_HUMAN) and HH_ASSISTANT in value


def detect_format(rows: list[dict]) -> str | None:
    """Return the format that the fields of the first rows match, or None.

    A row with `chosen` or `rejected` is "hh" when it has no `prompt` and most of the first
    rows' `chosen` values are "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts. Otherwise it
    is "trl". A row with `responses` or `completions` is "ranked".
    """
    if not rows:
        return None
    sample = rows[:DETECTION_ROWS]
    first = sample[0]

    if "chosen" in first or "rejected" in first:
        if "prompt" in first:
            return "trl"
        hh_rows = sum(1 for row in sample if looks_like_hh(row.get("chosen")))
        return "hh" if 2 * hh_rows > len(sample) else "trl"

    if "responses" in first or "completions" in first:
        return "ranked"
    return None


# ---------------------------------------------------------------- shared field checks


def require(row: dict, field: str, expected: str) -> Any:
    if field not in row:
        raise RowFieldError(field, "the field is missing", expected, "Add the field to every row.")
    if row[field] is None:
        raise RowFieldError(field, "the field is null", expected, "Give the field a value.")
    return row[field]


def require_str(row: dict, field: str) -> str:
    value = require(row, field, "a string")
    if not isinstance(value, str):
        raise RowFieldError(field, f"the value is {describe_value(value)}", "a string")
    return value


def parse_messages(value: Any, field: str) -> list[dict]:
    """Validate a list of chat messages and keep only their role and content."""
    if not isinstance(value, list):
        raise RowFieldError(field, f"the value is {describe_value(value)}", MESSAGES_EXPECTED)

    messages = []
    for index, message in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise RowFieldError(where, f"the message is {describe_value(message)}", MESSAGES_EXPECTED)
        for key in ("role", "content"):
            if message.get(key) is None:
                raise RowFieldError(
                    f"{where}.{key}", f"the message has no {key!r}", MESSAGES_EXPECTED
                )
            if not isinstance(message[key], str):
                raise RowFieldError(
                    f"{where}.{key}",
                    f"the value is {describe_value(message[key])}",
                    f"a string {key} in every message",
                )
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def parse_text_or_messages(row: dict, field: str) -> str | list[dict]:
    value = require(row, field, TEXT_OR_MESSAGES_EXPECTED)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return parse_messages(value, field)
    raise RowFieldError(field, f"the value is {describe_value(value)}", TEXT_OR_MESSAGES_EXPECTED)


def is_blank(response: str | list[dict]) -> bool:
    if isinstance(response, str):
        return response.strip() == ""
    return all(message["content"].strip() == "" for message in response)


def check_responses(
    chosen: str | list[dict], rejected: str | list[dict], suffix: str = "", field: str | None = None
) -> PairProblem | None:
    """Return why the two responses cannot form a pair, or None if they can."""
    for side, response in (("chosen", chosen), ("rejected", rejected)):
        if is_blank(response):
            return PairProblem(
                suffix, field or side, f"the {side} response is empty", "a non-empty response"
            )
    if chosen == rejected:
        return PairProblem(
            suffix, field or "rejected", "the chosen and rejected responses are identical",
            "two different responses",
        )
    return None


def optional_number(row: dict, field: str, expected: str = "a number") -> float | None:
    value = row.get(field)
    if value is None:
        return None
    if not is_number(value):
        raise RowFieldError(field, f"the value is {describe_value(value)}", expected)
    return float(value)


def optional_str(row: dict, field: str) -> str | None:
    value = row.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise RowFieldError(field, f"the value is {describe_value(value)}", "a non-empty string")
    return value


# ---------------------------------------------------------------- trl


def parse_trl_row(row: dict) -> list[ParsedPair | PairProblem]:
    """Convert a TRL preference row (explicit or implicit prompt, text or messages).

    Optional fields, all written by `ml.data.write_pairs_jsonl`: prompt_id, source_id,
    label, weight, and chosen_score and rejected_score (or TRL's score_chosen and
    score_rejected).
    """
    chosen = parse_text_or_messages(row, "chosen")
    rejected = parse_text_or_messages(row, "rejected")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise RowFieldError(
            "rejected",
            f"the value is {describe_value(row['rejected'])} but chosen is {describe_value(row['chosen'])}",
            "the same type as chosen: both strings or both message lists",
        )

    if "prompt" in row and row["prompt"] is not None:
        prompt = parse_text_or_messages(row, "prompt")
        if isinstance(prompt, str) != isinstance(chosen, str):
            raise RowFieldError(
                "chosen",
                f"the prompt is {describe_value(row['prompt'])} but chosen is {describe_value(row['chosen'])}",
                "responses of the same kind as the prompt: strings after a string prompt, "
                "message lists after a message-list prompt",
            )
        derived_id = pair_prompt_id(prompt, chosen, rejected)
    elif isinstance(chosen, str):
        # Implicit prompt in plain text: TRL trains on the two whole texts, so keep them whole.
        prompt = ""
        derived_id = pair_prompt_id(implicit_prompt(chosen, rejected), chosen, rejected)
    else:
        prompt, chosen, rejected = split_shared_messages(chosen, rejected)
        derived_id = pair_prompt_id(prompt, chosen, rejected)

    label = optional_number(row, "label", "a number from 0 to 1")
    if label is not None and not 0.0 <= label <= 1.0:
        raise RowFieldError("label", f"the value is {label!r}", "a number from 0 to 1")
    weight = optional_number(row, "weight", "a number of at least 0")
    if weight is not None and weight < 0:
        raise RowFieldError("weight", f"the value is {weight!r}", "a number of at least 0")
    pair = ParsedPair(
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        prompt_id=optional_str(row, "prompt_id") or derived_id,
        source_id=optional_str(row, "source_id"),
        label=label,
        weight=1.0 if weight is None else weight,
        chosen_score=first_score(row, ("chosen_score", "score_chosen")),
        rejected_score=first_score(row, ("rejected_score", "score_rejected")),
    )

    problem = check_responses(chosen, rejected)
    return [pair if problem is None else problem]


def first_score(row: dict, fields: tuple[str, ...]) -> float | None:
    for field in fields:
        score = optional_number(row, field)
        if score is not None:
            return score
    return None


def split_shared_messages(
    chosen: list[dict], rejected: list[dict]
) -> tuple[list[dict], list[dict], list[dict]]:
    """Split two conversations into their shared leading messages and the two remainders."""
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


# ---------------------------------------------------------------- hh


def parse_hh_row(row: dict) -> list[ParsedPair | PairProblem]:
    """Split an HH-RLHF transcript pair into the shared dialogue and the two last replies.

    The prompt is the text up to and including the last "\\n\\nAssistant:". Each reply loses
    one leading space, which the transcripts put after the colon.
    """
    texts = {side: require_str(row, side) for side in ("chosen", "rejected")}

    prompts = {}
    replies = {}
    for side, text in texts.items():
        end = text.rfind(HH_ASSISTANT)
        if end < 0:
            return [
                PairProblem(
                    "", side, f"the {side} transcript has no {HH_ASSISTANT!r} turn",
                    "a transcript that ends with an assistant reply",
                )
            ]
        end += len(HH_ASSISTANT)
        prompts[side] = text[:end]
        reply = text[end:]
        replies[side] = reply[1:] if reply.startswith(" ") else reply

    if prompts["chosen"] != prompts["rejected"]:
        return [
            PairProblem(
                "", "rejected",
                "the chosen and rejected transcripts differ before the last assistant reply",
                "two transcripts that share every turn but the last assistant reply",
            )
        ]

    problem = check_responses(replies["chosen"], replies["rejected"])
    if problem is not None:
        return [problem]
    prompt = prompts["chosen"]
    return [
        ParsedPair(
            prompt=prompt,
            chosen=replies["chosen"],
            rejected=replies["rejected"],
            prompt_id=prompt_id_for(prompt),
        )
    ]


# ---------------------------------------------------------------- ranked


def parse_ranked_row(row: dict) -> list[ParsedPair | PairProblem]:
    """Expand a prompt with scored responses into every (higher, lower) pair.

    Responses are numbered from 1 in file order. Equal scores give no pair. A row that
    gives no pair at all is reported, because it usually means a wrong score field.
    """
    if "prompt" not in row and "completions" in row and "instruction" in row:
        prompt = require_str(row, "instruction")  # UltraFeedback names the prompt "instruction"
    else:
        prompt = require_str(row, "prompt")
    responses, field = ranked_responses(row)

    if len(responses) < 2:
        return [
            PairProblem(
                "", field, f"the row has {len(responses)} response(s)", "at least two responses"
            )
        ]

    prompt_id = prompt_id_for(prompt)
    results: list[ParsedPair | PairProblem] = []
    for i, (text_i, score_i) in enumerate(responses):
        for j in range(i + 1, len(responses)):
            text_j, score_j = responses[j]
            if score_i == score_j:
                continue
            high, low = (i, j) if score_i > score_j else (j, i)
            suffix = f" (response {high + 1} over {low + 1})"
            chosen, chosen_score = responses[high]
            rejected, rejected_score = responses[low]

            problem = check_responses(chosen, rejected, suffix, field)
            if problem is not None:
                results.append(problem)
                continue
            results.append(
                ParsedPair(
                    prompt=prompt,
                    chosen=chosen,
                    rejected=rejected,
                    location_suffix=suffix,
                    prompt_id=prompt_id,
                    chosen_score=chosen_score,
                    rejected_score=rejected_score,
                )
            )

    if not results:
        return [
            PairProblem(
                "", field, f"all {len(responses)} responses have the same score",
                "responses with different scores",
            )
        ]
    return results


def ranked_responses(row: dict) -> tuple[list[tuple[str, float]], str]:
    """Return the (text, score) list of a ranked row and the field it came from."""
    field = "completions" if "completions" in row else "responses"
    value = require(row, field, 'scored responses, as {"text": score} or a list of objects')

    if isinstance(value, list) and value and all(isinstance(item, tuple) for item in value):
        value = dict(value)  # pyarrow returns a Parquet map column as a list of (key, value) tuples

    if isinstance(value, dict):
        responses = []
        for text, score in value.items():
            if not is_number(score):
                raise RowFieldError(
                    f"{field}[{json.dumps(shorten(text), ensure_ascii=False)}]",
                    f"the score is {describe_value(score)}",
                    "a number as the score of each response",
                )
            responses.append((text, float(score)))
        return responses, field

    if not isinstance(value, list):
        raise RowFieldError(
            field, f"the value is {describe_value(value)}",
            'an object {"response text": score} or a list of {"text", "score"} objects',
        )

    responses = []
    for index, item in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(item, dict):
            raise RowFieldError(
                where, f"the item is {describe_value(item)}", 'an object with "text" and "score"'
            )
        text_key = next((key for key in COMPLETION_TEXT_KEYS if key in item), None)
        score_key = next((key for key in COMPLETION_SCORE_KEYS if key in item), None)
        if text_key is None:
            raise RowFieldError(
                where, f"the item has no {' or '.join(map(repr, COMPLETION_TEXT_KEYS))}",
                "the response text in 'response' or 'text'",
            )
        if score_key is None:
            raise RowFieldError(
                where, f"the item has no {' or '.join(map(repr, COMPLETION_SCORE_KEYS))}",
                "the score in 'overall_score', 'score' or 'rating'",
            )
        text = item[text_key]
        score = item[score_key]
        if not isinstance(text, str):
            raise RowFieldError(f"{where}.{text_key}", f"the value is {describe_value(text)}", "a string")
        if not is_number(score):
            raise RowFieldError(f"{where}.{score_key}", f"the value is {describe_value(score)}", "a number")
        responses.append((text, float(score)))
    return responses, field


ROW_PARSERS = {"trl": parse_trl_row, "hh": parse_hh_row, "ranked": parse_ranked_row}
