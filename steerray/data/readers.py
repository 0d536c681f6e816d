"""Find a source's files (local path, hub id, ``hf://`` path) and read them as numbered raw rows.

Rows come out as ``{"file", "line", "raw", "error"}``: ``raw`` is the JSON text of one record (a jsonl line,
or a parquet row re-serialised), ``error`` says why a line could not be decoded. Keeping records as JSON
text until a source's converter parses them keeps Ray Data's Arrow schema stable whatever the input holds,
and line numbers let every reject name its file and line. Plain files are cut into byte ranges at line
boundaries so several tasks read one big file in parallel with bounded memory; gzip and parquet files are
read as one streamed task each.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerray.errors import SteerrayError

DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")
CHUNK_BYTES = 32 * 1024**2  # one read task per this many bytes of a plain jsonl file
HUB_PREFIX = "hf://"
# Deeper records parse, but later json.dumps calls from deeper call stacks (Ray workers, converters)
# hit the recursion limit: refuse them here, far above any real record (conversations nest < 10 deep).
MAX_JSON_DEPTH = 128
# A \uD800-\uDFFF escape: only lines holding one can decode to a lone surrogate (raw UTF-8 cannot).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class DataSourceError(SteerrayError, ValueError):
    """A source that cannot be read at all: missing path, unreadable file, unreachable hub."""


@dataclass(frozen=True)
class ReadTask:
    file: str  # local path or hf:// URL
    start: int  # byte offset where the task's first line starts (plain files)
    end: int  # byte offset where the next task starts; -1 = to the end
    first_line: int  # 1-based number of the task's first line


def _is_data_file(name: str) -> bool:
    return name.endswith(DATA_SUFFIXES)


def hub_unreachable(location: str, err: Exception | None = None) -> DataSourceError:
    why = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") else (
        f"{type(err).__name__}: {err}" if err else "the hub did not answer")
    return DataSourceError(
        f"cannot read {location} from the Hugging Face hub ({why}). Download the dataset where the hub is "
        "reachable and pass the local copy, e.g. --source NAME=/path/to/file.jsonl.gz (jsonl, jsonl.gz, "
        "parquet, or a folder of them)")


def hub_filesystem() -> Any:
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        raise hub_unreachable("the hub")
    from huggingface_hub import HfFileSystem

    return HfFileSystem()


def list_local_files(location: str) -> list[str]:
    """A file, or every data file under a folder (sorted, recursive). Errors name the path."""
    path = Path(location).expanduser()
    if not path.exists():
        raise DataSourceError(f"{location}: no such file or folder")
    if path.is_file():
        if not os.access(path, os.R_OK):
            raise DataSourceError(f"{location}: file is not readable (permissions)")
        return [str(path)]
    files = sorted(str(p) for p in path.rglob("*") if p.is_file() and _is_data_file(p.name))
    if not files:
        raise DataSourceError(f"{location}: folder holds no {', '.join(DATA_SUFFIXES)} files")
    return files


def list_hub_files(location: str, patterns: tuple[str, ...] = ()) -> list[str]:
    """Files of a hub dataset: ``owner/name`` (optionally with ``patterns`` inside it) or an hf:// path."""
    path = location.removeprefix(HUB_PREFIX)
    if not path.startswith("datasets/"):
        path = f"datasets/{path}"
    try:
        fs = hub_filesystem()
        if patterns:
            found = sorted({f for pattern in patterns for f in fs.glob(f"{path}/{pattern}")})
        elif _is_data_file(path):
            found = [path] if fs.exists(path) else []
        else:
            found = sorted(f for f in fs.find(path) if _is_data_file(f))
    except DataSourceError:
        raise
    except Exception as err:  # network, auth, missing repo: all mean "not readable from the hub"
        raise hub_unreachable(location, err) from None
    if not found:
        raise DataSourceError(f"{location}: no data files found on the hub")
    return [f"{HUB_PREFIX}{f}" for f in found]


def plan_reads(files: list[str], chunk_bytes: int = CHUNK_BYTES) -> list[ReadTask]:
    """Cut plain local jsonl files at line boundaries into read tasks, numbering their first lines."""
    tasks = []
    for file in files:
        if file.startswith(HUB_PREFIX) or not file.endswith((".jsonl", ".json")):
            tasks.append(ReadTask(file, 0, -1, 1))
            continue
        tasks.extend(_chunk_plain_file(file, chunk_bytes))
    return tasks


def _chunk_plain_file(file: str, chunk_bytes: int) -> Iterator[ReadTask]:
    # One streaming pass over the lines (constant memory) gives each chunk its first line number.
    start, first_line, position, line_no = 0, 1, 0, 0
    with open(file, "rb") as handle:
        for line in handle:
            position += len(line)
            line_no += 1
            if position - start >= chunk_bytes:
                yield ReadTask(file, start, position, first_line)
                start, first_line = position, line_no + 1
    if position > start or start == 0:
        yield ReadTask(file, start, -1, first_line)


def _open_binary(file: str) -> Any:
    if file.startswith(HUB_PREFIX):
        return hub_filesystem().open(file.removeprefix(HUB_PREFIX), "rb")
    return open(file, "rb")


def read_task_rows(task: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Ray Data ``flat_map`` body: one read task in, its numbered raw rows out."""
    file = task["file"]
    try:
        if file.endswith(".parquet"):
            yield from _parquet_rows(file)
        else:
            yield from _jsonl_rows(file, task["start"], task["end"], task["first_line"])
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        yield {"file": file, "line": 0, "raw": "", "error": f"cannot read file: {err}"}
    except Exception as err:
        if not _is_arrow_error(err):
            raise
        yield {"file": file, "line": 0, "raw": "",
               "error": f"cannot read file: not a readable parquet file ({err})"}


def _is_arrow_error(err: Exception) -> bool:
    # pyarrow is imported only for parquet files; a corrupt one raises ArrowInvalid / ArrowIOError.
    return type(err).__module__.startswith("pyarrow")


def _jsonl_rows(file: str, start: int, end: int, first_line: int) -> Iterator[dict[str, Any]]:
    with _open_binary(file) as raw_handle:
        handle = gzip.GzipFile(fileobj=raw_handle) if file.endswith(".gz") else raw_handle
        handle.seek(start) if start else None
        remaining = end - start if end >= 0 else None
        stream = io.BufferedReader(handle) if not isinstance(handle, io.BufferedReader) else handle
        line_no = first_line
        for line in stream:
            if remaining is not None:
                if remaining <= 0:
                    break
                remaining -= len(line)
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield {"file": file, "line": line_no, "raw": "",
                       "error": f"not UTF-8 text: {err.reason} at byte {err.start + 1} of the line"}
            else:
                if text.strip():
                    yield {"file": file, "line": line_no, "raw": text.rstrip("\r\n"), "error": ""}
            line_no += 1


def _parquet_rows(file: str) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    with _open_binary(file) as handle:
        parquet = pq.ParquetFile(handle)
        row = 1
        for batch in parquet.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                yield {"file": file, "line": row, "raw": json.dumps(record, ensure_ascii=False, default=str),
                       "error": ""}
                row += 1


def decode_raw(row: dict[str, Any]) -> tuple[Any, str]:
    """``(record, "")`` or ``(None, reason)`` for one raw row (see :func:`decode_json`)."""
    if row["error"]:
        return None, row["error"]
    return decode_json(row["raw"])


def decode_json(text: str) -> tuple[Any, str]:
    """``(value, "")`` or ``(None, reason)`` for one JSON text; never raises, whatever the text holds.

    Rejected besides malformed JSON: nesting deeper than ``MAX_JSON_DEPTH`` levels, integers over
    Python's int-string limit (ValueError), NaN/Infinity (not JSON; they would turn into NaN labels), and
    lone surrogates (a ``\\ud800`` escape decodes to a string that cannot be written out as UTF-8 again).
    """
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as err:
        return None, f"malformed JSON: {err.msg} at column {err.colno}"
    except RecursionError:
        return None, f"malformed JSON: nested more than {MAX_JSON_DEPTH} levels deep"
    except ValueError as err:  # the int-string limit (sys.get_int_max_str_digits), NaN/Infinity
        return None, f"unusable JSON value: {str(err).split(';')[0]}"
    # Counting brackets is a fast C scan: only a line with that many can be nested that deep.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _nested_deeper(value, MAX_JSON_DEPTH):
        return None, f"malformed JSON: nested more than {MAX_JSON_DEPTH} levels deep"
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        return None, "unusable JSON value: a string holds a lone surrogate (unpaired \\ud800-\\udfff escape)"
    return value, ""


def _nested_deeper(value: Any, limit: int) -> bool:
    stack = [(value, 1)]  # an explicit stack: walking this value recursively is what must not happen
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# One decoder for every line: json.loads(..., parse_constant=...) would build a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def _has_lone_surrogate(value: Any) -> bool:
    # Paired escapes decode to one code point; only unpaired ones survive, and UTF-8 refuses them.
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
