"""Precision: the demo's two training stages in fp32 and in bf16, same rows and steps, one command.

    .venv/bin/python bench/precision.py                              # demo presets, 24 steps each
    .venv/bin/python bench/precision.py --only sft --steps 40
    .venv/bin/python bench/precision.py --model tiny-llama --steps 6 # a quick check of the wiring
    .venv/bin/python bench/precision.py --variants bf16/sdpa,bf16/auto   # attention kernels, both in bf16

What ``precision: auto`` buys where the device computes bf16 natively, and what it costs in accuracy: each
stage (``train-reward`` on ``demo/reward``, ``train-sft`` on ``demo/sft``, both as users run them through
``steerray.stages.execute``: Ray Data, Ray Train's DDP workers, LoRA, validation at the start and end, the
merged export) runs once with ``scaling.precision=fp32`` and once with ``bf16``, on the demo's own data
(``demo/prepare`` with the demo pipeline's 480 conversations and its validation split). Only
``train.max_steps`` differs from the presets (``--steps``); the learning-rate schedule follows it, as it does
in a user's shortened run.

Printed per stage and precision: the stage's wall time, the training loop's tokens/s, MFU against the measured
matmul peak of the precision in use (so bf16's MFU is over bf16's peak), and the final validation loss (the
reward model's MSE over the nine attributes, SFT's token-mean cross-entropy of the answers); then bf16 / fp32:
the wall-time ratio and the validation loss's relative difference, against the 2% bound that says bf16
trains the same model. The two precisions alternate which goes first from one stage to the next, so neither
always gets the colder machine. bf16 on a CPU without native bf16 runs emulated (slowly): the bench says so
and runs it anyway when asked. ``--variants`` names the two runs as ``precision[/attention]``
(``model.attention``, default auto): ``bf16/sdpa,bf16/auto`` compares the attention kernels instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

PRESETS = {"reward": "demo/reward", "sft": "demo/sft"}
TOLERANCE = 0.02  # relative difference of the final validation loss that still counts as the same model


@dataclass
class StageRun:
    stage: str
    variant: str  # precision[/attention], as asked (an explicit precision is what the stage runs)
    wall_s: float
    tokens_per_s: float | None
    mfu: float | None
    peak_gflops: float | None
    val_first: float | None
    val_loss: float | None
    note: str = ""  # reward: the MSE of predicting the mean, and Pearson per attribute the data varies


def demo_data(out: Path, rows: int) -> Path:
    """The demo pipeline's prepare stage: conversations/ (SFT) and regression/ (reward), each with val.jsonl."""
    from steerray.config import PrepareConfig, load_config
    from steerray.stages import execute

    execute("prepare", load_config(PrepareConfig, "demo/prepare", [f"out={out}", f"demo_conversations={rows}"]))
    return out


def stage_config(args: argparse.Namespace, stage: str, data: Path, out: Path, variant: str) -> Any:
    from steerray.config import RewardConfig, SFTConfig, load_config

    precision, _, attention = variant.partition("/")
    overrides = [f"data={data}", f"out={out}", f"model.name={args.model}", f"train.max_steps={args.steps}",
                 f"train.checkpoint_every={args.steps}", f"scaling.precision={precision}", "scaling.max_failures=0",
                 f"model.attention={attention or 'auto'}", "logging.progress_bar=false"]
    if stage == "sft":
        overrides.append("sample_prompts=[]")  # samples are generation, not training
    return load_config(SFTConfig if stage == "sft" else RewardConfig, PRESETS[stage], overrides)


def run_stage(stage: str, variant: str, cfg: Any) -> StageRun:
    from steerray.stages import execute

    started = time.perf_counter()
    summary = execute("train-sft" if stage == "sft" else "train-reward", cfg)
    wall = time.perf_counter() - started
    if stage == "sft":
        first, last = summary.get("val_loss_first"), summary.get("val_loss")
    else:  # the reward stage validates at the end only (eval_every 0): its loss is the MSE over all cells
        first, last = None, (summary.get("val") or {}).get("mse")
    peak = summary.get("matmul_peak_flops_per_worker")
    return StageRun(stage, variant, wall, summary.get("tokens_per_s"), summary.get("mfu"),
                    peak / 1e9 if peak else None, first, last, reward_note(summary.get("val") or {}))


def reward_note(val: dict[str, Any]) -> str:
    """Pearson of each attribute whose validation labels vary (the demo's constant ones have none)."""
    if not val:
        return ""
    pearsons = {name: m["pearson"] for name, m in val.get("per_attribute", {}).items()
                if m.get("pearson") is not None and m["pearson"] == m["pearson"]}
    text = " ".join(f"{name} {value:.2f}" for name, value in pearsons.items())
    return f"mean-predictor MSE {fmt(val.get('baseline_mse'), '.4f')}; Pearson {text}"


def fmt(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def report(runs: list[StageRun]) -> None:
    print(f"   {'variant':14s} {'wall s':>8s} {'tokens/s':>9s} {'MFU':>7s} {'peak GF/s':>10s}  val loss: first -> final")
    for run in runs:
        print(f"   {run.variant:14s} {run.wall_s:8.1f} {fmt(run.tokens_per_s, '9.1f')} {fmt(run.mfu, '7.2%')} "
              f"{fmt(run.peak_gflops, '10.1f')}  {fmt(run.val_first, '.4f')} -> {fmt(run.val_loss, '.4f')}")
        if run.note:
            print(f"   {'':14s} {run.note}")


def verdict(stage: str, base: StageRun, other: StageRun) -> str:
    """``other`` against the baseline: wall-time share, loop speed-up, and the final validation loss's difference."""
    names = f"{other.variant} / {base.variant}"
    loop = other.tokens_per_s / base.tokens_per_s if other.tokens_per_s and base.tokens_per_s else float("nan")
    speed = f"wall {other.wall_s / base.wall_s:.2f} ({base.wall_s / other.wall_s:.2f}x faster), loop tokens/s {loop:.2f}x"
    if base.val_loss is None or other.val_loss is None:
        return f"   {stage:6s} {names}: {speed}; no validation loss"
    diff = (other.val_loss - base.val_loss) / base.val_loss
    within = "within" if abs(diff) <= TOLERANCE else "NOT within"
    return (f"   {stage:6s} {names}: {speed}; final val loss {other.val_loss:.4f} vs {base.val_loss:.4f} "
            f"({diff:+.2%}, {within} {TOLERANCE:.0%})")


def box_line() -> str:
    import torch

    from steerray.models.precision import cpu_has_native_bf16
    from steerray.training.metrics import measure_matmul_peak

    if torch.cuda.is_available():
        return f"device {torch.cuda.get_device_name()}"
    fp32 = measure_matmul_peak(dtype=torch.float32) / 1e9
    bf16 = measure_matmul_peak(dtype=torch.bfloat16) / 1e9
    native = "native" if cpu_has_native_bf16() else "EMULATED (no AVX512-BF16/AMX): expect it slow"
    return (f"CPU, {os.cpu_count()} cores, bf16 {native}; matmul this process, all threads: fp32 {fp32:.0f} GFLOP/s, "
            f"bf16 {bf16:.0f} ({bf16 / fp32:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (the demo's), tiny-llama, a folder")
    parser.add_argument("--steps", type=int, default=24, help="train.max_steps of each stage (presets: 96 / 200)")
    parser.add_argument("--rows", type=int, default=480, help="demo conversations (the demo pipeline's 480)")
    parser.add_argument("--only", choices=["reward", "sft"], default=None)
    parser.add_argument("--variants", default="fp32,bf16", help="the two runs, precision[/attention], the "
                                                                 "baseline first")
    args = parser.parse_args()
    baseline, other = [v.strip() for v in args.variants.split(",")]
    from steerray.runtime import init_ray

    print(box_line(), flush=True)
    init_ray()
    results: dict[str, dict[str, StageRun]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        work = Path(tmp)
        data = demo_data(work / "prepare", args.rows)
        for index, stage in enumerate([args.only] if args.only else ["reward", "sft"]):
            order = (baseline, other) if index % 2 == 0 else (other, baseline)
            results[stage] = {v: run_stage(stage, v, stage_config(args, stage, data, work / f"{stage}-{i}", v))
                              for i, v in enumerate(order)}
            print(f"\n== {stage}: {PRESETS[stage]}, {args.steps} steps, {args.rows} demo conversations")
            report(list(results[stage].values()))
    print(f"\n== summary ({box_line()})")
    for stage, runs in results.items():
        print(verdict(stage, runs[baseline], runs[other]))


if __name__ == "__main__":
    main()
