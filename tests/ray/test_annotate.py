"""`annotate` on the session's Ray: labels equal the in-process model's, rejects counted, a re-run does nothing.

Killed runs and their resumes: tests/faults/test_annotate_kill.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from steerray.annotation import load_predictor, score_conversations
from steerray.artifacts import read_manifest
from steerray.stages import annotate as annotate_stage
from steerray.templates import make_conversation

pytestmark = pytest.mark.ray
BLOCK_SIZE = 5


def sample_conversations(count: int, seed: int) -> list[dict]:
    """Short conversations with every label situation the annotator meets."""
    records = []
    for i in range(count):
        k = seed * 1000 + i
        labels = ["quality:3,toxicity:0", "", None, "helpfulness:2"]
        turns = [("User", f"Question {k}: how do I make {k % 7} cups of tea?", None),
                 ("Assistant", f"Boil water, add {k % 5} leaves, wait. " * (1 + k % 3), labels[k % 4])]
        if k % 3 == 0:
            turns += [("User", "And then?", None), ("Assistant", f"Drink it ({k}).", "quality:1")]
        record = make_conversation(turns)
        if k % 10 == 9:
            del record["conversations"][1]["label"]  # an unlabelled OASST message: not scored
        records.append(record)
    return records


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """A prepare-style folder: conversations/{train,val}.jsonl with malformed rows and a blank line."""
    root = tmp_path_factory.mktemp("annotate_in")
    folder = root / "conversations"
    folder.mkdir()
    train = [json.dumps(r) for r in sample_conversations(23, seed=1)]
    train.insert(4, '{"conversations": [{"from": "User"')  # malformed JSON, line 5
    train.insert(9, "")  # blank line 10: not a row
    train.insert(12, json.dumps({"conversations": [{"from": "User", "value": "alone", "label": None}]}))
    val = [json.dumps(r) for r in sample_conversations(6, seed=2)]
    (folder / "train.jsonl").write_text("\n".join(train) + "\n")
    (folder / "val.jsonl").write_text("\n".join(val))  # no trailing newline
    (root / "rejects.jsonl").write_text("")  # prepare's rejects: must not be annotated
    return root, {"train.jsonl": train, "val.jsonl": val}


def run_annotate(out: Path, input_dir: Path, model: str, **extra) -> dict:
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump({"model": model, "input": str(input_dir), "out": str(out),
                                      "block_size": BLOCK_SIZE, "batch_size": 8, **extra}))
    return annotate_stage.main(["--config", str(config)])  # the stage's Ray job entry point


@pytest.fixture(scope="module")
def full_run(ray_session, inputs, tiny_reward_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("annotate_out") / "full"
    summary = run_annotate(out, inputs[0], tiny_reward_dir)
    assert (summary["rows"], summary["rejects"]) == (29, 2)
    return out


def test_annotate_equals_in_process_scores_and_counts_rejects(full_run, inputs, tiny_reward_dir, capsys):
    _, lines = inputs
    predictor = load_predictor(tiny_reward_dir)
    for split, raw in lines.items():
        good = [json.loads(line) for line in raw if line and "Question" in line]
        expected = [r.conversation for r in score_conversations(good, predictor, predictor.attributes)]
        got = [json.loads(line) for line in (full_run / split).read_text().splitlines()]
        assert got == expected, split  # same rows, same order, same labels
    # config.yaml: the resolved config (`--config out/config.yaml` runs it again); .lock: the run lock, kept free
    assert sorted(p.name for p in full_run.iterdir()) == [".lock", "config.yaml", "manifest.json", "rejects.jsonl",
                                                          "train.jsonl", "val.jsonl"]
    rejects = [json.loads(line) for line in (full_run / "rejects.jsonl").read_text().splitlines()]
    assert [(Path(r["file"]).name, r["line"]) for r in rejects] == [("train.jsonl", 5), ("train.jsonl", 13)]
    assert rejects[0]["reason"].startswith("malformed JSON")
    assert rejects[1]["reason"] == "invalid conversation: conversation has no Assistant turn"
    manifest = read_manifest(full_run, "annotate")
    scored = sum(1 for r in sample_conversations(23, 1) + sample_conversations(6, 2)
                 for t in r["conversations"] if t["from"] == "Assistant" and t.get("label") is not None)
    assert manifest["totals"] == {"input_rows": 31, "rows": 29, "rejects": 2, "turns_scored": scored, "truncated": 0}
    assert manifest["outputs"]["val.jsonl"]["rows"] == 6
    # Same command again: nothing to do, nothing rewritten, the first run's summary back.
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in full_run.iterdir() if p.name != ".lock"}
    capsys.readouterr()
    again = run_annotate(full_run, inputs[0], tiny_reward_dir)
    assert "is finished with this config and these inputs; nothing to do" in capsys.readouterr().err
    assert again == manifest["summary"] and again["rows"] == 29
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in full_run.iterdir() if p.name != ".lock"} == before

