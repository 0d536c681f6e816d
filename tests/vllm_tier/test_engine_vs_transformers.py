"""steerray's vLLM engine against its transformers engine on the demo model (SmolLM2-135M), both fp32.

Same prompts, greedy: the answers must be the same text with the same token counts and finish reasons.
Prompts: SteerLM ones at two verbosity settings (the untuned SmolLM2 answers them in a few tokens, mostly
by starting a new turn: the marker the server cuts) and the same questions in SmolLM2's own ChatML
format, where it writes full answers that run into the 48-token budget.
"""

from __future__ import annotations

import asyncio

import pytest
from vllm_support import VLLM_TIER

from steerray.attributes import steering_label
from steerray.serving.engines import SamplingParams, TransformersEngine
from steerray.serving.factory import make_engine
from steerray.serving.openai_schema import stop_strings
from steerray.templates import generation_prompt

pytestmark = VLLM_TIER
QUESTIONS = ["Why is the sky blue?", "Give me three tips for learning a new language.",
             "What is a prime number?", "Write a haiku about autumn."]
STEERLM = [generation_prompt([{"role": "user", "content": q}], steering_label({"verbosity": v}))
           for q in QUESTIONS for v in (0, 4)]
CHATML = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in QUESTIONS]
GREEDY = SamplingParams(max_tokens=48, stop=stop_strings())


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()  # one loop for the module: vLLM binds its output task to the first one
    yield loop
    loop.run_until_complete(loop.shutdown_asyncgens())
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
    """All prompts at once, as concurrent requests (both engines batch them)."""
    async def gather() -> list:
        return await asyncio.gather(*(engine.complete(engine.encode(p), params) for p in prompts))

    return loop.run_until_complete(gather())


def test_greedy_answers_equal_the_transformers_engine_token_for_token(loop, engines):
    transformers, vllm = engines
    assert (vllm.kind, vllm.stats()["dtype"], vllm.stats()["device"]) == ("vllm", "float32", "cpu")
    assert vllm.encode(STEERLM[0]) == transformers.encode(STEERLM[0])  # the same prompt tokens, no BOS
    expected = answer_all(loop, transformers, STEERLM + CHATML)
    got = answer_all(loop, vllm, STEERLM + CHATML)
    assert [g.text for g in got] == [e.text for e in expected]
    assert [(g.completion_tokens, g.finish_reason) for g in got] == [
        (e.completion_tokens, e.finish_reason) for e in expected]
    chatml = expected[len(STEERLM):]
    print("ChatML answer tokens:", [e.completion_tokens for e in chatml])
    assert all(e.completion_tokens >= 20 and len(e.text) > 60 for e in chatml)  # real answers were compared


def test_streaming_gives_the_same_text_in_pieces(loop, engines):
    _, vllm = engines

    async def stream(prompt: str) -> list[str]:
        return [event.delta async for event in vllm.stream(vllm.encode(prompt), GREEDY)]

    (whole,) = answer_all(loop, vllm, CHATML[:1])
    pieces = loop.run_until_complete(stream(CHATML[0]))
    assert "".join(pieces) == whole.text and len([p for p in pieces if p]) > 5
