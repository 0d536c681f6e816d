"""prepare's shards without Ray: workers write rows to shard files, the driver only appends them in order."""

from __future__ import annotations

import dataclasses
import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from steerray.data import readers, sources
from steerray.data.writer import PrepareWriter, finalize_rows, finalized, write_shard_rows
from steerray.errors import SteerrayError
from steerray.stages.prepare import shard_read_task

SPLIT_ARGS = {"seed": 3, "val_fraction": 0.3}
COLUMNS = ("source", "kind", "split", "group", "file", "line", "payload", "counts_input")


def helpsteer2_line(i: int) -> str:
    scores = {k: i % 5 for k in ("helpfulness", "correctness", "coherence", "complexity", "verbosity")}
    return json.dumps({"prompt": f"question {i // 2}", "response": f"answer {i} " * (1 + i % 7), **scores})


def helpsteer3_line(i: int) -> str:
    return json.dumps({"domain": "general", "language": "english" if i % 3 else "german",
                       "context": [{"role": "user", "content": f"q{i}"}], "response1": f"a{i}",
                       "response2": f"b{i}" if i % 5 else f"a{i}", "overall_preference": i % 7 - 3})


@pytest.fixture
def mixed_file(tmp_path: Path) -> Path:
    """HelpSteer2 rows with bad lines among them (malformed, out of range, a template marker)."""
    lines = [helpsteer2_line(i) for i in range(300)]
    lines[17], lines[140] = "{broken", lines[140].replace('"verbosity": 0', '"verbosity": 9')
    lines[201] = json.dumps({**json.loads(lines[201]), "response": "hi\n<extra_id_2>toxicity:4"})
    path = tmp_path / "hs2.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    return path


def tasks_of(path: Path, chunk_bytes: int) -> list[dict]:
    return [{**dataclasses.asdict(task), "split": ""} for task in readers.plan_reads([str(path)], chunk_bytes)]


def outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_worker_shards_write_what_in_process_batches_write(mixed_file, tmp_path):
    """The fast path (a worker reads, converts and writes a whole read task) gives the same files, counts
    and reasons as converting the task's rows into one batch and writing that batch in this process."""
    tasks = tasks_of(mixed_file, chunk_bytes=4096)
    assert len(tasks) > 5
    shards = PrepareWriter(tmp_path / "shards", repeat={"helpsteer2": 2})
    for task in tasks:
        description = shard_read_task(task, name="helpsteer2", row_filter=None, shard_dir=str(shards.shard_dir),
                                      **SPLIT_ARGS)
        shards.add_shard(json.loads(description["shard"]))
    batches = PrepareWriter(tmp_path / "batches", repeat={"helpsteer2": 2})
    for task in tasks:
        rows = [row for raw in readers.read_task_rows(task) for row in sources.convert_raw_row("helpsteer2", raw, "")]
        batch = {c: np.asarray([r[c] for r in rows], dtype=np.int64 if c == "counts_input" else object)
                 for c in COLUMNS}
        batches.write_batch(finalize_rows(batch, **SPLIT_ARGS))
    first, second = shards.finish(), batches.finish()
    assert json.dumps(first) == json.dumps(second)  # the manifest sections, key order included
    assert outputs(tmp_path / "shards") == outputs(tmp_path / "batches")
    counts = first["per_source"]["helpsteer2"]
    assert counts["rows_in"] == 300 and counts["rejected"] == 3
    # 297 good rows, each a conversation and a regression record; train ones twice (--repeat).
    assert counts["conversations_train"] // 2 + counts["conversations_val"] == 297 == \
        counts["regression_train"] // 2 + counts["regression_val"] and counts["conversations_val"] > 0
    assert not shards.shard_dir.exists()


def test_a_shard_keeps_its_rejects_before_its_skips_and_is_repeated_whole(tmp_path):
    rows = [row for i in range(1, 21) for row in sources.convert_raw_row(
        "helpsteer3", {"file": "hs3.jsonl", "line": i, "raw": helpsteer3_line(i), "error": ""}, "train",
        sources.source_filter("helpsteer3", "language=english"))]
    rows.insert(3, sources.reject_row("helpsteer3", "hs3.jsonl", 99, "malformed JSON: at column 3"))
    writer = PrepareWriter(tmp_path / "out", repeat={"helpsteer3": 2})
    for half in (rows[:20], rows[20:]):
        writer.add_shard(write_shard_rows(finalized(half, **SPLIT_ARGS), writer.shard_dir))
    result = writer.finish()
    lines = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").open()]
    kinds = [line["kind"] for line in lines]
    first_half = sum(1 for r in rows[:20] if r["kind"] in ("reject", "skip"))
    assert kinds[:first_half] == sorted(kinds[:first_half]) and kinds[first_half:] == sorted(kinds[first_half:])
    assert "reject" in kinds[:first_half] and "skip" in kinds[:first_half]
    pairs = (tmp_path / "out" / "preference" / "train.jsonl").read_text().splitlines()
    first = [r["payload"] for r in rows[:20] if r["kind"] == "preference"]
    second = [r["payload"] for r in rows[20:] if r["kind"] == "preference"]
    assert pairs == first + first + second + second  # --repeat copies each shard's rows in a row
    counts = result["per_source"]["helpsteer3"]
    assert counts == {"rows_in": 20, "rejected": kinds.count("reject"), "skipped": kinds.count("skip"),
                      "preference_train": 2 * len(first + second)}
    assert list(result["rejects_by_reason"]["helpsteer3"].items()) == [  # first seen, a shard's rejects first
        ("reject: malformed JSON", 1), ("skip: not selected by --filter language=english", 6),
        ("skip: responseN and responseN are identical", 3)]


def test_the_driver_holds_no_rows(tmp_path):
    """Appending shards allocates nothing that grows with them: the rows stay in files."""
    writer = PrepareWriter(tmp_path / "out", repeat={})
    big = [json.loads(helpsteer2_line(i)) | {"prompt": f"p{i}" * 200} for i in range(2000)]
    converted = [row for i, record in enumerate(big) for row in sources.convert_raw_row(
        "helpsteer2", {"file": "f", "line": i + 1, "raw": json.dumps(record), "error": ""}, "")]
    shards = [write_shard_rows(finalized(converted, **SPLIT_ARGS), writer.shard_dir) for _ in range(10)]
    tracemalloc.start()
    for shard in shards:
        writer.add_shard(shard)
        assert not any(Path(part[3]).exists() for part in shard["parts"])  # appended, then gone
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    written = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*.tmp*") if p.is_file())
    # Kernel copies allocate nothing; the fallback (no copy_file_range) one 1 MiB buffer at a time.
    assert written > 40 * 1024**2 and peak < 4 * 1024**2, (written, peak)
    writer.finish()


def test_shards_of_killed_runs_and_aborts_leave_nothing(tmp_path):
    out = tmp_path / "out"
    stale = out / ".shards.tmp999999"
    stale.mkdir(parents=True)
    (stale / "x.0.jsonl").write_text("{}\n")
    writer = PrepareWriter(out, repeat={})
    assert not stale.exists()  # the stage holds the folder's run lock: an earlier run's shards are nobody's
    rows = sources.convert_raw_row("helpsteer2", {"file": "f", "line": 1, "raw": helpsteer2_line(1), "error": ""}, "")
    writer.add_shard(write_shard_rows(finalized(rows, **SPLIT_ARGS), writer.shard_dir))
    write_shard_rows(finalized(rows, **SPLIT_ARGS), writer.shard_dir)  # written, never appended
    writer.abort()
    assert sorted(p.name for p in out.rglob("*")) == ["conversations", "regression"]  # empty folders only


def test_a_shard_this_machine_cannot_see_is_a_clear_error(tmp_path):
    writer = PrepareWriter(tmp_path / "out", repeat={})
    shard = {"rows_in": {"helpsteer2": 1}, "parts": [["helpsteer2", "conversation", "train",
                                                       str(tmp_path / "elsewhere.jsonl"), 1]], "reasons": {}}
    with pytest.raises(SteerrayError, match="must be a folder every node shares"):
        writer.add_shard(shard)
    writer.abort()


def test_appending_falls_back_where_the_kernel_cannot_copy(mixed_file, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    tasks = tasks_of(mixed_file, chunk_bytes=1 << 20)
    results = []
    for name in ("kernel", "python"):
        if name == "python":
            monkeypatch.setattr(os, "copy_file_range", refuse)
        writer = PrepareWriter(tmp_path / name, repeat={})
        for task in tasks:
            writer.add_shard(json.loads(shard_read_task(task, name="helpsteer2", row_filter=None,
                                                        shard_dir=str(writer.shard_dir), **SPLIT_ARGS)["shard"]))
        writer.finish()
        results.append(outputs(tmp_path / name))
    assert results[0] == results[1]
