"""Checkpoints load safely: exact RNG resume from plain data, and pickle payloads are refused, not run."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from steerray.config import OptimConfig, ScalingConfig
from steerray.training.checkpoint import (
    CheckpointManager,
    CheckpointRefused,
    rng_state,
    safe_torch_load,
    set_rng_state,
)
from steerray.training.strategy import build_optimizer_and_schedule, prepare_model, resolve_strategy


class Payload:
    """Unpickling this creates ``marker``: proof that a load ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _draws() -> tuple[list[float], list[float], list[float]]:
    return (torch.rand(4).tolist() + torch.randn(2).tolist(),
            np.random.rand(4).tolist() + np.random.standard_normal(3).tolist(),
            [random.random() for _ in range(4)] + [random.gauss(0, 1) for _ in range(3)])


def test_rng_state_round_trips_exactly_through_a_weights_only_file(tmp_path: Path):
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    np.random.standard_normal(1)  # leaves numpy's cached second gaussian set (has_gauss=1)
    random.gauss(0, 1)  # and python's gauss_next
    torch.save(rng_state(), tmp_path / "rng_rank0.pt")
    expected = _draws()

    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    assert _draws() != expected
    set_rng_state(torch.load(tmp_path / "rng_rank0.pt", weights_only=True))
    assert _draws() == expected  # bit-exact: lists of python floats compare with ==


def test_pickle_payload_works_when_unpickled_and_is_refused_by_safe_load(tmp_path: Path):
    live = tmp_path / "live.pt"
    torch.save({"step": 1, "extra": Payload(tmp_path / "ran-unsafe")}, live)
    torch.load(live, weights_only=False)
    assert (tmp_path / "ran-unsafe").exists()  # the payload is real: an unsafe load runs it

    bad = tmp_path / "trainer_state.pt"
    torch.save({"step": 1, "extra": Payload(tmp_path / "ran-safe")}, bad)
    refused = r"trainer_state\.pt holds objects a safe load refuses \(Unsupported global: GLOBAL io\.open "
    with pytest.raises(CheckpointRefused, match=refused + r".*delete the checkpoint folder"):
        safe_torch_load(bad)
    assert not (tmp_path / "ran-safe").exists()


def test_rng_file_of_the_old_pickled_format_is_refused(tmp_path: Path):
    old = tmp_path / "rng_rank0.pt"
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save(state, old)  # what the unsafe loader used to read: numpy arrays need arbitrary globals
    with pytest.raises(CheckpointRefused, match=r"rng_rank0\.pt holds objects a safe load refuses"):
        safe_torch_load(old)


# -- a real checkpoint folder of a tiny model --------------------------------------------------------

def _manager(tiny_model_dir: str) -> CheckpointManager:
    from steerray.models.reward import build_reward_model

    torch.manual_seed(0)
    prepared = prepare_model(build_reward_model(tiny_model_dir), resolve_strategy(ScalingConfig()), None,
                             trainable_modules=["score"])
    stepper = build_optimizer_and_schedule(prepared, OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=1), 20)
    return CheckpointManager(prepared, stepper, every=1, enabled=False)


@pytest.fixture
def checkpoint(tmp_path: Path, tiny_model_dir: str) -> tuple[CheckpointManager, Path]:
    manager = _manager(tiny_model_dir)
    folder = tmp_path / "checkpoint_step00000003"
    folder.mkdir()
    manager.write(folder, 3, {"loss": np.float32(0.5), "history": [np.float64(1.25), 2]})
    return manager, folder


def test_checkpoint_files_are_plain_data_and_load_back(checkpoint: tuple[CheckpointManager, Path]):
    manager, folder = checkpoint
    for name in ("trainer_state.pt", "rng_rank0.pt"):
        torch.load(folder / name, weights_only=True)  # would raise on any non-allow-listed object
    progress = manager.load(folder)
    assert progress.step == 3 and progress.extra == {"loss": 0.5, "history": [1.25, 2]}
    assert manager.last_saved_step == 3


@pytest.mark.parametrize("target", ["trainer_state.pt", "rng_rank0.pt", "model_optim/.metadata"])
def test_tampered_checkpoint_file_is_refused_not_executed(checkpoint, tmp_path: Path, target: str):
    manager, folder = checkpoint
    marker = tmp_path / "payload-ran"
    path = folder / target
    if target.endswith(".pt"):
        torch.save({"step": 3, "scheduler": None, "extra": {}, "x": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointRefused, match=rf"{path.name} holds objects a safe load refuses .*io\.open"):
        manager.load(folder)
    assert not marker.exists()


def test_tampered_optimizer_item_in_dcp_data_is_refused_not_executed(checkpoint, tmp_path: Path):
    import torch.distributed.checkpoint as dcp

    manager, folder = checkpoint
    marker = tmp_path / "payload-ran"
    state = manager._state_dicts()
    state["optim"]["param_groups"][0]["lr"] = Payload(marker)  # DCP stores non-tensors as pickled bytes
    dcp.save(state, checkpoint_id=str(folder / "model_optim"))
    with pytest.raises(CheckpointRefused, match=r"item optim\.param_groups\.0\.lr\) holds objects a safe"):
        manager.load(folder)
    assert not marker.exists()


def test_a_model_folder_with_pickled_weights_only_is_refused_unless_its_code_is_trusted(tmp_path):
    """Weights load from safetensors: a pytorch_model.bin is never unpickled by default."""
    from transformers import AutoModelForCausalLM

    from steerray.models.loading import TINY_ALIAS, ModelNotFound, load_causal_lm, resolve_model

    folder = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(resolve_model(TINY_ALIAS))
    model.config.save_pretrained(folder)  # transformers only writes safetensors now: pickle by hand
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    with pytest.raises(ModelNotFound, match="no safetensors weights"):
        load_causal_lm(str(folder))
    assert load_causal_lm(str(folder), trust_remote_code=True).config.num_hidden_layers == 2
