"""The steerability grid: does asking for ``verbosity:0`` vs ``verbosity:4`` move what the model writes?

For each held-out prompt, each steered attribute and each requested value, one answer is generated with
that attribute at the value and every other attribute at its default (the reference's inference
defaults, ``attributes.DEFAULT_STEERING``). The reward model scores every answer; per attribute the
Spearman correlation between requested and measured value says how far steering moves it. Verbosity is
also checked against answer length, which needs no reward model at all.

Everything here is pure: rows in, numbers out, so it is tested without Ray or models.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from steerray.attributes import DEFAULT_STEERING, check_attribute, steering_label
from steerray.eval.sampling import stopped_at_cap
from steerray.templates import USER_ROLE


def held_out_prompts(conversations: Iterable[Mapping[str, Any]], limit: int) -> list[str]:
    """The first user turn of each conversation, without repeats, in input order, at most ``limit``.

    Single-turn prompts keep the grid readable: every answer depends on the steering label only.
    """
    prompts: list[str] = []
    seen: set[str] = set()
    for conversation in conversations:
        turns = conversation.get("conversations") or []
        if not turns or turns[0].get("from") != USER_ROLE:
            continue
        text = turns[0].get("value")
        if isinstance(text, str) and text.strip() and text not in seen:
            seen.add(text)
            prompts.append(text)
            if len(prompts) >= limit:
                break
    return prompts


def build_grid(prompts: Sequence[str], attributes: Sequence[str], values: Sequence[int],
               defaults: Mapping[str, int] = DEFAULT_STEERING,
               label_attributes: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per (prompt, attribute, value), in that order, with the label string to generate with.

    ``label_attributes``: the policy's label attributes (its config says), so labels match its training.

    Rows carry ``messages`` (OpenAI-style, for ``templates.generation_prompt``) so the generation and
    scoring code is the same one bootstrapping uses.
    """
    rows: list[dict[str, Any]] = []
    for prompt_id, prompt in enumerate(prompts):
        for attribute in attributes:
            check_attribute(attribute)
            for value in values:
                rows.append({
                    "id": len(rows), "prompt_id": prompt_id, "attribute": attribute, "value": int(value),
                    "label": steering_label({attribute: int(value)}, defaults, label_attributes),
                    "messages": [{"role": "user", "content": prompt}],
                })
    return rows


# --------------------------------------------------------------------------------------------------
# Correlations
# --------------------------------------------------------------------------------------------------

def rank_average(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (what Spearman's rho needs)."""
    data = np.asarray(values, dtype=np.float64)
    order = np.argsort(data, kind="mergesort")
    ranks = np.empty(len(data), dtype=np.float64)
    sorted_data = data[order]
    start = 0
    while start < len(data):
        end = start
        while end + 1 < len(data) and sorted_data[end + 1] == sorted_data[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's r, or None where it is undefined (fewer than 2 points or a constant side)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(a) != len(b):
        raise ValueError(f"pearson: {len(a)} vs {len(b)} values")
    if len(a) < 2:
        return None
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    if denominator == 0:
        return None
    return float((a * b).sum() / denominator)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho (Pearson on average ranks), None where undefined."""
    if len(x) < 2:
        return None
    return pearson(list(rank_average(x)), list(rank_average(y)))


def slope(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Least-squares slope of y on x: measured units moved per requested unit."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(a) < 2 or float(a.var()) == 0:
        return None
    return float(((a - a.mean()) * (b - b.mean())).sum() / ((a - a.mean()) ** 2).sum())


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------

def _by_value(values: Sequence[int], measured: Sequence[float]) -> tuple[dict[int, float], dict[int, float]]:
    groups: dict[int, list[float]] = defaultdict(list)
    for value, m in zip(values, measured, strict=True):
        groups[int(value)].append(float(m))
    means = {v: float(np.mean(ms)) for v, ms in sorted(groups.items())}
    stds = {v: float(np.std(ms)) for v, ms in sorted(groups.items())}
    return means, stds


def _curve(values: Sequence[int], measured: Sequence[float], prompt_ids: Sequence[int]) -> dict[str, Any]:
    """Correlation and movement of one measured quantity against the requested values."""
    means, stds = _by_value(values, measured)
    per_prompt: dict[int, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for value, m, pid in zip(values, measured, prompt_ids, strict=True):
        per_prompt[pid][0].append(value)
        per_prompt[pid][1].append(m)
    prompt_rhos = [rho for xs, ys in per_prompt.values() if (rho := spearman(xs, ys)) is not None]
    low, high = min(means), max(means)
    return {
        "spearman": spearman(values, measured),
        "pearson": pearson(values, measured),
        "slope": slope(values, measured),
        # Mean measured at the highest requested value minus at the lowest: how far steering moves it.
        "shift": means[high] - means[low],
        "per_prompt_spearman": float(np.mean(prompt_rhos)) if prompt_rhos else None,
        "mean_by_value": {str(v): m for v, m in means.items()},
        "std_by_value": {str(v): s for v, s in stds.items()},
        "n": len(values),
    }


def summarize_grid(rows: Sequence[Mapping[str, Any]], measured_attributes: Sequence[str]) -> dict[str, Any]:
    """Summarise scored grid rows.

    Each row needs ``attribute``, ``value``, ``prompt_id``, ``scores`` (``{attribute: float}``, the reward
    model's raw outputs) and ``completion_tokens``. ``measured_attributes`` are those the reward model
    predicts; a steered attribute it cannot measure gets ``spearman: None`` and a note.
    Returns per-attribute curves, verbosity against length, and the steered-by-measured Spearman matrix.
    """
    by_attribute: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        by_attribute[row["attribute"]].append(row)
    attributes: dict[str, Any] = {}
    cross: dict[str, dict[str, float | None]] = {}
    for attribute, group in by_attribute.items():
        values = [int(r["value"]) for r in group]
        prompt_ids = [int(r["prompt_id"]) for r in group]
        if attribute in measured_attributes:
            measured = [float(r["scores"][attribute]) for r in group]
            attributes[attribute] = _curve(values, measured, prompt_ids)
        else:
            attributes[attribute] = {"spearman": None, "note": "the reward model does not predict it",
                                     "n": len(group)}
        # Answers that ran into the generation cap: a long answer cut short reads as a shorter one.
        attributes[attribute]["at_cap_by_value"] = dict(sorted(Counter(
            str(r["value"]) for r in group if stopped_at_cap(r)).items()))
        cross[attribute] = {m: spearman(values, [float(r["scores"][m]) for r in group])
                            for m in measured_attributes}
    summary: dict[str, Any] = {"per_attribute": attributes, "cross": cross}
    if "verbosity" in by_attribute:
        group = by_attribute["verbosity"]
        values = [int(r["value"]) for r in group]
        lengths = [float(r["completion_tokens"]) for r in group]
        curve = _curve(values, lengths, [int(r["prompt_id"]) for r in group])
        summary["verbosity_length"] = {**curve, "unit": "tokens"}
    rhos = [a["spearman"] for a in attributes.values() if a.get("spearman") is not None]
    summary["mean_spearman"] = float(np.mean(rhos)) if rhos else None
    summary["rows"] = len(rows)
    summary["at_cap"] = sum(1 for r in rows if stopped_at_cap(r))
    return summary


def example_answers(rows: Sequence[Mapping[str, Any]], attribute: str, prompt_id: int = 0,
                    max_chars: int = 400) -> list[dict[str, Any]]:
    """The answers to one prompt across the values of one attribute, for the report's side-by-side."""
    picked = [r for r in rows if r["attribute"] == attribute and int(r["prompt_id"]) == prompt_id]
    picked.sort(key=lambda r: int(r["value"]))
    return [{"value": int(r["value"]), "answer": str(r.get("answer", ""))[:max_chars],
             "tokens": int(r.get("completion_tokens", 0)),
             "measured": r.get("scores", {}).get(attribute)} for r in picked]
