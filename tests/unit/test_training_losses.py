"""Losses against hand-computed values, and the global normalisation across micro-batches and workers."""

from __future__ import annotations

import math

import pytest
import torch

from steerray.training.losses import (
    bradley_terry_loss,
    bradley_terry_sum,
    masked_mse,
    masked_mse_sum,
    normalize_loss,
    token_cross_entropy,
    token_cross_entropy_sum,
)


def test_masked_mse_is_mean_over_valid_cells():
    pred = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]])
    labels = torch.tensor([[2.0, -100.0, 1.0], [-100.0, -100.0, 4.0]])
    total, count = masked_mse_sum(pred, labels)
    # valid cells: (1-2)^2=1, (3-1)^2=4, (4-4)^2=0 -> sum 5 over 3 cells (not a per-row mean first)
    assert float(total) == 5.0 and int(count) == 3
    assert float(masked_mse(pred, labels)) == pytest.approx(5 / 3)


def test_masked_mse_gradient_ignores_missing_cells():
    pred = torch.tensor([[1.0, 50.0]], requires_grad=True)
    masked_mse(pred, torch.tensor([[3.0, -100.0]])).backward()
    assert pred.grad.tolist() == [[-4.0, 0.0]]  # d/dp (p-3)^2 = 2(p-3) = -4; nothing for the -100 cell


def test_masked_mse_without_labels_is_an_error():
    with pytest.raises(ValueError, match="ignore value"):
        masked_mse(torch.zeros(1, 2), torch.full((1, 2), -100.0))


def _nls(x: float) -> float:  # -log sigmoid(x)
    return math.log1p(math.exp(-x))


def test_bradley_terry_variants_match_hand_values():
    chosen, rejected = torch.tensor([2.0, 0.5, 1.0]), torch.tensor([1.0, 1.5, 1.0])
    strength = torch.tensor([3.0, 1.0, 0.0])  # the last pair is a tie
    diffs = [1.0, -1.0, 0.0]
    scaled = [3 * _nls(diffs[0]), 1 * _nls(diffs[1]), 0.0]
    total, count = bradley_terry_sum(chosen, rejected, strength, "scaled_bt")
    assert float(total) == pytest.approx(sum(scaled)) and int(count) == 3
    assert float(bradley_terry_loss(chosen, rejected, strength, "scaled_bt")) == pytest.approx(sum(scaled) / 3)
    regular = sum(_nls(d) for d in diffs) / 3
    assert float(bradley_terry_loss(chosen, rejected, strength, "regular_bt")) == pytest.approx(regular)
    margin = sum(_nls(d - s) for d, s in zip(diffs, [3.0, 1.0, 0.0], strict=True)) / 3
    assert float(bradley_terry_loss(chosen, rejected, strength, "margin_bt")) == pytest.approx(margin)
    # the sign of the strength is irrelevant: the pair already says which side won
    assert float(bradley_terry_loss(chosen, rejected, -strength, "scaled_bt")) == pytest.approx(sum(scaled) / 3)


def test_scaled_bt_tie_gives_no_gradient():
    chosen = torch.tensor([0.3], requires_grad=True)
    bradley_terry_loss(chosen, torch.tensor([0.9]), torch.tensor([0.0])).backward()
    assert float(chosen.grad) == 0.0


def test_token_cross_entropy_shift_and_ignore():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, -100, 4, 5], [-100, 3, 3, -100, -100]])
    total, count = token_cross_entropy_sum(logits, labels)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum")
    assert int(count) == 5  # shifted labels: [2,-100,4,5] and [3,3,-100,-100]
    assert float(total) == pytest.approx(float(expected), rel=1e-6)
    assert float(token_cross_entropy(logits, labels)) == pytest.approx(float(expected) / 5, rel=1e-6)
    unshifted, n = token_cross_entropy_sum(logits, labels, shift=False)
    assert int(n) == 6


def test_normalize_loss_reproduces_the_global_batch_mean_gradient():
    """Micro-batches with different numbers of valid cells, on 2 simulated workers, give exactly the
    gradient of the mean over all valid cells once gradients are averaged over workers."""
    torch.manual_seed(0)
    weight = torch.randn(3, 2, requires_grad=True)
    xs = [torch.randn(2, 3) for _ in range(4)]
    labels = [torch.tensor([[1.0, -100.0], [0.5, 2.0]]), torch.tensor([[-100.0, -100.0], [1.0, -100.0]]),
              torch.tensor([[3.0, 1.0], [2.0, 2.0]]), torch.tensor([[-100.0, 0.0], [-100.0, -100.0]])]
    full_total, full_count = masked_mse_sum(torch.cat(xs) @ weight, torch.cat(labels))
    (expected,) = torch.autograd.grad(full_total / full_count, weight)
    global_count = int(full_count)
    worker_grads = []
    for worker in (0, 1):  # worker w holds micro-batches w and w + 2
        grad = torch.zeros_like(weight)
        for i in (worker, worker + 2):
            part, _ = masked_mse_sum(xs[i] @ weight, labels[i])
            grad += torch.autograd.grad(normalize_loss(part, global_count, world_size=2), weight)[0]
        worker_grads.append(grad)
    averaged = (worker_grads[0] + worker_grads[1]) / 2  # what DDP / FSDP all-reduce does
    assert torch.allclose(averaged, expected, atol=1e-6)


def test_normalize_loss_with_nothing_to_learn_keeps_the_graph():
    x = torch.tensor(2.0, requires_grad=True)
    out = normalize_loss(x * 3, 0, 2)
    out.backward()
    assert float(out.detach()) == 0.0 and float(x.grad) == 0.0
