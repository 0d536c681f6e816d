"""Annotation without Ray: which turns are scored, label strings, keep-human-labels, blocks and parts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from steerray.annotation import (
    OK,
    REJECT,
    ModelPredictor,
    annotate_rows,
    block_result,
    copy_part_rows,
    load_predictor,
    plan_blocks,
    plan_scoring,
    read_part_header,
    score_conversations,
    scoring_prompts,
    turn_label,
    write_part,
)
from steerray.attributes import ATTRIBUTES, HELPSTEER_ATTRIBUTES
from steerray.data.readers import read_task_rows
from steerray.templates import LABEL_START, SYSTEM_PROMPT, make_conversation, reward_prompts


def conversation(*labels: object, missing_label_at: int | None = None) -> dict:
    """User/Assistant pairs; the i-th Assistant turn gets labels[i]; optionally drop one label key."""
    turns = []
    for i, label in enumerate(labels):
        turns += [("User", f"question {i}", None), ("Assistant", f"answer {i}", label)]
    record = make_conversation(turns)
    if missing_label_at is not None:
        del record["conversations"][missing_label_at]["label"]
    return record


def fixed_predictor(values_by_text: dict[str, list[float]] | None = None, default: float = 2.0):
    """A predictor in plain Python: each text's predictions are looked up (or derived from its length)."""
    calls = []

    def predict(texts):
        calls.append(list(texts))
        rows = [values_by_text.get(t) if values_by_text and t in values_by_text else
                [default + (len(t) % 7) / 10] * len(ATTRIBUTES) for t in texts]
        return np.asarray(rows, dtype=np.float32), [False] * len(texts)

    predict.calls = calls
    return predict


def test_scored_turns_follow_the_annotator_rule():
    record = conversation("quality:3", "", None, "helpfulness:1", missing_label_at=7)
    # Turn 1 labelled, turn 3 "" (scored: label key present), turn 5 None (not), turn 7 no key (not).
    assert [p.turn_index for p in scoring_prompts(record)] == [1, 3]
    assert [p.turn_index for p in scoring_prompts(record, all_assistant_turns=True)] == [1, 3, 5, 7]
    # Same text as the regression converter's prompt for that turn: one prompt builder.
    assert scoring_prompts(record)[0].text == reward_prompts(record, labelled_only=True)[0].text
    assert scoring_prompts(record)[1].text.startswith(f"<extra_id_0>System\n{SYSTEM_PROMPT}\n")
    assert scoring_prompts(record)[1].text.endswith(f"<extra_id_1>Assistant\nanswer 1\n{LABEL_START}")


def test_turn_label_clips_and_rounds_half_to_even():
    predictions = [2.5, 3.5, -0.7, 7.2, 0.5, 1.5, 3.49, 4.0, 2.51]
    assert turn_label(predictions, ATTRIBUTES) == (
        "quality:2,toxicity:4,humor:0,creativity:4,helpfulness:0,correctness:2,coherence:3,complexity:4,verbosity:3")


def test_keep_human_labels_keeps_human_values_and_fills_the_rest():
    predictions = [1.0] * 9
    assert turn_label(predictions, ATTRIBUTES, "quality:4,humor:2", keep_human_labels=True) == (
        "quality:4,toxicity:1,humor:2,creativity:1,helpfulness:1,correctness:1,coherence:1,complexity:1,verbosity:1")
    # Without the flag the reference overwrites; an empty human label keeps nothing.
    assert turn_label(predictions, ATTRIBUTES, "quality:4", keep_human_labels=False).startswith("quality:1,")
    assert turn_label(predictions, ATTRIBUTES, "", keep_human_labels=True) == turn_label(predictions, ATTRIBUTES)
    # A HelpSteer-only model: a human OASST value the model does not predict is kept, in canonical order.
    assert turn_label([3.0] * 5, HELPSTEER_ATTRIBUTES, "quality:1", keep_human_labels=True) == (
        "quality:1,helpfulness:3,correctness:3,coherence:3,complexity:3,verbosity:3")


def test_score_conversations_writes_labels_into_the_scored_turns_only():
    records = [conversation("quality:3", None), conversation("", missing_label_at=1)]
    original = json.loads(json.dumps(records))
    texts = plan_scoring(records).texts
    assert len(texts) == 1  # record 1's only assistant turn has no label key
    predict = fixed_predictor({texts[0]: [0.4, 1.6, 2.5, 3.5, 4.4, -1, 2, 3, 1]})
    results = score_conversations(records, predict, ATTRIBUTES)
    assert predict.calls == [texts]  # one call for the whole batch
    assert records == original  # inputs are not modified
    turns = results[0].conversation["conversations"]
    assert turns[1]["label"] == (
        "quality:0,toxicity:2,humor:2,creativity:4,helpfulness:4,correctness:0,coherence:2,complexity:3,verbosity:1")
    assert turns[3]["label"] is None and results[1].conversation == records[1]
    assert [t.turn_index for t in results[0].turns] == [1] and results[1].turns == []
    assert results[0].turns[0].predictions == pytest.approx([0.4, 1.6, 2.5, 3.5, 4.4, -1, 2, 3, 1])


def test_model_predictor_matches_the_reward_model_and_truncates_from_the_left(tiny_reward_dir):
    import torch

    from steerray.models.reward import encode_reward_texts, reward_forward

    predictor = load_predictor(tiny_reward_dir, batch_size=4, max_length=128, precision="fp32")
    assert isinstance(predictor, ModelPredictor) and predictor.attributes == list(ATTRIBUTES)
    records = [conversation("quality:1", "helpfulness:2"), conversation(""),
               make_conversation([("User", "tell me a long story " * 30, None), ("Assistant", "Once.", "")])]
    results = score_conversations(records, predictor, predictor.attributes)
    texts = plan_scoring(records).texts
    with torch.no_grad():  # one row at a time: no padding anywhere
        expected = np.concatenate([reward_forward(predictor.model, b.input_ids, b.attention_mask).numpy()
                                   for b in (encode_reward_texts(predictor.tokenizer, [t], 128) for t in texts)])
    got = np.asarray([t.predictions for r in results for t in r.turns])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [t.truncated for r in results for t in r.turns] == [False, False, False, True]
    assert results[2].turns[0].label == turn_label(expected[3], ATTRIBUTES)


def write_lines(path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def test_plan_blocks_cover_every_line_once(tmp_path):
    lines = [b'{"a": 1}\n', b"\n", b'{"a": 2}\n', b"\xff\xfe not utf8\n", b"   \n", b'{"a": 3}\n', b'{"a": 4}']
    path = tmp_path / "train.jsonl"
    write_lines(path, lines)
    plan = plan_blocks(path, block_size=3)
    assert (plan.lines, plan.rows, plan.split) == (7, 5, "train.jsonl")
    assert [(b.index, b.task.first_line, b.rows) for b in plan.blocks] == [(0, 1, 2), (1, 4, 2), (2, 7, 1)]
    seen = []
    for block in plan.blocks:
        rows = list(read_task_rows({"file": str(path), "start": block.task.start, "end": block.task.end,
                                    "first_line": block.task.first_line}))
        assert len(rows) == block.rows
        seen += [(row["line"], row["raw"], bool(row["error"])) for row in rows]
    assert seen == [(1, '{"a": 1}', False), (3, '{"a": 2}', False), (4, "", True), (6, '{"a": 3}', False),
                    (7, '{"a": 4}', False)]
    assert plan_blocks(path, block_size=100).blocks[0].task.end == -1
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert [(b.rows, b.task.first_line) for b in plan_blocks(empty, 3).blocks] == [(0, 1)]


def raw_batch(rows: list[tuple[int, str, str]]) -> dict:
    return {"split": ["train.jsonl"] * len(rows), "block": [0] * len(rows), "file": ["in/train.jsonl"] * len(rows),
            "line": [r[0] for r in rows], "raw": [r[1] for r in rows], "error": [r[2] for r in rows]}


def test_annotate_rows_rejects_bad_rows_with_file_line_and_reason():
    good = json.dumps(conversation("quality:2"))
    no_assistant = json.dumps({"conversations": [{"from": "User", "value": "hi", "label": None}]})
    batch = raw_batch([(1, good, ""), (2, '{"conversations": [', ""), (3, no_assistant, ""),
                       (4, "", "not UTF-8 text: invalid start byte"), (5, json.dumps(conversation("quality:9")), "")])
    out = annotate_rows(batch, fixed_predictor(default=1.0), ATTRIBUTES)
    assert list(out["status"]) == [OK, REJECT, REJECT, REJECT, REJECT]
    assert list(out["line"]) == [1, 2, 3, 4, 5] and list(out["turns"]) == [1, 0, 0, 0, 0]
    annotated = json.loads(out["out"][0])
    assert annotated["conversations"][1]["label"].startswith("quality:1,")
    rejects = [json.loads(r) for r in out["out"][1:]]
    assert [(r["file"], r["line"]) for r in rejects] == [("in/train.jsonl", n) for n in (2, 3, 4, 5)]
    assert rejects[0]["reason"].startswith("malformed JSON")
    assert rejects[1]["reason"] == "invalid conversation: conversation has no Assistant turn"
    assert rejects[2]["reason"].startswith("not UTF-8")
    assert "outside 0..4" in rejects[3]["reason"] and rejects[3]["row"]["conversations"][1]["label"] == "quality:9"


def test_part_files_round_trip_in_line_order(tmp_path):
    rows = [{"line": 9, "status": OK, "out": '{"b": 2}', "turns": 2, "truncated": 1},
            {"line": 3, "status": OK, "out": '{"a": 1}', "turns": 1, "truncated": 0},
            {"line": 5, "status": REJECT, "out": json.dumps({"line": 5, "reason": "bad"}), "turns": 0, "truncated": 0}]
    result = block_result("train.jsonl", 4, rows)
    path = tmp_path / "parts" / "000004.part.jsonl"
    write_part(path, result)
    assert read_part_header(path) == {"split": "train.jsonl", "block": 4, "rows": 2, "turns": 3, "truncated": 1,
                                      "rejects": [{"line": 5, "reason": "bad"}]}
    out = tmp_path / "merged.jsonl"
    with open(out, "w", encoding="utf-8") as handle:
        assert copy_part_rows(path, handle) == 2
    assert out.read_text() == '{"a": 1}\n{"b": 2}\n'
    assert [p.name for p in path.parent.iterdir()] == ["000004.part.jsonl"]  # no temp file left behind


def test_default_max_length_prefers_what_the_reward_model_was_trained_with(tmp_path):
    from types import SimpleNamespace

    from steerray.annotation import default_max_length

    folder = tmp_path / "reward" / "model"
    folder.mkdir(parents=True)
    tokenizer, config = SimpleNamespace(model_max_length=8192), SimpleNamespace(max_position_embeddings=2048)
    assert default_max_length(tokenizer, config, folder) == 4096  # capped tokenizer limit
    assert default_max_length(SimpleNamespace(model_max_length=10**30), config, folder) == 2048
    (tmp_path / "reward" / "manifest.json").write_text(json.dumps({"config": {"model": {"max_length": 384}}}))
    assert default_max_length(tokenizer, config, folder) == 384
