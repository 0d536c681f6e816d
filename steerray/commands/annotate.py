"""`steerray annotate` and `steerray serve-reward`: SteerLM step 2, the reward model put to work.

``serve-reward`` runs the reward model as a Ray Serve endpoint; ``annotate`` labels a conversation
dataset, with the model in a Ray Data actor pool or, with ``--via``, through a running ``serve-reward``.
The bearer token travels in an environment variable (``STEERRAY_API_TOKEN`` unless the config's
``token_env`` names another), so it never lands in config.yaml or manifest.json.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from steerray.commands.common import ADDRESS_HELP, OVERRIDES_HELP, echo, fail, resolve_stage_config, run_stage
from steerray.config import AnnotateConfig, ServeRewardConfig

TOKEN_HELP = "Bearer token (default: $STEERRAY_API_TOKEN). Prefer the variable: options show up in `ps`."


def _check_model(model: str) -> None:
    if not (Path(model) / "config.json").is_file():
        fail(f"--model {model}: not a reward-model folder (no config.json); pass the `model` folder train-reward wrote")


def _export_token(token: str | None, env_var: str) -> None:
    # The job reads the token from the environment: in-process (embedded Ray) this reaches it directly.
    if token:
        os.environ[env_var] = token


def annotate(
    model: str | None = typer.Option(None, "--model", "-m", help="Reward-model folder (from train-reward)."),
    input: str | None = typer.Option(None, "--input", "-i", help="Conversation jsonl file, folder, or prepare output folder."),
    out: str | None = typer.Option(None, "--out", "-o", help="Output folder (one annotated file per input file)."),
    via: str | None = typer.Option(None, "--via", help="URL of a running serve-reward to score with instead."),
    keep_human_labels: bool | None = typer.Option(
        None, "--keep-human-labels/--overwrite-human-labels",
        help="Keep human label values and fill in only missing attributes (default: overwrite, as the reference)."),
    batch_size: int | None = typer.Option(None, help="Texts per forward pass."),
    num_actors: int | None = typer.Option(None, help="Scoring actors (model copies)."),
    token: str | None = typer.Option(None, "--token", envvar="STEERRAY_API_TOKEN", help=TOKEN_HELP, show_default=False),
    config: str | None = typer.Option(None, "--config", "-c", help="YAML preset (e.g. demo/annotate)."),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Label every scored assistant turn with the reward model; resumable, rejects counted."""
    fields = {"model": model, "input": input, "out": out, "via": via, "keep_human_labels": keep_human_labels,
              "batch_size": batch_size, "num_actors": num_actors}
    resolved = resolve_stage_config(AnnotateConfig, config, overrides, **fields)
    if not resolved.via:
        _check_model(resolved.model)
    if not Path(resolved.input).exists():
        fail(f"--input {resolved.input}: no such file or folder")
    _export_token(token, resolved.token_env)
    summary = run_stage("annotate", resolved, resolved.out, address)
    if isinstance(summary, dict):
        echo(f"annotated {summary.get('rows', 0)} rows ({summary.get('rejects', 0)} rejected) -> {resolved.out}")


def serve_reward(
    model: str | None = typer.Option(None, "--model", "-m", help="Reward-model folder (from train-reward)."),
    host: str | None = typer.Option(None, help="Interface to bind (default 127.0.0.1: this machine only)."),
    port: int | None = typer.Option(None, help="HTTP port (default 8000)."),
    replicas: int | None = typer.Option(None, help="Model replicas."),
    max_batch_size: int | None = typer.Option(None, help="Texts per forward pass (dynamic batching)."),
    token: str | None = typer.Option(None, "--token", envvar="STEERRAY_API_TOKEN", help=TOKEN_HELP, show_default=False),
    config: str | None = typer.Option(None, "--config", "-c", help="YAML preset."),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Serve the reward model over HTTP (POST /score, GET /health, /docs) until interrupted."""
    fields = {"model": model, "host": host, "port": port, "replicas": replicas, "max_batch_size": max_batch_size}
    resolved: ServeRewardConfig = resolve_stage_config(ServeRewardConfig, config, overrides, **fields)
    _check_model(resolved.model)
    if resolved.host not in ("127.0.0.1", "localhost", "::1") and not (token or os.environ.get(resolved.token_env)):
        echo(f"warning: serving on {resolved.host} without a bearer token; set ${resolved.token_env}")
    _export_token(token, resolved.token_env)
    run_stage("serve_reward", resolved, resolved.out, address)


def register(app: typer.Typer) -> None:
    app.command("annotate")(annotate)
    app.command("serve-reward")(serve_reward)
