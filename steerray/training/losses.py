"""Losses, once, for reward training and SFT: each returns ``(sum, count)`` so callers normalise globally.

Why sums: a global batch is split over micro-batches and workers that hold different numbers of valid
cells (labels present) or trained tokens. Averaging per micro-batch and then over micro-batches weighs a
token in a short micro-batch more than one in a long one. Instead each micro-batch's loss *sum* is divided
by the count over the whole global batch (all micro-batches, all workers; one all-reduce per step)::

    total = strategy.all_reduce_sum([count of every micro-batch of this step])[0]
    for micro in micro_batches:
        loss_sum, _ = masked_mse_sum(pred, labels)
        stepper.backward(normalize_loss(loss_sum, total, strategy.world_size))

``normalize_loss`` multiplies by the world size because DDP/FSDP average gradients over workers.
The ``*_loss`` helpers give the plain mean of one batch (tests, evaluation).
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any, cast

from steerray.attributes import IGNORE_VALUE
from steerray.data.sft import IGNORE_INDEX  # token label that carries no loss (HF / NeMo convention)

BT_KINDS = ("scaled_bt", "regular_bt", "margin_bt")


def masked_mse_sum(pred: Any, labels: Any, ignore_value: float = IGNORE_VALUE) -> tuple[Any, Any]:
    """Sum of squared errors over cells whose label is not ``ignore_value``, and the number of such cells.

    ``pred`` and ``labels`` are ``[B, A]``; computed in float32 whatever the model's precision.
    """
    import torch

    labels = labels.to(pred.device)
    mask = labels != ignore_value
    diff = torch.where(mask, pred.float() - labels.float(), torch.zeros((), device=pred.device))
    return (diff * diff).sum(), mask.sum()


def masked_mse(pred: Any, labels: Any, ignore_value: float = IGNORE_VALUE) -> Any:
    """Mean over valid (sample, attribute) cells, as the reference's regression loss (not per-sample first)."""
    total, count = masked_mse_sum(pred, labels, ignore_value)
    if int(count) == 0:
        raise ValueError("masked_mse: every label is the ignore value; nothing to learn from")
    return total / count


def bradley_terry_sum(r_chosen: Any, r_rejected: Any, strength: Any = None,
                      kind: str = "scaled_bt") -> tuple[Any, Any]:
    """Bradley-Terry loss summed over explicit pairs, and the number of pairs.

    - ``regular_bt``: ``-log sigmoid(r_c - r_r)``
    - ``margin_bt``: ``-log sigmoid(r_c - r_r - |s|)``
    - ``scaled_bt``: ``|s| * -log sigmoid(r_c - r_r)`` (ties, s = 0, weigh nothing; strength 3 weighs 3x)

    Rewards are ``[P]`` (the helpfulness output of each side); ``strength`` is ``[P]`` (sign ignored: the pair
    already says which side was chosen).
    """
    import torch
    import torch.nn.functional as F

    if kind not in BT_KINDS:
        raise ValueError(f"unknown Bradley-Terry loss {kind!r}; choose from {', '.join(BT_KINDS)}")
    diff = r_chosen.float() - r_rejected.float()
    if kind == "regular_bt":
        per_pair = -F.logsigmoid(diff)
    else:
        if strength is None:
            raise ValueError(f"{kind} needs the preference strength of each pair")
        margin = torch.as_tensor(strength, device=diff.device, dtype=torch.float32).abs()
        per_pair = -F.logsigmoid(diff - margin) if kind == "margin_bt" else margin * -F.logsigmoid(diff)
    return per_pair.sum(), torch.tensor(per_pair.numel(), device=diff.device)


def bradley_terry_loss(r_chosen: Any, r_rejected: Any, strength: Any = None, kind: str = "scaled_bt") -> Any:
    total, count = bradley_terry_sum(r_chosen, r_rejected, strength, kind)
    return total / count.clamp(min=1)


def token_cross_entropy_sum(logits: Any, labels: Any, *, shift: bool = True,
                            ignore_index: int = IGNORE_INDEX) -> tuple[Any, Any]:
    """Next-token cross entropy summed over trained tokens, and the number of trained tokens.

    ``logits`` ``[B, T, V]``, ``labels`` ``[B, T]`` with ``ignore_index`` where no loss is taken. With
    ``shift=True`` (HF convention) position t predicts ``labels[:, t + 1]``; pass already shifted labels with
    ``shift=False``. Computed in float32.
    """
    import torch.nn.functional as F

    if shift:
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    labels = labels.to(logits.device)
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    return total, (flat_labels != ignore_index).sum()


def projects_chosen_positions(model: Any) -> bool:
    """Whether the causal LM inside ``model`` (DDP, DeepSpeed and peft unwrapped) takes a boolean
    ``logits_to_keep`` mask (transformers >= 5): then only the trained positions need the lm_head."""
    inner = getattr(model, "module", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return _takes_position_mask(cast(Hashable, type(inner)))


@functools.cache
def _takes_position_mask(model_class: Any) -> bool:
    import inspect

    from transformers import modeling_utils

    return hasattr(modeling_utils, "slice_logits_to_keep") and \
        "logits_to_keep" in inspect.signature(model_class.forward).parameters


def trained_token_nll(model: Any, input_ids: Any, attention_mask: Any, labels: Any,
                      trained_only: bool | None = None) -> tuple[Any, Any]:
    """Next-token NLL of every trained token ``[N]`` (float32), and the batch row of each ``[N]``.

    ``labels`` come shifted (``collate_sft``: position t's label is token t + 1, ``IGNORE_INDEX`` where no loss
    is taken). ``trained_only`` (default: wherever the model takes it) projects just the trained positions onto
    the vocabulary: the same numbers without the lm_head matmul and the [tokens x vocabulary] logits of every
    prompt and padding position (49,152 wide for SmolLM2). Call it inside the strategy's autocast.
    """
    import torch.nn.functional as F

    labels = labels.to(input_ids.device)
    trained = labels != IGNORE_INDEX
    if trained_only is None:
        trained_only = projects_chosen_positions(model)
    if trained_only:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=trained).logits
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[trained]
    return F.cross_entropy(logits.float(), labels[trained], reduction="none"), trained.nonzero()[:, 0]


def token_cross_entropy(logits: Any, labels: Any, *, shift: bool = True, ignore_index: int = IGNORE_INDEX) -> Any:
    total, count = token_cross_entropy_sum(logits, labels, shift=shift, ignore_index=ignore_index)
    return total / count.clamp(min=1)


def normalize_loss(loss_sum: Any, global_count: float, world_size: int = 1) -> Any:
    """A micro-batch's share of the global-batch mean, scaled for gradient averaging across workers.

    Summing the result's gradients over the step's micro-batches and averaging them over ``world_size``
    workers gives exactly the gradient of ``(sum over the global batch) / global_count``.
    """
    if global_count <= 0:
        return loss_sum * 0.0  # nothing to learn in this step; keep the graph so collectives still run
    return loss_sum * (world_size / global_count)
