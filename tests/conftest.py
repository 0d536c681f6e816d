"""Shared fixtures: quiet offline environment, one local Ray per test session, real data samples."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before anything imports Ray or transformers: loopback-only Ray, no hub, no wandb, no telemetry.
os.environ.update(
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
    HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
OASST_SAMPLE = SHARED_DATA / "oasst1" / "oasst1_en_validation.jsonl"
HELPSTEER2_SAMPLE = SHARED_DATA / "helpsteer2" / "helpsteer2_validation_sample_hfschema.jsonl"


@pytest.fixture(scope="session")
def ray_session():
    """One embedded local Ray (2 CPUs, small object store) for the whole test session."""
    import ray

    from steerray.runtime import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=2, object_store_mb=512)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {SHARED_DATA} (they live in ../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """A random 2-layer Llama with SmolLM2's tokenizer, built once and cached."""
    from steerray.models.loading import TINY_ALIAS, resolve_model

    return resolve_model(TINY_ALIAS)


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory) -> str:
    """A reward-model folder (tiny-llama backbone, 9 attributes, fixed seed) with its tokenizer beside it."""
    import torch

    from steerray.models.loading import TINY_ALIAS, load_tokenizer
    from steerray.models.reward import build_reward_model

    out = tmp_path_factory.mktemp("tiny_reward") / "model"
    torch.manual_seed(1234)
    model = build_reward_model(TINY_ALIAS)
    with torch.no_grad():  # spread the random head's outputs over roughly -4..8, so labels vary
        model.score.weight.mul_(20.0)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(TINY_ALIAS).save_pretrained(out)
    return str(out)
