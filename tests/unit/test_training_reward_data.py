"""Reward data: clear errors for bad folders, rejects with reasons, left truncation, collation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from steerray.training import reward_data as rd

GOOD = {"text": "<extra_id_1>Assistant\nhi\n<extra_id_2>", "label": [-100] * 4 + [3, 3, 4, 2, 1]}


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_missing_folder_and_files_are_named(tmp_path):
    with pytest.raises(rd.RewardDataError, match="does not exist"):
        rd.locate_split_files(tmp_path / "nope", rd.REGRESSION)
    _write(tmp_path / "preference" / "train.jsonl", [{"chosen": "a", "rejected": "b", "strength": 1}])
    with pytest.raises(rd.RewardDataError, match=r"regression/train.jsonl not found.*loss=scaled_bt"):
        rd.locate_split_files(tmp_path, rd.REGRESSION)
    train, val = rd.locate_split_files(tmp_path, rd.PREFERENCE)
    assert train.name == "train.jsonl" and val is None


def test_rows_are_validated_with_reasons(tmp_path):
    path = tmp_path / "regression" / "train.jsonl"
    _write(path, [GOOD, "{not json", {"text": "x", "label": [1, 2, 3]}, {"text": "", "label": GOOD["label"]},
                  {"text": "x", "label": [-100] * 9}, {"text": "x", "label": [1] * 8 + ["a"]}, GOOD])
    split = rd.read_split(path, rd.REGRESSION, ["helpfulness", "verbosity"])
    assert split.total == 7 and len(split.rows) == 2
    assert split.rows[0] == {"line": 1, "text": GOOD["text"], "label": [3.0, 1.0]}  # the chosen columns only
    reasons = {r["line"]: r["reason"] for r in split.rejects}
    assert "malformed JSON" in reasons[2]
    assert "has 3 values, expected 9" in reasons[3]
    assert "'text' is missing or empty" in reasons[4]
    assert "no label for the trained attributes" in reasons[5]
    assert "not a finite number" in reasons[6]


def test_a_file_of_bad_rows_fails_naming_it(tmp_path):
    path = tmp_path / "regression" / "train.jsonl"
    _write(path, [{"text": "x", "label": [1, 2, 3, 4, 5]}] * 3)
    with pytest.raises(rd.RewardDataError, match=r"train.jsonl: no usable row among 3.*has 5 values"):
        rd.read_split(path, rd.REGRESSION, ["quality"])
    _write(tmp_path / "empty.jsonl", [])
    assert rd.read_split(tmp_path / "empty.jsonl", rd.REGRESSION, ["quality"], allow_empty=True).rows == []


def test_preference_rows(tmp_path):
    path = tmp_path / "preference" / "train.jsonl"
    _write(path, [{"id": "p1", "chosen": "a", "rejected": "b", "strength": 2},
                  {"id": "p2", "chosen": "a", "rejected": "b", "strength": -1},
                  {"id": "p3", "chosen": "", "rejected": "b", "strength": 1}])
    split = rd.read_split(path, rd.PREFERENCE, ["helpfulness"])
    assert [r["id"] for r in split.rows] == ["p1"]
    assert "'strength' must be a number >= 0" in split.rejects[0]["reason"]


def test_left_truncation_keeps_the_read_out_token(tiny_model_dir):
    long_text = "word " * 200 + "<extra_id_2>"
    batch = rd.tokenize_regression_batch({"line": np.array([1, 2]), "text": np.array([long_text, "hi there"]),
                                          "label": np.array([[1.0] * 9, [2.0] * 9])},
                                         tokenizer=tiny_model_dir, max_length=16)
    tok = rd.cached_tokenizer(tiny_model_dir)
    full = tok(long_text, add_special_tokens=False)["input_ids"]
    assert batch["truncated"].tolist() == [True, False]
    assert batch["input_ids"][0].tolist() == full[-16:] and batch["length"][0] == 16
    assert tok.decode(batch["input_ids"][0]).endswith("<extra_id_2>")


def test_collate_pairs_stacks_chosen_then_rejected():
    rows = {"chosen_ids": [np.array([1, 2, 3]), np.array([4])], "rejected_ids": [np.array([5]), np.array([6, 7])],
            "strength": [2.0, 0.0], "line": [1, 2]}
    batch = rd.collate_pairs(rows, [0, 1], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0], [5, 0, 0], [6, 7, 0]]
    assert batch["pairs"] == 2 and batch["strength"].tolist() == [2.0, 0.0] and batch["tokens"] == 7


def test_collect_rows_orders_by_source_line():
    batches = [{"line": np.array([3, 1]), "x": np.array(["c", "a"])}, {"line": np.array([2]), "x": np.array(["b"])}]
    assert rd.collect_rows(batches)["x"] == ["a", "b", "c"]
