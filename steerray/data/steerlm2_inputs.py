"""What train-steerlm2 reads, before any worker starts: the files, the group size n, the Ray Data body that
validates and tokenizes numbered lines into one row per group, and the counts and rejects of those rows.

Rows keep their ``file`` and 1-based ``line``, so every reject names where it came from; a reason reads
``category: detail`` (``steerray.data.steerlm2``) and is counted by category. Groups whose log values are
NaN or infinite pass (they are JSON numbers) and are counted here as ``<split>_nonfinite``; the trainer skips
them at every step and counts them again per step.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from steerray.data.sft import STATUS_OK, cached_tokenizer
from steerray.data.steerlm2 import SteerLM2RecordError, parse_line, tokenize_group_batch
from steerray.data.writer import reason_category
from steerray.errors import SteerrayError

COUNT_COLUMNS = ("file", "line", "split", "status", "reason", "log_pa", "log_py", "log_q")


class SteerLM2InputError(SteerrayError, ValueError):
    """No usable SteerLM 2.0 data where the config points; the message names the file."""


def data_files(data: str | Path) -> tuple[list[str], list[str]]:
    """``(train files, val files)``: a jsonl file, or a folder with train.jsonl (+ val.jsonl)."""
    path = Path(data)
    if path.is_file():
        return [str(path)], []
    if (path / "train.jsonl").is_file():
        return [str(path / "train.jsonl")], [str(path / "val.jsonl")] if (
            path / "val.jsonl"
        ).is_file() else []
    raise SteerLM2InputError(
        f"{path}: no such file, and no train.jsonl in it (give a steerlm2-data output folder "
        "or a SteerLM 2.0 jsonl file)"
    )


def group_size(path: str, label_attributes: Sequence[str] | None) -> int:
    """The n of the first valid group in ``path``: the size every group of the data must have."""
    with open(path, encoding="utf-8") as handle:
        for raw in handle:
            try:
                return parse_line(raw, label_attributes=label_attributes).n
            except SteerLM2RecordError:
                continue
    raise SteerLM2InputError(
        f"{path}: no valid SteerLM 2.0 group in the file (the schema: steerray.data.steerlm2)"
    )


def tokenize_groups(
    batch: Mapping[str, Any],
    *,
    tokenizer_source: str,
    trust_remote_code: bool,
    max_length: int,
    expected_n: int,
    label_attributes: Sequence[str] | None,
) -> dict[str, Any]:
    """Ray Data body: :func:`tokenize_group_batch` with the process's cached tokenizer, plus ``length`` (the
    group's tokens, what batches are grouped by) and the row's ``split``."""
    tokenizer = cached_tokenizer(tokenizer_source, trust_remote_code)
    out = tokenize_group_batch(
        batch, tokenizer, max_length, expected_n=expected_n, label_attributes=label_attributes
    )
    out["length"] = np.asarray([int(np.sum(x)) for x in out["lengths"]], dtype=np.int64)
    out["split"] = np.asarray([str(s) for s in batch["split"]])
    return out


def count_groups(batches: Iterable[Mapping[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Counts per split and status (``train_ok``, ``val_rejected``, ``train_nonfinite``, ``rejects_by_reason``),
    and one reject per rejected row (file, line, split, reason) in file/line order."""
    counts: Counter = Counter()
    reasons: Counter = Counter()
    rejects = []
    for batch in batches:
        for file, line, split, status, reason, *logs in zip(*(batch[c] for c in COUNT_COLUMNS), strict=True):
            counts[f"{split}_{status}"] += 1
            if status != STATUS_OK:
                rejects.append(
                    {"file": str(file), "line": int(line), "split": str(split), "reason": str(reason)}
                )
                reasons[reason_category(str(reason))] += 1
            elif not all(math.isfinite(float(v)) for part in logs for v in part):
                counts[f"{split}_nonfinite"] += 1
    rejects.sort(key=lambda r: (r["file"], r["line"]))
    return {**dict(sorted(counts.items())), "rejects_by_reason": dict(reasons)}, rejects
