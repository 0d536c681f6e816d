"""The OpenAI contract of `serve` without a server: parsing, steering, prompts, stop handling, shapes."""

from __future__ import annotations

import json
import random

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from steerray.attributes import DEFAULT_STEERING
from steerray.serving import openai_schema as oa
from steerray.templates import SYSTEM_PROMPT

REFERENCE_LABEL = ("quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,coherence:4,"
                   "complexity:4,verbosity:4")


def chat(**fields) -> oa.ChatCompletionRequest:
    return oa.parse_request(oa.ChatCompletionRequest,
                            {"messages": [{"role": "user", "content": "Hi"}], **fields})


def refused(raw, model=oa.ChatCompletionRequest) -> oa.RequestError:
    with pytest.raises(oa.RequestError) as info:
        request = oa.parse_request(model, raw)
        if model is oa.ChatCompletionRequest:
            label, _ = oa.resolve_steering(request.steering)
            oa.render_messages(request.messages, label)
            request.stop_list()
    assert 400 <= info.value.status < 500
    return info.value


def test_what_the_openai_client_sends_parses_with_openai_defaults():
    request = oa.parse_request(oa.ChatCompletionRequest, json.dumps({
        "model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": [{"type": "text", "text": "Hel"},
                                                                {"type": "text", "text": "lo"}]}],
        "stream": True, "stream_options": {"include_usage": True}, "n": 2, "seed": 7, "stop": "END",
        "max_completion_tokens": 12, "user": "someone", "presence_penalty": 0, "extra_unknown": 1,
        "steering": {"verbosity": 0}}).encode())
    assert (request.n, request.seed, request.stream, request.stream_options.include_usage) == (2, 7, True, True)
    assert request.stop_list() == ["END"] and request.requested_max_tokens() == 12
    assert (request.temperature, request.top_p) == (1.0, 1.0)  # OpenAI's defaults
    assert request.messages[1].text() == "Hello"


@pytest.mark.parametrize(("raw", "param", "code"), [
    (b"{not json", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_json"),
    ({"messages": []}, "messages", "empty_messages"),
    ({}, "messages", "invalid_request"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 9}, "n", "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 2.5}, "temperature", "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens", "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": 2**70}, "seed", "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "min_tokens": -1}, "min_tokens", "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "min_tokens": "8"}, "min_tokens", "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop", None),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools", "unsupported"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs", "unsupported"),
    ({"messages": [{"role": "user", "content": "x"}], "steering": {"verbosty": 1}}, "steering", "invalid_steering"),
    ({"messages": [{"role": "user", "content": "x"}], "steering": {"verbosity": 5}}, "steering", "invalid_steering"),
    ({"messages": [{"role": "user", "content": "x"}], "steering": {"verbosity": 2.5}}, "steering", "invalid_steering"),
    ({"messages": [{"role": "user", "content": "x"}], "steering": {"verbosity": "4"}}, "steering", "invalid_steering"),
    ({"messages": [{"role": "user", "content": "x"}], "steering": {"verbosity": True}}, "steering", "invalid_steering"),
    ({"messages": [{"role": "user", "content": "x"}], "steering": [1, 2]}, "steering", "invalid_request"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages", "invalid_messages"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages",
     "invalid_messages"),
    ({"messages": [{"role": "user", "content": "  "}]}, "messages", "invalid_messages"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "late"}]}, "messages", None),
    ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "messages", "empty_messages"),
])
def test_bad_requests_are_4xx_naming_the_field(raw, param, code):
    err = refused(raw)
    assert err.param == param and err.code == code
    assert err.message  # a sentence a person can act on


def test_steering_defaults_are_the_reference_and_overrides_land_in_the_label():
    label, values = oa.resolve_steering(None)
    assert label == REFERENCE_LABEL and values == DEFAULT_STEERING
    label, values = oa.resolve_steering({"verbosity": 0, "humor": 3.0})
    assert label == REFERENCE_LABEL.replace("humor:0", "humor:3").replace("verbosity:4", "verbosity:0")
    assert values["verbosity"] == 0 and values["humor"] == 3
    # a model fine-tuned on labels over a subset gets that subset; other attributes are a 400 on steering
    label, values = oa.resolve_steering({"verbosity": 0}, ("humor", "verbosity"))
    assert label == "humor:0,verbosity:0" and values == {"humor": 0, "verbosity": 0}
    with pytest.raises(oa.RequestError) as err:
        oa.resolve_steering({"complexity": 1}, ("humor", "verbosity"))
    assert err.value.status == 400 and err.value.param == "steering" and "cannot steer 'complexity'" in err.value.message


def test_prompt_is_the_steerlm_template_with_the_label_on_every_assistant_turn():
    request = chat(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
                   steering={"verbosity": 1})
    label, _ = oa.resolve_steering(request.steering)
    prompt = oa.render_messages(request.messages, label)
    assert prompt == ("<extra_id_0>System\nBe brief.\n<extra_id_1>User\nHi\n"
                      f"<extra_id_1>Assistant\n<extra_id_2>{label}\nHello.\n"
                      f"<extra_id_1>User\nBye\n<extra_id_1>Assistant\n<extra_id_2>{label}\n")
    assert "verbosity:1" in label
    native = oa.parse_request(oa.GenerateRequest, {"prompt": "Hi"})
    assert oa.render_generate(native, REFERENCE_LABEL) == (
        f"<extra_id_0>System\n{SYSTEM_PROMPT}\n<extra_id_1>User\nHi\n"
        f"<extra_id_1>Assistant\n<extra_id_2>{REFERENCE_LABEL}\n")
    assert native.temperature == 0.0  # the native route is greedy unless asked
    for body in ({}, {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, {"prompt": " "}):
        with pytest.raises(oa.RequestError):
            oa.render_generate(oa.parse_request(oa.GenerateRequest, body), REFERENCE_LABEL)


def test_min_tokens_may_not_exceed_max_tokens():
    oa.check_min_tokens(16, 16)
    with pytest.raises(oa.RequestError) as info:
        oa.check_min_tokens(17, 16)
    assert (info.value.status, info.value.param, info.value.message) == (
        400, "min_tokens", "min_tokens (17) is over max_tokens (16)")


def test_answer_budget_refuses_what_does_not_fit_the_context_window():
    assert oa.answer_budget(100, None, 4096, 256) == 256
    assert oa.answer_budget(4000, None, 4096, 256) == 96  # no max_tokens: what is left
    assert oa.answer_budget(100, 3996, 4096, 256) == 3996
    with pytest.raises(oa.RequestError) as info:
        oa.answer_budget(100, 3997, 4096, 256)
    assert (info.value.param, info.value.code) == ("max_tokens", "context_length_exceeded")
    with pytest.raises(oa.RequestError) as info:
        oa.answer_budget(4096, None, 4096, 256)
    assert (info.value.param, info.value.code) == ("messages", "context_length_exceeded")


def stream_through(raw: str, stops, pieces: list[int]) -> tuple[list[str], bool]:
    """Feed ``raw`` to a filter in pieces of the given sizes, as tokens arrive; return deltas and stopped."""
    text_filter, deltas, end = oa.StopTextFilter(stops), [], 0
    for size in pieces:
        end = min(len(raw), end + size)
        delta, stopped = text_filter.update(raw[:end])
        deltas.append(delta)
        if stopped:
            return deltas, True
    deltas.append(text_filter.finish(raw))
    return deltas, False


def test_stream_filter_never_leaks_a_marker_and_matches_the_final_text():
    stops = oa.stop_strings(["END"])
    assert stops[:3] == ("<extra_id_1>", "<extra_id_0>", "<extra_id_2>") and stops[-1] == "END"
    raw = "Paris is big.\n<extra_id_1>User\nmore"
    deltas, stopped = stream_through(raw, stops, [1] * len(raw))
    assert stopped and "".join(deltas) == "Paris is big." == oa.final_text(raw, stops)
    assert not any("<" in d or "\n" in d for d in deltas)
    # Something that only looks like a marker's beginning is released once it is clearly not one.
    raw = "a <extra> b\n\nc"
    deltas, stopped = stream_through(raw, stops, [1] * len(raw))
    assert not stopped and "".join(deltas) == raw
    # A user stop string ends the answer too, without being shown.
    deltas, stopped = stream_through("one two END three", stops, [3, 3, 3, 3, 3, 3])
    assert stopped and "".join(deltas) == "one two "
    # A half-decoded character is held back until it is whole.
    text_filter = oa.StopTextFilter(stops)
    assert text_filter.update("caf\ufffd") == ("caf", False)
    assert text_filter.update("café") == ("é", False)


def test_stream_filter_property_random_texts_and_chunkings():
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\n", "<", "extra", "_id_", "1", "2", ">", "<extra_id_1>", "<extra_id_2>", "E", "ND"]
    stops = oa.stop_strings(["END"])
    for _ in range(500):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        pieces = [rng.randint(1, 6) for _ in range(len(raw) + 1)]
        deltas, _ = stream_through(raw, stops, pieces)
        assert "".join(deltas) == oa.final_text(raw, stops), raw
        assert not any(stop in "".join(deltas) for stop in stops)


def test_response_shapes_validate_against_the_openai_client_types():
    body = oa.completion_body("chatcmpl-1", "m", [("Paris.", "stop"), ("Rome", "length")], 12, 7,
                              DEFAULT_STEERING, created=1)
    parsed = ChatCompletion.model_validate(body)
    assert [c.message.content for c in parsed.choices] == ["Paris.", "Rome"]
    assert parsed.usage.total_tokens == 19 and parsed.choices[1].finish_reason == "length"
    chunk = ChatCompletionChunk.model_validate(oa.chunk_body("chatcmpl-1", "m", 1, 0, {"content": "Pa"}))
    assert chunk.choices[0].delta.content == "Pa"
    last = ChatCompletionChunk.model_validate(oa.usage_chunk("chatcmpl-1", "m", 1, 12, 7))
    assert last.choices == [] and last.usage.completion_tokens == 7
    assert oa.sse({"a": 1}) == 'data: {"a": 1}\n\n' and oa.SSE_DONE == "data: [DONE]\n\n"
