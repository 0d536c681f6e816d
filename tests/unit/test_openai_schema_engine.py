"""The transformers engine without Ray: exact answers, batching that joins running batches, seeds, limits."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
from serve_support import LONG_ANSWER, SHORT_ANSWER, steerable_model_dir, steered_prompt

from steerray.models.generation import generate_batch
from steerray.serving.engines import (
    EngineError,
    SamplingParams,
    TransformersEngine,
    choose_engine,
    vllm_available,
)
from steerray.serving.factory import make_engine
from steerray.serving.openai_schema import stop_strings

STOPS = stop_strings()


@pytest.fixture(scope="module")
def engine():
    engine = make_engine("transformers", steerable_model_dir(), max_batch_size=4, batch_wait_ms=30)
    yield engine
    engine.shutdown()


async def collect(engine, prompt: str, started: asyncio.Event | None = None, wait_for: asyncio.Event | None = None,
                  **params) -> tuple[list[str], object]:
    if wait_for is not None:
        await wait_for.wait()
    deltas, last = [], None
    async for event in engine.stream(engine.encode(prompt), SamplingParams(**{"max_tokens": 40, "stop": STOPS,
                                                                              **params})):
        deltas.append(event.delta)
        last = event
        if started is not None:
            started.set()
    return deltas, last


def test_engine_answers_exactly_as_plain_generate(engine):
    assert isinstance(engine, TransformersEngine)
    assert choose_engine("auto") == ("vllm" if vllm_available() else "transformers")
    prompts = [steered_prompt(0), steered_prompt(4)]
    reference = generate_batch(engine.model, engine.tokenizer, prompts, max_new_tokens=40)
    assert [r.text for r in reference] == [SHORT_ANSWER, LONG_ANSWER]

    async def both():
        return await asyncio.gather(*(collect(engine, p) for p in prompts))

    (short, short_end), (long, long_end) = asyncio.run(both())
    assert "".join(short) == SHORT_ANSWER and "".join(long) == LONG_ANSWER
    assert len([d for d in long if d]) > 5  # streamed token by token, not in one piece
    assert (short_end.finish_reason, long_end.finish_reason) == ("stop", "stop")
    assert (short_end.completion_tokens, long_end.completion_tokens) == (
        reference[0].completion_tokens, reference[1].completion_tokens)


def test_late_requests_join_the_running_batch_and_get_the_same_answers(engine):
    before = engine.stats()

    async def staggered():
        # A long runner (no stop strings, 60 tokens) keeps a batch decoding; five requests arrive once it
        # has started, more than the 3 free rows of max_batch_size=4, so some join and some wait.
        running = asyncio.Event()
        runner = collect(engine, steered_prompt(4), started=running, stop=("\x00",), max_tokens=60)
        late = [collect(engine, steered_prompt(v), wait_for=running) for v in (0, 4, 0, 4, 0)]
        return await asyncio.gather(runner, *late)

    (runner, runner_end), *results = asyncio.run(staggered())
    assert runner_end.finish_reason == "length" and "".join(runner).startswith(LONG_ANSWER + "\n<extra_id_1>")
    assert ["".join(deltas) for deltas, _ in results] == [SHORT_ANSWER, LONG_ANSWER, SHORT_ANSWER, LONG_ANSWER,
                                                          SHORT_ANSWER]
    after = engine.stats()
    assert after["joined_running_batch"] > before["joined_running_batch"]
    assert after["max_rows_in_step"] >= 2 and after["max_rows_in_step"] <= 4


def test_max_tokens_and_user_stop_strings(engine):
    async def run():
        return await asyncio.gather(collect(engine, steered_prompt(4), max_tokens=3),
                                    collect(engine, steered_prompt(4), stop=stop_strings([" Paris"])))

    (cut, cut_end), (stopped, stopped_end) = asyncio.run(run())
    assert "".join(cut) == "The capital of" and (cut_end.finish_reason, cut_end.completion_tokens) == ("length", 3)
    assert "".join(stopped) == "The capital of France is" and stopped_end.finish_reason == "stop"


def test_min_tokens_holds_eos_back_as_min_new_tokens_does_for_its_row_only():
    """A model whose answers end in EOS: min_tokens keeps EOS from ending the answer before that many tokens,
    as transformers' ``min_new_tokens`` does, and only in the row that asks for it (both share one batch)."""
    engine = make_engine("transformers", steerable_model_dir(end_with_eos=True), max_batch_size=4, batch_wait_ms=50)
    try:
        prompt = steered_prompt(0)
        natural, = generate_batch(engine.model, engine.tokenizer, [prompt], max_new_tokens=24)
        held_reference, = generate_batch(engine.model, engine.tokenizer, [prompt], max_new_tokens=24,
                                         min_new_tokens=12)
        assert natural.text == SHORT_ANSWER and natural.completion_tokens < 12  # EOS ends it early

        async def both():
            ids = engine.encode(prompt)
            return await asyncio.gather(engine.complete(ids, SamplingParams(max_tokens=24, stop=STOPS)),
                                        engine.complete(ids, SamplingParams(max_tokens=24, stop=STOPS, min_tokens=12)))

        free, held = asyncio.run(both())
        assert engine.stats()["max_rows_in_step"] == 2
        # OpenAI counts the EOS token, transformers' generate drops it with the padding
        assert (free.text, free.finish_reason, free.completion_tokens) == (SHORT_ANSWER, "stop",
                                                                          natural.completion_tokens + 1)
        assert held.text == held_reference.text and held.text.startswith(SHORT_ANSWER) and held.text != SHORT_ANSWER
        assert held.completion_tokens >= 12
    finally:
        engine.shutdown()


def test_seeded_sampling_repeats_and_different_seeds_differ(tiny_model_dir):
    engine = TransformersEngine(tiny_model_dir, max_batch_size=4, batch_wait_ms=0)
    try:
        ids = engine.encode(steered_prompt(4))

        def sample(seed: int) -> str:
            params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=seed, stop=("\x00",))
            return asyncio.run(engine.complete(ids, params)).text

        first, again, other = sample(1), sample(1), sample(2)
        assert first == again and first != other
    finally:
        engine.shutdown()


def test_vllm_is_refused_clearly_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(EngineError, match="needs a CUDA GPU"):
        choose_engine("vllm")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["auto", "transformers"])
def test_gpu_engines_give_the_scripted_answers(kind):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if kind == "auto" and importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    engine = make_engine(kind, steerable_model_dir(), max_batch_size=4)
    try:
        assert engine.kind == ("vllm" if kind == "auto" else "transformers")

        async def both():
            return await asyncio.gather(*(engine.complete(engine.encode(steered_prompt(v)),
                                                          SamplingParams(max_tokens=40, stop=STOPS)) for v in (0, 4)))

        assert [c.text for c in asyncio.run(both())] == [SHORT_ANSWER, LONG_ANSWER]
    finally:
        engine.shutdown()
