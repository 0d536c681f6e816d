"""`steerray train-reward`: train the attribute-prediction reward model (regression or Bradley-Terry)."""

from __future__ import annotations

import typer

from steerray.commands.common import ADDRESS_HELP, OVERRIDES_HELP, echo, resolve_stage_config, run_stage
from steerray.config import RewardConfig


def train_reward(
    config: str | None = typer.Option(None, "--config", "-c",
                                         help="YAML preset, a path or e.g. demo/reward, tiny/reward."),
    data: str | None = typer.Option(None, "--data", "-d",
                                       help="A `prepare` output folder (reads regression/ or preference/)."),
    out: str | None = typer.Option(None, "--out", "-o",
                                      help="Output folder; re-running with the same folder resumes."),
    loss: str | None = typer.Option(None, "--loss",
                                       help="regression | scaled_bt | regular_bt | margin_bt (same as loss=...)."),
    init_from: str | None = typer.Option(None, "--init-from",
                                            help="Start from this reward-model folder, head included."),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Train on Ray Train (FSDP2 / DDP / DeepSpeed); writes model/, metrics.jsonl, checkpoints/, manifest.json."""
    # The loss asked for is the loss recorded in out/config.yaml and the one the job runs (unlike the
    # reference, where model.regression.loss_func was silently ignored).
    resolved = resolve_stage_config(RewardConfig, config, overrides, data=data, out=out, loss=loss,
                                    init_from=init_from)
    summary = run_stage("train_reward", resolved, resolved.out, address)
    if isinstance(summary, dict):
        val = summary.get("val") or {}
        quality = f", val mse {val['mse']:.4f} (constant baseline {val.get('baseline_mse', float('nan')):.4f})" \
            if val.get("mse") is not None else (f", val accuracy {val['accuracy']:.3f}"
                                                if val.get("accuracy") is not None else "")
        echo(f"trained {summary.get('loss')} reward model, {summary.get('steps')} steps, loss "
             f"{_fmt(summary.get('first_loss'))} -> {_fmt(summary.get('last_loss'))}{quality} -> {resolved.out}/model")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def register(app: typer.Typer) -> None:
    app.command("train-reward")(train_reward)
