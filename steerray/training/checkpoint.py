"""Checkpoints through Ray Train: model + optimizer + schedule + step + RNG, saved and resumed.

Each save writes, on every worker, into a temporary folder that ``ray.train.report`` merges into one
checkpoint folder under the run's storage path:

- ``model_optim/``: a ``torch.distributed.checkpoint`` (DCP) of the model's trainable weights and the
  optimizer state, each worker writing only its own shards (FSDP2 never gathers them; DDP dedups);
  DeepSpeed writes its own ``deepspeed/`` layout instead;
- ``trainer_state.pt`` (rank 0): step, scheduler state, whatever the job adds (``extra``);
- ``rng_rank<r>.pt``: each worker's torch / numpy / python RNG states.

Loading never unpickles arbitrary objects, so a tampered checkpoint folder cannot run code: the ``.pt``
files hold only tensors and plain containers (numpy's and python's RNG states are stored as lists) and
load with ``torch.load(weights_only=True)``; the DCP metadata is read with an unpickler that allows only
DCP's own metadata classes, and DCP's non-tensor items (optimizer hyper-parameters) load with
``weights_only=True`` too. A refused file raises :class:`CheckpointRefused`. (The DeepSpeed layout is
read by DeepSpeed's own ``load_checkpoint``, outside this module's control.)

Resuming: ``restore()`` reads ``ray.train.get_checkpoint()``, which Ray Train sets after a worker died
(``FailureConfig(max_failures)``) and when the same run (``RunConfig(name, storage_path)``) is started again,
so re-running the same command continues from the last checkpoint. Frozen weights are not saved (they
come back from the base model), which keeps LoRA checkpoints small.

Outside Ray Train (benchmarks, unit tests) the manager is disabled and ``restore()`` returns None.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerray.artifacts import atomic_write_json
from steerray.errors import SteerrayError

log = logging.getLogger("steerray")

FINGERPRINT_FILE = "fingerprint.json"


class CheckpointMismatch(SteerrayError, RuntimeError):
    """Checkpoints in the output folder come from a run with a different model, data or loss."""


class CheckpointRefused(SteerrayError, RuntimeError):
    """A checkpoint file holds objects a safe load does not accept (altered, or written by old code)."""


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
    """This process's torch, numpy and python RNG states as tensors, lists and numbers (safe to load)."""
    import numpy as np
    import torch

    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "key": [int(k) for k in key], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned: the next random numbers are those that would have followed."""
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state((npy["kind"], np.asarray(npy["key"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` accepting only tensors and plain data; anything else is :class:`CheckpointRefused`."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refused(str(path), Path(path).parent, err) from None


def _refused(what: str, folder: Path, err: Exception) -> CheckpointRefused:
    # torch's message is a page of advice; the line naming the refused global is what tells what happened.
    text = str(err).strip()
    found = re.search(r"WeightsUnpickler error: (.*?)(?:\. Please|\n|$)", text)
    why = found.group(1) if found else (text.splitlines()[0][:300] if text else type(err).__name__)
    return CheckpointRefused(
        f"{what} holds objects a safe load refuses ({why}). The checkpoint was altered or written by an "
        f"older steerray; delete the checkpoint folder {folder} to start the run over")


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
            state = {"step": step, "scheduler": _plain(scheduler), "extra": _plain(extra)}
            torch.save(state, folder / "trainer_state.pt")
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
        if self.strategy.kind == "deepspeed":
            self.stepper.engine.load_checkpoint(str(folder / "deepspeed"), tag="state")
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            state = self._state_dicts()
            safe_dcp_load(state, folder / "model_optim")
            set_state_dict(self.prepared.module, self.stepper.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"],
                           options=StateDictOptions(ignore_frozen_params=True, strict=False))
        trainer_state = safe_torch_load(folder / "trainer_state.pt")
        if trainer_state.get("scheduler") is not None and self.stepper.scheduler is not None:
            self.stepper.scheduler.load_state_dict(trainer_state["scheduler"])
        rng_file = folder / f"rng_rank{self.strategy.rank}.pt"
        if rng_file.exists():  # a run restarted with more workers has no RNG for the new ranks
            set_rng_state(safe_torch_load(rng_file))
        self.last_saved_step = int(trainer_state["step"])
        return Progress(int(trainer_state["step"]), dict(trainer_state.get("extra") or {}))


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars/arrays as python numbers/lists and unknown objects as strings.

    What ``torch.load(weights_only=True)`` accepts: a job's ``extra`` may hold ``np.float32`` losses.
    """
    import numpy as np
    import torch

    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.Tensor)):
        return value
    return str(value)


# -- DCP without pickle's code execution ------------------------------------------------------------

# Globals a DCP ``.metadata`` pickle names (torch 2.13, model + optimizer state, DDP and FSDP2 shards),
# besides every class of torch.distributed.checkpoint.metadata and the torch dtypes.
_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_DCP_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals: pickle runs whatever callable a global names."""

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if (module, name) in _DCP_ALLOWED:
            return super().find_class(module, name)
        if module in ("torch", _DCP_METADATA_MODULE):  # looking a name up runs nothing; calling it would
            found = super().find_class(module, name)
            own_class = isinstance(found, type) and found.__module__ == _DCP_METADATA_MODULE
            if own_class or isinstance(found, torch.dtype):
                return found
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in checkpoint metadata")


def safe_dcp_reader(path: Path) -> Any:
    """A DCP ``FileSystemReader`` for ``path`` whose metadata load allows only DCP's metadata classes."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            file = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
            try:
                with open(file, "rb") as handle:
                    metadata = _MetadataUnpickler(handle).load()
            except (pickle.UnpicklingError, AttributeError, ImportError, EOFError) as err:
                raise _refused(str(file), file.parent.parent, err) from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def safe_dcp_planner(folder: Path) -> Any:
    """A DCP ``DefaultLoadPlanner`` whose non-tensor items load with ``weights_only=True``.

    ``folder`` (the DCP checkpoint's) only names the checkpoint in the error.
    """
    import torch
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:  # validate first: the parent class loads with weights_only=False
                torch.load(value, weights_only=True)
            except pickle.UnpicklingError as err:
                raise _refused(f"{folder} (item {read_item.dest_index.fqn})", folder.parent, err) from None
            value.seek(0)
            super().load_bytes(read_item, value)

    return SafePlanner()


def safe_dcp_load(state: dict[str, Any], folder: Path) -> None:
    """``dcp.load(state)`` from ``folder`` via the safe reader and planner; refusals: CheckpointRefused.

    DCP folds a reader's or planner's exception into a ``CheckpointException`` (or an AssertionError
    text): the metadata is read once up front and refusals are unwrapped, so the user sees the reason.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader = safe_dcp_reader(folder)
    if (folder / ".metadata").exists():
        reader.read_metadata()
    try:
        dcp.load(state, storage_reader=reader, planner=safe_dcp_planner(folder))
    except CheckpointException as err:
        refused = [exc for exc, _ in err.failures.values() if isinstance(exc, CheckpointRefused)]
        if refused:
            raise refused[0] from None
        raise


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

    atomic_write_json(path, fingerprint)
    return False
