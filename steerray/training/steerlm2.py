"""SteerLM 2.0's objective (spec 7.2), as pure torch functions over groups of responses.

A group is the ``n`` responses sampled for one prompt and label; tensors are ``[..., n]`` with the group
axis last. Per step:

1. importance weights ``w = softmax(log P(a|x,y) + log P(y|x) - log Q'(y|a,x))`` (:func:`importance_weights`);
2. a no-grad pass under the current policy gives each response's summed token NLL (:func:`response_nll`),
   the baseline is ``b = softmax(-NLL - log Q')`` = softmax of ``log Q_theta - log Q'`` (:func:`baseline_weights`);
3. each response's loss is ``(w - b) * NLL / avg_tokens`` (:func:`steerlm2_loss`), ``w - b`` held constant,
   so the gradient is ``-sum (w - b) grad log Q_theta(y|a,x) / avg_tokens``;
4. the logged ``distance`` is KL(w || b) per group with the reference's 1e-8 (:func:`distance`).

Groups whose log values, NLL or weights are not finite are skipped and counted (:func:`nonfinite_groups`),
never trained on. :func:`sequence_nll` is the one definition of "sum of token NLL over the trained tokens":
the data generator's ``log Q'`` (and ``log P(y|x)``) and the trainer's NLL both call it on the same shifted
labels, so at ``theta = Q'`` the baseline is exactly uniform up to float noise.

``avg_tokens``, as the reference computes it: the group's mean number of loss tokens divided by the number
of micro-batches the group is split into (``num_microbatches / num_groups``); the reference then averages
the micro-batch loss sums over all micro-batches. Both together give the step loss
``(1 / num_groups) * sum_groups sum_i (w_i - b_i) NLL_i / mean_tokens``, which :func:`steerlm2_loss_sum`
returns as ``(sum, num_groups)`` for ``steerray.training.losses.normalize_loss`` over the global group count,
so micro-batches need not align with groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from steerray.training.batching import collate_sft
from steerray.training.losses import IGNORE_INDEX, trained_token_nll

KL_EPS = 1e-8  # the reference adds it to both distributions before the KL


def _float64(values: Any) -> Any:
    import torch

    return torch.as_tensor(values, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# Token NLL: the generator's log Q' and the trainer's NLL
# --------------------------------------------------------------------------------------------------

def sequence_nll(logits: Any, labels: Any, mask: Any = None) -> Any:
    """Per row, the sum of next-token NLL over the trained positions: ``[B, T, V], [B, T] -> [B]`` (float32).

    ``labels`` are already shifted (position t's label is token t + 1, as ``collate_sft`` makes them);
    ``mask`` defaults to ``labels != IGNORE_INDEX``. ``-sequence_nll`` is ``log Q(y|...)`` of the response.
    """
    import torch
    import torch.nn.functional as F

    labels = labels.to(logits.device)
    mask = (labels != IGNORE_INDEX) if mask is None else mask.to(logits.device).bool()
    targets = torch.where(mask, labels, torch.zeros_like(labels))  # any valid id; masked out below
    token_nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return (token_nll * mask).sum(dim=-1)


def row_nll(model: Any, input_ids: Any, attention_mask: Any, labels: Any) -> Any:
    """:func:`sequence_nll` from the model itself, ``[B]`` float32: only the trained positions are projected onto
    the vocabulary where transformers can (``trained_token_nll``). Call it inside the strategy's autocast."""
    nll, rows = trained_token_nll(model, input_ids, attention_mask, labels)
    return nll.new_zeros(input_ids.shape[0]).index_add(0, rows, nll)


def response_nll(model: Any, input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int,
                 *, micro_batch: int = 8) -> Any:
    """No-grad :func:`sequence_nll` of many shifted examples, ``micro_batch`` at a time: ``[N]`` float32.

    ``model`` is anything called as ``model(input_ids=, attention_mask=)`` returning ``.logits`` (an HF causal
    LM, or training's prepared root), with ``logits_to_keep=`` too where its causal LM takes that. The generator negates it for ``log Q'`` and ``log P(y|x)``; the trainer
    uses it for the baseline pass. Train/eval mode is left to the caller.
    """
    import torch

    if len(input_ids) != len(labels):
        raise ValueError(f"response_nll: {len(input_ids)} inputs but {len(labels)} label rows")
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(input_ids), micro_batch):
            batch = collate_sft(input_ids[start:start + micro_batch], labels[start:start + micro_batch], pad_id)
            out.append(row_nll(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                               batch["labels"].to(device)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


# --------------------------------------------------------------------------------------------------
# Weights, baseline, distance, skips
# --------------------------------------------------------------------------------------------------

def importance_weights(log_pa: Any, log_py: Any, log_q: Any) -> Any:
    """Self-normalised weights per group: ``softmax(log P(a|x,y) + log P(y|x) - log Q'(y|a,x))`` (float64)."""
    import torch

    return torch.softmax(_float64(log_pa) + _float64(log_py) - _float64(log_q), dim=-1)


def baseline_weights(nll_theta: Any, log_q: Any) -> Any:
    """Per group ``softmax(-NLL_theta - log Q')`` = softmax of ``log Q_theta - log Q'`` (float64)."""
    import torch

    return torch.softmax(-_float64(nll_theta) - _float64(log_q), dim=-1)


def distance(weights: Any, baseline: Any, eps: float = KL_EPS) -> Any:
    """KL(w || b) per group, ``eps`` added to both as the reference does: ``[..., n] -> [...]``."""
    import torch

    w, b = _float64(weights) + eps, _float64(baseline) + eps
    return torch.sum(w * torch.log(w / b), dim=-1)


def nonfinite_groups(*per_response: Any) -> Any:
    """Bool ``[...]``: True where any tensor has a NaN/inf in that group (skip it, count it)."""
    import torch

    skip = None
    for values in per_response:
        bad = ~torch.isfinite(_float64(values.detach() if hasattr(values, "detach") else values)).all(dim=-1)
        skip = bad if skip is None else skip | bad
    if skip is None:
        raise ValueError("nonfinite_groups needs at least one tensor")
    return skip


@dataclass(frozen=True)
class GroupWeights:
    weights: Any  # [G, n] float64, 0 in skipped groups
    baseline: Any  # [G, n] float64, 0 in skipped groups
    skip: Any  # [G] bool: not finite, never train on these groups
    distance: float  # mean KL(w || b) over the kept groups (0.0 if none)


def group_weights(log_pa: Any, log_py: Any, log_q: Any, nll_theta: Any) -> GroupWeights:
    """Steps 1, 2 and 4 for a batch of groups ``[G, n]``, with the per-group finite check."""
    import torch

    w = importance_weights(log_pa, log_py, log_q)
    b = baseline_weights(nll_theta, log_q)
    skip = nonfinite_groups(log_pa, log_py, log_q, nll_theta, w, b)
    w = torch.where(skip[..., None], torch.zeros_like(w), w)
    b = torch.where(skip[..., None], torch.zeros_like(b), b)
    kept = ~skip
    kl = float(distance(w[kept], b[kept]).mean()) if bool(kept.any()) else 0.0
    return GroupWeights(w, b, skip, kl)


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------

def avg_tokens(trained_tokens: Any, num_microbatches: int | None = None) -> Any:
    """The reference's ``avg_tokens`` per response, ``[G, n] -> [G, n]`` (float64).

    Each group's mean number of loss tokens over its responses, divided by ``num_microbatches / num_groups``
    (the micro-batches per group). ``None`` means one micro-batch per group: the plain mean.
    """
    tokens = _float64(trained_tokens)
    num_groups = tokens.shape[0] if tokens.dim() > 1 else 1
    per_group = num_microbatches / num_groups if num_microbatches is not None else 1.0
    if per_group <= 0:
        raise ValueError(f"avg_tokens: num_microbatches must be positive, got {num_microbatches}")
    return (tokens.mean(dim=-1, keepdim=True) / per_group).expand_as(tokens)


def steerlm2_loss(nll: Any, weights: Any, baseline: Any, avg_tokens: Any) -> Any:
    """Per response ``(w - b) * NLL / avg_tokens`` (any matching shapes). Only ``nll`` carries gradient.

    The reference sums this over a micro-batch and averages the sums over the step's micro-batches.
    """
    import torch

    coefficient = (_float64(weights) - _float64(baseline)) / _float64(avg_tokens)
    return nll * coefficient.to(device=nll.device, dtype=torch.float32)


def steerlm2_loss_sum(nll: Any, weights: Any, baseline: Any, trained_tokens: Any) -> tuple[Any, int]:
    """``(sum of per-response losses with avg_tokens = the group's mean, number of groups)`` for ``[G, n]``.

    Dividing the sum by the global number of groups (``normalize_loss``) gives the reference's step loss.
    """
    loss = steerlm2_loss(nll, weights, baseline, avg_tokens(trained_tokens))
    return loss.sum(), int(loss.shape[0]) if loss.dim() > 1 else 1
