"""Bootstrapping's pure parts: prompts, selection rules, relabelled training rows, score statistics."""

from __future__ import annotations

import json

import pytest

from steerray.attributes import ATTRIBUTES, parse_label
from steerray.bootstrapping import (
    new_conversation,
    round_stats,
    sample_rows,
    score_movement,
    select_samples,
    training_prompts,
    training_rows,
)
from steerray.templates import make_conversation, validate_conversation


def _convs():
    return [
        make_conversation([("User", "Q1", None), ("Assistant", "A1", "quality:2")]),
        make_conversation([("User", "Q1", None), ("Assistant", "A1 other", "quality:3")]),  # same context
        make_conversation([("User", "Q2", None), ("Assistant", "A2", "quality:1"), ("User", "more?", None),
                           ("Assistant", "A2b", "quality:4")]),
        {"conversations": [{"from": "Assistant", "value": "orphan", "label": None}]},
    ]


def test_training_prompts_contexts():
    prompts = training_prompts(_convs())
    assert [p["prompt_id"] for p in prompts] == [0, 1]
    assert prompts[0]["messages"] == [{"role": "user", "content": "Q1"}]
    assert prompts[1]["messages"] == [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"},
                                      {"role": "user", "content": "more?"}]
    assert prompts[1]["context"][1]["label"] == "quality:1"  # earlier answers keep their labels
    assert len(training_prompts(_convs(), max_prompts=1)) == 1


def test_sample_rows_ids_stable():
    rows = sample_rows(training_prompts(_convs()), 3, "quality:4")
    assert [r["id"] for r in rows] == list(range(6))
    assert [(r["prompt_id"], r["sample"]) for r in rows][:4] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert json.loads(rows[3]["messages"])[0]["content"] == "Q2"


def _samples():
    # prompt 0: scores 1, 3, 3 (tie between samples 1 and 2); prompt 1: 0.5, 4; prompt 2: skipped (no scores)
    out = []
    for pid, qualities in ((0, [1.0, 3.0, 3.0]), (1, [0.5, 4.0])):
        for k, q in enumerate(qualities):
            scores = {name: 1.0 for name in ATTRIBUTES}
            scores["quality"] = q
            out.append({"prompt_id": pid, "sample": k, "answer": f"ans {pid}.{k}", "label": "quality:4",
                        "scores": scores, "completion_tokens": 10 * (k + 1)})
    out.append({"prompt_id": 2, "sample": 0, "answer": "", "label": "quality:4", "scores": {}, "completion_tokens": 0})
    return out


def test_select_top1_threshold_weight():
    weights = {"quality": 1.0}
    top1 = select_samples(_samples(), weights, "top1")
    assert [(s["prompt_id"], s["sample"], c, score) for s, c, score in top1] == [(0, 1, 1, 3.0), (1, 1, 1, 4.0)]
    thr = select_samples(_samples(), weights, "threshold", threshold=3.0)
    assert [(s["prompt_id"], s["sample"]) for s, _, _ in thr] == [(0, 1), (0, 2), (1, 1)]
    weighted = select_samples(_samples(), weights, "weight", weight_temperature=1.0)
    # prompt 0: softmax([1,3,3]) = [0.0634, 0.4683, 0.4683] x 3 -> copies [0, 1, 1]
    # prompt 1: softmax([0.5, 4]) = [0.0293, 0.9707] x 2 -> copies [0, 2]
    assert [(s["prompt_id"], s["sample"], c) for s, c, _ in weighted] == [(0, 1, 1), (0, 2, 1), (1, 1, 2)]
    # a mixed score: the weighted sum of two outputs
    mixed = select_samples(_samples(), {"quality": 1.0, "verbosity": -2.0}, "top1")
    assert mixed[0][2] == pytest.approx(3.0 - 2.0)
    with pytest.raises(ValueError):
        select_samples(_samples(), weights, "bogus")


def test_training_rows_relabel_and_copies():
    prompts = {p["prompt_id"]: p for p in training_prompts(_convs())}
    kept = select_samples(_samples(), {"quality": 1.0}, "weight")
    rows = training_rows(kept, prompts, "predicted", list(ATTRIBUTES))
    assert len(rows) == 4  # copies 1 + 1 + 2
    for row in rows:
        validate_conversation(row)
    last = rows[-1]["conversations"][-1]
    assert last["value"] == "ans 1.1"
    assert parse_label(last["label"])["quality"] == 4 and parse_label(last["label"])["verbosity"] == 1
    assert rows[-1]["conversations"][:3] == prompts[1]["context"]
    steer = training_rows(kept, prompts, "steering", list(ATTRIBUTES))
    assert steer[0]["conversations"][-1]["label"] == "quality:4"


def test_empty_answers_are_not_trained_on():
    prompts = {0: {"context": [{"from": "User", "value": "Q", "label": None}]}}
    sample = {"prompt_id": 0, "sample": 0, "answer": "  ", "label": "quality:4", "scores": {"quality": 1.0}}
    assert training_rows([(sample, 1, 1.0)], prompts, "steering", ["quality"]) == []
    assert new_conversation(prompts[0], "x", "quality:1")["conversations"][-1] == {
        "from": "Assistant", "value": "x", "label": "quality:1"}


def test_round_stats_and_movement():
    weights = {"quality": 1.0}
    kept = select_samples(_samples(), weights, "top1")
    stats = round_stats(_samples(), weights, kept)
    assert stats["prompts"] == 2 and stats["samples"] == 5 and stats["skipped"] == 1
    assert stats["mean_score"] == pytest.approx((1 + 3 + 3 + 0.5 + 4) / 5)
    assert stats["mean_best"] == pytest.approx((3 + 4) / 2)
    assert stats["kept"] == 2 and stats["mean_kept"] == pytest.approx(3.5)
    assert stats["per_attribute"]["verbosity"] == pytest.approx(1.0)
    only0 = round_stats(_samples(), weights, prompt_ids={0})
    assert only0["prompts"] == 1 and only0["mean_best"] == pytest.approx(3.0)
    move = score_movement(only0, stats)
    assert move["mean_best"] == pytest.approx(0.5)
    assert move["per_attribute"]["verbosity"] == pytest.approx(0.0)


def test_a_sample_cut_at_the_cap_is_kept_only_where_its_prompt_has_no_complete_one():
    """Fine-tuned as a whole answer, a cut sample teaches the policy to end its turn mid-sentence."""
    samples = _samples()
    samples[1]["finish_reason"] = samples[2]["finish_reason"] = "length"  # prompt 0's two best (3.0) were cut
    samples[3]["finish_reason"] = samples[4]["finish_reason"] = "length"  # prompt 1: every sample cut
    weights = {"quality": 1.0}
    for selection in ("top1", "threshold", "weight"):
        by_prompt: dict[int, list[int]] = {}
        for sample, _, _ in select_samples(samples, weights, selection, threshold=0.0):
            by_prompt.setdefault(int(sample["prompt_id"]), []).append(int(sample["sample"]))
        assert by_prompt[0] == [0], selection  # the complete 1.0 wins over the cut 3.0s
        assert by_prompt[1], selection  # no complete sample: the cut ones still compete
    stats = round_stats(samples, weights, select_samples(samples, weights, "top1"))
    assert stats["cut_at_cap"] == 4 and stats["kept"] == 2 and stats["kept_cut_at_cap"] == 1
