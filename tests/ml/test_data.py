"""Tests of ml.data: reading the real GENIES and HH-RLHF files, TRL files in every container,
malformed input, strict mode, splitting, writing and fingerprints."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ml.data import (
    FORMATS,
    DataFormatError,
    ImportReport,
    PreferencePair,
    SkippedRow,
    fingerprint,
    read_preferences,
    read_preferences_bytes,
    split_by_prompt,
    write_pairs_jsonl,
)

ROOT = Path(__file__).resolve().parents[2]

# Prompts and pairs per distribution and split, as published with the GENIES data. A prompt
# with one response scored 1.0 and three scored 0.0 gives three pairs, and ties give none.
GENIES_COUNTS = {
    # distribution: (train prompts, train pairs, test prompts, test pairs)
    "alpaca_easy": (600, 1800, 250, 750),
    "alpaca_hard": (600, 1800, 250, 750),
    "arc_easy": (600, 1800, 250, 750),
    "arc_hard": (600, 1800, 250, 750),
    "code_easy": (600, 1800, 250, 750),
    "code_hard": (600, 1800, 250, 750),
    "us_history_textbook": (600, 1800, 250, 750),
    "us_history_fiction": (585, 1755, 250, 750),
    "alpaca_high_quality": (1800, 1800, 750, 750),
    "alpaca_low_quality": (1800, 1800, 750, 750),
    "alpaca_short": (600, 600, 250, 250),
    "alpaca_long": (600, 600, 250, 250),
    "shp_high_quality": (600, 600, 250, 250),
    "shp_low_quality": (600, 600, 250, 250),
}

# Pairs with an empty response in the real files. Every other file has none.
EMPTY_RESPONSE_PAIRS = {("alpaca_high_quality", "train"): 4, ("alpaca_low_quality", "train"): 2}

HH_LINES = 2312


def jsonl(*rows: object) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def hh_path(shared_data: Path) -> Path:
    return shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def transcript_to_messages(transcript: str) -> list[dict]:
    """Turn an HH prompt ("\\n\\nHuman: ... \\n\\nAssistant:") into chat messages."""
    parts = re.split(r"\n\n(Human|Assistant):", transcript)
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        content = content[1:] if content.startswith(" ") else content
        messages.append({"role": role, "content": content})
    if messages and messages[-1] == {"role": "assistant", "content": ""}:
        messages.pop()
    return messages


@pytest.fixture(scope="module")
def genies_pairs(genies: Path) -> list[PreferencePair]:
    pairs, _ = read_preferences(genies / "alpaca_hard" / "test.json.gz")
    return pairs[:12]


@pytest.fixture(scope="module")
def hh_pairs(shared_data: Path) -> list[PreferencePair]:
    pairs, _ = read_preferences(hh_path(shared_data))
    return pairs[:12]


# ---------------------------------------------------------------- real files


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("distribution", sorted(GENIES_COUNTS))
def test_genies_pair_counts(genies: Path, distribution: str, split: str) -> None:
    train_prompts, train_pairs, test_prompts, test_pairs = GENIES_COUNTS[distribution]
    prompts, table_pairs = (train_prompts, train_pairs) if split == "train" else (test_prompts, test_pairs)

    pairs, report = read_preferences(genies / distribution / f"{split}.json.gz")

    assert report.format == "ranked"
    assert report.rows_read == prompts
    assert report.pairs == len(pairs)
    assert len(pairs) == table_pairs - len(report.skipped)
    assert len(report.skipped) == EMPTY_RESPONSE_PAIRS.get((distribution, split), 0)
    for skipped in report.skipped:
        assert "response is empty" in skipped.reason
    for pair in pairs:
        assert pair.chosen_score > pair.rejected_score
        assert pair.chosen.strip()
        assert pair.rejected.strip()
        assert not pair.is_conversational


def test_genies_pair_fields(genies: Path) -> None:
    path = genies / "arc_easy" / "test.json.gz"
    raw = json.loads(gzip.decompress(path.read_bytes()))

    pairs, _ = read_preferences(path)

    first = raw[0]
    best = max(first["responses"], key=first["responses"].get)
    assert pairs[0].prompt == first["prompt"]
    assert pairs[0].chosen == best
    assert pairs[0].chosen_score == 1.0
    assert pairs[0].rejected_score == 0.0
    assert pairs[0].label is None
    assert pairs[0].weight == 1.0
    assert pairs[0].prompt_id == hashlib.sha1(first["prompt"].encode()).hexdigest()
    assert pairs[0].source_id.startswith("arc_easy/test.json.gz:row 1 (response ")
    assert len({pair.source_id for pair in pairs}) == len(pairs)


def test_genies_repeated_prompts_share_id(genies: Path) -> None:
    path = genies / "code_easy" / "train.json.gz"
    raw = json.loads(gzip.decompress(path.read_bytes()))

    pairs, _ = read_preferences(path)

    distinct_prompts = {row["prompt"] for row in raw}
    assert len(distinct_prompts) < len(raw)
    assert len({pair.prompt_id for pair in pairs}) == len(distinct_prompts)


def test_hh_pairs_and_skips(shared_data: Path) -> None:
    path = hh_path(shared_data)
    raw = [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]

    pairs, report = read_preferences(path)

    assert len(raw) == HH_LINES
    assert report.format == "hh"
    assert report.rows_read == HH_LINES
    assert len(pairs) + len(report.skipped) == HH_LINES
    assert len(report.skipped) == 9
    reasons = [skipped.reason for skipped in report.skipped]
    assert reasons.count("the chosen response is empty") == 4
    assert sum("differ before the last assistant reply" in reason for reason in reasons) == 5
    for pair in pairs:
        assert pair.prompt.endswith("\n\nAssistant:")
        assert pair.prompt.startswith("\n\nHuman:")
        assert pair.chosen != pair.rejected

    first = raw[0]
    assert pairs[0].prompt + " " + pairs[0].chosen == first["chosen"]
    assert pairs[0].prompt + " " + pairs[0].rejected == first["rejected"]
    assert pairs[0].source_id == "harmless-base/test.jsonl.gz:line 1"


def test_hh_skips_match_raw_rows(shared_data: Path) -> None:
    lines = gzip.decompress(hh_path(shared_data).read_bytes()).decode().splitlines()

    _, report = read_preferences(hh_path(shared_data))

    for skipped in report.skipped:
        number = int(skipped.location.removeprefix("line "))
        row = json.loads(lines[number - 1])
        chosen_prompt = row["chosen"][: row["chosen"].rfind("\n\nAssistant:")]
        rejected_prompt = row["rejected"][: row["rejected"].rfind("\n\nAssistant:")]
        if "empty" in skipped.reason:
            assert row["chosen"].endswith("\n\nAssistant: ")
        else:
            assert chosen_prompt != rejected_prompt


def test_bytes_reader_matches_file_reader(shared_data: Path) -> None:
    path = hh_path(shared_data)

    from_file, file_report = read_preferences(path)
    # No ".gz" in the name: the gzip magic bytes must be enough.
    from_bytes, bytes_report = read_preferences_bytes(path.read_bytes(), "harmless.jsonl")

    assert bytes_report.rows_read == file_report.rows_read
    assert bytes_report.skipped == file_report.skipped
    assert [(p.prompt, p.chosen, p.rejected) for p in from_bytes] == [
        (p.prompt, p.chosen, p.rejected) for p in from_file
    ]
    assert from_bytes[0].source_id == "harmless.jsonl:line 1"


# ---------------------------------------------------------------- TRL files


def trl_rows(shape: str, genies_pairs, hh_pairs) -> tuple[list[dict], list[tuple]]:
    """Build TRL rows of one shape and the (prompt, chosen, rejected) each should read as."""
    rows = []
    expected = []
    if shape == "explicit":
        for pair in genies_pairs:
            rows.append({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})
            expected.append((pair.prompt, pair.chosen, pair.rejected))
    elif shape == "implicit":
        for pair in genies_pairs:
            chosen = pair.prompt + pair.chosen
            rejected = pair.prompt + pair.rejected
            rows.append({"chosen": chosen, "rejected": rejected})
            expected.append(("", chosen, rejected))
    else:
        for pair in hh_pairs:
            prompt = transcript_to_messages(pair.prompt)
            chosen = [{"role": "assistant", "content": pair.chosen}]
            rejected = [{"role": "assistant", "content": pair.rejected}]
            if shape == "conversational":
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            else:
                rows.append({"chosen": prompt + chosen, "rejected": prompt + rejected})
            expected.append((prompt, chosen, rejected))
    return rows, expected


def write_rows(rows: list[dict], path: Path, container: str, compress: bool) -> Path:
    if container == "parquet":
        buffer = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), buffer)
        data = buffer.getvalue().to_pybytes()
    elif container == "json":
        data = json.dumps(rows).encode()
    else:
        data = "".join(json.dumps(row) + "\n" for row in rows).encode()

    name = f"pairs.{container}"
    if compress:
        data = gzip.compress(data)
        name += ".gz"
    path = path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("container", ["jsonl", "json", "parquet"])
@pytest.mark.parametrize("shape", ["explicit", "implicit", "conversational", "implicit_conversational"])
def test_trl_shapes_and_containers(
    tmp_path: Path, genies_pairs, hh_pairs, shape: str, container: str, compress: bool
) -> None:
    rows, expected = trl_rows(shape, genies_pairs, hh_pairs)
    path = write_rows(rows, tmp_path, container, compress)

    pairs, report = read_preferences(path)

    assert report.format == "trl"
    assert report.rows_read == len(rows)
    assert report.skipped == []
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == expected
    conversational = shape in ("conversational", "implicit_conversational")
    assert all(pair.is_conversational == conversational for pair in pairs)
    location = "line 2" if container == "jsonl" else "row 2"
    assert pairs[1].source_id == f"{path.parent.name}/{path.name}:{location}"


def test_trl_explicit_prompt_id_matches_genies(tmp_path: Path, genies_pairs) -> None:
    rows, _ = trl_rows("explicit", genies_pairs, [])
    path = write_rows(rows, tmp_path, "jsonl", compress=False)

    pairs, _ = read_preferences(path)

    assert [pair.prompt_id for pair in pairs] == [pair.prompt_id for pair in genies_pairs]


def test_trl_implicit_groups_same_prompt(tmp_path: Path, genies_pairs) -> None:
    rows, _ = trl_rows("implicit", genies_pairs, [])
    path = write_rows(rows, tmp_path, "jsonl", compress=False)

    pairs, _ = read_preferences(path)

    # The three pairs of each GENIES prompt must share an id, and different prompts must not.
    original_groups = [pair.prompt_id for pair in genies_pairs]
    implicit_groups = [pair.prompt_id for pair in pairs]
    for i in range(len(pairs)):
        for j in range(len(pairs)):
            assert (original_groups[i] == original_groups[j]) == (implicit_groups[i] == implicit_groups[j])


def test_trl_optional_fields(tmp_path: Path) -> None:
    rows = [
        {"prompt": "2+2=", "chosen": "4", "rejected": "5", "label": 0.8, "weight": 2,
         "score_chosen": 9, "score_rejected": 3},
        {"prompt": "2+2=", "chosen": "4", "rejected": "22", "prompt_id": "sum-1", "source_id": "sheet:A7"},
    ]
    path = write_rows(rows, tmp_path, "jsonl", compress=False)

    pairs, _ = read_preferences(path)

    assert pairs[0].label == 0.8
    assert pairs[0].weight == 2.0
    assert pairs[0].chosen_score == 9.0
    assert pairs[0].rejected_score == 3.0
    assert pairs[1].prompt_id == "sum-1"
    assert pairs[1].source_id == "sheet:A7"
    assert pairs[1].label is None


def test_trl_skips_unusable_rows(tmp_path: Path) -> None:
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "  ", "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": "a"},
        {"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]},
    ]
    path = write_rows(rows, tmp_path, "jsonl", compress=False)

    pairs, report = read_preferences(path)

    assert len(pairs) == 1
    assert report.skipped == [
        SkippedRow("line 2", "the chosen response is empty"),
        SkippedRow("line 3", "the chosen and rejected responses are identical"),
        SkippedRow("line 4", "the chosen response is empty"),
    ]


def test_empty_prompts_get_distinct_ids() -> None:
    rows = [
        {"prompt": "", "chosen": "a", "rejected": "b"},
        {"prompt": "", "chosen": "c", "rejected": "d"},
        {"chosen": "x a", "rejected": "y b"},
        {"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
    ]

    pairs, _ = read_preferences_bytes(jsonl(*rows), "pairs.jsonl")

    assert len({pair.prompt_id for pair in pairs}) == len(rows)
    assert pairs[3].prompt == []


def test_json_lines_under_json_name(tmp_path: Path, genies_pairs) -> None:
    rows, expected = trl_rows("explicit", genies_pairs, [])
    path = tmp_path / "pairs.json"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    pairs, _ = read_preferences(path)

    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == expected
    assert pairs[0].source_id == f"{tmp_path.name}/pairs.json:line 1"


def test_jsonl_with_crlf_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"chosen": "a", "rejected": "b"}\r\n\r\n{"chosen": "c\\u2028d", "rejected": "e"}\r\n')

    pairs, report = read_preferences(path)

    assert report.rows_read == 2
    assert pairs[1].chosen == "c\u2028d"
    assert pairs[1].source_id == f"{tmp_path.name}/pairs.jsonl:line 3"


# ---------------------------------------------------------------- ranked variants


def test_ranked_variants_match_genies(tmp_path: Path, genies: Path) -> None:
    path = genies / "arc_hard" / "test.json.gz"
    raw = json.loads(gzip.decompress(path.read_bytes()))[:20]
    reference, _ = read_preferences_bytes(json.dumps(raw).encode(), "arc.json")

    completions = [
        {"prompt": row["prompt"],
         "completions": [{"response": text, "overall_score": score} for text, score in row["responses"].items()]}
        for row in raw
    ]
    scored_list = [
        {"prompt": row["prompt"],
         "responses": [{"text": text, "score": score} for text, score in row["responses"].items()]}
        for row in raw
    ]
    parquet_map = pa.table({
        "prompt": [row["prompt"] for row in raw],
        "responses": pa.array([list(row["responses"].items()) for row in raw],
                              type=pa.map_(pa.string(), pa.float64())),
    })
    buffer = pa.BufferOutputStream()
    pq.write_table(parquet_map, buffer)

    variants = {
        "completions": read_preferences_bytes(json.dumps(completions).encode(), "arc.json"),
        "scored_list": read_preferences_bytes(json.dumps(scored_list).encode(), "arc.json"),
        "parquet_map": read_preferences_bytes(buffer.getvalue().to_pybytes(), "arc.parquet"),
    }
    expected = [(p.prompt, p.chosen, p.rejected, p.chosen_score, p.rejected_score) for p in reference]
    for name, (pairs, report) in variants.items():
        assert report.format == "ranked", name
        assert [(p.prompt, p.chosen, p.rejected, p.chosen_score, p.rejected_score) for p in pairs] == expected, name


def test_ranked_ties_and_single_response() -> None:
    rows = [
        {"prompt": "p1", "responses": {"a": 1, "b": 1, "c": 0}},
        {"prompt": "p2", "responses": {"a": 1, "b": 1}},
        {"prompt": "p3", "responses": {"a": 1}},
    ]

    pairs, report = read_preferences_bytes(json.dumps(rows).encode(), "ranked.json")

    assert [(p.chosen, p.rejected) for p in pairs] == [("a", "c"), ("b", "c")]
    assert report.skipped == [
        SkippedRow("row 2", "all 2 responses have the same score"),
        SkippedRow("row 3", "the row has 1 response(s)"),
    ]


def test_format_argument_overrides_detection() -> None:
    # HH-style transcripts read as TRL implicit rows keep the whole texts.
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    data = json.dumps(row).encode()

    hh_pairs, hh_report = read_preferences_bytes(data, "x.jsonl")
    trl_pairs, trl_report = read_preferences_bytes(data, "x.jsonl", format="trl")

    assert hh_report.format == "hh"
    assert hh_pairs[0].chosen == "hello"
    assert trl_report.format == "trl"
    assert trl_pairs[0].chosen == row["chosen"]
    assert trl_pairs[0].prompt == ""


# ---------------------------------------------------------------- malformed input


GOOD_ROW = {"prompt": "q", "chosen": "a", "rejected": "b"}
TRUNCATED_GZIP = gzip.compress(jsonl(*[GOOD_ROW] * 200))[:-30]

# (id, file name, content, format argument, expected message pattern)
MALFORMED = [
    ("missing_field", "pairs.jsonl", jsonl(GOOD_ROW, {"prompt": "q", "chosen": "a"}), "auto",
     r"^pairs\.jsonl, line 2, field 'rejected': the field is missing\. Expected a string or a list of"),
    ("null_field", "pairs.jsonl", jsonl({"prompt": "q", "chosen": None, "rejected": "b"}), "auto",
     r"line 1, field 'chosen': the field is null\. .*Give the field a value\."),
    ("non_string_field", "pairs.jsonl", jsonl({"prompt": "q", "chosen": 42, "rejected": "b"}), "auto",
     r"line 1, field 'chosen': the value is number 42\. Expected a string or a list of"),
    ("invalid_json_line", "pairs.jsonl", jsonl(GOOD_ROW, GOOD_ROW) + b'{"chosen": "a",\n', "auto",
     r"pairs\.jsonl, line 3: invalid JSON \(Expecting property name enclosed in double quotes at column 16\)"),
    ("invalid_json_array", "pairs.json", b'[{"chosen": "a", "rejected": "b"},\n {"chosen": }]', "auto",
     r"pairs\.json, line 2, column 13: invalid JSON \(Expecting value\)\. Expected a JSON array of objects"),
    ("truncated_gzip", "pairs.jsonl.gz", TRUNCATED_GZIP, "auto",
     r"pairs\.jsonl\.gz: the gzip data is invalid or truncated .*Expected a complete gzip stream"),
    ("unknown_fields", "pairs.jsonl", jsonl({"text": "x", "label": 1}), "auto",
     r"line 1: the fields \['label', 'text'\] match no supported format"),
    ("unknown_format_argument", "pairs.jsonl", jsonl(GOOD_ROW), "csv",
     r"pairs\.jsonl: unknown format 'csv'\. Expected 'auto' or one of 'trl', 'hh', 'ranked'"),
    ("empty_file", "pairs.jsonl", b"", "auto", r"pairs\.jsonl: the file is empty\. Expected at least one row"),
    ("blank_lines_only", "pairs.jsonl", b"\n \n", "auto", r"pairs\.jsonl: the file contains no rows"),
    ("empty_json_array", "pairs.json", b"[]", "auto", r"pairs\.json: the file contains no rows"),
    ("top_level_object", "pairs.json", json.dumps(GOOD_ROW).encode(), "auto",
     r"pairs\.json: the top-level value is a JSON object with fields \['chosen', 'prompt', 'rejected'\]\. "
     r"Expected a JSON array of objects"),
    ("line_not_object", "pairs.jsonl", jsonl(GOOD_ROW, ["q", "a", "b"]), "auto",
     r"line 2: the line is a JSON array of 3 items\. Expected one JSON object per line"),
    ("row_not_object", "pairs.json", json.dumps([GOOD_ROW, 3]).encode(), "auto",
     r"pairs\.json, row 2: the row is a JSON number 3"),
    ("score_not_number", "ranked.json", json.dumps([{"prompt": "p", "responses": {"Lion": 0.0, "Tiger": "high"}}]).encode(),
     "auto", r"row 1, field 'responses\[\"Tiger\"\]': the score is string 'high'\. Expected a number"),
    ("completion_score_not_number", "ranked.jsonl",
     jsonl({"prompt": "p", "completions": [{"response": "a", "overall_score": "N/A"}, {"response": "b", "overall_score": 2}]}),
     "auto", r"line 1, field 'completions\[0\]\.overall_score': the value is string 'N/A'\. Expected a number"),
    ("completion_without_score", "ranked.jsonl", jsonl({"prompt": "p", "completions": [{"text": "a"}]}), "auto",
     r"field 'completions\[0\]': the item has no 'overall_score' or 'score' or 'rating'"),
    ("boolean_score", "ranked.json", json.dumps([{"prompt": "p", "responses": {"a": True, "b": 0}}]).encode(), "auto",
     r"field 'responses\[\"a\"\]': the score is boolean True"),
    ("message_without_content", "chat.jsonl",
     jsonl({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant"}],
            "rejected": [{"role": "assistant", "content": "b"}]}),
     "auto", r"line 1, field 'chosen\[0\]\.content': the message has no 'content'\. Expected a list of \{\"role\""),
    ("message_without_role", "chat.jsonl",
     jsonl({"chosen": [{"content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}),
     "auto", r"field 'chosen\[0\]\.role': the message has no 'role'"),
    ("message_content_not_string", "chat.jsonl",
     jsonl({"chosen": [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
            "rejected": [{"role": "user", "content": "b"}]}),
     "auto", r"field 'chosen\[0\]\.content': the value is array of 1 item\. Expected a string content"),
    ("prompt_kind_mismatch", "chat.jsonl",
     jsonl({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}), "auto",
     r"field 'chosen': the prompt is array of 1 item but chosen is string 'a'"),
    ("label_out_of_range", "pairs.jsonl", jsonl({**GOOD_ROW, "label": 1.5}), "auto",
     r"line 1, field 'label': the value is 1\.5\. Expected a number from 0 to 1"),
    ("negative_weight", "pairs.jsonl", jsonl({**GOOD_ROW, "weight": -1}), "auto",
     r"field 'weight': the value is -1\.0\. Expected a number of at least 0"),
    ("unsupported_extension", "pairs.csv", b"prompt,chosen,rejected\nq,a,b\n", "auto",
     r"^pairs\.csv: unsupported file extension\. Expected one of the extensions \.jsonl, \.ndjson, \.json, \.parquet"),
    ("not_parquet", "pairs.parquet", jsonl(GOOD_ROW), "auto",
     r"pairs\.parquet: the file is not valid Parquet .*Expected a Parquet file"),
    ("invalid_utf8", "pairs.jsonl", jsonl(GOOD_ROW) + b'{"chosen": "\xff", "rejected": "b"}\n', "auto",
     r"pairs\.jsonl, line 2: invalid UTF-8 byte 0xff\. Expected UTF-8 text"),
    ("hh_forced_on_messages", "chat.jsonl",
     jsonl({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]}),
     "hh", r"line 1, field 'chosen': the value is array of 1 item\. Expected a string\. .*'hh' format"),
    ("ranked_forced_on_trl", "pairs.jsonl", jsonl(GOOD_ROW), "ranked",
     r"line 1, field 'responses': the field is missing\. Expected scored responses"),
]


@pytest.mark.parametrize(
    ("filename", "content", "format", "pattern"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_input_raises(filename: str, content: bytes, format: str, pattern: str) -> None:
    with pytest.raises(DataFormatError, match=pattern):
        read_preferences_bytes(content, filename, format=format)


def test_error_attributes_and_pickle() -> None:
    content = jsonl(GOOD_ROW, {"prompt": "q", "chosen": "a"})

    with pytest.raises(DataFormatError) as caught:
        read_preferences_bytes(content, "pairs.jsonl")

    error = caught.value
    assert isinstance(error, ValueError)
    assert error.path == "pairs.jsonl"
    assert error.location == "line 2"
    assert error.field == "rejected"
    assert "string" in error.expected
    assert "The 'trl' format was detected from the first rows" in str(error)
    restored = pickle.loads(pickle.dumps(error))
    assert str(restored) == str(error)
    assert restored.field == "rejected"


def test_truncated_real_gzip(tmp_path: Path, shared_data: Path) -> None:
    data = hh_path(shared_data).read_bytes()
    path = tmp_path / "test.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(DataFormatError, match=r"test\.jsonl\.gz: the gzip data is invalid or truncated") as caught:
        read_preferences(path)

    assert caught.value.path == str(path)
    assert caught.value.location is None


def test_gzip_size_limit() -> None:
    content = gzip.compress(jsonl(*[GOOD_ROW] * 100))

    with pytest.raises(DataFormatError, match=r"decompressed data is too large\. Expected at most 1000 bytes"):
        read_preferences_bytes(content, "pairs.jsonl.gz", max_bytes=1000)

    pairs, _ = read_preferences_bytes(content, "pairs.jsonl.gz", max_bytes=100_000)
    assert len(pairs) == 100


# ---------------------------------------------------------------- strict mode


def test_strict_raises_on_empty_response(genies: Path) -> None:
    path = genies / "alpaca_high_quality" / "train.json.gz"

    with pytest.raises(
        DataFormatError,
        match=r"train\.json\.gz, row 811 \(response 2 over 1\), field 'responses': "
        r"the rejected response is empty\. Expected a non-empty response\. .*strict=True",
    ) as caught:
        read_preferences(path, strict=True)

    assert caught.value.location == "row 811 (response 2 over 1)"


def test_default_mode_lists_empty_responses(genies: Path) -> None:
    path = genies / "alpaca_high_quality" / "train.json.gz"
    raw = json.loads(gzip.decompress(path.read_bytes()))
    rows_with_empty = [index + 1 for index, row in enumerate(raw) if "" in row["responses"]]

    pairs, report = read_preferences(path)

    assert len(rows_with_empty) == 4
    assert [int(s.location.split()[1]) for s in report.skipped] == rows_with_empty
    assert all(s.reason == "the rejected response is empty" for s in report.skipped)
    assert all(pair.chosen and pair.rejected for pair in pairs)


def test_strict_accepts_clean_file(genies: Path) -> None:
    pairs, report = read_preferences(genies / "alpaca_high_quality" / "test.json.gz", strict=True)

    assert len(pairs) == 750
    assert report.skipped == []


def test_strict_raises_on_hh_empty_reply(shared_data: Path) -> None:
    with pytest.raises(DataFormatError, match=r"line 87, field 'chosen': the chosen response is empty"):
        read_preferences(hh_path(shared_data), strict=True)


# ---------------------------------------------------------------- report


def test_report_summary(genies: Path) -> None:
    _, report = read_preferences(genies / "alpaca_hard" / "test.json.gz")

    assert report.summary() == "alpaca_hard/test.json.gz: ranked format, 250 rows, 750 pairs, 0 skipped"


def test_report_log_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    skipped = [SkippedRow(f"line {n}", "the chosen response is empty") for n in range(1, 26)]
    report = ImportReport(path="/data/pairs.jsonl", format="trl", rows_read=30, pairs=5, skipped=skipped)
    logger = logging.getLogger("test_data.report")

    with caplog.at_level(logging.INFO, logger=logger.name):
        report.log(logger)

    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == "read data/pairs.jsonl: trl format, 30 rows, 5 pairs, 25 skipped"
    assert messages[1] == "data/pairs.jsonl, line 1: skipped: the chosen response is empty"
    assert len(messages) == 22
    assert messages[-1] == "data/pairs.jsonl: 5 more skipped rows not listed"


# ---------------------------------------------------------------- split


@pytest.fixture(scope="module")
def code_easy_pairs(genies: Path) -> list[PreferencePair]:
    pairs, _ = read_preferences(genies / "code_easy" / "train.json.gz")
    return pairs


def test_split_is_deterministic(code_easy_pairs) -> None:
    first = split_by_prompt(code_easy_pairs, fraction=0.3, seed=7)
    second = split_by_prompt(code_easy_pairs, fraction=0.3, seed=7)
    reversed_input = split_by_prompt(code_easy_pairs[::-1], fraction=0.3, seed=7)
    other_seed = split_by_prompt(code_easy_pairs, fraction=0.3, seed=8)

    assert first == second
    assert {p.source_id for p in reversed_input[0]} == {p.source_id for p in first[0]}
    assert {p.source_id for p in other_seed[0]} != {p.source_id for p in first[0]}


def test_split_keeps_prompts_together(code_easy_pairs) -> None:
    first, second = split_by_prompt(code_easy_pairs, fraction=0.3, seed=0)

    first_ids = {pair.prompt_id for pair in first}
    second_ids = {pair.prompt_id for pair in second}
    all_ids = {pair.prompt_id for pair in code_easy_pairs}
    assert first_ids.isdisjoint(second_ids)
    assert first_ids | second_ids == all_ids
    assert len(first_ids) == round(0.3 * len(all_ids))
    assert len(first) + len(second) == len(code_easy_pairs)
    assert first == [pair for pair in code_easy_pairs if pair.prompt_id in first_ids]


def test_split_edge_fractions(code_easy_pairs) -> None:
    everything, nothing = split_by_prompt(code_easy_pairs, fraction=1.0)
    assert everything == code_easy_pairs
    assert nothing == []

    nothing, everything = split_by_prompt(code_easy_pairs, fraction=0.0)
    assert nothing == []
    assert everything == code_easy_pairs

    with pytest.raises(ValueError, match="fraction must be a number from 0 to 1"):
        split_by_prompt(code_easy_pairs, fraction=1.5)


# ---------------------------------------------------------------- write, fingerprint, imports


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.jsonl.gz"])
def test_write_read_round_trip(tmp_path: Path, genies_pairs, hh_pairs, name: str) -> None:
    conversational_rows, _ = trl_rows("conversational", [], hh_pairs[:3])
    conversational_path = write_rows(conversational_rows, tmp_path, "jsonl", compress=False)
    conversational, _ = read_preferences(conversational_path)
    pairs = [
        dataclasses.replace(genies_pairs[0], label=0.73, weight=2.5),
        dataclasses.replace(genies_pairs[1], label=0.0),
        genies_pairs[2],
        hh_pairs[0],
        dataclasses.replace(conversational[0], label=1.0, weight=0.0),
        *conversational[1:],
    ]
    path = tmp_path / name

    write_pairs_jsonl(pairs, path)
    read_back, report = read_preferences(path)

    assert read_back == pairs
    assert report.format == "trl"
    assert report.skipped == []


def test_written_lines_are_trl_explicit(tmp_path: Path, genies_pairs) -> None:
    path = tmp_path / "pairs.jsonl"

    write_pairs_jsonl([genies_pairs[0], dataclasses.replace(genies_pairs[1], label=0.5)], path)

    first, second = [json.loads(line) for line in path.read_text().splitlines()]
    assert list(first) == ["prompt", "chosen", "rejected", "prompt_id", "source_id", "chosen_score", "rejected_score"]
    assert second["label"] == 0.5
    assert "weight" not in second
    assert list(tmp_path.iterdir()) == [path]


def test_written_file_has_umask_permissions(tmp_path: Path, genies_pairs) -> None:
    path = tmp_path / "pairs.jsonl"
    umask = os.umask(0o022)
    try:
        write_pairs_jsonl(genies_pairs[:1], path)
    finally:
        os.umask(umask)

    assert path.stat().st_mode & 0o777 == 0o644


def test_fingerprint_is_sha256_of_bytes(genies: Path) -> None:
    path = genies / "alpaca_easy" / "test.json.gz"
    data = path.read_bytes()

    _, report = read_preferences(path)

    assert fingerprint(path) == hashlib.sha256(data).hexdigest()
    assert fingerprint(str(path)) == fingerprint(data)
    assert report.sha256 == fingerprint(data)


def test_pair_validation() -> None:
    pair = PreferencePair("q", [{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}], "id", "src")
    assert pair.is_conversational

    with pytest.raises(ValueError, match="label must be a number from 0 to 1"):
        PreferencePair("q", "a", "b", "id", "src", label=1.5)
    with pytest.raises(ValueError, match="weight must be a finite number of at least 0"):
        PreferencePair("q", "a", "b", "id", "src", weight=float("nan"))


def test_formats_constant() -> None:
    assert FORMATS == ("trl", "hh", "ranked")


def test_module_imports_no_torch() -> None:
    code = (
        "import sys, ml.data\n"
        "loaded = sorted(name for name in ('torch', 'transformers', 'pyarrow') if name in sys.modules)\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )

    assert result.stdout.strip() == ""
