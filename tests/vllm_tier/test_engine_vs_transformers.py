"""steerray's vLLM engine against its transformers engine on the demo model (SmolLM2-135M), both fp32.

Same SteerLM prompts (two verbosity settings, so the label differs), greedy: the answers must be the
same text with the same token counts, token for token; streaming must give the same text as a whole.
"""

from __future__ import annotations

import asyncio

import pytest
from vllm_support import VLLM_TIER

from steerray.attributes import steering_label
from steerray.serving.engines import SamplingParams, TransformersEngine, make_engine
from steerray.serving.openai_schema import stop_strings
from steerray.templates import generation_prompt

pytestmark = VLLM_TIER
QUESTIONS = ["Why is the sky blue?", "Give me three tips for learning a new language.", "What is a prime number?",
             "Write a haiku about autumn."]
PROMPTS = [generation_prompt([{"role": "user", "content": q}], steering_label({"verbosity": v}))
           for q in QUESTIONS for v in (0, 4)]
GREEDY = SamplingParams(max_tokens=48, stop=stop_strings())


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()  # one loop for the module: vLLM binds its output task to the first one
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engines(loop):
    from steerray.models.loading import SMOLLM2_ALIAS, resolve_model

    model = resolve_model(SMOLLM2_ALIAS)
    transformers = TransformersEngine(model, max_batch_size=8, batch_wait_ms=50, precision="fp32", threads=2)
    vllm = make_engine("vllm", model, precision="fp32", max_batch_size=8, max_model_len=1024)
    yield transformers, vllm
    transformers.shutdown()
    vllm.shutdown()


def answer_all(loop, engine, prompts, params=GREEDY) -> list:
    return loop.run_until_complete(asyncio.gather(*(engine.complete(engine.encode(p), params) for p in prompts)))


def test_greedy_answers_equal_the_transformers_engine_token_for_token(loop, engines):
    transformers, vllm = engines
    assert (vllm.kind, vllm.stats()["dtype"], vllm.stats()["device"]) == ("vllm", "float32", "cpu")
    assert vllm.encode(PROMPTS[0]) == transformers.encode(PROMPTS[0])  # the same prompt tokens, no BOS
    expected = answer_all(loop, transformers, PROMPTS)
    got = answer_all(loop, vllm, PROMPTS)
    assert [g.text for g in got] == [e.text for e in expected]
    assert [(g.completion_tokens, g.finish_reason) for g in got] == [
        (e.completion_tokens, e.finish_reason) for e in expected]
    assert len({e.text for e in expected}) > len(QUESTIONS)  # the label changed some answers


def test_streaming_gives_the_same_text_in_pieces(loop, engines):
    _, vllm = engines

    async def stream(prompt: str) -> list[str]:
        return [event.delta async for event in vllm.stream(vllm.encode(prompt), GREEDY)]

    (whole,) = answer_all(loop, vllm, PROMPTS[1:2])
    pieces = loop.run_until_complete(stream(PROMPTS[1]))
    assert "".join(pieces) == whole.text and len([p for p in pieces if p]) > 5
