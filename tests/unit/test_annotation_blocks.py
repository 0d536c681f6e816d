"""`annotate_block` without Ray: a block read from its byte range and scored equals scoring its rows directly."""

from __future__ import annotations

import json

import numpy as np

from steerray.annotation import annotate_block, plan_blocks, score_conversations
from steerray.attributes import ATTRIBUTES
from steerray.templates import make_conversation


def predict(texts):
    """Deterministic predictions from each text's length (plain Python, no model)."""
    rows = [[(len(t) % 5) + k / 10 for k in range(len(ATTRIBUTES))] for t in texts]
    return np.asarray(rows, dtype=np.float32), [False] * len(texts)


def conversation(i: int) -> dict:
    return make_conversation(
        [("User", f"question {i}", None), ("Assistant", "answer " * (i + 1), "quality:2")]
    )


def test_blocks_read_their_own_lines_and_score_like_the_whole_file(tmp_path):
    lines = [json.dumps(conversation(i)) for i in range(7)]
    lines.insert(2, "{broken")  # line 3: a reject in block 0
    lines.insert(4, "")  # line 5: blank, not a row
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    plan = plan_blocks(path, block_size=3)
    assert [b.rows for b in plan.blocks] == [3, 2, 3]
    results = [
        annotate_block(
            {
                "split": b.split,
                "block": b.index,
                "file": b.task.file,
                "start": b.task.start,
                "end": b.task.end,
                "first_line": b.task.first_line,
            },
            predict,
            ATTRIBUTES,
        )
        for b in plan.blocks
    ]
    assert [(r.split, r.index) for r in results] == [
        ("train.jsonl", 0),
        ("train.jsonl", 1),
        ("train.jsonl", 2),
    ]
    expected = [
        json.dumps(r.conversation, ensure_ascii=False)
        for r in score_conversations([conversation(i) for i in range(7)], predict, ATTRIBUTES)
    ]
    assert [row for r in results for row in r.rows] == expected  # every row once, in line order
    assert [len(r.rows) for r in results] == [2, 2, 3] and results[0].turns == 2
    assert [(rej["line"], rej["reason"][:14]) for rej in results[0].rejects] == [(3, "malformed JSON")]
    assert results[1].rejects == [] and results[2].rejects == []


def test_an_empty_block_gives_an_empty_result(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    block = plan_blocks(path, block_size=5).blocks[0]
    result = annotate_block(
        {"split": "val.jsonl", "block": 0, "file": str(path), "start": 0, "end": -1, "first_line": 1},
        predict,
        ATTRIBUTES,
    )
    assert block.rows == 0 and (result.rows, result.rejects, result.turns) == ([], [], 0)
