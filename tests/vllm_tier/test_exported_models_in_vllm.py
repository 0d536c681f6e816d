"""What an exported model gives a plain vLLM user, without steerray in the loop.

1. The SFT tokenizer's chat template (steerray.templates.steerlm_chat_template): vLLM's own chat path
   renders the same prompt tokens as steerray's renderer and follows ``chat_template_kwargs`` steering.
2. The reward model: vLLM's pooling runner (classify task, no activation) gives the same 9 attribute
   predictions as transformers, on real HelpSteer2 rows, within fp32 tolerance.
"""

from __future__ import annotations

import json
import shutil

import pytest
from serve_support import LONG_ANSWER, QUESTION, SHORT_ANSWER, steerable_model_dir
from vllm_support import VLLM_TIER

from steerray.attributes import ATTRIBUTES, steering_label
from steerray.templates import (
    STOP_STRING,
    generation_prompt,
    make_conversation,
    reward_prompts,
    steerlm_chat_template,
)

pytestmark = VLLM_TIER
ASK = [{"role": "user", "content": QUESTION}]
KV_CACHE = 512 * 1024**2  # what vLLM may take for its KV cache on this box (its default is most of the RAM)


def start_llm(model: str, **kwargs):
    from vllm import LLM

    return LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=2048,
               kv_cache_memory_bytes=KV_CACHE, **kwargs)


def stop_llm(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def exported_sft(tmp_path_factory):
    """The scripted model as the SFT export writes it: the SteerLM chat template in its tokenizer."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("sft") / "model"
    shutil.copytree(steerable_model_dir(), out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = steerlm_chat_template(("humor", "verbosity"))
    tokenizer.save_pretrained(out)
    return str(out)


def test_vllm_chat_renders_the_template_and_follows_the_steering(exported_sft):
    from vllm import SamplingParams

    llm = start_llm(exported_sft)
    try:
        tokenizer = llm.get_tokenizer()
        greedy = SamplingParams(temperature=0, max_tokens=40, stop=[STOP_STRING])
        answers = {}
        for verbosity in (0, 4):
            steering = {"steering": {"verbosity": verbosity}}
            (out,) = llm.chat(ASK, greedy, use_tqdm=False, chat_template_kwargs=steering)
            label = steering_label({"verbosity": verbosity}, attributes=("humor", "verbosity"))
            expected_prompt = generation_prompt(ASK, label)
            assert label == f"humor:0,verbosity:{verbosity}"
            assert out.prompt_token_ids == tokenizer(expected_prompt, add_special_tokens=False)["input_ids"]
            answers[verbosity] = out.outputs[0].text
        assert answers == {0: SHORT_ANSWER + "\n", 4: LONG_ANSWER + "\n"}  # vLLM cuts the stop, not the "\n"
        (default,) = llm.chat(ASK, greedy, use_tqdm=False)  # no kwargs: the defaults, verbosity 4
        assert default.outputs[0].text == LONG_ANSWER + "\n"
        with pytest.raises(Exception, match="cannot steer 'quality'"):
            llm.chat(ASK, greedy, use_tqdm=False, chat_template_kwargs={"steering": {"quality": 1}})
    finally:
        stop_llm(llm)


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """A demo-sized reward model: SmolLM2-135M with a seeded 9-output head, saved as train-reward saves it."""
    import torch

    from steerray.models.loading import SMOLLM2_ALIAS, load_tokenizer
    from steerray.models.reward import build_reward_model

    out = tmp_path_factory.mktemp("reward") / "model"
    torch.manual_seed(4)
    model = build_reward_model(SMOLLM2_ALIAS)
    with torch.no_grad():
        model.score.weight.mul_(20.0)  # spread the predictions over a few units, like a trained head
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(SMOLLM2_ALIAS).save_pretrained(out)
    return str(out)


def helpsteer2_texts(shared_data, limit: int = 6) -> list[str]:
    sample = shared_data / "helpsteer2" / "helpsteer2_validation_sample_hfschema.jsonl"
    rows = [json.loads(line) for line in sample.read_text().splitlines()]
    texts = []
    for row in rows[:limit]:
        conversation = make_conversation([("User", row["prompt"], None),
                                         ("Assistant", row["response"][:1500], "helpfulness:3")])
        texts.append(reward_prompts(conversation)[0].text)
    return texts


def test_reward_model_scores_the_same_in_vllm_classify(reward_dir, shared_data):
    import numpy as np
    from vllm.config import PoolerConfig

    from steerray.models.reward import load_reward_model, predict_texts

    texts = helpsteer2_texts(shared_data)
    model, tokenizer, attributes = load_reward_model(reward_dir)
    assert attributes == list(ATTRIBUTES)
    expected, _ = predict_texts(model, tokenizer, texts)
    del model
    llm = start_llm(reward_dir, runner="pooling", pooler_config=PoolerConfig(use_activation=False))
    try:
        prompts = [{"prompt_token_ids": tokenizer(t, add_special_tokens=False)["input_ids"]} for t in texts]
        got = np.array([o.outputs.probs for o in llm.classify(prompts, use_tqdm=False)])
    finally:
        stop_llm(llm)
    assert got.shape == (len(texts), 9)
    assert float(np.abs(expected).max()) > 1.0  # a head that says something, not all zeros
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=1e-3)
