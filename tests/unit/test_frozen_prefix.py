"""The frozen-prefix cache of train-reward: rows seen before skip the frozen layers, with the same predictions,
losses and gradients as the whole model; it stays within its budget and turns itself off where it cannot help."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steerray.config import LoraConfig, RewardConfig, ScalingConfig, load_config
from steerray.models.reward import build_reward_model, reward_readout
from steerray.stages.train_reward import RewardTask
from steerray.training.frozen_prefix import FrozenPrefixCache, first_trained_layer, reward_predictions
from steerray.training.losses import masked_mse_sum
from steerray.training.strategy import prepare_model, resolve_strategy


def _rows(count: int = 6) -> dict[str, list]:
    rng = np.random.default_rng(0)
    ids = [rng.integers(5, 500, size=int(rng.integers(6, 20))).tolist() for _ in range(count)]
    labels = [rng.integers(0, 5, size=9).astype(np.float32).tolist() for _ in range(count)]
    return {"input_ids": ids, "label": labels, "length": [len(i) for i in ids]}


def _task_and_model(tiny_model_dir, budget_mb: float = 64.0, last_layers: int | None = 1):
    torch.manual_seed(0)
    config = load_config(RewardConfig, "tiny/reward", [f"model.name={tiny_model_dir}",
                                                       f"train.frozen_prefix_cache_mb={budget_mb}"])
    task = RewardTask(config, {})
    lora = LoraConfig(enabled=True, r=4, alpha=8, last_layers=last_layers)
    prepared = prepare_model(build_reward_model(tiny_model_dir), resolve_strategy(ScalingConfig(precision="fp32")),
                             lora, trainable_modules=["score"], wrap=reward_readout)
    for name, param in prepared.module.named_parameters():
        if "lora_B" in name:  # B starts at zero: move it so the trained layers matter
            torch.nn.init.normal_(param, std=0.05)
    return task, prepared


def _loss_and_grads(task, prepared, batch, cached: bool):
    for p in prepared.module.parameters():
        p.grad = None
    preds = reward_predictions(task.cache, prepared, batch) if cached else task.predict(prepared, batch)
    loss = masked_mse_sum(preds, batch["labels"])[0]
    loss.backward()
    grads = [p.grad.clone() for p in prepared.module.parameters() if p.requires_grad]
    return preds.detach(), float(loss.detach()), grads


def test_cached_rows_give_the_whole_models_predictions_loss_and_gradients(tiny_model_dir):
    task, prepared = _task_and_model(tiny_model_dir)
    rows = _rows()
    cache = task.cache = FrozenPrefixCache.for_training(prepared, task.config.train.frozen_prefix_cache_mb)
    assert cache.enabled and cache.layer == 1  # tiny-llama has 2 layers; LoRA on the top one
    for indices in ([0, 1, 2], [2, 3, 0], [5, 4, 1, 0]):  # misses, then a mix of hits and misses in new widths
        batch = task.micro_batch(rows, indices, 0, torch.device("cpu"))
        whole_preds, whole_loss, whole_grads = _loss_and_grads(task, prepared, batch, cached=False)
        preds, loss, grads = _loss_and_grads(task, prepared, batch, cached=True)
        torch.testing.assert_close(preds, whole_preds, rtol=1e-5, atol=1e-5)
        assert loss == pytest.approx(whole_loss, rel=1e-5)
        for got, want in zip(grads, whole_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert cache.checked and cache.enabled
    assert cache.stats()["prefix_cache_rows"] == 6
    assert (cache.hits, cache.misses) == (4, 6)  # 2 and 0 again in the second batch; 1, 0 in the third


def test_budget_caps_what_is_kept_and_rows_beyond_it_still_score_right(tiny_model_dir):
    row_mb = 20 * 64 * 4 / 1024**2  # at most 20 tokens x 64 hidden x fp32 per row
    task, prepared = _task_and_model(tiny_model_dir, budget_mb=2 * row_mb)
    rows = _rows()
    batch = task.micro_batch(rows, [0, 1, 2, 3, 4], 0, torch.device("cpu"))
    task.cache = FrozenPrefixCache.for_training(prepared, task.config.train.frozen_prefix_cache_mb)
    for _ in range(2):
        preds = reward_predictions(task.cache, prepared, batch).detach()
        torch.testing.assert_close(preds, task.predict(prepared, batch).detach(), rtol=1e-5, atol=1e-5)
    cache = task.cache
    assert 0 < len(cache.rows) < 5 and cache.bytes <= cache.budget  # some rows kept, not all five
    assert cache.misses == 10 - cache.hits and cache.hits == len(cache.rows)


def test_no_cache_where_nothing_below_the_trained_layers_is_frozen(tiny_model_dir):
    task, prepared = _task_and_model(tiny_model_dir, last_layers=None)
    assert first_trained_layer(prepared.model) == 0
    assert not FrozenPrefixCache.for_training(prepared, 64).enabled
    task, prepared = _task_and_model(tiny_model_dir, budget_mb=0)
    assert not FrozenPrefixCache.for_training(prepared, task.config.train.frozen_prefix_cache_mb).enabled


def test_a_sliced_forward_that_disagrees_turns_the_cache_off(tiny_model_dir):
    _, prepared = _task_and_model(tiny_model_dir)
    cache = FrozenPrefixCache(prepared.model, 64)
    cache.rows[0] = torch.zeros(3, 64)
    whole = torch.tensor([[1.0, 2.0]])
    assert cache.agrees(whole + 1e-5, whole, "fp32")
    assert not cache.agrees(whole * 1.5, whole, "fp32")  # e.g. a backbone that scales inputs_embeds
    assert not cache.enabled and cache.rows == {} and cache.bytes == 0
