"""Every stage of steerray, and what running one means.

A stage is one module here, named the same everywhere: module ``steerray/stages/train_reward.py``, CLI
command ``train-reward``, preset file ``<preset>/reward.yaml``, run folder ``runs/<run>/reward/``. Its module
has ``run(config) -> StageResult`` (the work itself), optionally ``check(config)`` (input problems found
before Ray starts) and ``inputs(config)`` (the files its outputs depend on), and ``main(argv)``, the
entry point of its Ray job (``python -m steerray.stages.train_reward --config FILE``).

:func:`execute` is the one place the behaviour users rely on lives: paths made absolute on the driver,
the check, skip-if-finished (same config and same input content), one run per folder (a lock), the
resolved ``config.yaml`` beside the outputs, and ``manifest.json`` written last.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from steerray.artifacts import (
    CONFIG_FILE,
    MANIFEST,
    RunLock,
    atomic_write_text,
    config_hash,
    content_fingerprint,
    read_manifest,
    write_manifest,
)
from steerray.config import (
    AnnotateConfig,
    BootstrapConfig,
    ConfigError,
    EvaluateConfig,
    EvaluateRewardConfig,
    PipelineConfig,
    PrepareConfig,
    RewardConfig,
    ServeConfig,
    ServeRewardConfig,
    SFTConfig,
    SteerLM2Config,
    SteerLM2DataConfig,
    SteerLM2TrainConfig,
    StrictModel,
    dump_yaml,
)
from steerray.errors import SteerrayError
from steerray.runtime import config_from_argv


@dataclass(frozen=True)
class Stage:
    name: str  # run folder, pipeline key and preset file name
    command: str  # CLI verb
    module: str  # under steerray.stages
    config: type[StrictModel]
    upstream: tuple[str, ...] = ()  # stages whose outputs it reads, in the pipeline
    optional: bool = False  # a pipeline may switch it off
    # "job": finishes, skipped when finished, one run per folder, manifest last; "server": runs until
    # stopped, no manifest; "driver": runs other stages, each of which does all that itself (the pipeline);
    # "round": a job (all of the above) that a pipeline stage runs once per round, not a pipeline key itself.
    kind: str = "job"

    def load(self) -> ModuleType:
        return importlib.import_module(f"steerray.stages.{self.module}")


@dataclass
class StageResult:
    summary: dict[str, Any]  # what the CLI and the pipeline show; manifest["summary"]
    sections: dict[str, Any] = field(default_factory=dict)  # further manifest sections (counts, metrics, ...)


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("prepare", "prepare", "prepare", PrepareConfig),
    Stage("reward", "train-reward", "train_reward", RewardConfig, upstream=("prepare",)),
    Stage("evaluate_reward", "evaluate-reward", "evaluate_reward", EvaluateRewardConfig, upstream=("reward",),
          optional=True),
    Stage("annotate", "annotate", "annotate", AnnotateConfig, upstream=("prepare", "reward")),
    Stage("sft", "train-sft", "train_sft", SFTConfig, upstream=("annotate",)),
    Stage("bootstrap", "bootstrap", "bootstrap", BootstrapConfig, upstream=("annotate", "sft", "reward"),
          optional=True),
    Stage("evaluate", "evaluate", "evaluate", EvaluateConfig, upstream=("prepare", "reward", "sft"), optional=True),
    Stage("steerlm2", "steerlm2", "steerlm2", SteerLM2Config, upstream=("prepare", "reward", "annotate", "sft"),
          optional=True),
    Stage("steerlm2_data", "steerlm2-data", "steerlm2_data", SteerLM2DataConfig, kind="round"),
    Stage("train_steerlm2", "train-steerlm2", "train_steerlm2", SteerLM2TrainConfig, kind="round"),
    Stage("serve", "serve", "serve", ServeConfig, kind="server"),
    Stage("serve_reward", "serve-reward", "serve_reward", ServeRewardConfig, kind="server"),
    Stage("pipeline", "pipeline", "pipeline", PipelineConfig, kind="driver"),
)}
PIPELINE_STAGES = ("prepare", "reward", "evaluate_reward", "annotate", "sft", "bootstrap", "steerlm2", "evaluate")
# Other spellings users type: the CLI verbs and module names.
ALIASES = {alias: stage.name for stage in STAGES.values() for alias in (stage.command, stage.module)}


def get_stage(name: str) -> Stage:
    """The stage called ``name`` (its folder name, CLI verb or module name)."""
    key = ALIASES.get(name, name)
    if key not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[key]


def inputs_fingerprint(module: ModuleType, config: StrictModel) -> str | None:
    """Content hash of the stage's local input files and folders; names that are not paths (hub ids,
    aliases) count as themselves."""
    if not hasattr(module, "inputs"):
        return None
    items = [str(item) for item in module.inputs(config) if item]
    local = [item for item in items if Path(item).exists()]
    others = sorted(set(items) - set(local))
    return content_fingerprint(local) + ("|" + ",".join(others) if others else "")


def finished(stage: Stage, config: StrictModel, inputs: str | None) -> dict[str, Any] | None:
    """The manifest of an earlier run of this stage with the same config and the same input content."""
    manifest = read_manifest(Path(config.out), stage.name)  # type: ignore[attr-defined]
    if manifest and manifest.get("config_hash") == config_hash(config) and manifest.get("inputs_hash") == inputs:
        return manifest
    return None


def execute(stage: Stage | str, config: StrictModel) -> dict[str, Any]:
    """Run a stage in this process (on the embedded Ray, or the cluster of ``RAY_ADDRESS``)."""
    stage = get_stage(stage) if isinstance(stage, str) else stage
    module = stage.load()
    config = config.with_absolute_paths()
    if hasattr(module, "check"):
        try:
            module.check(config)  # before Ray starts: a bad path or model name fails here
        except SteerrayError as err:
            err.found_before_start = True  # type: ignore[attr-defined]  # the CLI exits 2: fix the input
            raise
    if stage.kind == "driver":
        return module.run(config).summary
    out = Path(config.out)  # type: ignore[attr-defined]
    if stage.kind == "server":
        write_config(out, config)
        return module.run(config).summary
    inputs = inputs_fingerprint(module, config)
    done = finished(stage, config, inputs)
    if done is not None:
        print(f"[{stage.command}] {out} is finished with this config and these inputs; nothing to do",
              file=sys.stderr, flush=True)
        return dict(done.get("summary") or {})
    with RunLock(out):
        (out / MANIFEST).unlink(missing_ok=True)  # from here on the folder is "not finished"
        write_config(out, config)
        result = module.run(config)
        write_manifest(out, stage.name, config, inputs_hash=inputs, summary=result.summary, **result.sections)
    return result.summary


def write_config(out: Path, config: StrictModel) -> Path:
    """The resolved config beside the outputs: ``--config out/config.yaml`` runs the stage again."""
    return atomic_write_text(out / CONFIG_FILE, dump_yaml(config))


def job_main(stage_name: str, argv: list[str] | None = None) -> dict[str, Any]:
    """The entry point of a stage's Ray job: ``--config FILE_OR_PRESET`` or ``--config-b64 BLOB`` (how the
    CLI submits a config it has loaded); the config is validated once here, then :func:`execute`."""
    stage = get_stage(stage_name)
    try:
        config = config_from_argv(stage.config, argv, f"{stage.command} job", stage_file=stage.name)
        return execute(stage, config)
    except SteerrayError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
