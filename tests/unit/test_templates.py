"""The SteerLM template: reward prompts byte-identical to NeMo's converter, SFT spans, serving prompts."""

import pytest

from steerray.templates import (
    LABEL_START,
    SYSTEM_PROMPT,
    ConversationError,
    generation_prompt,
    make_conversation,
    render_sft,
    reward_prompts,
    strip_generation,
    validate_conversation,
)

TWO_TURN = make_conversation([("User", "Hi?", None), ("Assistant", "Hello!", "helpfulness:4")], system="SYS")


def test_reward_prompt_matches_the_reference_converter():
    prompts = reward_prompts(TWO_TURN)
    # The converter always uses the constant system prompt, whatever the record says.
    expected = (f"<extra_id_0>System\n{SYSTEM_PROMPT}\n<extra_id_1>User\nHi?\n"
                "<extra_id_1>Assistant\nHello!\n<extra_id_2>")
    assert [p.text for p in prompts] == [expected]
    assert prompts[0].turn_index == 1


def test_annotator_rule_includes_empty_labels_but_not_missing_ones():
    conv = {"conversations": [{"from": "User", "value": "a", "label": None},
                              {"from": "Assistant", "value": "b", "label": ""},
                              {"from": "User", "value": "c", "label": None},
                              {"from": "Assistant", "value": "d"}], "mask": "User"}
    assert reward_prompts(conv) == []
    assert [p.turn_index for p in reward_prompts(conv, labelled_only=False)] == [1]


def test_render_sft_two_turn_spans():
    rendered = render_sft(TWO_TURN)
    assert rendered.text == ("<extra_id_0>System\nSYS\n<extra_id_1>User\nHi?\n"
                             "<extra_id_1>Assistant\n<extra_id_2>helpfulness:4\nHello!\n<extra_id_1>")
    trained = [rendered.text[s:e] for s, e in rendered.trained]
    assert trained == ["Hello!\n", "<extra_id_1>"]


def test_render_sft_multi_turn_trains_turn_end_markers():
    conv = make_conversation([("User", "Q1", None), ("Assistant", "A1", "verbosity:1"),
                              ("User", "Q2", None), ("Assistant", "A2", None)])
    rendered = render_sft(conv)
    trained = [rendered.text[s:e] for s, e in rendered.trained]
    # A1, the <extra_id_1> that opens User turn 2 (ends A1), A2, and the final marker.
    assert trained == ["A1\n", "<extra_id_1>", "A2\n", "<extra_id_1>"]
    assert "<extra_id_2>verbosity:1\nA1" in rendered.text
    assert rendered.text.count(LABEL_START) == 1  # a None label adds no label line


def test_validation_names_the_turn():
    with pytest.raises(ConversationError, match="turn 1: bad label"):
        validate_conversation(make_conversation([("User", "q", None), ("Assistant", "a", "wit:3")]))
    with pytest.raises(ConversationError, match="turn 0: expected a User turn"):
        validate_conversation(make_conversation([("Assistant", "a", None)]))
    with pytest.raises(ConversationError, match="no Assistant turn"):
        validate_conversation(make_conversation([("User", "q", None)]))
    with pytest.raises(ConversationError, match="empty"):
        validate_conversation(make_conversation([("User", "q", None), ("Assistant", " ", None)]))


def test_generation_prompt_and_strip():
    prompt = generation_prompt([{"role": "user", "content": "Hi"}], "verbosity:0")
    assert prompt.endswith("<extra_id_1>User\nHi\n<extra_id_1>Assistant\n<extra_id_2>verbosity:0\n")
    with pytest.raises(ConversationError):
        generation_prompt([{"role": "assistant", "content": "x"}], "verbosity:0")
    assert strip_generation("Answer here\n<extra_id_1>User\nmore") == "Answer here"
    assert strip_generation("text<extra_id_2>junk") == "text"
