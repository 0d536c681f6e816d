"""One pathological line is a counted reject with its file, line and reason, never an exception."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from steerray.data import sources
from steerray.data.readers import MAX_JSON_DEPTH, decode_json, decode_raw, plan_reads, read_task_rows

GOOD = {"conversations": [{"from": "User", "value": "hi"},
                          {"from": "Assistant", "value": "hello", "label": "helpfulness:4"}],
        "system": "", "mask": "User"}
PATHOLOGICAL = [  # (line bytes, the reason decode_raw gives)
    (b"[" * 100_000, f"malformed JSON: nested more than {MAX_JSON_DEPTH} levels deep"),
    (b'{"n": ' + b"7" * 5000 + b"}",
     "unusable JSON value: Exceeds the limit (4300 digits) for integer string conversion: "
     "value has 5000 digits"),
    (b'{"conversations": [{"from": "User", "value": "\\ud800"}]}',
     "unusable JSON value: a string holds a lone surrogate (unpaired \\ud800-\\udfff escape)"),
    (b'{"value": "caf\xe9"}', "not UTF-8 text: invalid continuation byte at byte 15 of the line"),
    (b'{"score": NaN}', "unusable JSON value: NaN is not a JSON number"),
    (b"[" * 500 + b"]" * 500, f"malformed JSON: nested more than {MAX_JSON_DEPTH} levels deep"),
]


def _rows(path: Path, chunk_bytes: int = 32 * 1024**2) -> list[dict]:
    tasks = plan_reads([str(path)], chunk_bytes=chunk_bytes)
    return [row for task in tasks for row in read_task_rows(task.__dict__)]


@pytest.fixture
def bad_file(tmp_path: Path) -> Path:
    """Good line, then each pathological line followed by a good one: lines 1, 2, 3, ... 13."""
    body = [json.dumps(GOOD).encode()]
    for line, _ in PATHOLOGICAL:
        body += [line, json.dumps(GOOD).encode()]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(body) + b"\n")
    return path


@pytest.mark.parametrize("chunk_bytes", [32 * 1024**2, 64])  # one read task, and one task per line or so
def test_every_pathological_line_is_a_numbered_reject(bad_file: Path, chunk_bytes: int):
    rows = _rows(bad_file, chunk_bytes)
    assert [row["line"] for row in rows] == list(range(1, 2 * len(PATHOLOGICAL) + 2))
    decoded = [decode_raw(row) for row in rows]
    assert [decoded[i] for i in range(0, len(rows), 2)] == [(GOOD, "")] * (len(PATHOLOGICAL) + 1)
    assert [(rows[i]["line"], decoded[i]) for i in range(1, len(rows), 2)] == [
        (2 * k + 2, (None, reason)) for k, (_, reason) in enumerate(PATHOLOGICAL)]


def test_pathological_lines_flow_through_the_prepare_converter_as_rejects(bad_file: Path):
    converted = [sources.convert_raw_row("conversations", row, "train") for row in _rows(bad_file)]
    assert [rows[0]["counts_input"] for rows in converted] == [1] * len(converted)  # every line counted
    rejects = [json.loads(rows[0]["payload"]) for rows in converted if rows[0]["kind"] == "reject"]
    assert [(r["file"], r["line"], r["reason"]) for r in rejects] == [
        (str(bad_file), 2 * k + 2, reason) for k, (_, reason) in enumerate(PATHOLOGICAL)]
    assert [rows[0]["kind"] for rows in converted[::2]] == ["conversation"] * (len(PATHOLOGICAL) + 1)


def test_decode_json_limits_are_exact():
    assert decode_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)[1] == ""
    deeper = MAX_JSON_DEPTH + 1
    assert decode_json("[" * deeper + "]" * deeper) == (
        None, f"malformed JSON: nested more than {MAX_JSON_DEPTH} levels deep")
    assert decode_json('{"a": [{"b": {"c": [1]}}]}') == ({"a": [{"b": {"c": [1]}}]}, "")
    code = {"code": "[" * 1000 + "{" * 1000}  # brackets inside strings are not nesting
    assert decode_json(json.dumps(code)) == (code, "")
    assert decode_json('"\\ud83d\\ude00"') == ("\U0001f600", "")  # a paired surrogate escape is one emoji
    assert decode_json('"\\\\ud800"') == ("\\ud800", "")  # an escaped backslash, not a surrogate
    lone = "unusable JSON value: a string holds a lone surrogate"
    assert decode_json('"\\udc00\\ud800"')[1].startswith(lone)  # the wrong order pairs nothing
    assert decode_json('{"\\ud800": 1}')[1].startswith(lone)  # keys count too
    assert decode_json("-Infinity") == (None, "unusable JSON value: -Infinity is not a JSON number")
    assert decode_json("7" * 4300) == (int("7" * 4300), "")
    assert decode_json('{"a": 1,}') == (
        None, "malformed JSON: Expecting property name enclosed in double quotes at column 9")


def test_corrupt_gzip_member_and_parquet_become_file_rejects(tmp_path: Path):
    gz = tmp_path / "a.jsonl.gz"
    broken = bytearray(gzip.compress(b'{"a": 3}\n'))
    broken[10] = 0xFF  # the deflate block header: "invalid block type" (a zlib.error, not an OSError)
    good = "".join(json.dumps({"a": i}) + "\n" for i in range(1, 5001))  # more than the read-ahead buffers
    gz.write_bytes(gzip.compress(good.encode()) + bytes(broken))
    rows = _rows(gz)
    # Lines decoded before the corrupt member come out numbered (read-ahead may hold back the last few).
    assert len(rows) > 1000
    expected = [(i, f'{{"a": {i}}}') for i in range(1, len(rows))]
    assert [(row["line"], row["raw"]) for row in rows[:-1]] == expected
    assert rows[-1:] == [{"file": str(gz), "line": 0, "raw": "",
                         "error": "cannot read file: Error -3 while decompressing data: invalid block type"}]

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"a": list(range(100))}), parquet)
    parquet.write_bytes(parquet.read_bytes()[:-20])  # cut off the footer
    rows = _rows(parquet)
    assert len(rows) == 1 and rows[0]["line"] == 0
    assert rows[0]["error"].startswith("cannot read file: not a readable parquet file (")
