"""Stage `train-reward`: the attribute-prediction reward model on Ray Train (FSDP2), regression or Bradley-Terry.

Launch it through the CLI (embedded Ray by default, --address to submit to a cluster):

    steerray train-reward --config jobs/configs/demo/reward.yaml --data runs/exp/prepare --out runs/exp/reward \
        [train.max_steps=50 lora.enabled=true loss=scaled_bt ...]

or as a Ray job directly:  ray job submit --working-dir . -- python jobs/train_reward.py --config CONFIG.yaml

Reads `data/regression/` (loss=regression: masked MSE over labelled cells) or `data/preference/` (loss=
scaled_bt | regular_bt | margin_bt on explicit pairs, reward = the helpfulness output). Writes under `out`:
model/ (Hugging Face sequence-classification folder + tokenizer), metrics.jsonl, checkpoints/ (Ray
storage; re-running the same command resumes from the last one), rejects.jsonl, manifest.json (last).
On a multi-node cluster `out` and `data` must be on storage every node sees (rank 0 writes the model).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from steerray.artifacts import write_jsonl, write_manifest
from steerray.config import ConfigError, RewardConfig, validate_config
from steerray.runtime import JobFailed, init_ray, job_config_from_argv
from steerray.training import reward_data as rd

STAGE = "reward"
RUN_NAME = "train-reward"
log = logging.getLogger("steerray")


class InjectedFailure(RuntimeError):
    """Raised by the `train.fail_after_step` test knob."""


# 1. Check the request before anything starts: loss vs attributes, data files, model name, init_from.
def check_request(cfg: RewardConfig) -> tuple[str, Path, Path | None, str]:
    from steerray.models.loading import resolve_model
    from steerray.models.reward import RewardModelError, reward_attributes
    from steerray.training.strategy import deepspeed_available

    kind = rd.data_kind(cfg.loss)
    if kind == rd.PREFERENCE and "helpfulness" not in cfg.attributes:
        raise ConfigError(f"loss={cfg.loss} reads the reward from the helpfulness output, but attributes="
                          f"{cfg.attributes} has none")
    if cfg.scaling.strategy == "deepspeed" and not deepspeed_available():
        raise ConfigError("scaling.strategy=deepspeed but DeepSpeed is not installed: "
                          "`pip install 'steerray[deepspeed]'`, or use fsdp / ddp")
    train_file, val_file = rd.locate_split_files(cfg.data, kind)
    rd.check_prepare_manifest(cfg.data)
    if cfg.init_from:
        config_file = Path(cfg.init_from) / "config.json"
        if not config_file.is_file():
            raise RewardModelError(f"init_from={cfg.init_from} is not a reward-model folder (no config.json)")
        found = reward_attributes(SimpleNamespace(**json.loads(config_file.read_text(encoding="utf-8"))))
        if found != list(cfg.attributes):
            raise RewardModelError(f"init_from={cfg.init_from} predicts {found}, but attributes={cfg.attributes}; "
                                   "set attributes to match the model you start from")
        tokenizer_source = str(Path(cfg.init_from).resolve())
    else:
        tokenizer_source = resolve_model(cfg.model.name)  # unknown names fail here, before Ray starts
    return kind, train_file, val_file, tokenizer_source


# 2. Validate rows (rejects with reasons), then tokenize with Ray Data (left truncation, counted).
def tokenize(rows: list[dict[str, Any]], kind: str, tokenizer: str, max_length: int) -> Any:
    import ray.data

    fn = rd.tokenize_regression_batch if kind == rd.REGRESSION else rd.tokenize_preference_batch
    blocks = max(1, min(16, len(rows) // 512))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    return ds.map_batches(fn, fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
                          batch_size=256, num_cpus=0.5).materialize()


def count_truncated(ds: Any) -> int:
    # Reading a materialized column locally is instant; ds.sum() would plan an aggregation job.
    return sum(int(b["truncated"].sum()) for b in ds.iter_batches(batch_format="numpy", batch_size=None))


# 3. The training loop, one per worker.
def train_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    import ray.train
    import torch

    from steerray.eval.metrics import label_means
    from steerray.models.loading import load_tokenizer
    from steerray.models.reward import build_reward_model, reward_readout
    from steerray.training.batching import plan_step
    from steerray.training.checkpoint import CheckpointManager
    from steerray.training.losses import normalize_loss
    from steerray.training.metrics import (
        MetricsWriter,
        Throughput,
        WandbLogger,
        measure_matmul_peak,
        progress_bar,
    )
    from steerray.training.strategy import (
        build_optimizer_and_schedule,
        export_model,
        prepare_model,
        resolve_strategy,
    )

    cfg = RewardConfig.model_validate(config["cfg"])
    max_steps, accumulation, kind = config["max_steps"], config["accumulation"], config["kind"]
    out = Path(cfg.out)
    strategy = resolve_strategy(cfg.scaling)
    torch.manual_seed(cfg.train.seed)
    rank0 = strategy.is_rank0

    rows = rd.collect_rows(ray.train.get_dataset_shard("train").iter_batches(batch_format="numpy"))
    val_shard = ray.train.get_dataset_shard("val") if config["has_val"] else None
    val_rows = rd.collect_rows(val_shard.iter_batches(batch_format="numpy")) if val_shard else {}
    lengths = rows["length"]
    baseline = label_means(rows["label"]) if kind == rd.REGRESSION else None
    tokenizer = load_tokenizer(config["tokenizer"])
    pad_id = tokenizer.pad_token_id

    # load_on_rank0 (big models): only rank 0 reads weights; FSDP2 broadcasts the other ranks' shards.
    empty = cfg.scaling.load_on_rank0 and strategy.kind == "fsdp" and not rank0
    model = build_reward_model(cfg.model.name, cfg.attributes, init_from=cfg.init_from,
                               trust_remote_code=cfg.model.trust_remote_code, empty=empty)
    prepared = prepare_model(model, strategy, cfg.lora, trainable_modules=["score"],
                             gradient_checkpointing=cfg.model.gradient_checkpointing, wrap=reward_readout)
    stepper = build_optimizer_and_schedule(prepared, cfg.optim, max_steps, accumulation)
    checkpoints = CheckpointManager(prepared, stepper, every=cfg.train.checkpoint_every)
    progress = checkpoints.restore()
    start = progress.step if progress else 0

    writer = MetricsWriter(out / "metrics.jsonl", enabled=rank0, resume_step=start)
    wandb = WandbLogger(cfg.logging.wandb_project, config["cfg"], name=out.name, out_dir=out, enabled=rank0)
    peak = measure_matmul_peak(strategy.device, strategy.compute_dtype)
    throughput = Throughput(prepared.flops_parameters(), peak, strategy.world_size,
                            flops_per_token=prepared.train_flops_per_token())
    helpfulness = cfg.attributes.index("helpfulness") if kind == rd.PREFERENCE else None

    def loss_of(batch: dict[str, Any]) -> tuple[Any, Any]:
        from steerray.training.losses import bradley_terry_sum, masked_mse_sum

        with strategy.autocast():
            preds = prepared.module(batch["input_ids"].to(strategy.device),
                                    batch["attention_mask"].to(strategy.device))
        if kind == rd.REGRESSION:
            return masked_mse_sum(preds, batch["labels"])
        rewards, pairs = preds[:, helpfulness].float(), batch["pairs"]
        return bradley_terry_sum(rewards[:pairs], rewards[pairs:], batch["strength"].to(preds.device), cfg.loss)

    collate = rd.collate_regression if kind == rd.REGRESSION else rd.collate_pairs
    history: list[float] = [] if progress is None else list(progress.extra.get("losses", []))
    val_metrics: dict[str, Any] | None = progress.extra.get("val") if progress else None
    bar = progress_bar(max_steps, start, enabled=rank0 and cfg.logging.progress_bar, desc="train-reward")
    prepared.train()
    throughput.reset()
    for step in range(start, max_steps):
        plan = plan_step(lengths, step, global_batch=cfg.train.global_batch_size,
                         micro_batch=cfg.train.micro_batch_size, world_size=strategy.world_size,
                         rank=strategy.rank, seed=cfg.train.seed, length_grouping=cfg.train.length_grouping)
        batches = [collate(rows, indices, pad_id) for indices in plan.micro_batches]
        # The loss is a mean over the whole global batch: count its cells/pairs on every worker first.
        local_count = sum(int((b["labels"] != -100).sum()) if kind == rd.REGRESSION else b["pairs"]
                          for b in batches)
        global_count = strategy.all_reduce_sum([local_count])[0]
        loss_sum, tokens = 0.0, 0
        for i, batch in enumerate(batches):
            with stepper.micro_step(last=i == len(batches) - 1):
                part, _ = loss_of(batch)
                stepper.backward(normalize_loss(part, global_count, strategy.world_size))
            loss_sum += float(part.detach())
            tokens += batch["tokens"]
        result = stepper.step()
        loss_total, tokens_total = strategy.all_reduce_sum([loss_sum, tokens])
        done = step + 1
        loss = loss_total / max(global_count, 1)
        history.append(loss)
        row = {"split": "train", "step": done, "epoch": plan.epoch, "loss": loss, "lr": result.lr,
               "grad_norm": result.grad_norm, "tokens": int(tokens_total),
               **throughput.rates(int(tokens_total))}
        is_last = done == max_steps
        if (cfg.train.eval_every and done % cfg.train.eval_every == 0 or is_last) and val_rows:
            val_metrics = evaluate(prepared, val_rows, kind, cfg, strategy, pad_id, helpfulness, baseline)
            writer.write({"split": "val", "step": done, **flat_metrics(val_metrics)})
            wandb.log({f"val/{k}": v for k, v in flat_metrics(val_metrics).items()}, step=done)
        writer.write(row)
        wandb.log({f"train/{k}": v for k, v in row.items() if k != "split"}, step=done)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{result.lr:.2e}", refresh=False)
        bar.update(1)
        if checkpoints.due(done, last=is_last):
            checkpoints.save(done, {"loss": loss}, extra={"losses": history, "val": val_metrics})
        if cfg.train.fail_after_step == done:
            raise InjectedFailure(f"train.fail_after_step={done}: failing on purpose after the checkpoint")
        throughput.reset()  # evaluation and checkpoint time stay out of the next step's tokens/s
    bar.close()
    wandb.finish()

    if val_rows and val_metrics is None:  # resumed a finished run: evaluate the model we export
        val_metrics = evaluate(prepared, val_rows, kind, cfg, strategy, pad_id, helpfulness, baseline)
    export_model(prepared, out / "model", tokenizer)
    if not rank0:
        return None
    return {"steps": max_steps, "resumed_from_step": start, "losses": history,
            "first_loss": history[0] if history else None, "last_loss": history[-1] if history else None,
            "val": val_metrics, "strategy": strategy.kind, "precision": strategy.precision,
            "world_size": strategy.world_size, "matmul_peak_flops_per_worker": peak,
            "trainable_params": prepared.num_parameters(trainable_only=True),
            "params": prepared.num_parameters(), "baseline": baseline}


# 4. Validation: every worker scores its share (sharded models need all workers), rank 0 gets all.
def evaluate(prepared: Any, rows: dict[str, list[Any]], kind: str, cfg: RewardConfig, strategy: Any, pad_id: int,
             helpfulness: int | None, baseline: list[float] | None) -> dict[str, Any]:
    import numpy as np
    import torch

    from steerray.eval.metrics import pairwise_metrics, regression_metrics
    from steerray.training.batching import eval_micro_batches
    from steerray.training.losses import bradley_terry_loss

    lengths = rows["length"][: cfg.train.max_eval_rows or None]
    collate = rd.collate_regression if kind == rd.REGRESSION else rd.collate_pairs
    mine: list[tuple[list[int], Any]] = []
    prepared.eval()
    with torch.no_grad():
        for indices, filler in eval_micro_batches(lengths, cfg.train.micro_batch_size * 2,
                                                  strategy.world_size, strategy.rank):
            batch = collate(rows, indices, pad_id)
            with strategy.autocast():
                preds = prepared.module(batch["input_ids"].to(strategy.device),
                                        batch["attention_mask"].to(strategy.device)).float().cpu().numpy()
            if not filler:
                mine.append((list(indices), preds))
    prepared.train()
    gathered = [item for part in strategy.all_gather_objects(mine) for item in part]
    index = np.concatenate([np.asarray(i) for i, _ in gathered])
    preds = np.concatenate([p for _, p in gathered])
    if kind == rd.REGRESSION:
        labels = np.stack([rows["label"][i] for i in index])
        return regression_metrics(preds, labels, cfg.attributes, baseline=baseline)
    sizes = [len(i) for i, _ in gathered]
    chosen = np.concatenate([p[:n, helpfulness] for (_, p), n in zip(gathered, sizes, strict=True)])
    rejected = np.concatenate([p[n:, helpfulness] for (_, p), n in zip(gathered, sizes, strict=True)])
    strength = np.asarray([rows["strength"][i] for i in index])
    metrics = pairwise_metrics(chosen, rejected, strength)
    metrics["loss"] = float(bradley_terry_loss(torch.as_tensor(chosen), torch.as_tensor(rejected),
                                               torch.as_tensor(strength), cfg.loss))
    return metrics


def flat_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """``{"mse": .., "mse/quality": .., "pearson/quality": ..}`` for metrics.jsonl and wandb."""
    flat = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    for name, entry in (metrics.get("per_attribute") or {}).items():
        for key in ("mse", "pearson", "spearman", "baseline_mse", "n"):
            if entry.get(key) is not None:
                flat[f"{key}/{name}"] = entry[key]
    return flat


# 5. main: check, tokenize, fit (resuming if checkpoints exist), write the manifest last.
def main(argv: list[str] | None = None) -> dict[str, Any]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from steerray.training.batching import accumulation_steps, steps_per_epoch
    from steerray.training.checkpoint import check_fingerprint
    from steerray.training.schedule import check_schedule
    from steerray.training.strategy import plan_ray_scaling

    logging.basicConfig(level=logging.INFO, format="[train-reward] %(message)s", stream=sys.stderr)
    cfg = validate_config(RewardConfig, yaml.safe_load(job_config_from_argv(argv)) or {}, "train-reward config")
    # Workers run in other folders: hand them absolute paths (the manifest keeps the config as given).
    absolute = cfg.model_copy(deep=True)
    absolute.out, absolute.data = str(Path(cfg.out).resolve()), str(Path(cfg.data).resolve())
    if cfg.init_from:
        absolute.init_from = str(Path(cfg.init_from).resolve())
    if Path(cfg.model.name).exists():
        absolute.model.name = str(Path(cfg.model.name).resolve())
    out = Path(absolute.out)

    kind, train_file, val_file, tokenizer = check_request(absolute)
    train = rd.read_split(train_file, kind, cfg.attributes)
    val = rd.read_split(val_file, kind, cfg.attributes, allow_empty=True) if val_file else None
    rejects = train.rejects + (val.rejects if val else [])
    write_jsonl(out / "rejects.jsonl", rejects)
    if rejects:
        log.warning("%d rows rejected (reasons in %s)", len(rejects), out / "rejects.jsonl")

    if cfg.scaling.num_workers != "auto":  # fail before Ray starts where the worker count is known
        accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, int(cfg.scaling.num_workers))
        steps_per_epoch(len(train.rows), cfg.train.global_batch_size)
    init_ray()
    plan = plan_ray_scaling(cfg.scaling)
    accumulation = accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, plan.num_workers)
    per_epoch = steps_per_epoch(len(train.rows), cfg.train.global_batch_size)
    max_steps = min(cfg.train.max_steps, cfg.train.epochs_cap * per_epoch) if cfg.train.epochs_cap \
        else cfg.train.max_steps
    check_schedule(cfg.optim, max_steps)
    resuming = check_fingerprint(out / "checkpoints", {
        "model": absolute.model.name, "init_from": absolute.init_from, "attributes": cfg.attributes,
        "loss": cfg.loss, "lora": cfg.lora.model_dump(), "data": str(train_file.resolve()),
        "train_rows": len(train.rows), "global_batch_size": cfg.train.global_batch_size, "seed": cfg.train.seed})

    train_ds = tokenize(train.rows, kind, tokenizer, cfg.model.max_length)
    val_ds = tokenize(val.rows, kind, tokenizer, cfg.model.max_length) if val and val.rows else None
    truncated = {"train": count_truncated(train_ds), "val": count_truncated(val_ds) if val_ds else 0}
    if truncated["train"] or truncated["val"]:
        log.warning("%d train / %d val texts were longer than model.max_length=%d tokens and lost tokens from "
                    "the left (the read-out token at the end is kept)", truncated["train"], truncated["val"],
                    cfg.model.max_length)
    log.info("%s data: %d train / %d val rows, %d steps (%d per epoch), %d workers x %d micro-batches of %d%s",
             kind, len(train.rows), len(val.rows) if val else 0, max_steps, per_epoch, plan.num_workers,
             accumulation, cfg.train.micro_batch_size, "; resuming from checkpoints" if resuming else "")

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": absolute.model_dump(mode="json"), "max_steps": max_steps, "kind": kind,
                           "accumulation": accumulation, "tokenizer": tokenizer, "has_val": val_ds is not None},
        datasets={"train": train_ds, **({"val": val_ds} if val_ds is not None else {})},
        # Every worker sees all rows and takes its share by a deterministic plan (exact resume).
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
        scaling_config=plan.scaling_config, torch_config=plan.torch_config,
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=str(out / "checkpoints"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise JobFailed(f"train-reward failed: {err}\nRe-run the same command to resume from the last "
                        f"checkpoint in {out / 'checkpoints'}.") from None
    summary = result.return_value or {}

    counts = {"train_rows": len(train.rows), "val_rows": len(val.rows) if val else 0, "rejected": len(rejects),
              "truncated": truncated, "train_total": train.total, "val_total": val.total if val else 0}
    write_manifest(out, STAGE, cfg,
                   inputs={"data": cfg.data, "files": [str(train_file)] + ([str(val_file)] if val_file else []),
                           "kind": kind, "init_from": cfg.init_from},
                   outputs={"model": "model", "metrics": "metrics.jsonl", "checkpoints": "checkpoints",
                            "rejects": "rejects.jsonl"},
                   counts=counts, loss=cfg.loss,
                   attributes=cfg.attributes,
                   training={k: summary.get(k) for k in ("steps", "resumed_from_step", "strategy", "precision",
                                                         "world_size", "params", "trainable_params",
                                                         "first_loss", "last_loss")},
                   metrics={"val": summary.get("val"), "baseline_means": summary.get("baseline")})
    print(f"[train-reward] wrote {out}/model; loss {summary.get('first_loss')} -> {summary.get('last_loss')}",
          file=sys.stderr)
    return {"out": str(out), "loss": cfg.loss, "counts": counts, **{k: summary.get(k) for k in (
        "steps", "resumed_from_step", "first_loss", "last_loss", "val", "strategy", "world_size")}}


if __name__ == "__main__":
    main()
