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


def _option_value(args: list[str], names: tuple[str, ...]) -> str | None:
    for i, arg in enumerate(args):
        if arg in names and i + 1 < len(args):
            return args[i + 1]
        for name in names:
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


CONFIG_COMMANDS = [c for c in _steerray_commands() if _option_value(shlex.split(c), ("--config", "-c"))]


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_every_readme_config_resolves_and_loads(command: str, monkeypatch):
    """`--config NAME` names a shipped preset (or file) for that command's stage, and the whole command's
    config (preset, flags, overrides; for the pipeline every stage's) validates. Nothing runs: the stage,
    the job submission and the pipeline's file and model checks are replaced."""
    from typer.testing import CliRunner

    import steerray.cli as cli
    from steerray.config import resolve_preset
    from steerray.stages import get_stage
    from steerray.stages import pipeline as pipeline_stage
    from steerray.stages.planning import resolve_stages

    args = shlex.split(command)[1:]
    stage = get_stage(args[0])
    assert resolve_preset(_option_value(args, ("--config", "-c")), stage.name).is_file()

    monkeypatch.setenv("STEERRAY_API_TOKEN", "readme-test")  # restored afterwards (`--token` sets it)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cli, "execute", lambda *a, **k: {})
    monkeypatch.setattr(cli, "submit_job", lambda *a, **k: "job")
    monkeypatch.setattr(cli, "launch_resolved_pipeline", lambda *a, **k: None)
    monkeypatch.setattr(pipeline_stage, "check", lambda cfg: resolve_stages(cfg))
    monkeypatch.setattr(pipeline_stage, "dry_run", lambda cfg: {})
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"README command does not load: {command}\n{result.output}"


def _readme_paths() -> list[str]:
    """Repository paths the README names in backticks: `bench/x.py`, `scripts/...`, `cluster/.../`, globs."""
    prefixes = ("bench/", "scripts/", "cluster/", "jobs/", "steerray/", "tests/", ".ci/")
    paths = set()
    for quoted in re.findall(r"`([^`\s]+)`", README.read_text()):
        if not quoted.startswith(prefixes) or any(c in quoted for c in "<>{}$"):
            continue
        last = quoted.rstrip("/").rsplit("/", 1)[-1]
        if quoted.endswith("/") or "." in last or last == "Dockerfile":
            paths.add(quoted)
    return sorted(paths)


def test_readme_names_repository_paths():
    assert len(_readme_paths()) >= 10  # the extraction itself works


@pytest.mark.parametrize("path", _readme_paths())
def test_every_readme_path_exists(path: str):
    root = README.parent
    found = sorted(root.glob(path.rstrip("/"))) if "*" in path else [root / path]
    assert found and all(p.exists() for p in found), f"README names {path}, which does not exist"
    if path.endswith("/"):
        assert all(p.is_dir() for p in found), f"README names {path} as a folder"
