"""The reference's learning-rate schedule (NeMo ``CosineAnnealing``) and the AdamW builder.

NeMo's CosineAnnealing has two shapes, reproduced exactly (``step`` = optimizer steps taken so far):

- ``constant_steps == 0``: warm-up ``lr * (step + 1) / (warmup + 1)`` while ``step <= warmup``, then cosine
  from ``lr`` to ``min_lr`` over ``max_steps - warmup`` steps, ``min_lr`` after ``max_steps``.
- ``constant_steps > 0`` (Megatron style): warm-up ``lr * step / warmup`` (so the very first step runs at 0),
  cosine to ``min_lr`` over ``max_steps - warmup - constant_steps`` steps, then ``min_lr`` held for the last
  ``constant_steps``.

``lr == min_lr`` gives a flat schedule after warm-up (the HelpSteer2 recipes).
"""

from __future__ import annotations

import math
from typing import Any

from steerray.config import ConfigError, OptimConfig


def nemo_cosine_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, constant_steps: int,
                   max_steps: int) -> float:
    """Learning rate at optimizer step ``step`` (0-based), as NeMo's CosineAnnealing computes it."""
    if max_steps < 1:
        raise ValueError("max_steps must be >= 1")
    decay_steps = max_steps - warmup_steps - constant_steps
    if constant_steps > 0:
        return _megatron_cosine(step, lr, min_lr, warmup_steps, decay_steps)
    if warmup_steps > 0 and step <= warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step > max_steps:
        return min_lr
    span = max_steps - warmup_steps
    mult = 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / span)) if span > 0 else 0.0
    return (lr - min_lr) * mult + min_lr


def _megatron_cosine(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    if warmup_steps > 0 and step <= warmup_steps:
        return lr * step / warmup_steps
    if step > warmup_steps + decay_steps or decay_steps <= 0:
        return min_lr
    ratio = (step - warmup_steps) / decay_steps
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (lr - min_lr)


def check_schedule(optim: OptimConfig, max_steps: int) -> None:
    """Reject a warm-up + constant phase longer than the run's real step count (``train.epochs_cap`` can
    stop a run before ``train.max_steps``; ``OptimConfig`` itself rejects ``min_lr`` above ``lr``)."""
    if optim.warmup_steps + optim.constant_steps > max_steps:
        raise ConfigError(f"optim.warmup_steps ({optim.warmup_steps}) + optim.constant_steps "
                          f"({optim.constant_steps}) exceed train.max_steps ({max_steps})")


def lr_at(optim: OptimConfig, max_steps: int, step: int) -> float:
    return nemo_cosine_lr(step, lr=optim.lr, min_lr=optim.min_lr, warmup_steps=optim.warmup_steps,
                          constant_steps=optim.constant_steps, max_steps=max_steps)


def build_optimizer(module: Any, optim: OptimConfig) -> Any:
    """AdamW over trainable parameters; no weight decay on biases and norm weights (1-D tensors), as NeMo."""
    import torch

    decay: list[Any] = []
    no_decay: list[Any] = []
    for _name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 else decay).append(param)
    if not decay and not no_decay:
        raise ConfigError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.betas[0], optim.betas[1]), eps=1e-8)


def build_scheduler(optimizer: Any, optim: OptimConfig, max_steps: int) -> Any:
    """A ``LambdaLR`` following :func:`nemo_cosine_lr`; call ``step()`` once per optimizer step."""
    import torch

    def factor(step: int) -> float:
        return lr_at(optim, max_steps, step) / optim.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
