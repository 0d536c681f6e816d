"""Raw readers: numbered lines across chunks, gzip, parquet, malformed and non-UTF-8 lines."""

import gzip
import json
from pathlib import Path

import pytest

from steerray.data.readers import DataSourceError, decode_raw, list_local_files, plan_reads, read_task_rows


def _rows(tasks):
    return [row for task in tasks for row in read_task_rows(task.__dict__)]


def test_chunked_plain_file_keeps_line_numbers(tmp_path: Path):
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps({"i": i, "pad": "x" * 50}) + "\n" for i in range(1, 501)))
    tasks = plan_reads([str(path)], chunk_bytes=1000)
    assert len(tasks) > 10
    rows = _rows(tasks)
    assert [row["line"] for row in rows] == list(range(1, 501))
    assert [json.loads(row["raw"])["i"] for row in rows] == list(range(1, 501))


def test_gzip_parquet_and_bad_lines(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    gz = tmp_path / "a.jsonl.gz"
    with gzip.open(gz, "wt") as handle:
        handle.write('{"a": 1}\n{not json\n\n{"a": 3}\n')
    rows = _rows(plan_reads([str(gz)]))
    assert [r["line"] for r in rows] == [1, 2, 4]
    assert decode_raw(rows[1])[1].startswith("malformed JSON")
    pq.write_table(pa.table({"a": [1, 2]}), tmp_path / "b.parquet")
    rows = _rows(plan_reads([str(tmp_path / "b.parquet")]))
    assert [(r["line"], json.loads(r["raw"])) for r in rows] == [(1, {"a": 1}), (2, {"a": 2})]
    bad = tmp_path / "c.jsonl"
    bad.write_bytes(b'{"a": 1}\n\xff\xfe\n')
    rows = _rows(plan_reads([str(bad)]))
    assert rows[1]["line"] == 2 and "not UTF-8" in rows[1]["error"]


def test_missing_paths_and_empty_folders(tmp_path: Path):
    with pytest.raises(DataSourceError, match="no such file or folder"):
        list_local_files(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataSourceError, match="holds no"):
        list_local_files(str(tmp_path))
