"""The label probe's arithmetic on a real (tiny) causal LM: exact log-probabilities, the right answers."""

from __future__ import annotations

import numpy as np
import pytest

from steerray.eval.probe import answer_logprobs, probe_items, probe_policy
from steerray.templates import generation_prompt, make_conversation


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from steerray.models.loading import load_causal_lm, load_tokenizer

    return load_causal_lm(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)


def test_batched_answer_logprobs_equal_one_prompt_at_a_time(tiny):
    import torch

    model, tokenizer = tiny
    prompts = [generation_prompt([{"role": "user", "content": "Hi there"}], f"verbosity:{v}") for v in (0, 4)]
    prompts.append(generation_prompt([{"role": "user", "content": "A much longer question " * 5}], "humor:2"))
    batched = answer_logprobs(model, tokenizer, prompts, "Hello! How can I help?")
    for prompt, got in zip(prompts, batched, strict=True):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer("Hello! How can I help?\n<extra_id_1>", add_special_tokens=False)["input_ids"]
        full = torch.tensor([ids + answer])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=full).logits.float()[0, :-1], -1)
        expected = sum(float(logprobs[len(ids) - 1 + k, token]) for k, token in enumerate(answer))
        assert got == pytest.approx(expected, abs=1e-3)


def test_probe_items_take_the_last_labelled_answer_and_its_context():
    conversations = [
        make_conversation([("User", "q1", None), ("Assistant", "a1", "humor:2,verbosity:1"),
                           ("User", "q2", None), ("Assistant", "a2", "quality:3,humor:4,verbosity:0")]),
        make_conversation([("User", "q", None), ("Assistant", "unlabelled", None)]),
    ]
    [item] = probe_items(conversations, ["humor", "verbosity"], limit=5)
    assert item.answer == "a2" and item.label == {"humor": 4, "verbosity": 0}
    assert [m["content"] for m in item.messages] == ["q1", "a1", "q2"]


def test_probe_reports_per_attribute_gain_best_rate_and_chance(tiny):
    model, tokenizer = tiny
    conversations = [make_conversation([("User", f"Question {i}?", None),
                                        ("Assistant", f"Answer {i}.", f"humor:{2 * (i % 3)},verbosity:{i % 5}")])
                     for i in range(4)]
    result = probe_policy(model, tokenizer, probe_items(conversations, None, 4), ["humor", "verbosity"],
                          [0, 2, 4])
    assert result["humor"]["n"] == 4 and result["verbosity"]["n"] == 4
    assert result["humor"]["chance"] == pytest.approx(1 / 3)  # the true humor values are among 0, 2, 4
    assert result["verbosity"]["chance"] == pytest.approx(np.mean([1 / 3, 1 / 4, 1 / 3, 1 / 4]))
    assert 0 <= result["humor"]["true_is_best"] <= 1 and np.isfinite(result["humor"]["mean_gain_nats"])
