"""A LoRA SFT run (single process, the job's own pieces) exports merged weights that generate like the adapter."""

from __future__ import annotations

import pytest

from steerray.config import LoraConfig, OptimConfig, ScalingConfig
from steerray.data.sft import render_trained, tokenize_sft
from steerray.templates import generation_prompt, make_conversation
from steerray.training.batching import collate_sft


def test_lora_merged_export_generates_same_tokens(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from steerray.models.generation import generate_batch
    from steerray.models.loading import load_causal_lm, load_tokenizer
    from steerray.training.losses import normalize_loss, token_cross_entropy_sum
    from steerray.training.strategy import (
        build_optimizer_and_schedule,
        export_model,
        prepare_model,
        resolve_strategy,
    )

    torch.manual_seed(0)
    tokenizer = load_tokenizer(tiny_model_dir)
    strategy = resolve_strategy(ScalingConfig(precision="fp32"))
    assert strategy.kind == "single"
    prepared = prepare_model(load_causal_lm(tiny_model_dir), strategy, LoraConfig(enabled=True, r=4, alpha=8))
    stepper = build_optimizer_and_schedule(prepared, OptimConfig(lr=1e-2, min_lr=1e-2, warmup_steps=0), max_steps=4)
    examples = [tokenize_sft(render_trained(make_conversation([("User", f"Say {w}.", None),
                                                                ("Assistant", f"{w} {w} {w}.", "verbosity:1")])),
                             tokenizer, 128) for w in ("red", "blue")]
    batch = collate_sft([e.input_ids for e in examples], [e.labels for e in examples], tokenizer.pad_token_id)
    losses = []
    for _ in range(4):
        logits = prepared.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total, count = token_cross_entropy_sum(logits, batch["labels"], shift=False)
        stepper.backward(normalize_loss(total, int(count)))
        stepper.step()
        losses.append(float(total.detach() / count))
    assert losses[-1] < losses[0]  # the adapter learned something, so merging is not a no-op

    prepared.eval()
    prompts = [generation_prompt([{"role": "user", "content": "Say red."}], "verbosity:1")]
    adapter_answer = generate_batch(prepared.model, tokenizer, prompts, max_new_tokens=12)
    export_model(prepared, tmp_path / "model", tokenizer)  # lora.merge_on_export defaults to True
    assert not (tmp_path / "model" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    merged_answer = generate_batch(merged, tokenizer, prompts, max_new_tokens=12)
    assert merged_answer == adapter_answer
    assert merged_answer[0].completion_tokens > 0
    with torch.no_grad():
        ids = batch["input_ids"][:1]
        expected = prepared.model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-4)
    base = load_causal_lm(tiny_model_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged.state_dict()[name], base.state_dict()[name])
    assert pytest.approx(0.0) != float((merged.state_dict()[name] - base.state_dict()[name]).abs().max())
