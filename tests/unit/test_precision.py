"""bf16 where the device computes it natively: the choice, and that it changes the numbers only a little.

On a CPU with AVX512-BF16 or AMX, ``precision: auto`` trains with bf16 autocast (fp32 master weights; frozen
Linear weights stored in bf16) and scores and generates with bf16 weights. These tests pin down the choice and
the tolerances: reward labels from bf16 scoring agree with fp32 scoring on the real data samples, and a LoRA
run in bf16 follows the fp32 run's loss.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from steerray.config import LoraConfig, OptimConfig, ScalingConfig
from steerray.models import precision
from steerray.training.strategy import build_optimizer_and_schedule, prepare_model, resolve_strategy


def test_auto_follows_the_hardware_and_explicit_choices_are_obeyed(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision("auto", "cpu") == "fp32"
    with caplog.at_level(logging.WARNING, logger="steerray"):
        assert precision.resolve_precision("bf16", "cpu") == "bf16"
    assert "does not compute bf16 natively" in caplog.text
    assert precision.resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve_precision("fp16", "cpu")


def test_the_training_strategy_uses_the_resolved_precision():
    strategy = resolve_strategy(ScalingConfig())
    assert strategy.precision == ("bf16" if precision.cpu_has_native_bf16() else "fp32")
    assert resolve_strategy(ScalingConfig(precision="fp32")).precision == "fp32"


def real_reward_texts(shared_data, limit: int = 48) -> list[str]:
    from steerray.data.sources import convert_raw_row

    """HelpSteer2's rows through prepare's converter, then oasst1 answers after their prompts."""
    path = shared_data / "helpsteer2" / "helpsteer2_validation_sample_hfschema.jsonl"
    texts = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        rows = convert_raw_row("helpsteer2", {"file": str(path), "line": line_no, "raw": line, "error": ""}, "")
        texts += [json.loads(r["payload"])["text"] for r in rows if r["kind"] == "regression"]
    oasst = [json.loads(line) for line in (shared_data / "oasst1" / "oasst1_en_validation.jsonl").read_text()
             .splitlines()[:400]]
    by_id = {m["message_id"]: m for m in oasst}
    for message in oasst:
        parent = by_id.get(message.get("parent_id"))
        if message["role"] == "assistant" and parent is not None and len(texts) < limit:
            texts.append(f"<extra_id_0>System\nsys\n<extra_id_1>User\n{parent['text']}\n<extra_id_1>Assistant\n"
                         f"{message['text']}\n<extra_id_2>")
    return texts[:limit]


@pytest.mark.skipif(not precision.cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_bf16_scoring_gives_the_fp32_labels_on_the_real_samples(tiny_reward_dir, shared_data):
    """Tolerance: predictions within 5% of their spread (mean absolute difference), and the clipped,
    rounded 0-4 labels the annotator writes equal for at least 90% of the cells."""
    from steerray.annotation import load_predictor
    from steerray.attributes import clip_round

    texts = real_reward_texts(shared_data)
    assert len(texts) >= 20
    fp32, _ = load_predictor(tiny_reward_dir, max_length=256, precision="fp32")(texts)
    bf16, _ = load_predictor(tiny_reward_dir, max_length=256, precision="bf16")(texts)
    fp32, bf16 = np.asarray(fp32), np.asarray(bf16)
    assert np.abs(bf16 - fp32).mean() < 0.05 * fp32.std()
    labels = np.vectorize(clip_round)
    assert (labels(bf16) == labels(fp32)).mean() >= 0.90


def lora_losses(precision_name: str, steps: int = 6) -> tuple[list[float], torch.nn.Module]:
    from steerray.models.loading import TINY_ALIAS, load_causal_lm
    from steerray.training.losses import token_cross_entropy_sum

    torch.manual_seed(0)
    model = load_causal_lm(TINY_ALIAS)
    strategy = resolve_strategy(ScalingConfig(precision=precision_name))
    prepared = prepare_model(model, strategy, LoraConfig(enabled=True, r=8, alpha=16))
    stepper = build_optimizer_and_schedule(prepared, OptimConfig(lr=5e-3, min_lr=5e-3, warmup_steps=0), steps)
    ids = torch.randint(5, 400, (4, 48), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        with stepper.micro_step(last=True):
            with strategy.autocast():
                logits = prepared.module(input_ids=ids).logits
            loss, count = token_cross_entropy_sum(logits, ids)
            stepper.backward(loss / count)
        stepper.step()
        losses.append(float(loss / count))
    return losses, prepared


@pytest.mark.skipif(not precision.cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_lora_in_bf16_keeps_trainable_weights_fp32_and_follows_the_fp32_loss():
    fp32, _ = lora_losses("fp32")
    bf16, prepared = lora_losses("bf16")
    dtypes = {name: p.dtype for name, p in prepared.model.named_parameters()}
    assert all(dtypes[n] == torch.float32 for n in dtypes if "lora_" in n)  # what trains stays fp32
    assert any(d == torch.bfloat16 for n, d in dtypes.items() if "base_layer" in n)  # frozen matmuls in bf16
    assert dtypes[next(n for n in dtypes if "embed_tokens" in n)] == torch.float32  # the residual stream too
    assert fp32[-1] < fp32[0] and bf16[-1] < bf16[0]
    assert abs(bf16[-1] - fp32[-1]) / fp32[-1] < 0.02


def test_training_attention_is_eager_only_for_bf16_on_a_cpu_without_amx(monkeypatch):
    from steerray.training import strategy as strategy_module
    from steerray.training.strategy import Strategy, training_attention

    cpu = torch.device("cpu")
    monkeypatch.setattr(strategy_module, "cpu_has_amx", lambda: False)
    assert training_attention("auto", Strategy(kind="single", device=cpu, precision="bf16")) == "eager"
    assert training_attention("auto", Strategy(kind="single", device=cpu, precision="fp32")) is None
    assert training_attention("sdpa", Strategy(kind="single", device=cpu, precision="bf16")) == "sdpa"
    monkeypatch.setattr(strategy_module, "cpu_has_amx", lambda: True)
    assert training_attention("auto", Strategy(kind="single", device=cpu, precision="bf16")) is None
    assert training_attention("eager", Strategy(kind="single", device=cpu, precision="fp32")) == "eager"


def test_eager_and_sdpa_attention_train_the_same_model():
    """The kernel the strategy picks changes the speed, not the model: the same LoRA steps give the same
    losses and the same gradients (fp32, padded rows, so the attention mask is used)."""
    from steerray.models.loading import TINY_ALIAS, load_causal_lm
    from steerray.training.losses import token_cross_entropy_sum

    ids = torch.randint(5, 400, (3, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # right padding on one row
    results = {}
    for kernel in ("sdpa", "eager"):
        torch.manual_seed(0)
        model = load_causal_lm(TINY_ALIAS)
        prepared = prepare_model(model, resolve_strategy(ScalingConfig(precision="fp32")),
                                 LoraConfig(enabled=True, r=8, alpha=16), attention=kernel)
        assert model.config._attn_implementation == kernel
        logits = prepared.module(input_ids=ids, attention_mask=mask).logits
        loss, count = token_cross_entropy_sum(logits[mask.bool()][None], ids[mask.bool()][None])
        (loss / count).backward()
        grads = [p.grad.clone() for p in prepared.model.parameters() if p.requires_grad]
        results[kernel] = float(loss / count), grads
    (loss_sdpa, grads_sdpa), (loss_eager, grads_eager) = results["sdpa"], results["eager"]
    assert loss_eager == pytest.approx(loss_sdpa, rel=1e-5)
    for a, b in zip(grads_sdpa, grads_eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
