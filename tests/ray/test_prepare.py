"""`steerray prepare` end to end on a local Ray: real samples, other schemas, bad input, re-runs."""

import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from steerray.artifacts import read_jsonl, read_manifest
from steerray.cli import app

pytestmark = pytest.mark.ray
runner = CliRunner()


def prepare(*args: str):
    result = runner.invoke(app, ["prepare", *args])
    return result


def test_real_samples(ray_session, shared_data, tmp_path: Path):
    out = tmp_path / "p"
    result = prepare("--source", f"helpsteer2={shared_data}/helpsteer2/helpsteer2_validation_sample_hfschema.jsonl",
                     "--source", f"oasst1={shared_data}/oasst1/oasst1_en_validation.jsonl", "--out", str(out))
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out, "prepare")
    oasst, hs2 = manifest["per_source"]["oasst1"], manifest["per_source"]["helpsteer2"]
    assert oasst["rows_in"] == 2022 and hs2["rows_in"] == 8
    assert oasst["conversations_train"] + oasst["conversations_val"] == 979
    assert oasst["skipped"] == 40 and oasst["rejected"] == 3
    assert hs2["regression_train"] + hs2.get("regression_val", 0) == 8
    regression = read_jsonl(out / "regression" / "train.jsonl") + read_jsonl(out / "regression" / "val.jsonl")
    # The first HelpSteer2 row is the one in NeMo-Aligner's own regression test fixture.
    fixture = next(r for r in regression if "explain master slave replication nsql\n<extra_id_1>Assistant\nIn the "
                   "context of NoSQL" in r["text"])
    assert fixture["label"] == [-100, -100, -100, -100, 4, 4, 4, 3, 2]
    assert fixture["text"].startswith("<extra_id_0>System\nA chat between a curious user") and \
        fixture["text"].endswith("\n<extra_id_2>")
    rejects = read_jsonl(out / "rejects.jsonl")
    assert len(rejects) == 43 and all(r["file"].endswith(".jsonl") and r["line"] > 0 and r["reason"] for r in rejects)
    # Tree-level split: no tree has conversations in both splits.
    import pyarrow.parquet as pq
    assert pq.read_table(out / "regression" / "train.parquet").num_rows == sum(
        1 for _ in open(out / "regression" / "train.jsonl"))


def test_other_schemas_and_bad_rows(ray_session, tmp_path: Path):
    hs1 = tmp_path / "helpsteer"
    hs1.mkdir()
    rows = [{"prompt": f"p{i}", "response": f"r{i}", "helpfulness": i % 5, "correctness": 3, "coherence": 4,
             "complexity": 1, "verbosity": 2} for i in range(20)]
    with gzip.open(hs1 / "train.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows[:16])
        handle.write("{broken\n")
        handle.write(json.dumps({**rows[0], "verbosity": 9}) + "\n")
    with gzip.open(hs1 / "validation.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows[16:])
    pref = tmp_path / "preference.jsonl"
    pref.write_text("".join(json.dumps({"split": "train" if i < 3 else "validation", "prompt": f"q{i}",
                                        "response_1": "a", "response_2": "b", "preference_strength": i - 2,
                                        "preference_statement": "", "preference_elaboration": ""}) + "\n"
                            for i in range(5)))
    out = tmp_path / "p"
    result = prepare("--source", f"helpsteer={hs1}", "--source", f"helpsteer2-preference={pref}",
                     "--repeat", "helpsteer=2", "--out", str(out))
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out, "prepare")
    hs = manifest["per_source"]["helpsteer"]
    # Folder splits come from file names; --repeat doubles train rows only.
    assert hs["rows_in"] == 22 and hs["regression_train"] == 32 and hs["regression_val"] == 4 and hs["rejected"] == 2
    reasons = {r["reason"].split(":")[0] for r in read_jsonl(out / "rejects.jsonl")}
    assert reasons == {"malformed JSON", "column 'verbosity' = 9 is outside 0-4"}
    train_pairs = read_jsonl(out / "preference" / "train.jsonl")
    assert [p["strength"] for p in train_pairs] == [2.0, 1.0, 0.0]
    assert len(read_jsonl(out / "preference" / "val.jsonl")) == 2


def test_rerun_is_a_no_op_and_errors_are_clear(ray_session, tmp_path: Path):
    out = tmp_path / "demo"
    assert prepare("--source", "demo", "--out", str(out), "demo_conversations=50").exit_code == 0
    first = (out / "conversations" / "train.jsonl").read_text()
    stamp = (out / "manifest.json").stat().st_mtime_ns
    result = prepare("--source", "demo", "--out", str(out), "demo_conversations=50")
    assert result.exit_code == 0, result.output
    assert "is finished with this config and these inputs; nothing to do" in result.output
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    assert (out / "conversations" / "train.jsonl").read_text() == first

    missing = prepare("--source", f"oasst1={tmp_path}/nope.jsonl", "--out", str(tmp_path / "x"))
    assert missing.exit_code != 0 and "nope.jsonl: no such file or folder" in missing.output
    unknown = prepare("--source", "oasst9", "--out", str(tmp_path / "x"))
    assert unknown.exit_code != 0 and "unknown source 'oasst9'" in unknown.output
    offline = prepare("--source", "helpsteer2", "--out", str(tmp_path / "x"))
    assert offline.exit_code != 0 and "HF_HUB_OFFLINE" in offline.output and "local copy" in offline.output
    bad_key = prepare("--source", "demo", "--out", str(tmp_path / "x"), "demo_conversationz=5")
    assert bad_key.exit_code != 0 and "demo_conversationz: unknown key" in bad_key.output


def test_workers_write_what_converting_in_process_writes(ray_session, shared_data, tmp_path: Path):
    """Workers read, convert and write each read task (the driver only appends their shards in order): the
    outputs are byte for byte those of converting each task here and writing it as one batch."""
    import dataclasses

    import numpy as np

    from steerray.data import readers, sources
    from steerray.data.writer import PrepareWriter, finalize_rows

    sample = (shared_data / "helpsteer2" / "helpsteer2_validation_sample_hfschema.jsonl").read_text().splitlines()
    folder = tmp_path / "hs2"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(sample[:5] + ["{broken", json.dumps({"prompt": "p"})]) + "\n")
    (folder / "b.jsonl").write_text("\n".join(sample[5:]) + "\n")
    out = tmp_path / "p"
    result = prepare("--source", f"helpsteer2={folder}", "--repeat", "helpsteer2=2", "--val-fraction", "0.4",
                     "--out", str(out))
    assert result.exit_code == 0, result.output
    expected = PrepareWriter(tmp_path / "expected", repeat={"helpsteer2": 2})
    columns = ("source", "kind", "split", "group", "file", "line", "payload", "counts_input")
    for task in readers.plan_reads(sorted(str(f) for f in folder.iterdir())):
        rows = [row for raw in readers.read_task_rows(dataclasses.asdict(task))
                for row in sources.convert_raw_row("helpsteer2", raw, "")]
        batch = {c: np.asarray([r[c] for r in rows], dtype=np.int64 if c == "counts_input" else object)
                 for c in columns}
        expected.write_batch(finalize_rows(batch, seed=10, val_fraction=0.4))
    sections = expected.finish()
    manifest = read_manifest(out, "prepare")
    assert manifest["outputs"] == sections["outputs"] and "regression/train.parquet" in sections["outputs"]
    for relative in sections["outputs"]:
        assert (out / relative).read_bytes() == (tmp_path / "expected" / relative).read_bytes(), relative
    assert manifest["per_source"] == sections["per_source"] and manifest["per_source"]["helpsteer2"]["rejected"] == 2
    assert manifest["rejects_by_reason"] == sections["rejects_by_reason"]
    assert not list(out.glob(".shards*"))  # the workers' shard files are gone with the run
