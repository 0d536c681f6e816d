"""The `steerray` command line: one command per stage, each a thin shell around `jobs/<stage>.py`.

Every command validates its config before anything starts, writes the resolved config next to its
outputs, and runs the job on an embedded local Ray or, with --address / RAY_ADDRESS, on a cluster.
"""

from __future__ import annotations

import typer

from steerray.commands import annotate, pipeline, prepare, serve, train_reward, train_sft

app = typer.Typer(
    name="steerray",
    help="SteerLM alignment on Ray: prepare data, train the attribute reward model, annotate, "
         "attribute-conditioned SFT, bootstrap, evaluate and serve steerable models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def main() -> None:
    """SteerLM alignment on Ray. Each command runs one stage; `steerray COMMAND --help` for its options."""


for command_module in (prepare, train_reward, annotate, train_sft, serve, pipeline):
    command_module.register(app)


if __name__ == "__main__":
    app()
