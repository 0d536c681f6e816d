"""Phase 4 of SteerLM, bootstrapping: the pure parts (prompts, selection, new training rows, statistics).

The reference has no code for it (spec 7.1: "ignored for simplicity"); the paper's description is: sample
several answers per training prompt conditioned on top quality, re-label them with the attribute model,
fine-tune again. ``jobs/bootstrap.py`` runs the loop; this module decides what is kept and what it means.

Selection (``BootstrapConfig.selection``) over the K samples of one prompt, ranked by a weighted sum of
the reward model's outputs (``score_weights``):
- ``top1``: the best sample (ties: the lower sample index);
- ``threshold``: every sample scoring at least ``threshold``;
- ``weight``: every sample, as ``round(K * softmax(score / weight_temperature))`` copies: self-normalised
  importance weights expressed as data, so the unchanged SFT stage trains on them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from steerray.attributes import predictions_to_label
from steerray.eval.sampling import stopped_at_cap, weighted_score
from steerray.templates import ASSISTANT_ROLE, SYSTEM_PROMPT, USER_ROLE


def training_prompts(conversations: Iterable[Mapping[str, Any]], max_prompts: int | None = None) -> list[dict[str, Any]]:
    """One prompt per distinct context: every turn before a conversation's last Assistant turn.

    Returns ``{"prompt_id", "system", "context": [turns], "messages": [{"role", "content"}]}``; the context
    keeps earlier assistant turns with their labels, so a new answer slots into a valid conversation.
    Conversations without a user turn before an assistant turn are skipped.
    """
    prompts: list[dict[str, Any]] = []
    seen: set[str] = set()
    for conversation in conversations:
        turns = list(conversation.get("conversations") or [])
        last = max((i for i, t in enumerate(turns) if t.get("from") == ASSISTANT_ROLE), default=None)
        if not last or turns[last - 1].get("from") != USER_ROLE:
            continue
        context = [dict(t) for t in turns[:last]]
        key = "\x00".join(str(t.get("value")) for t in context)
        if key in seen:
            continue
        seen.add(key)
        messages = [{"role": "user" if t["from"] == USER_ROLE else "assistant", "content": t["value"]} for t in context]
        prompts.append({"prompt_id": len(prompts), "system": conversation.get("system", SYSTEM_PROMPT),
                        "context": context, "messages": messages})
        if max_prompts is not None and len(prompts) >= max_prompts:
            break
    return prompts


def sample_rows(prompts: Sequence[Mapping[str, Any]], samples_per_prompt: int, label: str) -> list[dict[str, Any]]:
    """K rows per prompt for ``SampleScorer``; ``id`` = prompt_id * K + sample index (stable across runs)."""
    import json

    return [{"id": p["prompt_id"] * samples_per_prompt + k, "prompt_id": p["prompt_id"], "sample": k,
             "label": label, "messages": json.dumps(p["messages"], ensure_ascii=False)}
            for p in prompts for k in range(samples_per_prompt)]


def _group(samples: Iterable[Mapping[str, Any]], weights: Mapping[str, float]) -> dict[int, list[tuple[float, Mapping]]]:
    groups: dict[int, list[tuple[float, Mapping]]] = defaultdict(list)
    for sample in samples:
        score = weighted_score(sample.get("scores") or {}, weights)
        if score is not None:
            groups[int(sample["prompt_id"])].append((score, sample))
    for group in groups.values():
        group.sort(key=lambda item: int(item[1]["sample"]))
    return groups


def select_samples(samples: Iterable[Mapping[str, Any]], weights: Mapping[str, float], selection: str, *,
                   threshold: float = 3.0, weight_temperature: float = 1.0) -> list[tuple[Mapping[str, Any], int, float]]:
    """``(sample, copies, score)`` for every kept sample, by prompt then sample index.

    Samples cut at the sampling cap (``finish_reason`` "length") compete only where a prompt has no complete
    one: fine-tuned as a whole answer, with the end of turn after its last token, a cut sample teaches the
    policy to end its turn mid-sentence (in one demo round 7 of 24 samples were cut at 160 tokens, and the
    best of their pair for 3 of the 12 prompts; with this rule 2, where both samples were cut).
    """
    kept: list[tuple[Mapping[str, Any], int, float]] = []
    for _, group in sorted(_group(samples, weights).items()):
        complete = [item for item in group if not stopped_at_cap(item[1])]
        group = complete or group
        scores = np.array([score for score, _ in group])
        if selection == "top1":
            best = int(np.argmax(scores))  # argmax returns the first maximum: the lower sample index
            kept.append((group[best][1], 1, float(scores[best])))
        elif selection == "threshold":
            kept.extend((sample, 1, score) for score, sample in group if score >= threshold)
        elif selection == "weight":
            logits = scores / weight_temperature
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            for (score, sample), p in zip(group, probs, strict=True):
                copies = int(round(p * len(group)))
                if copies > 0:
                    kept.append((sample, copies, score))
        else:
            raise ValueError(f"unknown selection {selection!r}")
    return kept


def new_conversation(prompt: Mapping[str, Any], answer: str, label: str) -> dict[str, Any]:
    """The prompt's context plus the sampled answer as the labelled final assistant turn."""
    turns = [dict(t) for t in prompt["context"]] + [{"from": ASSISTANT_ROLE, "value": answer, "label": label}]
    return {"system": prompt.get("system", SYSTEM_PROMPT), "mask": USER_ROLE, "type": "VALUE_TO_TEXT",
            "conversations": turns}


def training_rows(kept: Sequence[tuple[Mapping[str, Any], int, float]], prompts: Mapping[int, Mapping[str, Any]],
                  relabel: str, attributes: Sequence[str]) -> list[dict[str, Any]]:
    """SFT conversations from the kept samples (copies repeated); empty answers are dropped.

    ``relabel="predicted"`` labels each answer with the reward model's label string over its attributes
    (clipped to 0-4, rounded half to even, as annotation does); ``"steering"`` keeps the sampling label.
    """
    rows: list[dict[str, Any]] = []
    for sample, copies, _ in kept:
        answer = str(sample.get("answer", ""))
        if not answer.strip():
            continue
        scores = sample["scores"]
        label = (predictions_to_label([scores[a] for a in attributes], attributes) if relabel == "predicted"
                 else str(sample["label"]))
        rows.extend(new_conversation(prompts[int(sample["prompt_id"])], answer, label) for _ in range(copies))
    return rows


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def round_stats(samples: Sequence[Mapping[str, Any]], weights: Mapping[str, float],
                kept: Sequence[tuple[Mapping[str, Any], int, float]] | None = None,
                prompt_ids: set[int] | None = None) -> dict[str, Any]:
    """How a round's samples scored: mean score, mean best-of-K, kept rows, per-attribute means.

    ``prompt_ids`` restricts the statistics to some prompts (to compare rounds on the same prompts).
    """
    if prompt_ids is not None:
        samples = [s for s in samples if int(s["prompt_id"]) in prompt_ids]
    groups = _group(samples, weights)
    all_scores = [score for group in groups.values() for score, _ in group]
    per_attribute: dict[str, list[float]] = defaultdict(list)
    for group in groups.values():
        for _, sample in group:
            for name, value in sample["scores"].items():
                per_attribute[name].append(float(value))
    stats: dict[str, Any] = {
        "prompts": len(groups),
        "samples": len(all_scores),
        "skipped": sum(1 for s in samples if not s.get("scores")),
        "mean_score": _mean(all_scores),
        "mean_best": _mean([max(score for score, _ in group) for group in groups.values()]),
        "mean_tokens": _mean([float(s.get("completion_tokens", 0)) for s in samples if s.get("scores")]),
        "cut_at_cap": sum(1 for s in samples if s.get("scores") and stopped_at_cap(s)),
        "per_attribute": {name: _mean(values) for name, values in per_attribute.items()},
    }
    if kept is not None:
        copies = [c for _, c, _ in kept]
        stats["kept"] = int(sum(copies))
        stats["kept_cut_at_cap"] = int(sum(c for sample, c, _ in kept if stopped_at_cap(sample)))
        stats["mean_kept"] = (float(sum(score * c for _, c, score in kept) / sum(copies)) if copies else None)
    return stats


def score_movement(first: Mapping[str, Any], last: Mapping[str, Any]) -> dict[str, Any]:
    """Differences between two round statistics (last - first), overall and per attribute."""
    def diff(a: Any, b: Any) -> float | None:
        return None if a is None or b is None or (isinstance(a, float) and math.isnan(a)) else float(b - a)

    return {
        "mean_score": diff(first.get("mean_score"), last.get("mean_score")),
        "mean_best": diff(first.get("mean_best"), last.get("mean_best")),
        "per_attribute": {name: diff(first["per_attribute"].get(name), value)
                          for name, value in (last.get("per_attribute") or {}).items()},
    }
