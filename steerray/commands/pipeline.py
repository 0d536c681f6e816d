"""`steerray pipeline` (the whole loop), `steerray bootstrap` (phase 4) and `steerray evaluate` (report)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import typer

from steerray.commands.common import ADDRESS_HELP, OVERRIDES_HELP, echo, fail, resolve_stage_config, run_stage
from steerray.config import (
    BootstrapConfig,
    ConfigError,
    EvaluateConfig,
    PipelineConfig,
    SFTConfig,
    dump_yaml,
    load_config,
)
from steerray.errors import SteerrayError

# Seen from a pipeline job on the head node, the cluster's own job server.
HEAD_JOB_SERVER = "http://127.0.0.1:8265"


def _local_location(location: str) -> bool:
    return location.startswith((".", "/", "~")) or location.endswith((".jsonl", ".gz", ".parquet", ".json"))


def preflight(cfg: PipelineConfig, local: bool = True) -> None:
    """Fail before anything starts: every stage config validates; running locally, files and models exist.

    With --address, paths name the cluster's filesystem, which this machine may not see: only the configs
    are checked here (the pipeline job checks the rest on the cluster before its first stage).
    """
    from steerray.models.loading import ModelNotFound, resolve_model
    from steerray.pipeline import resolve_stages

    planned = {item.name: item for item in resolve_stages(cfg)}
    if not local:
        return
    problems = []
    for source in getattr(planned["prepare"].config, "sources", []):
        _, sep, location = source.partition("=")
        if sep and _local_location(location) and not Path(location).expanduser().exists():
            problems.append(f"prepare: source {source!r} names a file that does not exist")
    for name in ("reward", "sft"):
        model = getattr(planned[name].config, "model", None)
        if model is not None:
            try:
                resolve_model(model.name)
            except ModelNotFound as err:
                problems.append(f"{name}: {err}")
    if problems:
        raise ConfigError("the pipeline config has problems, nothing was started:\n" + "\n".join(problems))


def _command_line(config: str, run: str | None, address: str | None, overrides: list[str]) -> str:
    parts = ["steerray", "pipeline", "--config", config]
    if run:
        parts += ["--run", run]
    if address:
        parts += ["--address", address]
    return shlex.join(parts + overrides)


def pipeline(
    config: str = typer.Option("demo/pipeline", "--config", "-c",
                               help="Pipeline YAML (e.g. jobs/configs/demo/pipeline.yaml or demo/pipeline)."),
    run: str | None = typer.Option(None, "--run", help="Run name: outputs go to RUNS_DIR/RUN/<stage>/."),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would run or be skipped; run nothing."),
    rerun: str | None = typer.Option(None, "--rerun", help="Re-run this stage and every stage after it."),
    overrides: list[str] | None = typer.Argument(
        None, help="STAGE.key=value (e.g. sft.train.max_steps=20, bootstrap.enabled=true, "
                   "prepare.sources=[helpsteer2]) or a pipeline key (runs_dir=/mnt/shared/runs)."),
) -> None:
    """Run prepare, train-reward, annotate, train-sft, bootstrap (optional) and evaluate, skipping finished stages."""
    from steerray.pipeline import load_pipeline_config, stage_name
    from steerray.runtime import load_job_module, run_job

    overrides = list(overrides or [])
    try:
        cfg = load_pipeline_config(config, overrides, run=run)
        if rerun:
            cfg = cfg.model_copy(update={"rerun": stage_name(rerun)})
        cfg = cfg.model_copy(update={"command": _command_line(config, run, address, overrides)})
        if address and not cfg.stage_address:
            cfg = cfg.model_copy(update={"stage_address": HEAD_JOB_SERVER})
        preflight(cfg, local=not (address or os.environ.get("RAY_ADDRESS")))
    except ConfigError as err:
        fail(str(err))
        return
    try:
        if dry_run:
            load_job_module("pipeline").main(["--dry-run", "--config-b64", _b64(cfg)])
        else:
            run_job("pipeline", dump_yaml(cfg), address)
    except SteerrayError as err:
        fail(str(err), code=1)


def _b64(cfg: PipelineConfig) -> str:
    from steerray.runtime import encode_config

    return encode_config(dump_yaml(cfg))


def bootstrap(
    config: str | None = typer.Option(None, "--config", "-c", help="YAML preset (e.g. demo/bootstrap)."),
    data: str | None = typer.Option(None, "--data", help="Training conversations: the annotate output or a jsonl."),
    policy: str | None = typer.Option(None, "--policy", help="The SFT model folder to start from."),
    reward_model: str | None = typer.Option(None, "--reward-model", help="The reward-model folder that scores samples."),
    out: str | None = typer.Option(None, "--out", "-o", help="Output folder (rounds/, model, bootstrap.json)."),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Phase 4: sample K answers per prompt at top quality, score, keep the best, fine-tune again."""
    resolved = resolve_stage_config(BootstrapConfig, config, overrides, data=data, policy=policy,
                                    reward_model=reward_model, out=out)
    if not Path(resolved.data).exists():
        fail(f"--data {resolved.data} does not exist (the annotate output folder or a conversation jsonl)")
    if not (Path(resolved.reward_model) / "config.json").is_file():
        fail(f"--reward-model {resolved.reward_model} is not a model folder (no config.json)")
    try:
        if resolved.sft_preset:
            load_config(SFTConfig, resolved.sft_preset, resolved.sft_overrides)
        elif not (Path(resolved.policy).parent / "manifest.json").is_file():
            fail(f"{resolved.policy} has no SFT manifest beside it: set sft_preset=PRESET to say how to fine-tune")
    except ConfigError as err:
        fail(f"sft_preset: {err}")
    summary = run_stage("bootstrap", resolved, resolved.out, address)
    if isinstance(summary, dict):
        echo(f"[bootstrap] model: {summary.get('model')}; mean score round 0 {summary.get('round0_mean_score')}"
             f" -> final {summary.get('final_mean_score')}")


def evaluate(
    config: str | None = typer.Option(None, "--config", "-c", help="YAML preset (e.g. demo/evaluate)."),
    reward_model: str | None = typer.Option(None, "--reward-model", help="The reward-model folder."),
    policy: str | None = typer.Option(None, "--policy", help="The SFT (or bootstrapped) model folder."),
    data: str | None = typer.Option(None, "--data", help="A prepare output: val splits and held-out prompts."),
    bootstrap_dir: str | None = typer.Option(None, "--bootstrap", help="A bootstrap output to include."),
    out: str | None = typer.Option(None, "--out", "-o", help="Output folder (report.html, report.md, eval.json)."),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Reward-model metrics on the val split and the steerability grid, written as a report."""
    resolved = resolve_stage_config(EvaluateConfig, config, overrides, reward_model=reward_model, policy=policy,
                                    data=data, bootstrap=bootstrap_dir, out=out)
    if not (Path(resolved.reward_model) / "config.json").is_file():
        fail(f"--reward-model {resolved.reward_model} is not a model folder (no config.json)")
    if resolved.data and not Path(resolved.data).is_dir():
        fail(f"--data {resolved.data} is not a folder (a prepare output)")
    summary = run_stage("evaluate", resolved, resolved.out, address)
    if isinstance(summary, dict):
        echo(f"[evaluate] report: {summary.get('report')}; mean steering rho {summary.get('steer_mean_spearman')}")


def register(app: typer.Typer) -> None:
    app.command("pipeline")(pipeline)
    app.command("bootstrap")(bootstrap)
    app.command("evaluate")(evaluate)
