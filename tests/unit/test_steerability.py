"""The steerability grid and its statistics: exact values on hand-made rows, no models, no Ray."""

from __future__ import annotations

import math

import pytest

from steerray.attributes import ATTRIBUTES, parse_label
from steerray.eval.steerability import (
    build_grid,
    example_answers,
    held_out_prompts,
    pearson,
    rank_average,
    slope,
    spearman,
    summarize_grid,
)
from steerray.templates import make_conversation


def test_rank_average_shares_ties():
    assert rank_average([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_spearman_and_pearson_exact():
    assert spearman([0, 1, 2, 3], [1, 5, 9, 100]) == pytest.approx(1.0)
    assert spearman([0, 1, 2, 3], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Hand-computed: ranks x = 1..4, y ranks [1, 3, 2, 4] -> rho = 1 - 6*sum(d^2)/(n(n^2-1)) = 1 - 6*2/60 = 0.8
    assert spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None  # constant side: undefined, not 0
    assert spearman([1], [2]) is None
    assert slope([0, 2, 4], [1, 2, 3]) == pytest.approx(0.5)


def test_held_out_prompts_first_user_turns_deduplicated():
    convs = [make_conversation([("User", "A?", None), ("Assistant", "a", "verbosity:1")]),
             make_conversation([("User", "A?", None), ("Assistant", "b", "verbosity:2")]),
             make_conversation([("User", "B?", None), ("Assistant", "b", None), ("User", "more", None),
                                ("Assistant", "c", None)]),
             make_conversation([("User", "C?", None), ("Assistant", "c", None)])]
    assert held_out_prompts(convs, 10) == ["A?", "B?", "C?"]
    assert held_out_prompts(convs, 2) == ["A?", "B?"]


def test_build_grid_steers_one_attribute_others_default():
    rows = build_grid(["p0", "p1"], ["verbosity", "humor"], [0, 4])
    assert len(rows) == 2 * 2 * 2
    assert [r["id"] for r in rows] == list(range(8))
    first = rows[0]
    assert (first["prompt_id"], first["attribute"], first["value"]) == (0, "verbosity", 0)
    label = parse_label(first["label"])
    assert label["verbosity"] == 0 and label["quality"] == 4 and label["humor"] == 0 and label["helpfulness"] == 4
    humor4 = [r for r in rows if r["attribute"] == "humor" and r["value"] == 4][0]
    assert parse_label(humor4["label"])["humor"] == 4 and parse_label(humor4["label"])["verbosity"] == 4
    assert rows[-1]["messages"] == [{"role": "user", "content": "p1"}]
    assert first["label"].startswith("quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4")


def _scored(attribute: str, value: int, prompt: int, measured: float, tokens: int) -> dict:
    scores = {name: 2.0 for name in ATTRIBUTES}
    scores[attribute] = measured
    return {"attribute": attribute, "value": value, "prompt_id": prompt, "scores": scores,
            "completion_tokens": tokens, "answer": f"answer {attribute} {value}"}


def test_summarize_grid_exact_numbers():
    rows = []
    for prompt in (0, 1):
        for value in (0, 2, 4):
            # verbosity is steered perfectly (measured = value + prompt offset), length grows with it
            rows.append(_scored("verbosity", value, prompt, value + 0.5 * prompt, 10 + 10 * value))
            # humor does not move at all: measured is the same for every value
            rows.append(_scored("humor", value, prompt, 1.0 + prompt, 20))
    summary = summarize_grid(rows, list(ATTRIBUTES))
    verb = summary["per_attribute"]["verbosity"]
    # Hand-computed: requested ranks [1.5,3.5,5.5]*2, measured ranks [1,3,5,2,4,6] -> 16 / sqrt(16 * 17.5).
    # Below 1 only because of the prompt offset; per prompt it is exactly 1.
    assert verb["spearman"] == pytest.approx(16 / math.sqrt(16 * 17.5))
    assert verb["per_prompt_spearman"] == pytest.approx(1.0)
    assert verb["mean_by_value"] == {"0": 0.25, "2": 2.25, "4": 4.25}
    assert verb["shift"] == pytest.approx(4.0)
    assert verb["slope"] == pytest.approx(1.0)
    assert verb["n"] == 6
    humor = summary["per_attribute"]["humor"]
    assert humor["shift"] == pytest.approx(0.0)
    assert humor["per_prompt_spearman"] is None  # constant within each prompt: undefined, reported as such
    length = summary["verbosity_length"]
    assert length["spearman"] == pytest.approx(1.0)
    assert length["mean_by_value"] == {"0": 10.0, "2": 30.0, "4": 50.0}
    # cross matrix: steering verbosity moves verbosity, and no other output (constant 2.0 -> undefined)
    assert summary["cross"]["verbosity"]["verbosity"] == pytest.approx(verb["spearman"])
    assert summary["cross"]["verbosity"]["quality"] is None
    assert summary["rows"] == 12
    assert humor["spearman"] == pytest.approx(0.0)  # measured depends on the prompt only
    assert summary["mean_spearman"] == pytest.approx(16 / math.sqrt(16 * 17.5) / 2)


def test_summarize_grid_attribute_the_reward_model_lacks():
    rows = [_scored("humor", v, 0, float(v), 5) for v in (0, 4)]
    summary = summarize_grid(rows, ["verbosity", "quality"])
    assert summary["per_attribute"]["humor"]["spearman"] is None
    assert "does not predict" in summary["per_attribute"]["humor"]["note"]
    assert summary["mean_spearman"] is None
    assert "verbosity_length" not in summary


def test_example_answers_sorted_by_value():
    rows = [_scored("verbosity", v, 0, float(v), 3 * v) for v in (4, 0, 2)] + [_scored("verbosity", 0, 1, 0.0, 1)]
    examples = example_answers(rows, "verbosity", prompt_id=0)
    assert [e["value"] for e in examples] == [0, 2, 4]
    assert examples[2]["tokens"] == 12 and math.isclose(examples[2]["measured"], 4.0)
