"""Stage `train-sft`: attribute-conditioned SFT (SteerLM step 3) on Ray Train, loss on answers only.

Launch it through the CLI (embedded Ray by default, --address to submit to a cluster):

    steerray train-sft --config jobs/configs/demo/sft.yaml --data runs/demo/annotate --out runs/demo/sft \
        [train.max_steps=60 lora.enabled=false ...]

or as a Ray job directly:  ray job submit --working-dir . -- python jobs/train_sft.py --config CONFIG.yaml
See what the model is trained on first:  steerray render-sft --input runs/demo/annotate/train.jsonl -n 3

Data: a SteerLM conversation jsonl, or a folder with train.jsonl (+ val.jsonl), e.g. the annotate output
or prepare's conversations/. Outputs under `out`: model/ (Hugging Face causal LM + tokenizer),
metrics.jsonl, samples.jsonl + samples.md (answers to fixed prompts at each steering setting),
rejects.jsonl, checkpoints/ (re-running the same command resumes from the last one), manifest.json (last).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from steerray.artifacts import atomic_write_text, read_manifest, write_jsonl, write_manifest
from steerray.attributes import LABEL_ATTRIBUTES_KEY
from steerray.config import SFTConfig, config_hash, config_to_dict, validate_config
from steerray.data import readers
from steerray.data.sft import (
    IGNORE_INDEX,
    STATUS_OK,
    STATUS_REJECTED,
    SFTDataError,
    collate_sft,
    is_val_row,
    locate_sft_data,
    tokenize_rows,
)
from steerray.errors import SteerrayError
from steerray.runtime import init_ray, job_config_from_argv

STAGE = "sft"
log = logging.getLogger("steerray")


class SFTTrainingFailed(SteerrayError, RuntimeError):
    """The Ray Train run failed (its workers' errors are in the message); a re-run resumes."""


# 1. Data, on the driver before any worker starts: read numbered lines with Ray Data, render, tokenize
#    (answer-only labels), count and write every reject, so a file of bad rows fails here, not in a worker.
def tokenized_dataset(config: SFTConfig) -> Any:
    import ray.data

    files = locate_sft_data(config.data)
    tasks = [{**dataclasses.asdict(t), "split": "train" if files.val else ""} for t in readers.plan_reads(files.train)]
    tasks += [{**dataclasses.asdict(t), "split": "val"} for t in readers.plan_reads(files.val)]
    fraction, seed = config.val_fraction, config.train.seed

    def read(task: dict[str, Any]) -> Any:
        for row in readers.read_task_rows(task):
            split = task["split"] or ("val" if is_val_row(row["raw"], fraction, seed) else "train")
            yield {**row, "split": split}

    raw = ray.data.from_items(tasks, override_num_blocks=len(tasks)).flat_map(read)
    return raw.map_batches(tokenize_rows, fn_kwargs={
        "tokenizer_source": config.model.name, "max_length": config.model.max_length,
        "trust_remote_code": config.model.trust_remote_code, "label_attributes": config.label_attributes},
        batch_size=256, num_cpus=0.5).materialize()


def count_and_reject(dataset: Any, out: Path, data: str) -> dict[str, Any]:
    """Counts per split and status; rejected and untrained rows go to rejects.jsonl with their reason."""
    counts: Counter = Counter()
    rejects = []
    columns = ["file", "line", "split", "status", "reason", "truncated", "length"]
    for batch in dataset.select_columns(columns).iter_batches(batch_size=4096, batch_format="numpy"):
        for file, line, split, status, reason, truncated, length in zip(*(batch[c] for c in columns), strict=True):
            counts[f"{split}_{status}"] += 1
            counts[f"{split}_truncated"] += int(truncated)
            counts[f"{split}_tokens"] += int(length)
            if status != STATUS_OK:
                rejects.append({"kind": "rejected" if status == STATUS_REJECTED else "skipped", "file": str(file),
                                "line": int(line), "split": str(split), "reason": str(reason)})
    rejects.sort(key=lambda r: (r["file"], r["line"]))
    write_jsonl(out / "rejects.jsonl", rejects)
    counts_dict = dict(sorted(counts.items()))
    if counts["train_ok"] == 0:
        reasons = Counter(r["reason"].split(":")[0] for r in rejects).most_common(3)
        raise SFTDataError(f"no trainable conversation in {data}: every row was rejected or had nothing to train "
                           f"on ({counts_dict}; top reasons: {reasons}); see {out / 'rejects.jsonl'}")
    return counts_dict


def planned_steps(config: SFTConfig, train_rows: int, num_workers: int) -> int:
    """Optimizer steps of the run; also checks the batch sizes split over the workers (before workers start)."""
    from steerray.training.batching import accumulation_steps, steps_per_epoch

    train = config.train
    accumulation_steps(train.global_batch_size, train.micro_batch_size, num_workers)
    per_epoch = steps_per_epoch(train_rows, train.global_batch_size)
    return min(train.max_steps, train.epochs_cap * per_epoch) if train.epochs_cap else train.max_steps


# 2. The training loop, on every Ray Train worker.
def load_rows(name: str, limit: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """This dataset's rows (every worker holds all of them: batches are planned per step, see batching.py),
    in file/line order whatever order Ray Data delivered them in."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    rows = []
    for batch in shard.iter_batches(batch_size=1024, batch_format="numpy"):
        for file, line, ids, labels in zip(batch["file"], batch["line"], batch["input_ids"], batch["labels"], strict=True):
            rows.append(((str(file), int(line)), np.asarray(ids, np.int64), np.asarray(labels, np.int64)))
    rows.sort(key=lambda row: row[0])
    return [(ids, labels) for _, ids, labels in rows[:limit]]


def micro_batch(rows: list, indices: Any, pad_id: int, device: Any) -> dict[str, Any]:
    batch = collate_sft([rows[i][0] for i in indices], [rows[i][1] for i in indices], pad_id)
    return {key: value.to(device) for key, value in batch.items()}


def summed_loss(prepared: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """Token cross entropy (sum, count) of one micro-batch; labels are already shifted by the collate."""
    from steerray.training.losses import token_cross_entropy_sum

    with prepared.strategy.autocast():
        logits = prepared.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_cross_entropy_sum(logits, batch["labels"], shift=False)


def evaluate(prepared: Any, rows: list, micro: int, pad_id: int) -> float | None:
    """Token-mean validation loss over every row exactly once across workers."""
    import torch

    from steerray.training.batching import eval_micro_batches

    strategy = prepared.strategy
    if not rows:
        return None
    total = count = 0.0
    prepared.eval()
    with torch.no_grad():
        for indices, filler in eval_micro_batches([len(r[0]) for r in rows], micro, strategy.world_size, strategy.rank):
            loss_sum, n = summed_loss(prepared, micro_batch(rows, indices, pad_id, strategy.device))
            if not filler:
                total, count = total + float(loss_sum), count + float(n)
    prepared.train()
    total, count = strategy.all_reduce_sum([total, count])
    return total / count if count else None


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    import torch

    from steerray.models.loading import load_causal_lm, load_tokenizer
    from steerray.training import batching, metrics
    from steerray.training.checkpoint import CheckpointManager
    from steerray.training.losses import normalize_loss
    from steerray.training.strategy import (
        build_optimizer_and_schedule,
        export_model,
        prepare_model,
        resolve_strategy,
    )

    cfg = SFTConfig.model_validate(loop_config["config"])
    total_steps, out = int(loop_config["total_steps"]), Path(loop_config["out"])
    train, strategy = cfg.train, resolve_strategy(cfg.scaling)
    torch.manual_seed(train.seed)
    train_rows = load_rows("train")
    val_rows = load_rows("val", train.max_eval_rows) if loop_config["has_val"] else []
    lengths = np.array([len(ids) for ids, _ in train_rows])
    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    model = load_causal_lm(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    model.config.use_cache = False  # no KV cache while training: memory for nothing
    prepared = prepare_model(model, strategy, cfg.lora, gradient_checkpointing=cfg.model.gradient_checkpointing)
    accumulation = batching.accumulation_steps(train.global_batch_size, train.micro_batch_size, strategy.world_size)
    stepper = build_optimizer_and_schedule(prepared, cfg.optim, total_steps, accumulation)
    checkpoints = CheckpointManager(prepared, stepper, every=train.checkpoint_every)
    progress = checkpoints.restore()
    start = progress.step if progress else 0
    val_first = progress.extra.get("val_loss_first") if progress else evaluate(prepared, val_rows, train.micro_batch_size, pad_id)

    rank0 = strategy.is_rank0
    writer = metrics.MetricsWriter(out / "metrics.jsonl", enabled=rank0, resume_step=start)
    if start == 0:
        writer.write({"step": 0, "split": "val", "loss": val_first})
    wandb = metrics.WandbLogger(cfg.logging.wandb_project, config_to_dict(cfg), name=out.name, out_dir=out, enabled=rank0)
    peak = metrics.measure_matmul_peak(strategy.device, strategy.compute_dtype, seconds=0.5)
    # The same FLOPs count as train-reward: LoRA computes no gradients for frozen weights, and the backward
    # pass stops below the lowest trainable layer.
    throughput = metrics.Throughput(prepared.flops_parameters(), peak, strategy.world_size,
                                    flops_per_token=prepared.train_flops_per_token())
    bar = metrics.progress_bar(total_steps, initial=start, enabled=rank0 and cfg.logging.progress_bar, desc="sft")
    run_tokens, run_start = 0.0, time.perf_counter()
    row: dict[str, Any] = {}
    prepared.train()
    for step in range(start, total_steps):
        plan = batching.plan_step(lengths, step, global_batch=train.global_batch_size, micro_batch=train.micro_batch_size,
                                  world_size=strategy.world_size, rank=strategy.rank, seed=train.seed,
                                  length_grouping=train.length_grouping)
        batches = [micro_batch(train_rows, indices, pad_id, strategy.device) for indices in plan.micro_batches]
        # Token-mean over the whole global batch: every worker's trained tokens, one all-reduce.
        trained = strategy.all_reduce_sum([sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)])[0]
        loss_sum = 0.0
        for i, batch in enumerate(batches):
            with stepper.micro_step(last=i == len(batches) - 1):
                part, _ = summed_loss(prepared, batch)
                stepper.backward(normalize_loss(part, trained, strategy.world_size))
                loss_sum += float(part.detach())
        result = stepper.step()
        local_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        loss_sum, tokens = strategy.all_reduce_sum([loss_sum, local_tokens])
        throughput.add(local_tokens)
        run_tokens += tokens
        row = {"step": step + 1, "split": "train", "epoch": plan.epoch, "loss": loss_sum / max(trained, 1),
               "lr": result.lr, "grad_norm": result.grad_norm, "trained_tokens": int(trained),
               **throughput.rates(tokens)}
        throughput.reset()
        if train.eval_every and (step + 1) % train.eval_every == 0 and step + 1 < total_steps:
            row["val_loss"] = evaluate(prepared, val_rows, train.micro_batch_size, pad_id)
            writer.write({"step": step + 1, "split": "val", "loss": row["val_loss"]})
        writer.write(row)
        wandb.log(row, step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if checkpoints.due(step + 1, last=step + 1 == total_steps):
            checkpoints.save(step + 1, {"loss": row["loss"]}, extra={"val_loss_first": val_first})
            if train.fail_after_step == step + 1 and progress is None:
                raise RuntimeError(f"injected failure after step {step + 1} (train.fail_after_step)")
    bar.close()
    loop_seconds = time.perf_counter() - run_start
    run_rate = run_tokens / loop_seconds if start < total_steps else None
    run_mfu = run_rate * throughput.flops_per_token / throughput.peak if run_rate and throughput.peak else None

    # 3. Final validation, export (collective), then samples from the exported folder on rank 0.
    val_loss = evaluate(prepared, val_rows, train.micro_batch_size, pad_id)
    if rank0:
        writer.write({"step": total_steps, "split": "val", "loss": val_loss})
    prepared.base_hf_model().config.use_cache = True  # the exported model generates with a KV cache
    if cfg.label_attributes is not None:  # serve/evaluate/bootstrap render the label the model learnt
        setattr(prepared.base_hf_model().config, LABEL_ATTRIBUTES_KEY, list(cfg.label_attributes))
    export_model(prepared, out / "model", tokenizer)
    wandb.log({"val_loss": val_loss}, total_steps)
    wandb.finish()
    if not rank0:
        return {}
    samples = write_samples(out, cfg, tokenizer, strategy.device, strategy.compute_dtype)
    return {"steps": total_steps, "resumed_from": start, "train_loss": row.get("loss"), "val_loss_first": val_first,
            "val_loss": val_loss, "tokens_per_s": run_rate,
            "mfu": run_mfu, "model": str(out / "model"), "samples": str(out / "samples.md") if samples else None,
            "sample_count": samples, "strategy": strategy.kind, "precision": strategy.precision,
            "world_size": strategy.world_size}


# 4. Samples: what the model learned, at each steering setting, for fixed prompts.
def write_samples(out: Path, cfg: SFTConfig, tokenizer: Any, device: Any, dtype: Any) -> int:
    """Greedy answers from the exported model on rank 0's device; ``sample_prompts: []`` skips them (a model
    too big for one device, e.g. the 70B recipe: sample it with the serve or evaluate stage instead)."""
    from steerray.attributes import steering_label
    from steerray.models.generation import generate_batch
    from steerray.templates import generation_prompt

    if not cfg.sample_prompts or not cfg.sample_steering:
        return 0
    model_dir = out / "model"
    if (model_dir / "adapter_config.json").exists():  # lora.merge_on_export=false: an adapter folder
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.to(device).eval()
    rows = []
    for steering in cfg.sample_steering:
        label = steering_label(steering, attributes=cfg.label_attributes)
        prompts = [generation_prompt([{"role": "user", "content": p}], label) for p in cfg.sample_prompts]
        answers = generate_batch(model, tokenizer, prompts, max_new_tokens=cfg.sample_max_new_tokens)
        for prompt, answer in zip(cfg.sample_prompts, answers, strict=True):
            rows.append({"prompt": prompt, "steering": steering, "label": label, "answer": answer.text,
                         "completion_tokens": answer.completion_tokens, "finish_reason": answer.finish_reason})
    write_jsonl(out / "samples.jsonl", rows)
    lines = [f"# SFT samples ({cfg.model.name}, greedy, up to {cfg.sample_max_new_tokens} new tokens)\n"]
    for prompt in cfg.sample_prompts:
        lines.append(f"## {prompt}\n")
        for r in (r for r in rows if r["prompt"] == prompt):
            setting = ", ".join(f"{k}={v}" for k, v in r["steering"].items()) or "defaults"
            quoted = "\n".join(f"> {line}" for line in (r["answer"].strip() or "(empty)").splitlines())
            lines.append(f"**{setting}** ({r['completion_tokens']} tokens, {r['finish_reason']}):\n\n{quoted}\n")
    atomic_write_text(out / "samples.md", "\n".join(lines))
    return len(rows)


# 5. The stage: data, the fit (resumable), the manifest last.
def run(config: SFTConfig) -> dict[str, Any]:
    out = Path(config.out).resolve()
    previous = read_manifest(out, STAGE)
    if previous and previous.get("config_hash") == config_hash(config):
        print(f"[train-sft] {out} is finished with this config; nothing to do", file=sys.stderr)
        return previous["summary"]
    (out / "manifest.json").unlink(missing_ok=True)  # from here on the folder is "not finished"
    init_ray()
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from steerray.training.checkpoint import check_fingerprint
    from steerray.training.strategy import plan_ray_scaling

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    started = time.time()
    dataset = tokenized_dataset(config)
    counts = count_and_reject(dataset, out, config.data)
    print(f"[train-sft] rows: {counts}; rejects with reasons: {out / 'rejects.jsonl'}", file=sys.stderr)
    plan = plan_ray_scaling(config.scaling)
    total_steps = planned_steps(config, counts["train_ok"], plan.num_workers)
    files = locate_sft_data(config.data)
    check_fingerprint(out / "checkpoints", {
        "model": config.model.name, "max_length": config.model.max_length, "lora": config.lora.model_dump(exclude={"merge_on_export"}),
        "global_batch_size": config.train.global_batch_size, "seed": config.train.seed,
        "label_attributes": config.label_attributes,
        "data": [(f, os.path.getsize(f)) for f in files.train + files.val]})
    columns = ["file", "line", "input_ids", "labels"]
    datasets = {"train": dataset.filter(expr="status == 'ok' and split == 'train'").select_columns(columns).materialize()}
    if counts.get("val_ok"):
        datasets["val"] = dataset.filter(expr="status == 'ok' and split == 'val'").select_columns(columns).materialize()
    trainer = TorchTrainer(
        train_loop, train_loop_config={"config": config_to_dict(config), "total_steps": total_steps, "out": str(out),
                                       "has_val": "val" in datasets},
        scaling_config=plan.scaling_config, torch_config=plan.torch_config, datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),  # every worker plans from all rows
        run_config=ray.train.RunConfig(
            name="sft", storage_path=str(out / "checkpoints"),
            failure_config=ray.train.FailureConfig(max_failures=config.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise SFTTrainingFailed(f"training failed after {config.scaling.max_failures} restart(s): {err}\n"
                                f"Re-running the same command resumes from the last checkpoint in "
                                f"{out / 'checkpoints'}") from None
    summary = {**result.return_value, "rows": counts, "seconds": round(time.time() - started, 1)}
    write_manifest(out, STAGE, config, summary=summary, counts=counts,
                   outputs=[name for name in ("model", "metrics.jsonl", "samples.jsonl", "samples.md", "rejects.jsonl")
                            if (out / name).exists()])
    print(f"[train-sft] val loss {summary['val_loss_first']} -> {summary['val_loss']}; model: {out / 'model'}; "
          f"samples: {out / 'samples.md'}", file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    text = job_config_from_argv(argv)
    config = validate_config(SFTConfig, yaml.safe_load(text) or {}, "train-sft config")
    return run(config)


if __name__ == "__main__":
    main()
