"""SampleScorer without Ray: generate with a policy, score with the reward model, as the jobs do in an actor."""

from __future__ import annotations

import json

import numpy as np
import pytest

from steerray.attributes import ATTRIBUTES, steering_label
from steerray.eval.sampling import SKIPPED, SampleScorer, TextScorer, reward_text, weighted_score
from steerray.templates import LABEL_START, generation_prompt


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tiny_model_dir):
    import torch

    from steerray.models.loading import load_tokenizer
    from steerray.models.reward import build_reward_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("reward")
    build_reward_model(tiny_model_dir).save_pretrained(folder)
    load_tokenizer(tiny_model_dir).save_pretrained(folder)
    return str(folder)


def test_reward_text_is_the_annotators_prompt():
    text = reward_text([{"role": "user", "content": "Hi?"}], "Hello.")
    assert text.endswith("<extra_id_1>User\nHi?\n<extra_id_1>Assistant\nHello.\n" + LABEL_START)
    multi = reward_text([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "user", "content": "c"}], "d")
    assert multi.count("<extra_id_1>Assistant\n") == 2 and multi.count(LABEL_START) == 1


def test_weighted_score():
    assert weighted_score({"quality": 2.0, "verbosity": 1.0}, {"quality": 1.0, "verbosity": -0.5}) == 1.5
    assert weighted_score({"quality": 2.0}, {"helpfulness": 1.0}) is None
    assert weighted_score({}, {"quality": 1.0}) is None


def test_sample_scorer_matches_direct_generation_and_scoring(tiny_model_dir, reward_dir):
    from steerray.models.generation import generate_batch
    from steerray.models.loading import load_causal_lm, load_tokenizer
    from steerray.models.reward import load_reward_model, predict_texts

    sampling = {"max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "batch_size": 2, "max_prompt_tokens": 120,
                "engine": "auto", "seed": 1, "precision": "fp32"}  # compared with fp32 references below
    scorer = SampleScorer(tiny_model_dir, reward_dir, sampling, threads=1)
    messages = [[{"role": "user", "content": "Why is the sky blue?"}],
                [{"role": "user", "content": "Tell me a joke."}],
                [{"role": "user", "content": "word " * 200}]]  # over max_prompt_tokens: skipped, counted
    labels = [steering_label({"verbosity": 0}), steering_label({"verbosity": 4}), steering_label()]
    batch = {"id": np.array([0, 1, 2]), "messages": np.array([json.dumps(m) for m in messages], dtype=object),
             "label": np.array(labels, dtype=object)}
    out = scorer(batch)
    assert out["finish_reason"][2] == SKIPPED and out["answer"][2] == "" and json.loads(out["scores"][2]) == {}

    model, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    prompts = [generation_prompt(m, label) for m, label in zip(messages[:2], labels[:2], strict=True)]
    expected = generate_batch(model, tokenizer, prompts, max_new_tokens=4)  # greedy: deterministic
    assert [str(a) for a in out["answer"][:2]] == [g.text for g in expected]
    assert list(out["completion_tokens"][:2]) == [g.completion_tokens for g in expected]

    reward, reward_tok, attributes = load_reward_model(reward_dir)
    assert attributes == list(ATTRIBUTES)
    preds, _ = predict_texts(reward, reward_tok, [reward_text(m, g.text) for m, g in zip(messages, expected, strict=False)])
    for row in range(2):
        scores = json.loads(out["scores"][row])
        assert list(scores) == list(ATTRIBUTES)
        assert np.allclose([scores[a] for a in ATTRIBUTES], preds[row], atol=1e-5)

    texts = TextScorer(reward_dir, max_length=64, threads=1)({"id": np.array([0]), "text": np.array(["a " * 100])})
    assert bool(texts["truncated"][0]) and len(json.loads(texts["scores"][0])) == len(ATTRIBUTES)


def test_engine_choice():
    from steerray.eval.sampling import use_vllm

    assert use_vllm("auto", "cpu") is False and use_vllm("vllm", "cpu") is False  # no vLLM without a GPU
    assert use_vllm("transformers", "cuda") is False
    try:
        import vllm  # noqa: F401
    except ImportError:
        assert use_vllm("auto", "cuda") is False  # auto falls back to transformers
        with pytest.raises(ImportError):
            use_vllm("vllm", "cuda")  # asked for explicitly: say it is missing


@pytest.mark.gpu
def test_sample_scorer_on_gpu_uses_bf16(tiny_model_dir, reward_dir):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    sampling = {"max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "batch_size": 2, "max_prompt_tokens": 256,
                "engine": "transformers", "seed": 1}
    scorer = SampleScorer(tiny_model_dir, reward_dir, sampling)
    assert scorer.device == "cuda" and next(scorer.policy.parameters()).dtype == torch.bfloat16
    assert next(scorer.reward.parameters()).dtype == torch.bfloat16
    out = scorer({"id": np.array([0]), "messages": np.array([json.dumps([{"role": "user", "content": "Hi"}])],
                                                             dtype=object), "label": np.array([steering_label()])})
    assert len(json.loads(out["scores"][0])) == len(ATTRIBUTES)
