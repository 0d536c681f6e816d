"""`steerray train-reward` through the real CLI on a local Ray: 2 CPU workers, tiny model, three fits.

1. regression with FSDP2, a worker failure injected after the first checkpoint (FailureConfig resumes it
   inside the same run): the loss falls, every step is logged once, the export reloads and predicts what
   the trained model predicted;
2. the same command again (longer): it resumes from the last checkpoint instead of restarting;
3. stage two of HelpSteer2-Preference: scaled Bradley-Terry from the stage-one model (init_from), LoRA on
   the top layer, DDP; the loss asked for is the loss recorded and run, the LoRA export keeps the trained
   head, and the second epoch reads the frozen layer's output from the frozen-prefix cache.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from steerray.artifacts import read_jsonl, read_manifest
from steerray.cli import app
from steerray.training.batching import plan_step

pytestmark = pytest.mark.ray
runner = CliRunner()
WORDS = "alpha beta gamma delta kind rude helpful sorry thanks great bad maybe".split()


def _text(body: str) -> str:
    return f"<extra_id_0>System\nsys\n<extra_id_1>User\nq\n<extra_id_1>Assistant\n{body}\n<extra_id_2>"


def make_prepare_folder(root: Path, seed: int = 0) -> Path:
    """A tiny prepare output whose labels follow the text (verbosity ~ length, helpfulness ~ a keyword)."""
    rng = random.Random(seed)

    def regression_row() -> dict:
        n = rng.randint(2, 40)
        body = " ".join(rng.choice(WORDS) for _ in range(n))
        label = [-100.0] * 9
        label[8], label[4] = float(min(4, n // 9)), 4.0 if "helpful" in body else 1.0
        if rng.random() < 0.5:
            label[0] = float(n % 5)
        return {"text": _text(body), "label": label}

    def pair(i: int) -> dict:
        good = " ".join(["helpful"] + [rng.choice(WORDS) for _ in range(rng.randint(1, 10))])
        bad = " ".join(rng.choice(WORDS[:4]) for _ in range(rng.randint(1, 10)))
        return {"id": f"p{i}", "chosen": _text(good), "rejected": _text(bad), "strength": float(rng.randint(0, 3))}

    for split, n in (("train", 48), ("val", 16)):
        for kind, rows in (("regression", [regression_row() for _ in range(n)]),
                           ("preference", [pair(i) for i in range(n)])):
            (root / kind).mkdir(parents=True, exist_ok=True)
            (root / kind / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def train_reward(*args: str):
    result = runner.invoke(app, ["train-reward", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def exported_val_mse(model_dir: Path, data: Path, precision: str, attention: str | None) -> float:
    """Val MSE of the exported folder, scored with plain transformers in the precision and with the attention
    kernel training computed in (``precision: auto`` is bf16 on a CPU with native bf16: the workers' validation
    ran in bf16, and with eager attention where the CPU has no AMX; kernels differ by ~1e-3 in bf16)."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from steerray.models.precision import torch_dtype

    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=torch_dtype(precision), **({"attn_implementation": attention} if attention else {})).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = read_jsonl(data / "regression" / "val.jsonl")
    errors = []
    with torch.no_grad():
        for row in rows:
            ids = tokenizer(row["text"], add_special_tokens=False, return_tensors="pt")["input_ids"][:, -128:]
            pred = model(input_ids=ids).logits[0].float().numpy()
            label = np.asarray(row["label"])
            errors.extend(((pred - label) ** 2)[label != -100].tolist())
    return float(np.mean(errors))


@pytest.fixture(scope="module")
def tiny_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    data = make_prepare_folder(root / "prepare")
    out = root / "reward"
    args = ["--config", "tiny/reward", "--data", str(data), "--out", str(out)]
    train_reward(*args, "train.fail_after_step=6")  # dies right after the step-6 checkpoint, once
    return data, out, args


def test_regression_run_survives_a_worker_failure_and_exports(tiny_run):
    data, out, _ = tiny_run
    manifest = read_manifest(out, "reward")
    assert manifest["loss"] == "regression" and manifest["config"]["loss"] == "regression"
    training = manifest["training"]
    assert (training["strategy"], training["world_size"], training["steps"]) == ("fsdp", 2, 12)
    assert training["resumed_from_step"] == 6  # the restarted workers continued from the checkpoint
    rows = read_jsonl(out / "metrics.jsonl")
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 13))  # every step logged once, none twice
    losses = [r["loss"] for r in train_rows]
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3
    assert all(r["tokens_per_s"] > 0 for r in train_rows)
    val = manifest["metrics"]["val"]
    assert val["n_rows"] == 16 and val["per_attribute"]["verbosity"]["n"] == 16
    assert val["per_attribute"]["toxicity"] == {"n": 0}  # no labels, no numbers
    # The exported folder, loaded with plain transformers, predicts what the trained model predicted.
    exported = exported_val_mse(out / "model", data, training["precision"], training["attention"])
    assert exported == pytest.approx(val["mse"], rel=1e-4)
    assert yaml.safe_load((out / "config.yaml").read_text())["loss"] == "regression"


def test_rerunning_the_command_resumes(tiny_run):
    data, out, args = tiny_run
    train_reward(*args, "train.max_steps=14")
    manifest = read_manifest(out, "reward")
    assert manifest["training"]["resumed_from_step"] == 12 and manifest["training"]["steps"] == 14
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"]
    assert steps == list(range(1, 15))


def test_scaled_bt_stage_two_with_lora_keeps_the_head(tiny_run, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    data, stage_one, _ = tiny_run
    out = tmp_path / "stage2"
    train_reward("--config", "tiny/reward", "--data", str(data), "--out", str(out), "--loss", "scaled_bt",
                 "--init-from", str(stage_one / "model"), "lora.enabled=true", "lora.r=4", "lora.last_layers=1",
                 "scaling.strategy=ddp", "optim.lr=1e-2", "train.max_steps=8")
    assert yaml.safe_load((out / "config.yaml").read_text())["loss"] == "scaled_bt"  # recorded as asked
    manifest = read_manifest(out, "reward")
    assert manifest["loss"] == "scaled_bt" and manifest["inputs"]["kind"] == "preference"
    assert manifest["training"]["strategy"] == "ddp"
    assert 0 < manifest["training"]["trainable_params"] < manifest["training"]["params"]  # LoRA
    # LoRA on the top layer only: rank 0 kept the layer below's output of its rows and reused it in epoch 2.
    # Row affinity brings each row back to it, so every revisit hits: misses = its distinct rows (x2: chosen
    # and rejected), hits = its other visits.
    cache, train = manifest["training"]["frozen_prefix_cache"], yaml.safe_load((out / "config.yaml").read_text())["train"]
    visits = [int(r) for step in range(8) for batch in plan_step(
        np.zeros(manifest["counts"]["train_rows"]), step, global_batch=train["global_batch_size"],
        micro_batch=train["micro_batch_size"], world_size=manifest["training"]["world_size"], rank=0,
        seed=train["seed"], row_affinity=True).micro_batches for r in batch]
    assert manifest["training"]["world_size"] == 2 and len(set(visits)) < len(visits)
    assert cache["prefix_cache_misses"] == 2 * len(set(visits)) == cache["prefix_cache_rows"]
    assert cache["prefix_cache_hits"] == 2 * (len(visits) - len(set(visits)))
    val = manifest["metrics"]["val"]
    assert val["n_pairs"] == 16 and val["accuracy"] is not None and val["loss"] >= 0
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    start = load_file(stage_one / "model" / "model.safetensors")
    assert model.config.num_labels == 9
    # The head was trained (helpfulness row moved) and survived the LoRA merge.
    assert not torch.allclose(model.score.weight[4], start["score.weight"][4])
