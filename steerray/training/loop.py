"""The one training loop every Ray Train stage runs in its workers: train-reward, train-sft, bootstrap's
fine-tune. A stage supplies a :class:`TrainTask` (its model, micro-batches, loss and evaluation); the loop
owns everything users rely on being the same: deterministic length-grouped batches planned per step (so a
resumed run sees the same data), gradient accumulation to a global-batch mean, checkpoints and resume
through Ray Train, metrics.jsonl, wandb, tokens/s and MFU, the progress bar, the final export.

The driver side (skip, fingerprint, scaling plan, ``TorchTrainer``, error advice) is ``launcher.py``.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from steerray.artifacts import config_to_dict
from steerray.config import TrainStageConfig
from steerray.models.loading import load_tokenizer
from steerray.training.batching import accumulation_steps, eval_micro_batches, plan_step
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
    PreparedModel,
    Strategy,
    build_optimizer_and_schedule,
    export_model,
    prepare_model,
    resolve_strategy,
)


class InjectedFailure(RuntimeError):
    """Raised by the ``train.fail_after_step`` test knob (first attempt only)."""


Rows = dict[str, list[Any]]


class TrainTask:
    """What a training stage adds to the shared loop. Subclasses live in the stage modules.

    ``options`` is the stage's own JSON-able data for its workers (e.g. the reward data kind).
    """

    name = "train"  # progress-bar label
    config_class: type[TrainStageConfig] = TrainStageConfig
    trainable_modules: tuple[str, ...] = ()  # kept fully trainable under LoRA (the reward head)
    eval_at_start = False  # validate before the first step too (train-sft reports the loss it started from)

    def __init__(self, config: TrainStageConfig, options: dict[str, Any]) -> None:
        self.config = config
        self.options = options

    def build_model(self, strategy: Strategy) -> Any:
        """The Hugging Face model to train, before LoRA and sharding."""
        raise NotImplementedError

    def wrap(self, model: Any) -> Any:
        """The module the loop calls, around the (LoRA-wrapped) model: a reward read-out, or the model."""
        return model

    def micro_batch(self, rows: Rows, indices: np.ndarray, pad_id: int, device: Any) -> dict[str, Any]:
        raise NotImplementedError

    def units(self, batch: dict[str, Any]) -> int:
        """What the loss is a mean over in this micro-batch: labelled cells, pairs, trained tokens."""
        raise NotImplementedError

    def tokens(self, batch: dict[str, Any]) -> int:
        """Real (unpadded) tokens of the micro-batch, for tokens/s."""
        return int(batch["attention_mask"].sum())

    def loss_sum(self, prepared: PreparedModel, batch: dict[str, Any]) -> Any:
        """The loss summed over the micro-batch's units (the loop normalises by the global count)."""
        raise NotImplementedError

    def evaluate(self, prepared: PreparedModel, rows: Rows, pad_id: int) -> dict[str, Any]:
        """Validation metrics over every row exactly once across workers (a collective)."""
        raise NotImplementedError

    def row_affinity(self) -> bool:
        """Deal each row to the same worker every epoch where it can (``plan_step``): for a task that keeps
        per-row work on the worker that did it."""
        return False

    def step_metrics(self, strategy: Strategy) -> dict[str, Any]:
        """Extra numbers for the step's metrics row, after its optimizer step; called on every worker, so a
        task that gathers numbers in ``loss_sum`` reduces them here (``strategy.all_reduce_sum``)."""
        return {}

    def before_export(self, prepared: PreparedModel, tokenizer: Any) -> None:
        """Last changes to the model's config and tokenizer before they are written (label attributes,
        chat template)."""

    def after_export(self, out: Path, tokenizer: Any, strategy: Strategy) -> dict[str, Any]:
        """Rank 0, after the export: extra outputs (samples) and their entries for the summary."""
        return {}


def load_task(spec: str, config: dict[str, Any], options: dict[str, Any]) -> TrainTask:
    """``"steerray.stages.train_reward:RewardTask"`` -> an instance (workers import it by name)."""
    module_name, _, class_name = spec.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(cls.config_class.model_validate(config), options)


# --------------------------------------------------------------------------------------------------
# Rows and evaluation helpers the tasks share
# --------------------------------------------------------------------------------------------------

def read_rows(name: str, limit: int | None = None) -> Rows:
    """This worker's copy of dataset ``name`` as columns, in source order (``file``, ``line``) whatever
    order Ray Data delivered it in, so every worker plans its batches from the same row indices."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    columns: Rows = {}
    for batch in shard.iter_batches(batch_size=1024, batch_format="numpy"):
        for key, values in batch.items():
            columns.setdefault(key, []).extend(list(values))
    if not columns:
        return columns
    keys = [np.asarray(columns[k]) for k in ("line", "file") if k in columns]  # lexsort: last key first
    order = np.lexsort(keys) if keys else np.arange(len(next(iter(columns.values()))))
    order = order[:limit] if limit else order
    return {key: [values[i] for i in order] for key, values in columns.items()}


def sharded_eval(task: TrainTask, prepared: PreparedModel, rows: Rows, pad_id: int, micro: int,
                 score: Any) -> list[tuple[list[int], Any]]:
    """Run ``score(batch) -> result`` over every validation row once across workers (fillers dropped);
    every worker gets the list of ``(row indices, result)`` of all workers."""
    import torch

    strategy = prepared.strategy
    mine: list[tuple[list[int], Any]] = []
    prepared.eval()
    with torch.no_grad():
        for indices, filler in eval_micro_batches(rows["length"], micro, strategy.world_size, strategy.rank):
            result = score(task.micro_batch(rows, indices, pad_id, strategy.device))
            if not filler:
                mine.append((list(indices), result))
    prepared.train()
    return [item for part in strategy.all_gather_objects(mine) for item in part]


def flat_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """``{"mse": .., "mse/quality": .., "pearson/quality": ..}`` for metrics.jsonl and wandb."""
    metrics = metrics or {}
    flat = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    for name, entry in (metrics.get("per_attribute") or {}).items():
        for key in ("mse", "pearson", "spearman", "baseline_mse", "n"):
            if entry.get(key) is not None:
                flat[f"{key}/{name}"] = entry[key]
    return flat


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------

@dataclass
class RunState:
    """What a checkpoint carries besides weights: the loss history and the validation results."""

    start: int = 0
    resumed: bool = False
    losses: list[float] = field(default_factory=list)
    val_first: dict[str, Any] | None = None
    val: dict[str, Any] | None = None
    tokens: float = 0.0
    seconds: float = 0.0

    def extra(self) -> dict[str, Any]:
        return {"losses": self.losses, "val_first": self.val_first, "val": self.val}


@dataclass
class Telemetry:
    writer: MetricsWriter
    wandb: WandbLogger
    throughput: Throughput
    bar: Any
    peak: float

    def log(self, row: dict[str, Any], step: int) -> None:
        self.writer.write(row)
        prefix = f"{row.get('split', 'train')}/"
        self.wandb.log({prefix + k: v for k, v in row.items() if k != "split"}, step=step)


def train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's per-worker function: build, restore, train, validate, export; rank 0 returns the summary."""
    import torch

    task = load_task(loop_config["task"], loop_config["config"], loop_config["options"])
    cfg, steps, out = task.config, int(loop_config["steps"]), Path(loop_config["out"])
    strategy = resolve_strategy(cfg.scaling)
    torch.manual_seed(cfg.train.seed)
    rows = read_rows("train")
    val_rows = read_rows("val", cfg.train.max_eval_rows) if loop_config["has_val"] else {}
    tokenizer = load_tokenizer(loop_config["tokenizer"], trust_remote_code=cfg.model.trust_remote_code)
    prepared = prepare_model(task.build_model(strategy), strategy, cfg.lora,
                             trainable_modules=task.trainable_modules,
                             gradient_checkpointing=cfg.model.gradient_checkpointing, wrap=task.wrap,
                             attention=cfg.model.attention)
    accumulation = accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, strategy.world_size)
    stepper = build_optimizer_and_schedule(prepared, cfg.optim, steps, accumulation)
    checkpoints = CheckpointManager(prepared, stepper, every=cfg.train.checkpoint_every)
    state = restore_state(checkpoints)
    telemetry = open_telemetry(task, prepared, out, steps, state.start)
    pad_id = tokenizer.pad_token_id
    if state.start == 0 and task.eval_at_start and val_rows:
        state.val_first = task.evaluate(prepared, val_rows, pad_id)
        telemetry.log({"split": "val", "step": 0, **flat_metrics(state.val_first)}, 0)
    train_steps(task, prepared, stepper, checkpoints, telemetry, state, rows, val_rows, steps, pad_id)
    if val_rows:
        state.val = task.evaluate(prepared, val_rows, pad_id)
        telemetry.log({"split": "val", "step": steps, **flat_metrics(state.val)}, steps)
    telemetry.wandb.finish()
    return finish(task, prepared, tokenizer, out, state, steps, telemetry)


def restore_state(checkpoints: CheckpointManager) -> RunState:
    progress = checkpoints.restore()
    if progress is None:
        return RunState()
    extra = progress.extra
    return RunState(start=progress.step, resumed=True, losses=list(extra.get("losses") or []),
                    val_first=extra.get("val_first"), val=extra.get("val"))


def open_telemetry(task: TrainTask, prepared: PreparedModel, out: Path, steps: int, start: int) -> Telemetry:
    cfg, strategy = task.config, prepared.strategy
    rank0 = strategy.is_rank0
    peak = measure_matmul_peak(strategy.device, strategy.compute_dtype, seconds=0.5)
    return Telemetry(
        writer=MetricsWriter(out / "metrics.jsonl", enabled=rank0, resume_step=start),
        wandb=WandbLogger(cfg.logging.wandb_project, config_to_dict(cfg), name=out.name, out_dir=out,
                          enabled=rank0),
        # LoRA computes no gradients for frozen weights, and the backward pass stops below the lowest
        # trainable layer: the FLOPs per token follow what actually trains.
        throughput=Throughput(prepared.flops_parameters(), peak, strategy.world_size,
                              flops_per_token=prepared.train_flops_per_token()),
        bar=progress_bar(steps, start, enabled=rank0 and cfg.logging.progress_bar, desc=task.name),
        peak=peak)


def train_steps(task: TrainTask, prepared: PreparedModel, stepper: Any, checkpoints: CheckpointManager,
                telemetry: Telemetry, state: RunState, rows: Rows, val_rows: Rows, steps: int, pad_id: int) -> None:
    """Steps ``state.start`` .. ``steps``: one optimizer step each, validation and checkpoints on schedule."""
    train = task.config.train
    prepared.train()
    for step in range(state.start, steps):
        started = time.perf_counter()
        telemetry.throughput.reset()
        row = one_step(task, prepared, stepper, rows, step, pad_id)
        state.seconds += time.perf_counter() - started
        state.tokens += row["tokens"]
        row.update(telemetry.throughput.rates(row["tokens"]))
        done = step + 1
        state.losses.append(row["loss"])
        if train.eval_every and done % train.eval_every == 0 and done < steps and val_rows:
            state.val = task.evaluate(prepared, val_rows, pad_id)
            telemetry.log({"split": "val", "step": done, **flat_metrics(state.val)}, done)
        telemetry.log(row, done)
        telemetry.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", refresh=False)
        telemetry.bar.update(1)
        if checkpoints.due(done, last=done == steps):
            checkpoints.save(done, {"loss": row["loss"]}, extra=state.extra())
        if train.fail_after_step == done and not state.resumed:
            raise InjectedFailure(f"injected failure after step {done} (train.fail_after_step), "
                                  "right after its checkpoint")
    telemetry.bar.close()


def one_step(task: TrainTask, prepared: PreparedModel, stepper: Any, rows: Rows, step: int,
             pad_id: int) -> dict[str, Any]:
    """Plan this worker's micro-batches, accumulate their gradients, step; the metrics row (global)."""
    train, strategy = task.config.train, prepared.strategy
    plan = plan_step(rows["length"], step, global_batch=train.global_batch_size, micro_batch=train.micro_batch_size,
                     world_size=strategy.world_size, rank=strategy.rank, seed=train.seed,
                     length_grouping=train.length_grouping, row_affinity=task.row_affinity())
    batches = [task.micro_batch(rows, indices, pad_id, strategy.device) for indices in plan.micro_batches]
    # The loss is a mean over the whole global batch: count its units on every worker first.
    global_units = strategy.all_reduce_sum([sum(task.units(b) for b in batches)])[0]
    loss_sum = 0.0
    for i, batch in enumerate(batches):
        with stepper.micro_step(last=i == len(batches) - 1):
            part = task.loss_sum(prepared, batch)
            stepper.backward(normalize_loss(part, global_units, strategy.world_size))
        loss_sum += float(part.detach())
    result = stepper.step()
    loss_total, tokens = strategy.all_reduce_sum([loss_sum, sum(task.tokens(b) for b in batches)])
    return {"split": "train", "step": step + 1, "epoch": plan.epoch, "loss": loss_total / max(global_units, 1),
            "lr": result.lr, "grad_norm": result.grad_norm, "units": int(global_units), "tokens": int(tokens),
            **task.step_metrics(strategy)}


def finish(task: TrainTask, prepared: PreparedModel, tokenizer: Any, out: Path, state: RunState, steps: int,
           telemetry: Telemetry) -> dict[str, Any]:
    """Export (collective), then rank 0's extras and the summary every training stage reports."""
    task.before_export(prepared, tokenizer)
    export_model(prepared, out / "model", tokenizer)
    strategy = prepared.strategy
    if not strategy.is_rank0:
        return {}
    rate = state.tokens / state.seconds if state.seconds else None
    flops = telemetry.throughput.flops_per_token
    peak = telemetry.throughput.peak
    summary = {
        "steps": steps, "resumed_from": state.start, "losses": state.losses,
        "first_loss": state.losses[0] if state.losses else None,
        "last_loss": state.losses[-1] if state.losses else None,
        "val_first": state.val_first, "val": state.val, "tokens_per_s": rate,
        "mfu": rate * flops / peak if rate and peak else None, "matmul_peak_flops_per_worker": telemetry.peak,
        "strategy": strategy.kind, "precision": strategy.precision, "world_size": strategy.world_size,
        "attention": getattr(getattr(prepared.model, "config", None), "_attn_implementation", None),
        "params": prepared.num_parameters(), "trainable_params": prepared.num_parameters(trainable_only=True),
        "model": str(out / "model"),
    }
    return {**summary, **task.after_export(out, tokenizer, strategy)}
