"""The reference's learning-rate schedule (NeMo CosineAnnealing), value by value, and the AdamW builder."""

from __future__ import annotations

import math

import pytest
import torch

from steerray.config import ConfigError, OptimConfig
from steerray.training.schedule import build_optimizer, build_scheduler, check_schedule, nemo_cosine_lr


def lr(step, **kw):
    return nemo_cosine_lr(step, **{"lr": 1.0, "min_lr": 0.1, "warmup_steps": 4, "constant_steps": 0,
                                   "max_steps": 14, **kw})


def test_no_constant_steps_warmup_then_cosine():
    assert lr(0) == pytest.approx(1 / 5)  # NeMo: lr * (step + 1) / (warmup + 1)
    assert lr(3) == pytest.approx(4 / 5)
    assert lr(4) == pytest.approx(1.0)
    # cosine over max_steps - warmup = 10 steps
    assert lr(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert lr(14) == pytest.approx(0.1)
    assert lr(20) == pytest.approx(0.1)


def test_constant_steps_megatron_shape():
    # SFT recipe shape: warm-up 1, cosine 6e-6 -> 5e-6, then 5e-6 held for the last constant steps
    kw = {"lr": 6e-6, "min_lr": 5e-6, "warmup_steps": 1, "constant_steps": 200, "max_steps": 800}
    assert nemo_cosine_lr(0, **kw) == 0.0  # Megatron warm-up: lr * step / warmup
    assert nemo_cosine_lr(1, **kw) == pytest.approx(6e-6)
    decay = 800 - 1 - 200
    assert nemo_cosine_lr(300, **kw) == pytest.approx(5e-6 + 1e-6 * 0.5 * (1 + math.cos(math.pi * 299 / decay)))
    assert nemo_cosine_lr(1 + decay, **kw) == pytest.approx(5e-6)
    assert nemo_cosine_lr(1 + decay + 1, **kw) == pytest.approx(5e-6)
    assert nemo_cosine_lr(799, **kw) == pytest.approx(5e-6)


def test_flat_recipe_lr_equals_min_lr():
    kw = {"lr": 2e-6, "min_lr": 2e-6, "warmup_steps": 10, "constant_steps": 0, "max_steps": 317}
    assert nemo_cosine_lr(10, **kw) == pytest.approx(2e-6)
    assert all(nemo_cosine_lr(s, **kw) == pytest.approx(2e-6) for s in range(10, 318))
    kw["constant_steps"] = 5  # the Megatron branch must not trip on lr == min_lr
    assert nemo_cosine_lr(100, **kw) == pytest.approx(2e-6)


def test_scheduler_drives_the_optimizer_lr():
    optim = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4, constant_steps=0)
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, max_steps=14)
    seen = []
    for _ in range(15):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([lr(s) for s in range(15)])


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decays = {len(g["params"]): g["weight_decay"] for g in optimizer.param_groups}
    assert decays == {1: 0.1, 3: 0.0}  # the Linear weight decays; its bias and both LayerNorm params don't


def test_impossible_schedules_fail_when_the_config_loads():
    from steerray.config import RewardConfig, load_config

    with pytest.raises(ConfigError, match="optim.min_lr=1e-05 is above optim.lr=1e-06"):
        load_config(RewardConfig, None, ["optim.lr=1e-6", "optim.min_lr=1e-5"])
    with pytest.raises(ConfigError, match="exceed train.max_steps"):
        load_config(RewardConfig, None, ["optim.warmup_steps=8", "optim.constant_steps=5", "train.max_steps=10"])
    # The real step count can be lower than train.max_steps (train.epochs_cap): checked again at launch.
    with pytest.raises(ConfigError, match="exceed train.max_steps"):
        check_schedule(OptimConfig(warmup_steps=8, constant_steps=5), 10)
