"""`steerray prepare`: turn public or local SteerLM sources into the data contract later stages read."""

from __future__ import annotations

import typer

from steerray.commands.common import ADDRESS_HELP, OVERRIDES_HELP, echo, fail, resolve_stage_config, run_stage
from steerray.config import PrepareConfig
from steerray.data.sources import SOURCES, SourceError, SourceSpec


def _parse_repeats(values: list[str]) -> dict[str, int]:
    repeats = {}
    for value in values:
        name, sep, count = value.partition("=")
        if not sep or not count.strip().isdigit():
            fail(f"--repeat {value!r}: expected NAME=COUNT, e.g. --repeat helpsteer2=4")
        repeats[name.strip()] = int(count)
    return repeats


def prepare(
    source: list[str] = typer.Option(
        [], "--source", "-s",
        help=f"NAME[=LOCATION], repeatable. NAME: {', '.join(SOURCES)}. LOCATION: hub id, hf:// path, local "
             "jsonl/jsonl.gz/parquet file or folder; without it the public hub dataset is used."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder."),
    val_fraction: float | None = typer.Option(None, help="Share of groups (trees, prompts) held out when the source has no split."),
    seed: int | None = typer.Option(None, help="Seed of the hash that assigns splits."),
    repeat: list[str] = typer.Option([], "--repeat", help="NAME=COUNT: copies of that source's train rows (the reference's oversampling)."),
    config: str | None = typer.Option(None, "--config", "-c", help="YAML preset (e.g. demo/prepare)."),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Read sources with Ray Data; write conversations/, regression/, preference/, rejects.jsonl, manifest.json."""
    try:
        for text in source:
            SourceSpec.parse(text)
    except SourceError as err:
        fail(str(err))
    fields = {"sources": list(source) or None, "out": out, "val_fraction": val_fraction, "seed": seed,
              "repeat": _parse_repeats(repeat) or None}
    resolved = resolve_stage_config(PrepareConfig, config, overrides, **fields)
    summary = run_stage("prepare", resolved, resolved.out, address)
    if isinstance(summary, dict):
        echo(f"prepared {summary.get('rows_in', 0)} input rows -> {resolved.out}")


def register(app: typer.Typer) -> None:
    app.command("prepare")(prepare)
