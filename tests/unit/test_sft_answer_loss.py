"""The causal-LM losses project only the trained positions onto the vocabulary: SFT's loss and gradients and
SteerLM 2.0's per-response NLL are those of the full logits."""

from __future__ import annotations

import json

import pytest
import torch

from steerray.config import LoraConfig
from steerray.data.demo import demo_conversation
from steerray.data.sft import IGNORE_INDEX, example_from_json
from steerray.models.loading import load_causal_lm, load_tokenizer
from steerray.training.batching import collate_sft
from steerray.training.losses import projects_chosen_positions, trained_token_nll
from steerray.training.steerlm2 import row_nll, sequence_nll
from steerray.training.strategy import Strategy, prepare_model


def _loss_and_grads(prepared, batch, trained_only: bool) -> tuple[float, list[torch.Tensor]]:
    params = [p for p in prepared.module.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss = trained_token_nll(prepared.module, batch["input_ids"], batch["attention_mask"], batch["labels"],
                             trained_only)[0].sum()
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in params]


@pytest.mark.parametrize("lora", [True, False])
def test_trained_positions_only_gives_the_full_logits_loss_and_gradients(tiny_model_dir, lora):
    torch.manual_seed(0)
    tokenizer = load_tokenizer(tiny_model_dir)
    examples = [example_from_json(json.dumps(demo_conversation(i)), tokenizer, 160)[2] for i in (0, 1, 5)]
    batch = collate_sft([e.input_ids for e in examples], [e.labels for e in examples], tokenizer.pad_token_id)
    trained = int((batch["labels"] != IGNORE_INDEX).sum())
    assert 0 < trained < batch["labels"].numel()  # prompts and padding are not trained
    model = load_causal_lm(tiny_model_dir)
    model.config.use_cache = False
    prepared = prepare_model(model, Strategy(kind="single", device=torch.device("cpu"), precision="fp32"),
                             LoraConfig(enabled=True, r=4, alpha=8) if lora else None)
    if lora:  # LoRA's B starts at zero: move it so the adapters change the loss and get full gradients
        for name, param in prepared.module.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
    assert projects_chosen_positions(prepared.module) and projects_chosen_positions(prepared.base_hf_model())
    full_loss, full_grads = _loss_and_grads(prepared, batch, trained_only=False)
    kept_loss, kept_grads = _loss_and_grads(prepared, batch, trained_only=True)
    assert kept_loss == pytest.approx(full_loss, rel=1e-5)
    # the sum over trained tokens, by hand from the full logits
    with torch.no_grad():
        logits = prepared.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    by_hand = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
    assert kept_loss == pytest.approx(float(by_hand), rel=1e-5)
    assert len(full_grads) == len(kept_grads) > 0
    for full, kept in zip(full_grads, kept_grads, strict=True):
        torch.testing.assert_close(kept, full, rtol=1e-4, atol=1e-6)


def test_steerlm2_row_nll_equals_the_per_row_sum_over_full_logits(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    examples = [example_from_json(json.dumps(demo_conversation(i)), tokenizer, 160)[2] for i in (2, 3, 4, 7)]
    batch = collate_sft([e.input_ids for e in examples], [e.labels for e in examples], tokenizer.pad_token_id)
    model = load_causal_lm(tiny_model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = sequence_nll(logits, batch["labels"])
        got = row_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert got.shape == (4,) and bool((want > 0).all())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
