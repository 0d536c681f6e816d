"""The whole loop as data: which stages, their resolved configs wired folder to folder, and what can be skipped.

A pipeline YAML names, per stage, a preset plus overrides; the pipeline owns the folders and sets each
stage's input and output paths (``runs/NAME/<stage>/``). ``steerray/stages/pipeline.py`` runs the plan;
everything here is pure (files in, decisions out) and tested without Ray.

Skipping: a stage is skipped when its folder holds a valid manifest for the same resolved config and its
inputs' manifests are the ones it was run on (recorded in ``runs/NAME/pipeline_state.json``). A stage
whose config or inputs changed runs again from an empty folder, and so does everything downstream
(their inputs' manifests change when it finishes). A stage that did not finish (no manifest) resumes in
its folder when the config is the same, so its own checkpoints are used. A corrupted manifest is
reported and not trusted.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from steerray.artifacts import (
    CONFIG_FILE,
    MANIFEST,
    ManifestError,
    atomic_write_json,
    config_hash,
    read_manifest,
)
from steerray.config import ConfigError, PipelineConfig, apply_overrides, load_config
from steerray.stages import ALIASES, PIPELINE_STAGES, STAGES, Stage

STATE_FILE = "pipeline_state.json"
SUMMARY_FILE = "summary.json"


STAGE_NAMES = PIPELINE_STAGES


def stage_name(text: str) -> str:
    """A pipeline stage's folder name from any of its spellings (``train-sft``, ``train_sft``, ``sft``)."""
    name = ALIASES.get(text, text)
    if name not in STAGE_NAMES:
        raise ConfigError(f"unknown stage {text!r}; stages: {', '.join(STAGE_NAMES)}")
    return name


# --------------------------------------------------------------------------------------------------
# Loading the pipeline config
# --------------------------------------------------------------------------------------------------

def apply_pipeline_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """``STAGE.enabled=``/``STAGE.preset=`` set the stage entry; ``STAGE.key=value`` adds a stage override;
    anything else (``run=``, ``runs_dir=``) is a pipeline key."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        head, dot, rest = key.strip().partition(".")
        if sep and dot and (ALIASES.get(head, head) in STAGE_NAMES):
            entry = data.setdefault(ALIASES.get(head, head), {}) or {}
            data[ALIASES.get(head, head)] = entry
            if rest in ("enabled", "preset"):
                apply_overrides(entry, [f"{rest}={raw}"])
            elif rest == "overrides":
                raise ConfigError(f"override {override!r}: give stage overrides one by one, as {head}.KEY=VALUE")
            else:
                entry.setdefault("overrides", []).append(f"{rest}={raw}")
        else:
            apply_overrides(data, [override])
    return data


def load_pipeline_config(path: str | None, overrides: Iterable[str] = (), **fields: Any) -> PipelineConfig:
    """The one precedence order: defaults < preset or file < flags (``--run``) < overrides; stage overrides
    (``sft.train.max_steps=20``) are collected into their stage's entry."""
    raw = [o for o in overrides]
    stage_overrides = [o for o in raw if _is_stage_override(o)]
    config = load_config(PipelineConfig, path, [o for o in raw if not _is_stage_override(o)],
                         stage_file="pipeline", **fields)
    if not stage_overrides:
        return config
    data = apply_pipeline_overrides(config.model_dump(mode="json"), stage_overrides)
    return load_config(PipelineConfig, None, [], **data)


def _is_stage_override(override: str) -> bool:
    head = override.partition("=")[0].strip().partition(".")[0]
    return "." in override.partition("=")[0] and ALIASES.get(head, head) in STAGE_NAMES


# --------------------------------------------------------------------------------------------------
# Resolving every stage's config
# --------------------------------------------------------------------------------------------------

@dataclass
class PlannedStage:
    stage: Stage
    folder: Path
    enabled: bool
    inputs: tuple[str, ...]  # upstream stages whose manifests this one reads
    config: BaseModel | None = None  # None when disabled
    source: str = ""  # where the config came from, for messages

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def config_hash(self) -> str:
        return config_hash(self.config) if self.config is not None else ""


def run_dir(cfg: PipelineConfig) -> Path:
    """The run's folder, absolute: every stage config gets absolute paths, whatever folder a job runs in."""
    return Path(cfg.runs_dir).expanduser().resolve() / cfg.run


def wiring(cfg: PipelineConfig, dirs: Mapping[str, Path]) -> dict[str, tuple[tuple[str, ...], dict[str, Any]]]:
    """Per stage: (input stages, the config keys the pipeline sets to connect the folders). Evaluate reads
    the last fine-tuned model: bootstrap's when it is on, else SFT's; and the reward benchmarks when they run.
    SteerLM 2.0 starts from that model too, and evaluate compares the two when it runs."""
    final_sft = "bootstrap" if cfg.bootstrap.enabled else "sft"
    benches, steerlm2 = cfg.evaluate_reward.enabled, cfg.steerlm2.enabled
    keys: dict[str, dict[str, Any]] = {
        "prepare": {"out": str(dirs["prepare"])},
        "reward": {"data": str(dirs["prepare"]), "out": str(dirs["reward"])},
        "evaluate_reward": {"model": str(dirs["reward"] / "model"), "out": str(dirs["evaluate_reward"])},
        "annotate": {"model": str(dirs["reward"] / "model"), "input": str(dirs["prepare"] / "conversations"),
                     "out": str(dirs["annotate"])},
        "sft": {"data": str(dirs["annotate"]), "out": str(dirs["sft"])},
        "bootstrap": {"data": str(dirs["annotate"]), "policy": str(dirs["sft"] / "model"),
                      "reward_model": str(dirs["reward"] / "model"), "out": str(dirs["bootstrap"])},
        "steerlm2": {"data": str(dirs["annotate"]), "policy": str(dirs[final_sft] / "model"),
                     "reward_model": str(dirs["reward"] / "model"), "reward_data": str(dirs["prepare"]),
                     "out": str(dirs["steerlm2"])},
        "evaluate": {"reward_model": str(dirs["reward"] / "model"), "policy": str(dirs[final_sft] / "model"),
                     "data": str(dirs["prepare"]), "bootstrap": str(dirs["bootstrap"]) if cfg.bootstrap.enabled else None,
                     "reward_bench": str(dirs["evaluate_reward"]) if benches else None,
                     "steerlm2": str(dirs["steerlm2"]) if steerlm2 else None, "out": str(dirs["evaluate"])},
    }
    inputs = {name: tuple(final_sft if name in ("evaluate", "steerlm2") and up == "sft" else up
                          for up in STAGES[name].upstream) for name in STAGE_NAMES}
    if steerlm2:
        inputs["evaluate"] += ("steerlm2",)
    if benches:  # a re-run of the benchmarks re-runs evaluate, whose report holds their tables
        inputs["evaluate"] += ("evaluate_reward",)
    return {name: (inputs[name], keys[name]) for name in STAGE_NAMES}


def resolve_stages(cfg: PipelineConfig) -> list[PlannedStage]:
    """Every stage's config: preset + overrides + the pipeline's folders, validated. All problems at once."""
    root = run_dir(cfg)
    dirs = {name: root / name for name in STAGE_NAMES}
    wires = wiring(cfg, dirs)
    planned, problems = [], []
    for name in STAGE_NAMES:
        stage, spec = STAGES[name], getattr(cfg, name)
        inputs, wired = wires[name]
        if not spec.enabled and not stage.optional:
            problems.append(f"{name}: cannot be disabled (later stages read its output)")
            continue
        item = PlannedStage(stage, dirs[name], spec.enabled, inputs)
        planned.append(item)
        if not spec.enabled:
            continue
        try:
            item.config = stage_config(stage, spec.preset, spec.overrides, wired)
            item.source = (spec.preset or "defaults") + (" with " + " ".join(spec.overrides) if spec.overrides else "")
        except ConfigError as err:
            problems.append(f"{name}: {err}")
    if problems:
        raise ConfigError("the pipeline config has problems, nothing was started:\n" + "\n".join(problems))
    return planned


def stage_config(stage: Stage, preset: str | None, overrides: list[str], wired: dict[str, Any]) -> BaseModel:
    """One stage's config in the pipeline: its preset and overrides, the folders the pipeline wires."""
    touched = [o.partition("=")[0].strip() for o in overrides]
    clash = sorted(set(touched) & set(wired))
    if clash:
        raise ConfigError(f"{', '.join(clash)} is set by the pipeline (it wires the stage folders); "
                          "remove the override")
    config = load_config(stage.config, preset, overrides, stage_file=stage.name, **wired)
    return config.with_absolute_paths()


# --------------------------------------------------------------------------------------------------
# State and skip decisions
# --------------------------------------------------------------------------------------------------

def manifest_fingerprint(manifest: Mapping[str, Any]) -> str:
    """Changes whenever the stage finishes again: the manifest's whole content (finish time, metrics, config)."""
    blob = json.dumps(manifest, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_state(root: Path) -> dict[str, Any]:
    path = root / STATE_FILE
    if not path.exists():
        return {"stages": {}}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("stages"), dict):
            raise ValueError("no 'stages' mapping")
        return state
    except (ValueError, UnicodeDecodeError) as err:
        # The state only adds knowledge; without it manifests and configs still decide.
        print(f"[pipeline] {path} is unreadable ({err}); deciding from the manifests alone")
        return {"stages": {}}


def save_state(root: Path, state: Mapping[str, Any]) -> None:
    atomic_write_json(root / STATE_FILE, state)


def stage_manifest(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, problem): a missing manifest is (None, None); a corrupted one (None, reason)."""
    try:
        return read_manifest(folder), None
    except ManifestError as err:
        return None, str(err)


def current_fingerprints(planned: Iterable[PlannedStage]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for item in planned:
        manifest, _ = stage_manifest(item.folder)
        out[item.name] = manifest_fingerprint(manifest) if manifest else None
    return out


def _written_config_hash(folder: Path) -> str | None:
    try:
        return config_hash(yaml.safe_load((folder / CONFIG_FILE).read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError):
        return None


@dataclass
class Decision:
    action: str  # skip | run | resume | disabled
    reason: str
    clear: bool = False  # empty the stage folder first (outputs from another config or other inputs)
    drop_manifest: bool = False  # move a corrupted manifest aside first

    @property
    def runs(self) -> bool:
        return self.action in ("run", "resume")


def decide(item: PlannedStage, state: Mapping[str, Any], fingerprints: Mapping[str, str | None],
           force: bool = False) -> Decision:
    """What to do with one stage, given the state on disk now (upstream stages already settled)."""
    if not item.enabled:
        return Decision("disabled", "switched off in the pipeline config")
    entry = state.get("stages", {}).get(item.name)
    inputs_now = {name: fingerprints.get(name) for name in item.inputs}
    has_output = item.folder.exists() and any(item.folder.iterdir())
    if force:
        return Decision("run", "asked to re-run", clear=has_output)
    manifest, problem = stage_manifest(item.folder)
    same_inputs = entry is None or entry.get("inputs") == inputs_now
    if problem:
        resumable = _written_config_hash(item.folder) == item.config_hash and same_inputs
        return Decision("resume" if resumable else "run", f"not trusted: {problem}", clear=not resumable,
                        drop_manifest=resumable)
    if manifest is not None:
        same_config = manifest.get("config_hash") == item.config_hash or (
            entry is not None and entry.get("config_hash") == item.config_hash
            and entry.get("manifest") == manifest_fingerprint(manifest))
        if not same_config:
            return Decision("run", "config changed", clear=True)
        if not same_inputs:
            changed = sorted(k for k in inputs_now if (entry.get("inputs") or {}).get(k) != inputs_now[k])
            return Decision("run", f"input changed: {', '.join(changed)}", clear=True)
        return Decision("skip", "finished with this config" + ("" if entry else " (adopted: run outside this pipeline)"))
    if not has_output:
        return Decision("run", "not run yet")
    if _written_config_hash(item.folder) == item.config_hash and same_inputs:
        return Decision("resume", "did not finish: resuming in its folder")
    return Decision("run", "unfinished output from another config or other inputs", clear=True)


def settle(item: PlannedStage, state: Mapping[str, Any], fingerprints: Mapping[str, str | None],
           forced: set[str], upstream_ran: set[str]) -> Decision:
    """:func:`decide`, plus: a stage whose input ran (or will run) in this invocation runs too, even
    when nothing recorded which input manifests it was built from."""
    decision = decide(item, state, fingerprints, force=item.name in forced)
    upstream = [name for name in item.inputs if name in upstream_ran]
    if decision.action == "skip" and upstream:
        return Decision("run", f"input re-ran: {', '.join(upstream)}", clear=True)
    return decision


def plan(planned: list[PlannedStage], state: Mapping[str, Any], force_from: str | None = None) -> list[Decision]:
    """Decisions for the whole pipeline before anything runs (for --dry-run and the opening summary)."""
    fingerprints = current_fingerprints(planned)
    forced = _forced(planned, force_from)
    decisions: list[Decision] = []
    will_run: set[str] = set()
    for item in planned:
        decision = settle(item, state, fingerprints, forced, will_run)
        if decision.runs:
            will_run.add(item.name)
        decisions.append(decision)
    return decisions


def _forced(planned: list[PlannedStage], force_from: str | None) -> set[str]:
    """The stage asked for and every stage that reads it, directly or not."""
    if not force_from:
        return set()
    forced = {stage_name(force_from)}
    for item in planned:
        if any(name in forced for name in item.inputs):
            forced.add(item.name)
    return forced


def forced_stages(planned: list[PlannedStage], force_from: str | None) -> set[str]:
    return _forced(planned, force_from)


def record_start(state: dict[str, Any], item: PlannedStage, fingerprints: Mapping[str, str | None]) -> None:
    state.setdefault("stages", {})[item.name] = {
        "config_hash": item.config_hash, "inputs": {n: fingerprints.get(n) for n in item.inputs},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "status": "running"}


def record_finish(state: dict[str, Any], item: PlannedStage, manifest: Mapping[str, Any], seconds: float) -> None:
    entry = state["stages"][item.name]
    entry.update(manifest=manifest_fingerprint(manifest), seconds=round(seconds, 1), status="finished",
                 finished_at=manifest.get("finished_at"))


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------

PREFERRED_METRICS: dict[str, tuple[str, ...]] = {
    "prepare": ("conversations", "regression", "preference", "rejects"),
    "reward": ("val.mse", "val.baseline_mse", "last_loss"),
    "evaluate_reward": ("overall", "accuracy", "win_rate", "rejected"),
    "annotate": ("rows", "turns_scored", "rejects"),
    "sft": ("val_loss_first", "val_loss", "train_loss"),
    "bootstrap": ("round0_mean_score", "final_mean_score", "score_change"),
    "steerlm2": ("distance_before", "distance_after", "rounds"),
    "evaluate": ("steer_mean_spearman", "steer_spearman_verbosity", "verbosity_length_spearman", "reward_val_mse"),
}
# Manifest sections stages keep their numbers in, most telling first.
METRIC_SECTIONS = ("metrics", "summary", "totals", "training", "counts")


def _flatten(data: Mapping[str, Any], prefix: str = "", depth: int = 2) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[name] = value
        elif isinstance(value, Mapping) and depth > 1:
            out.update(_flatten(value, f"{name}.", depth - 1))
    return out


def key_metrics(stage: str, manifest: Mapping[str, Any] | None, limit: int = 4) -> dict[str, Any]:
    """A few numbers from a stage's manifest sections, the stage's telling names first."""
    if not manifest:
        return {}
    flat: dict[str, Any] = {}
    for section in METRIC_SECTIONS:
        if isinstance(manifest.get(section), Mapping):
            for name, value in _flatten(manifest[section]).items():
                flat.setdefault(name, value)
    picked: dict[str, Any] = {}
    preferred = PREFERRED_METRICS.get(stage, ())
    for wanted in preferred:  # exact names first, then names that contain them
        if wanted in flat and len(picked) < limit:
            picked[wanted] = flat[wanted]
    for wanted in preferred:
        for name, value in flat.items():
            if len(picked) < limit and name not in picked and wanted in name:
                picked[name] = value
    for name, value in flat.items():
        if len(picked) >= limit:
            break
        picked.setdefault(name, value)
    return picked


def format_metric(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass
class StageOutcome:
    name: str
    action: str  # skip | run | resume | disabled | failed | not reached
    reason: str = ""
    seconds: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def summary_table(outcomes: Iterable[StageOutcome]) -> str:
    lines = [f"{'stage':<15} {'status':<11} {'time':>8}  key metrics", "-" * 83]
    for o in outcomes:
        took = "-" if o.seconds is None else f"{o.seconds:.0f} s"
        metrics = ", ".join(f"{k}={format_metric(v)}" for k, v in o.metrics.items())
        lines.append(f"{o.name:<15} {o.action:<11} {took:>8}  {metrics}")
    return "\n".join(lines)


def corrupt_manifest_aside(folder: Path) -> Path:
    """Keep a corrupted manifest for inspection, out of the way of the stage's re-run."""
    target = folder / f"{MANIFEST}.corrupt-{int(time.time())}"
    (folder / MANIFEST).replace(target)
    return target
