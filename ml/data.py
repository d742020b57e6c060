"""Read preference data into PreferencePair lists, split it by prompt and write it back.

Supported files are JSON Lines (.jsonl, .ndjson), JSON (.json, an array of objects) and
Parquet (.parquet), each optionally gzip-compressed. The row formats are described in
`ml.data_formats`: "trl" (TRL preference rows), "hh" (HH-RLHF transcripts) and "ranked"
(a prompt with scored responses, such as GENIES and UltraFeedback).

Rows and lines are numbered from 1 in locations and source ids. The HTTP front end
validates uploads with this module, so it must not import torch or transformers. pyarrow
is imported only when a Parquet file is read.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import math
import os
import uuid
import zlib
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from ml.data_formats import (
    ROW_PARSERS,
    PairProblem,
    ParsedPair,
    RowFieldError,
    describe_value,
    detect_format,
    is_number,
)

__all__ = [
    "FORMATS",
    "DataFormatError",
    "ImportReport",
    "Message",
    "PreferencePair",
    "SkippedRow",
    "fingerprint",
    "read_preferences",
    "read_preferences_bytes",
    "split_by_prompt",
    "write_pairs_jsonl",
]

Message = dict  # {"role": str, "content": str}

FORMATS = ("trl", "hh", "ranked")

GZIP_MAGIC = b"\x1f\x8b"
CONTAINERS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}

# Number of skipped rows that ImportReport.log lists one by one.
LOGGED_SKIPS = 20


@dataclass(frozen=True, slots=True)
class PreferencePair:
    """One preference judgement: `chosen` is preferred to `rejected` as a reply to `prompt`.

    Text data stores strings. Conversational data stores lists of {"role", "content"}
    messages, and the tokenizer's chat template renders them later. `label` is
    P(chosen preferred) from a weak labeller, and None means a gold label (chosen wins).
    `prompt_id` groups the pairs of one prompt: the file's own id if it stores one, else
    the sha1 of the prompt. `source_id` names the file and the line or row.
    Pairs that contain message lists are not hashable.
    """

    prompt: str | list[Message]
    chosen: str | list[Message]
    rejected: str | list[Message]
    prompt_id: str
    source_id: str
    label: float | None = None
    weight: float = 1.0
    chosen_score: float | None = None
    rejected_score: float | None = None

    def __post_init__(self) -> None:
        if self.label is not None and not (is_number(self.label) and 0.0 <= self.label <= 1.0):
            raise ValueError(f"label must be a number from 0 to 1 or None, got {self.label!r}")
        if not (is_number(self.weight) and self.weight >= 0):
            raise ValueError(f"weight must be a finite number of at least 0, got {self.weight!r}")

    @property
    def is_conversational(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass
class SkippedRow:
    """A row, or one pair of a ranked row, that was left out.

    Example: location "row 811 (response 2 over 1)", reason "the rejected response is empty".
    """

    location: str
    reason: str


@dataclass
class ImportReport:
    """Summary of reading one file: the format, the counts and each skipped row with its reason.

    `sha256` is the digest of the file bytes as stored, as `fingerprint` returns it.
    """

    path: str
    format: str
    rows_read: int
    pairs: int
    skipped: list[SkippedRow] = field(default_factory=list)
    sha256: str = ""

    def summary(self) -> str:
        """Return one line such as "alpaca_hard/test.json.gz: ranked format, 250 rows, 750 pairs, 0 skipped"."""
        return (
            f"{display_name(self.path)}: {self.format} format, {self.rows_read} rows, "
            f"{self.pairs} pairs, {len(self.skipped)} skipped"
        )

    def log(self, logger: logging.Logger, max_listed: int = LOGGED_SKIPS) -> None:
        """Log the summary at INFO and the first `max_listed` skipped rows at WARNING."""
        logger.info("read %s", self.summary())
        name = display_name(self.path)
        for skipped in self.skipped[:max_listed]:
            logger.warning("%s, %s: skipped: %s", name, skipped.location, skipped.reason)
        if len(self.skipped) > max_listed:
            logger.warning(
                "%s: %d more skipped rows not listed", name, len(self.skipped) - max_listed
            )


class DataFormatError(ValueError):
    """A file that cannot be read as preference data.

    `location` is "line N" or "row N" (None for the file as a whole), `field` the field
    path inside the row or None, `expected` what the reader expected there, `problem` what
    it found and `fix` what the user can do.
    """

    def __init__(
        self,
        path: str,
        expected: str,
        location: str | None = None,
        field: str | None = None,
        problem: str | None = None,
        fix: str | None = None,
    ):
        self.path = str(path)
        self.expected = expected
        self.location = location
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(self._message())

    def _message(self) -> str:
        where = [self.path or "(unnamed file)"]
        if self.location:
            where.append(self.location)
        if self.field:
            where.append(f"field {self.field!r}")
        message = f"{', '.join(where)}: {self.problem or 'invalid data'}. Expected {self.expected}."
        if self.fix:
            message += f" {self.fix}"
        return message

    def __reduce__(self):
        # The default reduce calls the class with self.args, which is the message alone, and
        # unpickling would fail because __init__ requires `expected`.
        return (
            type(self),
            (self.path, self.expected, self.location, self.field, self.problem, self.fix),
        )


def display_name(path: str | os.PathLike) -> str:
    """Return the file name with its parent folder, e.g. "alpaca_hard/test.json.gz"."""
    pure = PurePath(path)
    if pure.parent.name:
        return f"{pure.parent.name}/{pure.name}"
    return pure.name


# ---------------------------------------------------------------- reading


def read_preferences(
    path: str | os.PathLike, format: str = "auto", strict: bool = False
) -> tuple[list[PreferencePair], ImportReport]:
    """Read a preference file into pairs and an import report.

    `format` is "auto" (detect from the fields of the first rows) or one of FORMATS.
    Rows that cannot form a usable pair are skipped and listed in the report, unless
    `strict` is True, in which case the first one raises DataFormatError. Malformed input
    always raises DataFormatError. A missing file raises FileNotFoundError.
    """
    path = Path(path)
    data = path.read_bytes()
    return _read(data, str(path), display_name(path), format, strict, max_bytes=None)


def read_preferences_bytes(
    data: bytes,
    filename: str,
    format: str = "auto",
    strict: bool = False,
    *,
    max_bytes: int | None = None,
) -> tuple[list[PreferencePair], ImportReport]:
    """Read an uploaded preference file, as `read_preferences` reads a file on disk.

    The extension of `filename` selects the container. Gzip data is recognised by its
    magic bytes, with or without a ".gz" suffix. `max_bytes` caps the decompressed size of
    gzip data, because a small upload can expand to many gigabytes.
    """
    return _read(bytes(data), filename, filename, format, strict, max_bytes)


def _read(
    data: bytes, path: str, name: str, format: str, strict: bool, max_bytes: int | None
) -> tuple[list[PreferencePair], ImportReport]:
    if format != "auto" and format not in FORMATS:
        raise DataFormatError(
            path, f"'auto' or one of {', '.join(map(repr, FORMATS))}",
            problem=f"unknown format {format!r}",
        )
    sha256 = hashlib.sha256(data).hexdigest()
    container = _container_for(path)

    if not data:
        raise DataFormatError(path, "at least one row", problem="the file is empty")
    if data[:2] == GZIP_MAGIC:
        data = _gunzip(data, path, max_bytes)
        if not data:
            raise DataFormatError(path, "at least one row", problem="the gzip data is empty")

    if container == "parquet":
        records = _parquet_records(data, path)
    elif container == "json":
        records = _json_records(data, path)
    else:
        records = _jsonl_records(data, path)
    if not records:
        raise DataFormatError(path, "at least one row", problem="the file contains no rows")

    detected = format == "auto"
    if detected:
        format = detect_format([row for _, row in records])
        if format is None:
            location, first = records[0]
            raise DataFormatError(
                path,
                "'chosen' and 'rejected' (trl or hh format), or 'prompt' with 'responses' "
                "or 'completions' (ranked format)",
                location=location,
                problem=f"the fields {sorted(first)} match no supported format",
                fix="Rename the fields, or convert the file to one of these formats.",
            )

    pairs, skipped = _parse_rows(records, path, name, format, detected, strict)
    report = ImportReport(
        path=path, format=format, rows_read=len(records), pairs=len(pairs), skipped=skipped,
        sha256=sha256,
    )
    return pairs, report


def _parse_rows(
    records: list[tuple[str, dict]], path: str, name: str, format: str, detected: bool, strict: bool
) -> tuple[list[PreferencePair], list[SkippedRow]]:
    parse_row = ROW_PARSERS[format]
    if detected:
        format_hint = (
            f"The {format!r} format was detected from the first rows. If that is wrong, "
            "pass the right one as format."
        )
    else:
        format_hint = f"Check that the file is in {format!r} format."

    pairs = []
    skipped = []
    for location, row in records:
        try:
            results = parse_row(row)
        except RowFieldError as error:
            raise DataFormatError(
                path, error.expected, location, error.field, error.problem,
                f"{error.fix or 'Fix the row.'} {format_hint}",
            ) from None

        for result in results:
            pair_location = location + result.location_suffix
            if isinstance(result, PairProblem):
                if strict:
                    raise DataFormatError(
                        path, result.expected, pair_location, result.field, result.reason,
                        "Fix or remove the row, or read without strict=True to skip such "
                        "rows and list them in the import report.",
                    )
                skipped.append(SkippedRow(pair_location, result.reason))
            else:
                pairs.append(_make_pair(result, f"{name}:{pair_location}"))
    return pairs, skipped


def _make_pair(parsed: ParsedPair, source_id: str) -> PreferencePair:
    return PreferencePair(
        prompt=parsed.prompt,
        chosen=parsed.chosen,
        rejected=parsed.rejected,
        prompt_id=parsed.prompt_id,
        source_id=parsed.source_id or source_id,
        label=parsed.label,
        weight=parsed.weight,
        chosen_score=parsed.chosen_score,
        rejected_score=parsed.rejected_score,
    )


def _container_for(path: str) -> str:
    name = PurePath(path).name.lower()
    if name.endswith(".gz"):
        name = name[: -len(".gz")]
    container = CONTAINERS.get(PurePath(name).suffix)
    if container is None:
        raise DataFormatError(
            path,
            f"one of the extensions {', '.join(CONTAINERS)}, optionally followed by .gz",
            problem="unsupported file extension",
            fix="Rename the file to match its content, or convert it to JSON Lines.",
        )
    return container


def _gunzip(data: bytes, path: str, max_bytes: int | None) -> bytes:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
            output = stream.read() if max_bytes is None else stream.read(max_bytes + 1)
    except (OSError, EOFError, zlib.error) as error:
        raise DataFormatError(
            path, "a complete gzip stream", problem=f"the gzip data is invalid or truncated ({error})",
            fix="Compress the file again, or copy it again if the transfer was cut short.",
        ) from None
    if max_bytes is not None and len(output) > max_bytes:
        raise DataFormatError(
            path, f"at most {max_bytes} bytes after decompression",
            problem="the decompressed data is too large",
            fix="Split the file into smaller files.",
        )
    return output


def _decode_text(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataFormatError(
            path, "UTF-8 text", f"line {line}",
            problem=f"invalid UTF-8 byte 0x{data[error.start]:02x}",
            fix="Save the file as UTF-8.",
        ) from None


def _jsonl_records(data: bytes | str, path: str) -> list[tuple[str, dict]]:
    text = data if isinstance(data, str) else _decode_text(data, path)
    records = []
    # Split on "\n" only. str.splitlines would also split on U+2028 and other separators,
    # which JSON allows unescaped inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataFormatError(
                path, "one JSON object per line", f"line {number}",
                problem=f"invalid JSON ({error.msg} at column {error.colno})",
                fix="Fix the line, or remove it.",
            ) from None
        if not isinstance(row, dict):
            raise DataFormatError(
                path, "one JSON object per line", f"line {number}",
                problem=f"the line is a JSON {describe_value(row)}",
            )
        records.append((f"line {number}", row))
    return records


def _json_records(data: bytes, path: str) -> list[tuple[str, dict]]:
    text = _decode_text(data, path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        # Hugging Face `Dataset.to_json` (datasets 5.2, by default) and pandas
        # `to_json(lines=True)` write JSON Lines, often under a .json name. Such a file
        # fails here with "Extra data" on line 2.
        if error.msg == "Extra data" and text.lstrip().startswith("{"):
            return _jsonl_records(text, path)
        raise DataFormatError(
            path, "a JSON array of objects", f"line {error.lineno}, column {error.colno}",
            problem=f"invalid JSON ({error.msg})",
        ) from None

    if not isinstance(value, list):
        raise DataFormatError(
            path, "a JSON array of objects at the top level",
            problem=f"the top-level value is a JSON {describe_value(value)}",
            fix="Put the rows in a JSON array, or write one object per line to a .jsonl file.",
        )
    records = []
    for index, row in enumerate(value):
        if not isinstance(row, dict):
            raise DataFormatError(
                path, "a JSON array of objects", f"row {index + 1}",
                problem=f"the row is a JSON {describe_value(row)}",
            )
        records.append((f"row {index + 1}", row))
    return records


def _parquet_records(data: bytes, path: str) -> list[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as error:
        raise DataFormatError(
            path, "a Parquet file", problem=f"the file is not valid Parquet ({error})",
            fix="Check the file, or rename it if it is JSON or JSON Lines.",
        ) from None
    return [(f"row {index + 1}", row) for index, row in enumerate(table.to_pylist())]


# ---------------------------------------------------------------- writing, splitting, lineage


def write_pairs_jsonl(pairs: Iterable[PreferencePair], path: str | os.PathLike) -> None:
    """Write pairs as TRL explicit-prompt JSON Lines that `read_preferences` reads back unchanged.

    Each line has prompt, chosen, rejected, prompt_id and source_id, plus label, weight and
    the two scores when they differ from their defaults. A path ending in ".gz" is
    gzip-compressed. The file is written under a temporary name in the same folder and
    then renamed, so a failed write leaves no partial file at `path`.
    """
    path = Path(path)
    lines = []
    for pair in pairs:
        row: dict[str, Any] = {
            "prompt": pair.prompt,
            "chosen": pair.chosen,
            "rejected": pair.rejected,
            "prompt_id": pair.prompt_id,
            "source_id": pair.source_id,
        }
        if pair.label is not None:
            row["label"] = pair.label
        if pair.weight != 1.0:
            row["weight"] = pair.weight
        if pair.chosen_score is not None:
            row["chosen_score"] = pair.chosen_score
        if pair.rejected_score is not None:
            row["rejected_score"] = pair.rejected_score
        lines.append(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")

    data = "".join(lines).encode("utf-8")
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)

    # open() rather than tempfile.mkstemp, so that the file gets the umask's permissions
    # and not mkstemp's 0600.
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def split_by_prompt(
    pairs: list[PreferencePair], fraction: float = 0.5, seed: int = 0
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Split pairs into two parts so that no prompt_id is in both.

    The first part gets fraction times the number of distinct prompt ids, rounded half up.
    Which prompts go there depends only on the set of prompt ids and the seed, not on the
    order of `pairs` or the Python version. Each part keeps the input order.
    """
    if not (is_number(fraction) and 0.0 <= fraction <= 1.0):
        raise ValueError(f"fraction must be a number from 0 to 1, got {fraction!r}")

    prompt_ids = sorted(
        {pair.prompt_id for pair in pairs},
        key=lambda prompt_id: hashlib.sha256(f"{seed}:{prompt_id}".encode()).hexdigest(),
    )
    first_count = math.floor(fraction * len(prompt_ids) + 0.5)
    first_ids = set(prompt_ids[:first_count])

    first = [pair for pair in pairs if pair.prompt_id in first_ids]
    second = [pair for pair in pairs if pair.prompt_id not in first_ids]
    return first, second


def fingerprint(path_or_bytes: str | os.PathLike | bytes) -> str:
    """Return the sha256 hex digest of a file's bytes as stored (before decompression)."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return hashlib.sha256(path_or_bytes).hexdigest()

    digest = hashlib.sha256()
    with open(path_or_bytes, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
