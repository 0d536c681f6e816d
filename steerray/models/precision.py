"""Which number format a model computes in: bf16 where the device does it natively, fp32 elsewhere.

``precision: auto`` (every stage's default) means bf16 on a CUDA GPU with bf16 support and on a CPU whose
oneDNN kernels compute bf16 natively (AVX512-BF16 or AMX: measured 3.5-4x the fp32 matmul rate on the
2-core boxes this project runs on), fp32 everywhere else. ``fp32`` and ``bf16`` are obeyed as given; bf16
on a CPU without native support runs, with a warning that it will be slow (it is emulated).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger("steerray")

PRECISIONS = ("auto", "bf16", "fp32")


@functools.cache
def cpu_has_native_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN
        return False


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles for bf16 (Sapphire Rapids and later Xeons), read from /proc/cpuinfo
    (False where there is none to read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in handle)
    except OSError:
        return False


def native_bf16(device: Any) -> bool:
    """Whether ``device`` (a torch.device or "cpu"/"cuda") computes bf16 in hardware."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return kind == "cpu" and cpu_has_native_bf16()


def resolve_precision(precision: str, device: Any) -> str:
    """``auto`` -> ``bf16`` or ``fp32`` for this device; explicit choices stay (bf16 emulated: a warning)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    native = native_bf16(device)
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and not native:
        log.warning("precision=bf16 on %s, which does not compute bf16 natively: it will run, slowly; "
                    "precision=auto picks fp32 here", device)
    return precision


def torch_dtype(precision: str) -> Any:
    """The torch dtype of a resolved precision (``bf16`` or ``fp32``)."""
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


def inference_dtype(precision: str, device: Any) -> Any:
    """The dtype to load a model in for scoring or generation on ``device``."""
    return torch_dtype(resolve_precision(precision, device))
