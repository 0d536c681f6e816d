"""Training telemetry: metrics.jsonl, tokens/s and MFU, a live progress bar, optional wandb.

- :class:`MetricsWriter` appends one JSON object per line (rank 0 only); on resume it drops lines past the
  resumed step so a restarted run does not log a step twice.
- :class:`Throughput` counts real (unpadded) tokens over wall time; MFU = ``6 * params * tokens/s`` over the
  peak from :func:`measure_matmul_peak` (a measured dense matmul, not a datasheet number) times workers.
- :func:`progress_bar`: tqdm on rank 0 with the live loss; silent elsewhere.
- :class:`WandbLogger`: active only when ``WANDB_API_KEY`` or ``WANDB_MODE`` is set (and not ``disabled``);
  without a key it logs offline, and any wandb failure is logged and ignored: it never blocks a run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from steerray.artifacts import atomic_write_text

log = logging.getLogger("steerray")


# --------------------------------------------------------------------------------------------------
# metrics.jsonl
# --------------------------------------------------------------------------------------------------

class MetricsWriter:
    """Append-only ``metrics.jsonl`` (``enabled`` on rank 0 only)."""

    def __init__(self, path: str | Path, *, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._truncate_after(resume_step or 0)

    def _truncate_after(self, step: int) -> None:
        # Lines logged after the checkpoint we resume from will be logged again: drop the old ones.
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash

        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def write(self, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **{k: _clean(v) for k, v in row.items()}}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def read_metrics(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if split is None or r.get("split") == split]


# --------------------------------------------------------------------------------------------------
# Throughput and MFU
# --------------------------------------------------------------------------------------------------

def measure_matmul_peak(device: Any = None, dtype: Any = None, size: int = 2048, seconds: float = 1.0) -> float:
    """Achievable dense matmul FLOP/s of this process on ``device`` (the MFU denominator), in about
    ``seconds``: a dtype the CPU only emulates (bf16 without AVX512-BF16/AMX runs at ~1 GFLOP/s, where one
    1024^3 multiply takes seconds) gets a smaller matrix instead of a longer measurement."""
    import torch

    device = torch.device(device or "cpu")
    dtype = dtype or torch.float32
    if device.type == "cpu":
        size = cpu_matmul_size(dtype, largest=min(size, 1024), seconds=seconds)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up (kernel selection, allocation)
    _sync(device)
    # A CUDA launch is asynchronous: synchronize only every few multiplies there; a CPU multiply has ended.
    check_every = 4 if device.type == "cuda" else 1
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if reps % check_every == 0:
            _sync(device)
            if time.perf_counter() - start >= seconds:
                break
    elapsed = time.perf_counter() - start
    return 2 * size**3 * reps / elapsed


def cpu_matmul_size(dtype: Any, largest: int, seconds: float, probe: int = 128) -> int:
    """The largest square size (a multiple of 64, at most ``largest``) whose multiply takes at most a tenth
    of ``seconds``, judged from one small multiply (the time grows as size^3)."""
    import torch

    a = torch.randn(probe, probe, dtype=dtype)
    a @ a
    started = time.perf_counter()
    a @ a
    per_probe = max(time.perf_counter() - started, 1e-6)
    fits = probe * (seconds / 10 / per_probe) ** (1 / 3)
    return int(max(64, min(largest, fits // 64 * 64)))


def box_matmul_speed(seconds: float = 0.5) -> dict[str, float]:
    """This process's dense matmul GFLOP/s in fp32 and bf16 (CUDA where there is one): printed beside a run's
    timings, because a shared box's speed moves with its load and a time alone says little."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {f"matmul_gflops_{name}": round(measure_matmul_peak(device, dtype, seconds=seconds) / 1e9, 1)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def _sync(device: Any) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def train_flops_per_token(num_params: int) -> float:
    """Forward + backward FLOPs per token for a dense decoder: the usual ``6 N`` (attention ignored)."""
    return 6.0 * num_params


def train_flops_per_token_partial(num_params: int, trainable_params: int) -> float:
    """Like :func:`train_flops_per_token` when only some weights train (LoRA): forward ``2N`` + input
    gradients ``2N`` + weight gradients ``2T`` for the ``T`` trainable parameters (= ``6N`` when all train)."""
    return 4.0 * num_params + 2.0 * trainable_params


class Throughput:
    """Tokens per second over a window of steps, and the MFU they imply."""

    def __init__(self, num_params: int, peak_flops_per_worker: float | None = None, world_size: int = 1,
                 flops_per_token: float | None = None):
        self.flops_per_token = flops_per_token or train_flops_per_token(num_params)
        self.peak = (peak_flops_per_worker or 0.0) * world_size
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += int(tokens)

    def rates(self, tokens: int | None = None) -> dict[str, float]:
        """``tokens_per_s`` and ``mfu`` since the last reset (``tokens``: a global count, if gathered)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tps = (self.tokens if tokens is None else tokens) / elapsed
        mfu = tps * self.flops_per_token / self.peak if self.peak else float("nan")
        return {"tokens_per_s": tps, "mfu": mfu}


# --------------------------------------------------------------------------------------------------
# Progress bar and wandb
# --------------------------------------------------------------------------------------------------

def progress_bar(total: int, initial: int = 0, *, enabled: bool = True, desc: str = "train") -> Any:
    """tqdm with a live loss (``bar.set_postfix(loss=...)``); disabled on ranks other than 0."""
    from tqdm import tqdm

    # Not a terminal (Ray worker logs, CI): update at most every few seconds instead of redrawing.
    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, file=sys.stderr,
                mininterval=0.5 if interactive else 10.0, dynamic_ncols=interactive, unit="step")


def wandb_wanted() -> bool:
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode == "disabled":
        return False
    return bool(os.environ.get("WANDB_API_KEY") or mode)


class WandbLogger:
    """wandb on rank 0 when asked for by the environment; every failure degrades to a warning."""

    def __init__(self, project: str | None, config: Mapping[str, Any], *, name: str | None = None,
                 out_dir: str | Path | None = None, enabled: bool = True):
        self.run = None
        if not (enabled and wandb_wanted()):
            return
        try:
            import wandb

            # No key: never try the network (which could hang a run on an offline machine).
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.run = wandb.init(project=project or "steerray", name=name, config=dict(config), mode=mode,  # type: ignore[arg-type]
                                  dir=str(out_dir) if out_dir else None, resume="allow",
                                  settings=wandb.Settings(init_timeout=60, silent=True))
        except Exception as err:  # noqa: BLE001 - telemetry must never stop training
            log.warning("wandb disabled: %s: %s", type(err).__name__, err)
            self.run = None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        except Exception as err:  # noqa: BLE001
            log.warning("wandb log failed (%s); continuing without it", err)
            self.run = None

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception:  # noqa: BLE001
                pass
            self.run = None
