"""What every stage command does: resolve the config, write it beside the outputs, run the job."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TypeVar

import typer
from pydantic import BaseModel

from steerray.artifacts import CONFIG_FILE, atomic_write_text
from steerray.config import ConfigError, dump_yaml, load_config
from steerray.errors import SteerrayError

T = TypeVar("T", bound=BaseModel)

ADDRESS_HELP = "Ray cluster to submit the job to (else RAY_ADDRESS, else an embedded local Ray)."
OVERRIDES_HELP = "Dotted config overrides, e.g. train.max_steps=50 lora.enabled=true."


def fail(message: str, code: int = 2) -> None:
    """Print a user-facing error (no traceback) and exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def resolve_stage_config(model: type[T], config: str | None, overrides: list[str] | None, /,
                         **fields: Any) -> T:
    # Positional-only, so a stage field may be called `model` or `config` (annotate's `--model`).
    try:
        return load_config(model, config, overrides or [], **fields)
    except ConfigError as err:
        fail(str(err))
        raise  # unreachable: fail() exits


def write_resolved_config(resolved: BaseModel, out: str | Path) -> Path:
    return atomic_write_text(Path(out) / CONFIG_FILE, dump_yaml(resolved))


def run_stage(stage_file: str, resolved: BaseModel, out: str | Path, address: str | None) -> Any:
    """Write ``out/config.yaml`` then run ``jobs/<stage_file>.py`` on embedded Ray or a cluster."""
    from steerray.runtime import run_job

    write_resolved_config(resolved, out)
    try:
        return run_job(stage_file, dump_yaml(resolved), address)
    except SteerrayError as err:
        fail(str(err), code=1)


def echo(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
