"""Reward-model quality metrics: per-attribute MSE, Pearson and Spearman on labelled cells, pairwise accuracy.

Shared by ``train-reward`` (validation during and after training) and ``evaluate``. Pure numpy.
The correlation functions are the ones the steerability report uses (one definition in the project).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from steerray.attributes import IGNORE_VALUE
from steerray.eval.steerability import pearson, spearman


def regression_metrics(preds: Any, labels: Any, attributes: Sequence[str],
                       baseline: Sequence[float] | None = None,
                       ignore_value: float = IGNORE_VALUE) -> dict[str, Any]:
    """Metrics over labelled cells only; attributes without labels get ``n: 0`` and no numbers.

    ``preds`` and ``labels`` are ``[N, A]``. ``baseline`` (one constant per attribute, e.g. the training
    means) adds ``baseline_mse``: what predicting that constant would score, the bar a model must beat.
    Returns ``{"mse": overall mean over valid cells, "n_cells", "per_attribute": {name: {...}}}``.
    """
    preds = np.asarray(preds, dtype=np.float64).reshape(len(preds), -1) if len(preds) else \
        np.zeros((0, len(attributes)))
    labels = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1) if len(labels) else \
        np.zeros((0, len(attributes)))
    if preds.shape != labels.shape or preds.shape[1] != len(attributes):
        raise ValueError(f"regression_metrics: preds {preds.shape}, labels {labels.shape}, "
                         f"{len(attributes)} attributes")
    valid = labels != ignore_value
    per_attribute: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(attributes):
        mask = valid[:, j]
        n = int(mask.sum())
        entry: dict[str, Any] = {"n": n}
        if n:
            p, y = preds[mask, j], labels[mask, j]
            entry.update(mse=float(np.mean((p - y) ** 2)), pearson=pearson(p, y), spearman=spearman(p, y),
                         mean_label=float(y.mean()), mean_pred=float(p.mean()))
            if baseline is not None:
                entry["baseline_mse"] = float(np.mean((baseline[j] - y) ** 2))
        per_attribute[name] = entry
    n_cells = int(valid.sum())
    result: dict[str, Any] = {"n_rows": int(len(labels)), "n_cells": n_cells,
                              "mse": float(((preds - labels) ** 2)[valid].mean()) if n_cells else None,
                              "per_attribute": per_attribute}
    if baseline is not None and n_cells:
        base = np.broadcast_to(np.asarray(baseline, dtype=np.float64), labels.shape)
        result["baseline_mse"] = float(((base - labels) ** 2)[valid].mean())
    return result


def label_means(labels: Any, ignore_value: float = IGNORE_VALUE) -> list[float]:
    """Per-attribute mean of the labelled cells (0.0 where an attribute has none): the constant baseline."""
    labels = np.asarray(labels, dtype=np.float64)
    if labels.size == 0:
        return []
    valid = labels != ignore_value
    sums = np.where(valid, labels, 0.0).sum(axis=0)
    counts = valid.sum(axis=0)
    return [float(s / c) if c else 0.0 for s, c in zip(sums, counts, strict=True)]


def pairwise_metrics(r_chosen: Any, r_rejected: Any, strength: Any = None) -> dict[str, Any]:
    """Accuracy of ``r_chosen > r_rejected`` over non-tie pairs (strength != 0), and over all pairs.

    Ties (strength 0) say nothing about order, so they are left out of ``accuracy``.
    """
    chosen = np.asarray(r_chosen, dtype=np.float64)
    rejected = np.asarray(r_rejected, dtype=np.float64)
    correct = chosen > rejected
    strength = np.ones_like(chosen) if strength is None else np.abs(np.asarray(strength, dtype=np.float64))
    decided = strength > 0
    result: dict[str, Any] = {
        "n_pairs": int(len(chosen)), "n_ties": int((~decided).sum()),
        "accuracy": float(correct[decided].mean()) if decided.any() else None,
        "mean_margin": float((chosen - rejected).mean()) if len(chosen) else None,
    }
    if decided.any():
        # Strength-weighted accuracy: strongly preferred pairs should be the easiest to get right.
        result["weighted_accuracy"] = float((correct * strength)[decided].sum() / strength[decided].sum())
    return result
