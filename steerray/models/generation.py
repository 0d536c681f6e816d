"""Batched generation with transformers, shared by SFT samples, bootstrapping, evaluation and serving.

Prompts are left-padded so every row's continuation starts at the same position; each answer is cut at
the SteerLM stop marker and cleaned of template markers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from steerray.templates import STOP_STRING, strip_generation


@dataclass(frozen=True)
class Generation:
    text: str  # the answer, cut at the stop string, markers removed
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (a stop string or EOS ended it) or "length"


def generate_batch(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 64,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                   stop: Sequence[str] = (STOP_STRING,), min_new_tokens: int = 0) -> list[Generation]:
    """Generate one answer per prompt in a single batched ``generate`` call (greedy if temperature 0);
    ``min_new_tokens`` keeps EOS from ending an answer sooner (stop strings still do)."""
    import torch

    if not prompts:
        return []
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = previous_side
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    sampling = temperature > 0
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sampling,
                              "pad_token_id": tokenizer.pad_token_id, "stop_strings": list(stop),
                              "tokenizer": tokenizer}
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    if sampling:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(**batch, **kwargs)
    prompt_width = batch["input_ids"].shape[1]
    results = []
    for row in range(len(prompts)):
        new_tokens = output[row, prompt_width:]
        new_tokens = new_tokens[new_tokens != tokenizer.pad_token_id] if tokenizer.pad_token_id is not None else new_tokens
        raw = tokenizer.decode(new_tokens, skip_special_tokens=True)
        text = strip_generation(raw, stop)
        stopped = len(new_tokens) < max_new_tokens or any(s in raw for s in stop)
        results.append(Generation(text, int(batch["attention_mask"][row].sum()), int(len(new_tokens)),
                                  "stop" if stopped else "length"))
    return results
