"""Checkpoints through Ray Train: model + optimizer + schedule + step + RNG, saved and resumed.

Each save writes, on every worker, into a temporary folder that ``ray.train.report`` merges into one
checkpoint folder under the run's storage path:

- ``model_optim/``: a ``torch.distributed.checkpoint`` (DCP) of the model's trainable weights and the
  optimizer state, each worker writing only its own shards (FSDP2 never gathers them; DDP dedups);
  DeepSpeed writes its own ``deepspeed/`` layout instead;
- ``trainer_state.pt`` (rank 0): step, scheduler state, whatever the job adds (``extra``);
- ``rng_rank<r>.pt``: each worker's torch / numpy / python RNG states.

Resuming: ``restore()`` reads ``ray.train.get_checkpoint()``, which Ray Train sets after a worker died
(``FailureConfig(max_failures)``) and when the same run (``RunConfig(name, storage_path)``) is started again,
so re-running the same command continues from the last checkpoint. Frozen weights are not saved (they
come back from the base model), which keeps LoRA checkpoints small.

Outside Ray Train (benchmarks, unit tests) the manager is disabled and ``restore()`` returns None.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerray.errors import SteerrayError

log = logging.getLogger("steerray")

FINGERPRINT_FILE = "fingerprint.json"


class CheckpointMismatch(SteerrayError, RuntimeError):
    """Checkpoints in the output folder come from a run with a different model, data or loss."""


@dataclass
class Progress:
    step: int  # optimizer steps completed when the checkpoint was taken
    extra: dict[str, Any] = field(default_factory=dict)


def in_ray_train() -> bool:
    import sys

    if "ray.train" not in sys.modules:  # a Train worker has imported it already
        return False
    try:
        import ray.train

        return ray.train.get_context() is not None
    except Exception:  # noqa: BLE001 - Ray absent or not in a Train worker
        return False


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Save every ``every`` steps (and at the end) through ``ray.train.report``; restore on (re)start.

    All workers must call :meth:`save` / :meth:`report` together: Ray Train's report is a barrier.
    """

    def __init__(self, prepared: Any, stepper: Any, *, every: int, enabled: bool | None = None):
        self.prepared = prepared
        self.stepper = stepper
        self.every = every
        self.enabled = in_ray_train() if enabled is None else enabled
        self.last_saved_step: int | None = None

    @property
    def strategy(self) -> Any:
        return self.prepared.strategy

    def due(self, step: int, last: bool = False) -> bool:
        """Whether step ``step`` (1-based count of completed steps) should be checkpointed."""
        return self.enabled and step != self.last_saved_step and (last or step % self.every == 0)

    # -- saving ------------------------------------------------------------------------------------

    def save(self, step: int, metrics: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        """Write this worker's part of a checkpoint and report it with ``metrics`` (collective)."""
        if not self.enabled:
            return
        import ray.train

        with tempfile.TemporaryDirectory(prefix="steerray-ckpt-") as tmp:
            self.write(Path(tmp), step, extra or {})
            ray.train.report(dict(metrics, step=step), checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_step{step:08d}")
        self.last_saved_step = step

    def write(self, folder: Path, step: int, extra: dict[str, Any]) -> None:
        """This worker's files of a checkpoint at ``step``, into ``folder`` (usable without Ray)."""
        import torch

        rank = self.strategy.rank
        if self.strategy.kind == "deepspeed":
            self.stepper.engine.save_checkpoint(str(folder / "deepspeed"), tag="state")
        else:
            import torch.distributed.checkpoint as dcp

            dcp.save(self._state_dicts(), checkpoint_id=str(folder / "model_optim"))
        torch.save(rng_state(), folder / f"rng_rank{rank}.pt")
        if rank == 0:
            scheduler = self.stepper.scheduler.state_dict() if self.stepper.scheduler is not None else None
            torch.save({"step": step, "scheduler": scheduler, "extra": extra}, folder / "trainer_state.pt")
            (folder / "trainer_state.json").write_text(json.dumps({"step": step, **_jsonable(extra)}, indent=2))

    def report(self, metrics: dict[str, Any]) -> None:
        """Report metrics without a checkpoint (still collective)."""
        if self.enabled:
            import ray.train

            ray.train.report(metrics)

    def _state_dicts(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(self.prepared.module, self.stepper.optimizer,
                                            options=StateDictOptions(ignore_frozen_params=True))
        return {"model": model_sd, "optim": optim_sd}

    # -- restoring ---------------------------------------------------------------------------------

    def restore(self) -> Progress | None:
        """Load the latest checkpoint Ray Train hands this run, if any; returns the progress made."""
        if not self.enabled:
            return None
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            progress = self.load(Path(folder))
        if self.strategy.is_rank0:
            log.info("resumed from checkpoint at step %d (%s)", progress.step, checkpoint.path)
        return progress

    def load(self, folder: Path) -> Progress:
        """Load model, optimizer, schedule and RNG from a checkpoint folder (every worker)."""
        import torch

        if self.strategy.kind == "deepspeed":
            self.stepper.engine.load_checkpoint(str(folder / "deepspeed"), tag="state")
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            state = self._state_dicts()
            dcp.load(state, checkpoint_id=str(folder / "model_optim"))
            set_state_dict(self.prepared.module, self.stepper.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"],
                           options=StateDictOptions(ignore_frozen_params=True, strict=False))
        trainer_state = torch.load(folder / "trainer_state.pt", weights_only=False)
        if trainer_state.get("scheduler") is not None and self.stepper.scheduler is not None:
            self.stepper.scheduler.load_state_dict(trainer_state["scheduler"])
        rng_file = folder / f"rng_rank{self.strategy.rank}.pt"
        if rng_file.exists():  # a run restarted with more workers has no RNG for the new ranks
            set_rng_state(torch.load(rng_file, weights_only=False))
        self.last_saved_step = int(trainer_state["step"])
        return Progress(int(trainer_state["step"]), dict(trainer_state.get("extra") or {}))


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(data, default=str))


def check_fingerprint(storage_dir: str | Path, fingerprint: dict[str, Any]) -> bool:
    """Guard a re-run: checkpoints under ``storage_dir`` must come from the same model/data/loss.

    Writes the fingerprint on the first run; returns True when earlier checkpoints exist (a resume).
    Raises :class:`CheckpointMismatch` naming the differing keys otherwise.
    """
    storage = Path(storage_dir)
    path = storage / FINGERPRINT_FILE
    fingerprint = _jsonable(fingerprint)
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        differing = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
        if differing:
            raise CheckpointMismatch(
                f"{storage} holds checkpoints of a different run ({', '.join(differing)} changed); "
                f"use another --out, or delete {storage} to start over")
        return any(storage.rglob("trainer_state.pt"))
    storage.mkdir(parents=True, exist_ok=True)
    from steerray.artifacts import atomic_write_json

    atomic_write_json(path, fingerprint)
    return False
