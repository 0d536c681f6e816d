"""The driver side of every training stage: plan, check, fit with Ray Train, explain failures.

A stage tokenizes its data into Ray datasets, then hands :func:`fit` a :class:`Fit`: which task class
its workers run (``steerray/training/loop.py``), the datasets, and what a resumable checkpoint must match.
``fit`` settles the step count and the schedule before any worker starts, guards the checkpoints with
the fingerprint, runs ``TorchTrainer`` (resuming from ``out/checkpoints`` when the same run is started
again, or after a worker died, through ``FailureConfig``) and turns a failure into advice that says
whether re-running resumes or the input or config must change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from steerray.artifacts import config_to_dict, content_fingerprint
from steerray.config import TrainLoopConfig, TrainStageConfig
from steerray.errors import SteerrayError
from steerray.training.batching import accumulation_steps, steps_per_epoch
from steerray.training.checkpoint import check_fingerprint
from steerray.training.loop import train_worker
from steerray.training.schedule import check_schedule
from steerray.training.strategy import plan_ray_scaling

log = logging.getLogger("steerray")


class TrainingFailed(SteerrayError, RuntimeError):
    """Training failed in its workers; the message says whether a re-run resumes or something must change."""


@dataclass
class Fit:
    name: str  # the run's name under out/checkpoints/ and in messages ("train-reward")
    task: str  # "module:Class" of the TrainTask the workers run
    config: TrainStageConfig  # with absolute paths: workers run in other folders
    out: Path
    datasets: dict[str, Any]  # Ray datasets: "train" and, when there is one, "val"
    train_rows: int
    tokenizer: str  # where workers load the tokenizer from
    data_files: list[str]  # the files the datasets were read from: their content is part of the fingerprint
    fingerprint: dict[str, Any] = field(default_factory=dict)  # what else resumable checkpoints must match
    options: dict[str, Any] = field(default_factory=dict)  # the task's own settings (JSON-able)


def planned_steps(train: TrainLoopConfig, rows: int, workers: int) -> int:
    """Optimizer steps of the run; also checks that the batch sizes split over the workers."""
    accumulation_steps(train.global_batch_size, train.micro_batch_size, workers)
    per_epoch = steps_per_epoch(rows, train.global_batch_size)
    return min(train.max_steps, train.epochs_cap * per_epoch) if train.epochs_cap else train.max_steps


def fit(job: Fit) -> dict[str, Any]:
    """Train on Ray Train; returns rank 0's summary (``steerray.training.loop.finish``)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = job.config
    plan = plan_ray_scaling(cfg.scaling)
    steps = planned_steps(cfg.train, job.train_rows, plan.num_workers)
    check_schedule(cfg.optim, steps)
    resuming = check_fingerprint(job.out / "checkpoints", run_fingerprint(job))
    log.info("%s: %d train rows, %d steps, %d workers%s", job.name, job.train_rows, steps, plan.num_workers,
             "; resuming from checkpoints" if resuming else "")
    trainer = TorchTrainer(
        cast(Any, train_worker),  # Ray types the loop as returning None; V2 hands its value back
        train_loop_config={"task": job.task, "config": config_to_dict(cfg), "options": job.options,
                           "steps": steps, "out": str(job.out), "tokenizer": job.tokenizer,
                           "has_val": "val" in job.datasets},
        datasets=job.datasets,
        # Every worker sees all rows and takes its share by a deterministic plan (exact resume).
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
        scaling_config=plan.scaling_config, torch_config=plan.torch_config,
        run_config=ray.train.RunConfig(
            name=job.name, storage_path=str(job.out / "checkpoints"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise TrainingFailed(failure_advice(job, err)) from None
    return getattr(result, "return_value", None) or {}


def run_fingerprint(job: Fit) -> dict[str, Any]:
    """What checkpoints in out/checkpoints must come from to be resumed: the model, LoRA, batch size, seed,
    the data's content, and what the stage adds (its loss, attributes, label attributes)."""
    cfg = job.config
    return {"model": cfg.model.name, "max_length": cfg.model.max_length,
            "lora": cfg.lora.model_dump(exclude={"merge_on_export"}), "global_batch_size": cfg.train.global_batch_size,
            "seed": cfg.train.seed, "data": content_fingerprint(job.data_files), **job.fingerprint}


def worker_errors(err: BaseException) -> list[BaseException]:
    """The workers' own exceptions inside Ray Train's error, their causes included."""
    found: list[BaseException] = []
    for failure in (getattr(err, "worker_failures", None) or {}).values():
        while failure is not None and failure not in found:
            found.append(failure)
            failure = failure.__cause__ or getattr(failure, "cause", None)
    return found


def failure_advice(job: Fit, err: BaseException) -> str:
    """What went wrong, and what to do: a problem with the input/config does not go away on a re-run."""
    errors = worker_errors(err)
    ours = next((e for e in errors if isinstance(e, SteerrayError)), None)
    detail = str(ours or (errors[0] if errors else err)).strip()
    restarts = job.config.scaling.max_failures
    if ours is not None:
        return (f"{job.name} failed: {detail}\nThis is a problem with the input or the config: change it, "
                f"then re-run (a re-run with the same data and model resumes from {job.out / 'checkpoints'}).")
    return (f"{job.name} failed after {restarts} restart(s): {detail}\n"
            f"Re-running the same command resumes from the last checkpoint in {job.out / 'checkpoints'}.")
