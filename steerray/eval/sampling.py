"""Generate answers with a policy and score them with the reward model, in batches.

``SampleScorer`` is a plain callable class over ``dict[str, np.ndarray]`` batches: Ray Data runs it as a
``map_batches`` actor (one model load per actor; generation through steerray's engine, or vLLM on a GPU;
batched forward passes to score), tests call it directly. Bootstrapping and the steerability grid both
use it, so "sample at a label, then score" means the same thing in both.

A batch's prompts go to the engine at once: a finished answer leaves the decoding batch and the next
prompt takes its row, and an answer ends at the first SteerLM marker, as the server's do (one ``generate``
call per chunk decoded every row until its longest answer ended, and ran on past markers other than the
stop marker: completion_tokens then counted text that was cut away).

Input columns: ``id`` (int), ``messages`` (JSON list of ``{"role", "content"}``, ending with a user turn),
``label`` (the steering label string). Output adds ``answer``, ``prompt_tokens``, ``completion_tokens``,
``finish_reason`` (``stop`` | ``length`` | ``prompt_too_long``) and ``scores`` (JSON ``{attribute: float}``,
the reward model's raw outputs for the answer in its context).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from steerray.models.loading import load_tokenizer
from steerray.models.precision import inference_dtype
from steerray.models.reward import load_reward_model, predict_texts
from steerray.serving.engines import SamplingParams, TransformersEngine
from steerray.serving.openai_schema import stop_strings
from steerray.templates import (
    ASSISTANT_ROLE,
    USER_ROLE,
    generation_prompt,
    make_conversation,
    reward_prompts,
    strip_generation,
)

SKIPPED = "prompt_too_long"


def stopped_at_cap(row: Mapping[str, Any]) -> bool:
    """Whether a sampled row's generation stopped at ``max_new_tokens`` rather than at the end of its answer."""
    return row.get("finish_reason") == "length"


def reward_text(messages: Sequence[Mapping[str, str]], answer: str) -> str:
    """The reward-model prompt for ``answer`` as the next assistant turn (annotation's prompt builder)."""
    turns: list[tuple[str, str, str | None]] = []
    for message in messages:
        role = USER_ROLE if message.get("role", message.get("from")) in ("user", USER_ROLE) else ASSISTANT_ROLE
        turns.append((role, str(message.get("content", message.get("value", ""))), None))
    turns.append((ASSISTANT_ROLE, answer, ""))  # "" marks the one turn to score (the annotator's rule)
    return reward_prompts(make_conversation(turns), labelled_only=False)[-1].text


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def use_vllm(engine: str, device: str) -> bool:
    """vLLM for generation where it can run (a GPU and the package); transformers everywhere else."""
    if engine == "transformers" or device != "cuda":
        return False
    try:
        import vllm  # noqa: F401
    except ImportError:
        if engine == "vllm":
            raise
        return False
    return True


def engine_answers(engine: TransformersEngine, prompts: Sequence[str], seeds: Sequence[int],
                   sampling: Mapping[str, Any]) -> list[tuple[str, int, int, str]]:
    """(answer, prompt_tokens, completion_tokens, finish_reason) per prompt from steerray's engine, every prompt
    submitted at once with its own seed (a row's sample does not depend on which rows share its batch)."""
    encoded = [engine.encode(p) for p in prompts]

    async def answer_all() -> list[Any]:
        return await asyncio.gather(*(engine.complete(ids, SamplingParams(
            max_tokens=sampling["max_new_tokens"], temperature=sampling["temperature"], top_p=sampling["top_p"],
            seed=seed, stop=stop_strings())) for ids, seed in zip(encoded, seeds, strict=True)))

    completions = asyncio.run(answer_all())
    return [(strip_generation(c.text), len(ids), c.completion_tokens, c.finish_reason)
            for ids, c in zip(encoded, completions, strict=True)]


class SampleScorer:
    """Load a policy and a reward model once; per batch, generate then score."""

    def __init__(self, policy: str, reward_model: str, sampling: Mapping[str, Any], *,
                 reward_max_length: int = 1024, reward_batch_size: int = 16, threads: int | None = None) -> None:
        import torch

        self.device = pick_device()
        if self.device == "cpu":
            # One actor per node on CPU: let it use the node's cores (Ray sets OMP threads to 1).
            torch.set_num_threads(max(1, threads or os.cpu_count() or 1))
        self.sampling = dict(sampling)
        dtype = inference_dtype(self.sampling.get("precision", "auto"), self.device)
        self.tokenizer = load_tokenizer(policy, padding_side="left")
        self.vllm = None
        self.engine: TransformersEngine | None = None
        if use_vllm(self.sampling.get("engine", "auto"), self.device):
            from vllm import LLM

            # Leave room on the GPU for the reward model beside it.
            self.vllm = LLM(model=policy, dtype="bfloat16", gpu_memory_utilization=0.6, seed=self.sampling["seed"])
        else:
            # steerray's engine, not one generate call per chunk: a finished answer leaves the batch at once
            # and the next prompt takes its row (a generate call decodes every row until its longest ends).
            self.engine = TransformersEngine(policy, max_batch_size=int(self.sampling["batch_size"]),
                                             batch_wait_ms=0, precision=self.sampling.get("precision", "auto"),
                                             threads=torch.get_num_threads())
        self.reward, self.reward_tokenizer, self.attributes = load_reward_model(reward_model, dtype=dtype,
                                                                                device=self.device)
        self.reward_max_length = reward_max_length
        self.reward_batch_size = reward_batch_size

    def _generate(self, prompts: list[str], seeds: list[int]) -> list[tuple[str, int, int, str]]:
        """(answer, prompt_tokens, completion_tokens, finish_reason) per prompt, each with its own seed."""
        s = self.sampling
        if self.vllm is not None:
            import vllm

            params = [vllm.SamplingParams(max_tokens=s["max_new_tokens"], temperature=s["temperature"],
                                          top_p=s["top_p"], seed=seed, stop=list(stop_strings())) for seed in seeds]
            outputs = self.vllm.generate(prompts, params, use_tqdm=False)
            return [(strip_generation(o.outputs[0].text), len(o.prompt_token_ids), len(o.outputs[0].token_ids),
                     "length" if o.outputs[0].finish_reason == "length" else "stop") for o in outputs]
        assert self.engine is not None
        return engine_answers(self.engine, prompts, seeds, s)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [int(i) for i in batch["id"]]
        messages = [json.loads(m) for m in batch["messages"]]
        prompts = [generation_prompt(m, str(label)) for m, label in zip(messages, batch["label"], strict=True)]
        lengths = [len(ids_) for ids_ in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        keep = [i for i, n in enumerate(lengths) if n <= self.sampling["max_prompt_tokens"]]
        answers = [("", lengths[i], 0, SKIPPED) for i in range(len(prompts))]
        seeds = [int(self.sampling["seed"]) + ids[i] for i in keep]
        for i, result in zip(keep, self._generate([prompts[i] for i in keep], seeds), strict=True):
            answers[i] = result
        scores: list[dict[str, float]] = [{} for _ in prompts]
        if keep:
            texts = [reward_text(messages[i], answers[i][0]) for i in keep]
            preds, _ = predict_texts(self.reward, self.reward_tokenizer, texts, max_length=self.reward_max_length,
                                     batch_size=self.reward_batch_size)
            for i, row in zip(keep, preds, strict=True):
                scores[i] = {name: float(v) for name, v in zip(self.attributes, row, strict=True)}
        out = dict(batch)
        out["answer"] = np.array([a[0] for a in answers], dtype=object)
        out["prompt_tokens"] = np.array([a[1] for a in answers], dtype=np.int64)
        out["completion_tokens"] = np.array([a[2] for a in answers], dtype=np.int64)
        out["finish_reason"] = np.array([a[3] for a in answers], dtype=object)
        out["scores"] = np.array([json.dumps(s) for s in scores], dtype=object)
        return out


class TextScorer:
    """Score already-templated reward texts (``text`` column) -> ``scores`` (JSON list, model output order)."""

    def __init__(self, reward_model: str, *, max_length: int = 1024, batch_size: int = 16,
                 threads: int | None = None, precision: str = "auto") -> None:
        import torch

        device = pick_device()
        if device == "cpu":
            torch.set_num_threads(max(1, threads or os.cpu_count() or 1))
        dtype = inference_dtype(precision, device)
        self.model, self.tokenizer, self.attributes = load_reward_model(reward_model, dtype=dtype, device=device)
        self.max_length, self.batch_size = max_length, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        preds, truncated = predict_texts(self.model, self.tokenizer, [str(t) for t in batch["text"]],
                                         max_length=self.max_length, batch_size=self.batch_size)
        out = dict(batch)
        out["scores"] = np.array([json.dumps([float(v) for v in row]) for row in preds], dtype=object)
        out["truncated"] = np.array(truncated, dtype=bool)
        return out


def weighted_score(scores: Mapping[str, float], weights: Mapping[str, float]) -> float | None:
    """The scalar a sample is ranked by; None when the reward model lacks a weighted attribute."""
    if not scores or any(name not in scores for name in weights):
        return None
    return float(sum(scores[name] * w for name, w in weights.items()))


def map_rows(rows: Sequence[Mapping[str, Any]], actor: type, constructor_kwargs: Mapping[str, Any], *,
             batch_size: int, desc: str, progress: bool = True) -> list[dict[str, Any]]:
    """Run ``actor`` over ``rows`` as a Ray Data actor pool; return the output rows sorted by ``id``.

    One actor per GPU where the cluster has GPUs, else a single actor at 0.5 logical CPU (a pool of
    whole-CPU actors leaves Ray Data nothing to schedule on small machines and hangs) that uses the node's
    cores through its own torch threads.
    """
    import math

    import ray
    import ray.data
    from tqdm import tqdm

    if not rows:
        return []
    gpus = int(ray.cluster_resources().get("GPU", 0))
    size = max(1, min(gpus, math.ceil(len(rows) / batch_size))) if gpus else 1
    resources = {"num_gpus": 1} if gpus else {"num_cpus": 0.5}
    ds = ray.data.from_items([dict(r) for r in rows]).map_batches(
        actor, fn_constructor_kwargs=dict(constructor_kwargs), batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=size), **resources)
    out: list[dict[str, Any]] = []
    with tqdm(total=len(rows), desc=desc, unit="row", disable=not progress, mininterval=2) as bar:
        for row in ds.iter_rows():
            out.append({k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()})
            bar.update(1)
    out.sort(key=lambda r: int(r["id"]))
    return out
