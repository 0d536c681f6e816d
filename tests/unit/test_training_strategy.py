"""Strategy pieces in one process: LoRA keeps the reward head, export round trips, checkpoints resume exactly."""

from __future__ import annotations

import pytest
import torch

from steerray.config import ConfigError, LoraConfig, OptimConfig, ScalingConfig
from steerray.training.strategy import (
    build_optimizer_and_schedule,
    export_model,
    plan_ray_scaling,
    prepare_model,
    resolve_strategy,
)

TEXTS = ["<extra_id_1>Assistant\nshort\n<extra_id_2>",
         "<extra_id_1>Assistant\na much longer answer with many more words in it\n<extra_id_2>",
         "<extra_id_1>Assistant\nmedium sized answer\n<extra_id_2>"]
LABELS = [[-100.0, -100.0, -100.0, -100.0, 1.0, 2.0, 3.0, 0.0, 0.0],
          [-100.0, -100.0, -100.0, -100.0, 3.0, 2.0, 3.0, 4.0, 4.0],
          [2.0, 0.0, 0.0, 1.0, -100.0, -100.0, -100.0, -100.0, 2.0]]


def _setup(tiny_model_dir, lora: LoraConfig | None, lr: float = 5e-3):
    from steerray.models.loading import load_tokenizer
    from steerray.models.reward import build_reward_model, encode_reward_texts, reward_readout

    torch.manual_seed(0)
    tokenizer = load_tokenizer(tiny_model_dir)
    model = build_reward_model(tiny_model_dir)
    prepared = prepare_model(model, resolve_strategy(ScalingConfig(precision="fp32")), lora, trainable_modules=["score"],
                             wrap=reward_readout)
    stepper = build_optimizer_and_schedule(prepared, OptimConfig(lr=lr, min_lr=lr / 10, warmup_steps=1), 20)
    batch = encode_reward_texts(tokenizer, TEXTS, 64)
    return tokenizer, prepared, stepper, batch


def _train(prepared, stepper, batch, steps: int) -> list[float]:
    from steerray.training.losses import masked_mse_sum, normalize_loss

    losses = []
    labels = torch.tensor(LABELS)
    for _ in range(steps):
        with stepper.micro_step(last=True):
            total, count = masked_mse_sum(prepared.module(batch.input_ids, batch.attention_mask), labels)
            stepper.backward(normalize_loss(total, int(count)))
        stepper.step()
        losses.append(float(total.detach() / count))
    return losses


def test_resolve_strategy_single_process_cpu():
    strategy = resolve_strategy(ScalingConfig(precision="fp32"))
    assert (strategy.kind, strategy.precision, strategy.world_size, strategy.device.type) == \
        ("single", "fp32", 1, "cpu")
    assert strategy.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
    assert strategy.all_gather_objects({"a": 1}) == [{"a": 1}]


def test_plan_ray_scaling_follows_the_cluster():
    cpu = plan_ray_scaling(ScalingConfig(), gpus_in_cluster=0)
    assert (cpu.num_workers, cpu.use_gpu, cpu.backend, cpu.resources_per_worker) == (2, False, "gloo", {"CPU": 0.5})
    gpu = plan_ray_scaling(ScalingConfig(), gpus_in_cluster=8)
    assert (gpu.num_workers, gpu.use_gpu, gpu.backend) == (8, True, "nccl")
    with pytest.raises(ConfigError, match="no GPU"):
        plan_ray_scaling(ScalingConfig(use_gpu=True), gpus_in_cluster=0)


def test_placement_strategy_reaches_ray_trains_scaling_config():
    assert plan_ray_scaling(ScalingConfig(), gpus_in_cluster=0).scaling_config.placement_strategy == "PACK"
    spread = plan_ray_scaling(ScalingConfig(placement_strategy="SPREAD"), gpus_in_cluster=0)
    assert spread.scaling_config.placement_strategy == "SPREAD"
    with pytest.raises(ValueError, match="placement_strategy"):
        ScalingConfig(placement_strategy="STRICT_SPREAD")  # would leave a restart no node after a node is lost


def test_training_flops_follow_what_trains(tiny_model_dir):
    from steerray.models.reward import build_reward_model, reward_readout

    strategy = resolve_strategy(ScalingConfig(precision="fp32"))
    full = prepare_model(build_reward_model(tiny_model_dir), strategy, None, wrap=reward_readout)
    n = full.flops_parameters()
    embeddings = full.base_hf_model().get_input_embeddings().weight.numel()
    assert n == full.num_parameters() - embeddings  # an embedding lookup is not a matmul
    assert full.train_flops_per_token() == pytest.approx(6 * n)
    top = prepare_model(build_reward_model(tiny_model_dir), strategy,
                        LoraConfig(enabled=True, r=4, last_layers=1), trainable_modules=["score"])
    layer = sum(p.numel() for p in top.base_hf_model().model.layers[0].parameters())
    trainable = top.num_parameters(trainable_only=True)
    # forward everywhere, input gradients only above layer 0, weight gradients for LoRA + head
    assert top.train_flops_per_token() == pytest.approx(2 * top.flops_parameters() +
                                                        2 * (top.flops_parameters() - layer) + 2 * trainable)


def test_lora_reward_model_keeps_its_head_in_both_exports(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from steerray.models.reward import reward_forward

    tokenizer, prepared, stepper, batch = _setup(tiny_model_dir, LoraConfig(enabled=True, r=4, alpha=8), lr=5e-3)
    assert prepared.is_peft
    head = prepared.base_hf_model().score
    trainable = {n for n, p in prepared.model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)
    initial_head = head.original_module.weight.detach().clone()
    losses = _train(prepared, stepper, batch, 8)
    assert losses[-1] < losses[0]
    prepared.eval()
    with torch.no_grad():
        expected = prepared.module(batch.input_ids, batch.attention_mask)

    export_model(prepared, tmp_path / "merged", tokenizer)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert loaded.config.num_labels == 9 and loaded.config.problem_type == "regression"
    assert loaded.config.id2label[4] == "helpfulness"
    assert not torch.allclose(loaded.score.weight, initial_head)  # the trained head, not a fresh one
    with torch.no_grad():
        got = reward_forward(loaded, batch.input_ids, batch.attention_mask)
        hf_logits = loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(hf_logits, expected, atol=1e-5)  # plain transformers reads the same token

    export_model(prepared, tmp_path / "adapter", tokenizer, merge_lora=False)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    score = [k for k in weights if "score" in k]
    assert score and torch.allclose(weights[score[0]], loaded.score.weight)


def test_checkpoint_round_trip_continues_exactly(tmp_path, tiny_model_dir):
    from steerray.training.checkpoint import CheckpointManager

    _, prepared, stepper, batch = _setup(tiny_model_dir, None, lr=5e-3)
    _train(prepared, stepper, batch, 3)
    manager = CheckpointManager(prepared, stepper, every=3, enabled=False)
    manager.write(tmp_path, 3, {"note": "x"})
    continued = _train(prepared, stepper, batch, 2)

    _, prepared2, stepper2, _ = _setup(tiny_model_dir, None, lr=5e-3)
    progress = CheckpointManager(prepared2, stepper2, every=3, enabled=False).load(tmp_path)
    assert progress.step == 3 and progress.extra == {"note": "x"}
    assert stepper2.scheduler.last_epoch == 3
    resumed = _train(prepared2, stepper2, batch, 2)
    assert resumed == pytest.approx(continued, rel=1e-5)


def test_checkpoint_fingerprint_guards_reruns(tmp_path):
    from steerray.training.checkpoint import CheckpointMismatch, check_fingerprint

    assert check_fingerprint(tmp_path, {"model": "a", "loss": "regression"}) is False
    assert check_fingerprint(tmp_path, {"model": "a", "loss": "regression"}) is False  # no checkpoint yet
    with pytest.raises(CheckpointMismatch, match="loss changed"):
        check_fingerprint(tmp_path, {"model": "a", "loss": "scaled_bt"})


@pytest.mark.gpu
def test_gpu_picks_bf16_and_exports_bf16(tmp_path, tiny_model_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from transformers import AutoModelForSequenceClassification

    tokenizer, prepared, stepper, batch = _setup(tiny_model_dir, LoraConfig(enabled=True, r=4))
    strategy = prepared.strategy
    assert strategy.device.type == "cuda" and strategy.precision == "bf16"
    batch.input_ids, batch.attention_mask = batch.input_ids.cuda(), batch.attention_mask.cuda()
    with strategy.autocast():
        losses = _train(prepared, stepper, batch, 3)
    assert all(loss == loss for loss in losses)  # finite under bf16 autocast
    export_model(prepared, tmp_path / "model", tokenizer)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model", dtype="auto")
    assert loaded.score.weight.dtype == torch.bfloat16
