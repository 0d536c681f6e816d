"""CLI commands, one module per stage; `steerray.cli` wires them into one Typer app."""
