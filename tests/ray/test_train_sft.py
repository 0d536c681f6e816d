"""`train-sft` on the session's local Ray: 2 CPU workers at 0.5 CPU, tiny-llama, three fits in all.

1. FSDP2 full fine-tuning killed after the step-4 checkpoint (in-process ``execute``), then the same config
   again through the Ray job entry point (``main --config-b64``): it resumes at step 4, the loss falls, the
   export loads with AutoModelForCausalLM and generates, samples are written.
2. LoRA over DDP with gradient accumulation, exported as an adapter, through the CLI.
3. A file of nothing but bad rows fails before any worker starts, naming the file (``execute`` raises
   the data error; the job entry point exits 1 with the message).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from steerray.cli import app
from steerray.config import SFTConfig, load_config
from steerray.data.sft import SFTDataError
from steerray.runtime import encode_config
from steerray.stages import execute
from steerray.stages import train_sft as sft_stage
from steerray.templates import make_conversation
from steerray.training.launcher import TrainingFailed

pytestmark = pytest.mark.ray

TOPICS = ["the sky", "rain", "cats", "tea", "maps", "bread", "music", "stars"]


def conversation(rng: random.Random) -> dict:
    """Short answers labelled verbosity:0, long ones verbosity:4: something the labels can steer."""
    topic, verbosity = rng.choice(TOPICS), rng.choice([0, 4])
    if verbosity == 0:
        answer = f"It is {topic}."
    else:
        answer = " ".join([f"Here is a long answer about {topic}."] +
                          [f"Point {k} about {topic} matters." for k in range(5)])
    return make_conversation([("User", f"Tell me about {topic}.", None),
                              ("Assistant", answer, f"helpfulness:3,verbosity:{verbosity}")], system="Be brief.")


def write_conversations(path: Path, count: int, seed: int, bad_rows: bool = False) -> Path:
    rng = random.Random(seed)
    lines = [json.dumps(conversation(rng)) for _ in range(count)]
    if bad_rows:
        lines += ["{not json", json.dumps({"conversations": [{"from": "User", "value": "no answer"}]}),
                  json.dumps(make_conversation([("User", "a", None), ("Assistant", "b", "wit:2")]))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_config(data: Path, out: Path, *overrides: str) -> SFTConfig:
    return load_config(SFTConfig, "tiny/sft", [f"data={data}", f"out={out}", *overrides])


def run_job(config: SFTConfig) -> dict:
    """The stage's Ray job entry point, given the config the way the CLI submits it."""
    return sft_stage.main(["--config-b64", encode_config(config)])


def test_fsdp_kill_resume_loss_falls_export_generates(ray_session, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from steerray.models.generation import generate_batch
    from steerray.models.loading import load_tokenizer
    from steerray.templates import generation_prompt

    data = write_conversations(tmp_path / "conv.jsonl", 60, seed=0, bad_rows=True)
    out = tmp_path / "sft"
    config = tiny_config(data, out, "train.fail_after_step=4", "scaling.max_failures=0",
                         "label_attributes=[verbosity,complexity]")
    with pytest.raises(TrainingFailed, match="injected failure") as failure:
        execute("sft", config)
    assert "Re-running the same command resumes" in str(failure.value)
    assert not (out / "manifest.json").exists()  # the stage did not finish
    assert list((out / "checkpoints").rglob("checkpoint_step00000004"))

    summary = run_job(config)  # the same command again: resumes from the step-4 checkpoint
    assert summary["resumed_from"] == 4 and summary["steps"] == 8
    assert summary["strategy"] == "fsdp" and summary["world_size"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))  # every step logged once across the restart
    first, last = sum(r["loss"] for r in train[:2]) / 2, sum(r["loss"] for r in train[-2:]) / 2
    assert last < first - 0.3, [r["loss"] for r in train]
    assert summary["val_loss"] < summary["val_loss_first"] - 0.3
    assert all(r["tokens_per_s"] > 0 for r in train)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "sft" and manifest["counts"]["train_rejected"] + manifest["counts"].get(
        "val_rejected", 0) == 3
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["line"] for r in rejects) == [61, 62, 63]
    assert any("unknown attribute 'wit'" in r["reason"] for r in rejects)

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["steering"] for s in samples] == [{"verbosity": 0}, {"verbosity": 4}]
    # trained on labels over two attributes: samples use the same two, and the export records them
    assert [s["label"] for s in samples] == ["complexity:4,verbosity:0", "complexity:4,verbosity:4"]
    assert json.loads((out / "model" / "config.json").read_text())["steerlm_label_attributes"] == [
        "complexity", "verbosity"]
    assert "## Explain why the sky is blue." in (out / "samples.md").read_text()

    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    tokenizer = load_tokenizer(str(out / "model"))
    prompt = generation_prompt([{"role": "user", "content": "Tell me about tea."}], "verbosity:0")
    answer = generate_batch(model, tokenizer, [prompt], max_new_tokens=6)[0]
    assert answer.completion_tokens > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 on CPU
    assert model.config.use_cache  # training turns the KV cache off; the export generates with it


def test_lora_ddp_adapter_export_via_cli(ray_session, tmp_path):
    from peft import AutoPeftModelForCausalLM

    data = tmp_path / "annotated"
    write_conversations(data / "train.jsonl", 24, seed=1)
    write_conversations(data / "val.jsonl", 6, seed=2)
    out = tmp_path / "sft-lora"
    result = CliRunner().invoke(app, [
        "train-sft", "--config", "tiny/sft", "--data", str(data), "--out", str(out),
        "lora.enabled=true", "lora.r=4", "lora.merge_on_export=false", "scaling.strategy=ddp",
        "train.max_steps=4", "train.eval_every=2", "train.checkpoint_every=10", "optim.lr=1e-2"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["lora"]["enabled"] is True
    manifest = json.loads((out / "manifest.json").read_text())
    summary = manifest["summary"]
    assert summary["strategy"] == "ddp" and summary["steps"] == 4
    assert manifest["counts"]["train_ok"] == 24 and manifest["counts"]["val_ok"] == 6  # the folder's own split
    vals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "val"]
    assert [v["step"] for v in vals] == [0, 2, 4]
    assert (out / "model" / "adapter_config.json").exists()  # merge_on_export=false: a peft adapter
    model = AutoPeftModelForCausalLM.from_pretrained(out / "model")
    assert any("lora_B" in name for name, _ in model.named_parameters())
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2


def test_only_bad_rows_fail_before_training(ray_session, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"conversations": []}\nnot json\n', encoding="utf-8")
    config = tiny_config(data, tmp_path / "out")
    with pytest.raises(SFTDataError, match="no trainable conversation in .*bad.jsonl"):
        execute("sft", config)
    rejects = (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()
    assert len(rejects) == 2 and not (tmp_path / "out" / "checkpoints").exists()
    assert not (tmp_path / "out" / "manifest.json").exists()

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:  # the job entry point: exit 1, the error printed, no traceback
        run_job(config)
    assert exited.value.code == 1
    assert f"error: no trainable conversation in {data}" in capsys.readouterr().err
