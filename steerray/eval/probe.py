"""The label probe: has a policy learnt to read its label, before any answer is generated?

For held-out conversations, the log-probability of the real answer is computed under its true label and
under the same label with one attribute set to each other value. A policy that reads the attribute finds the
real answer likelier under its true value: the mean gain (nats, true minus the mean of the others) and how
often the true value scores best (chance: one over the number of values) say how well, per attribute. It
costs forward passes only (conversations x attributes x values), so a recipe can be judged in seconds
where generating a steerability grid takes minutes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from steerray.attributes import encode_label, parse_label, restrict_label
from steerray.templates import ASSISTANT_ROLE, STOP_STRING, USER_ROLE, generation_prompt
from steerray.training.losses import IGNORE_INDEX
from steerray.training.steerlm2 import response_nll


@dataclass(frozen=True)
class ProbeItem:
    messages: list[dict[str, str]]  # the turns before the answer, OpenAI style
    answer: str
    label: dict[str, int]  # the answer's true label, restricted to what the policy was trained on


def probe_items(conversations: Sequence[Mapping[str, Any]], label_attributes: Sequence[str] | None,
                limit: int) -> list[ProbeItem]:
    """The last labelled answer of each conversation with the turns before it, at most ``limit``."""
    items: list[ProbeItem] = []
    for conversation in conversations:
        turns = list(conversation.get("conversations") or [])
        last = max((i for i, t in enumerate(turns) if t.get("from") == ASSISTANT_ROLE and t.get("label")),
                   default=None)
        if last is None or last == 0:
            continue
        label = restrict_label(str(turns[last]["label"]), label_attributes)
        messages = [{"role": "user" if t["from"] == USER_ROLE else "assistant", "content": str(t["value"])}
                    for t in turns[:last]]
        values = {k: int(round(v)) for k, v in parse_label(label).items()}
        if values and messages[-1]["role"] == "user":
            items.append(ProbeItem(messages, str(turns[last]["value"]), values))
        if len(items) >= limit:
            break
    return items


def answer_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str], answer: str) -> np.ndarray:
    """Sum of the log-probabilities of ``answer`` + the stop marker after each prompt (one batch).

    The training NLL computes it (``response_nll``): only the answer's positions are projected onto the
    vocabulary, not the prompt's, which is most of each row here.
    """
    continuation = tokenizer(answer + "\n" + STOP_STRING, add_special_tokens=False)["input_ids"]
    rows, labels = [], []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        rows.append(ids + continuation)
        # Shifted labels: position t predicts token t + 1; the last prompt token predicts the first answer token.
        labels.append([IGNORE_INDEX] * (len(ids) - 1) + continuation + [IGNORE_INDEX])
    nll = response_nll(model, rows, labels, tokenizer.pad_token_id or 0, micro_batch=len(rows))
    return -nll.double().numpy()


def probe_policy(model: Any, tokenizer: Any, items: Sequence[ProbeItem], attributes: Sequence[str],
                 values: Sequence[int]) -> dict[str, Any]:
    """Per attribute: mean log-prob gain of the true value, how often it scores best, and chance."""
    result: dict[str, Any] = {}
    for attribute in attributes:
        gains, best, chance = [], [], []
        for item in items:
            if attribute not in item.label:
                continue
            options = sorted(set(values) | {item.label[attribute]})
            prompts = [generation_prompt(item.messages, encode_label({**item.label, attribute: v}))
                       for v in options]
            scores = answer_logprobs(model, tokenizer, prompts, item.answer)
            true = options.index(item.label[attribute])
            gains.append(float(scores[true] - np.delete(scores, true).mean()))
            best.append(bool(np.argmax(scores) == true))
            chance.append(1 / len(options))
        result[attribute] = {"n": len(gains), "mean_gain_nats": float(np.mean(gains)) if gains else None,
                             "true_is_best": float(np.mean(best)) if best else None,
                             "chance": float(np.mean(chance)) if chance else None}
    return result
