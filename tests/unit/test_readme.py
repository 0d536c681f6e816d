"""The README stays true: its set-up commands come first, and every `steerray` command in it parses."""

import re
import shlex
from pathlib import Path

import click
import pytest
import typer

from steerray.cli import app

README = Path(__file__).resolve().parents[2] / "README.md"


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _steerray_commands() -> list[str]:
    commands = []
    for block in _bash_blocks(README.read_text()):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("steerray "):
                commands.append(line)
    return commands


def test_readme_opens_with_the_two_setup_commands():
    first_block = _bash_blocks(README.read_text())[0]
    lines = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert lines == ["make demo", "make test"]
    makefile = (README.parent / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (README.parent / ".ci" / "run").read_text()


@pytest.mark.parametrize("command", _steerray_commands())
def test_every_readme_command_parses(command: str):
    group = typer.main.get_command(app)
    args = shlex.split(command)[1:]
    ctx = group.make_context("steerray", list(args), resilient_parsing=True)
    name, sub, rest = group.resolve_command(ctx, args)
    assert sub is not None, f"unknown command in README: {command}"
    try:
        sub.make_context(name, rest)
    except click.exceptions.UsageError as err:  # pragma: no cover - the assertion message is the point
        pytest.fail(f"README command does not parse: {command}\n{err}")
