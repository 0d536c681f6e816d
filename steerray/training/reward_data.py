"""Reward-model training data: find and validate a ``prepare`` folder, tokenize, collate.

Inputs (spec section 3, written by ``steerray prepare``)::

    DIR/regression/{train,val}.jsonl   {"text": "...<extra_id_2>", "label": [9 floats, -100 = missing]}
    DIR/preference/{train,val}.jsonl   {"id": str, "chosen": text, "rejected": text, "strength": float >= 0,
                                        "tie": bool (optional; a tie has strength 0)}

Validation runs on the driver, before any worker starts: every bad row is counted and kept with its
file, line and reason for ``rejects.jsonl``; a file with no usable row is an error naming it. Labels are
always 9 long in canonical order; a run on a subset of attributes keeps only those columns.

Ties (strength 0): ``scaled_bt`` weighs a pair by its strength, so a tie adds nothing to the loss sum
and is kept (it still counts in the mean's denominator, exactly as in NeMo-Aligner, so loss values match
the reference). ``regular_bt`` and ``margin_bt`` have no tie term: they would train a tie as a preference
for whichever side prepare wrote first, so :func:`read_split` given ``loss`` skips ties for them and counts
them by reason in ``SplitData.skipped``.

Tokenization is a pure batch function for Ray Data's ``map_batches``: no BOS/EOS (as NeMo), and texts
longer than ``max_length`` lose tokens from the LEFT so the read-out token at the end survives.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from steerray.artifacts import read_manifest
from steerray.attributes import ATTRIBUTE_INDEX, ATTRIBUTES, IGNORE_VALUE
from steerray.data.readers import decode_json
from steerray.errors import SteerrayError
from steerray.models.loading import load_tokenizer
from steerray.training.batching import pad_batch

REGRESSION, PREFERENCE = "regression", "preference"
# Bradley-Terry losses without a tie term: a tie would be trained as a preference, so it is skipped.
TIE_SKIPPING_LOSSES = ("regular_bt", "margin_bt")


class RewardDataError(SteerrayError, ValueError):
    """A data folder or file that cannot train a reward model; the message names it."""


@dataclass
class SplitData:
    path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # usable rows left out by design (ties)
    total: int = 0

    def skipped_by_reason(self) -> dict[str, int]:
        """How many rows were skipped, per reason (for the manifest)."""
        return count_reasons(self.skipped)


def count_reasons(entries: Sequence[dict[str, Any]]) -> dict[str, int]:
    """``{reason: count}`` of reject or skip entries, most frequent first."""
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry["reason"]] = counts.get(entry["reason"], 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def data_kind(loss: str) -> str:
    return REGRESSION if loss == "regression" else PREFERENCE


def locate_split_files(data_dir: str | Path, kind: str) -> tuple[Path, Path | None]:
    """``(train, val or None)`` of a prepare folder; a clear error when the expected files are absent."""
    root = Path(data_dir)
    if not root.is_dir():
        raise RewardDataError(f"data folder {root} does not exist; run `steerray prepare --out {root}` first")
    train, val = root / kind / "train.jsonl", root / kind / "val.jsonl"
    if not train.is_file():
        other = PREFERENCE if kind == REGRESSION else REGRESSION
        hint = (f" (it has {other}/ data: use loss=" + ("scaled_bt" if other == PREFERENCE else "regression") + ")"
                if (root / other / "train.jsonl").is_file() else "")
        raise RewardDataError(f"{train} not found: {root} is not a prepare output with {kind} data{hint}")
    return train, val if val.is_file() else None


def check_prepare_manifest(data_dir: str | Path) -> dict[str, Any] | None:
    """The prepare manifest if there is one (a hand-made folder without one is accepted)."""
    return read_manifest(data_dir, "prepare")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def regression_row_problem(row: Any, attributes: Sequence[str]) -> str | None:
    """Why a regression row cannot be used (None if it can)."""
    if not isinstance(row, dict):
        return "row is not a JSON object"
    text, label = row.get("text"), row.get("label")
    if not isinstance(text, str) or not text:
        return "'text' is missing or empty"
    if not isinstance(label, list):
        return "'label' is missing or not a list"
    if len(label) != len(ATTRIBUTES):
        return (f"'label' has {len(label)} values, expected {len(ATTRIBUTES)} (one per attribute in the order "
                f"{','.join(ATTRIBUTES)}, -100 for missing)")
    if not all(_is_number(v) for v in label):
        return "'label' holds a value that is not a finite number"
    if all(label[ATTRIBUTE_INDEX[a]] == IGNORE_VALUE for a in attributes):
        return f"no label for the trained attributes ({','.join(attributes)})"
    return None


def preference_row_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return "row is not a JSON object"
    for key in ("chosen", "rejected"):
        if not isinstance(row.get(key), str) or not row[key]:
            return f"'{key}' is missing or empty"
    strength = row.get("strength", 1.0)
    if not _is_number(strength) or strength < 0:
        return f"'strength' must be a number >= 0, got {strength!r}"
    tie = row.get("tie", False)
    if not isinstance(tie, bool):
        return f"'tie' must be true or false, got {tie!r}"
    if tie and strength != 0:
        return f"'tie' is true but 'strength' is {strength!r} (a tie has strength 0)"
    return None


def tie_skip_reason(row: dict[str, Any], loss: str | None) -> str | None:
    """Why a valid pair is left out for ``loss`` (None: it is used). Only ties, only for losses without a tie term."""
    if loss in TIE_SKIPPING_LOSSES and float(row.get("strength", 1.0)) == 0:
        return f"tie (strength 0): loss={loss} has no tie term and would train it as a preference"
    return None


def read_split(path: Path, kind: str, attributes: Sequence[str], *, allow_empty: bool = False,
               loss: str | None = None) -> SplitData:
    """Parse and validate one jsonl file; rows keep their 1-based ``line`` (a stable order key).

    A file without a usable row is an error (``allow_empty``: a file with no rows, or only skipped ties, is
    accepted, e.g. val). ``loss``: the reward loss that will read the pairs; ties are skipped for ``regular_bt``/``margin_bt``.
    """
    split = SplitData(path)
    columns = [ATTRIBUTE_INDEX[a] for a in attributes]
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            split.total += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                split.rejects.append({"file": str(path), "line": line_no, "reason": f"not UTF-8: {err.reason} "
                                      f"at byte {err.start}"})
                continue
            row, why = decode_json(line)
            if why:
                split.rejects.append({"file": str(path), "line": line_no, "reason": why})
                continue
            problem = regression_row_problem(row, attributes) if kind == REGRESSION else preference_row_problem(row)
            if problem:
                split.rejects.append({"file": str(path), "line": line_no, "reason": problem, "row": row})
                continue
            if kind == REGRESSION:
                split.rows.append({"line": line_no, "text": row["text"],
                                   "label": [float(row["label"][c]) for c in columns]})
            elif skip := tie_skip_reason(row, loss):
                split.skipped.append({"file": str(path), "line": line_no, "reason": skip, "id": row.get("id")})
            else:
                split.rows.append({"line": line_no, "id": str(row.get("id", line_no)), "chosen": row["chosen"],
                                   "rejected": row["rejected"], "strength": float(row.get("strength", 1.0))})
    if not split.rows and not (allow_empty and split.total == len(split.skipped)):  # empty, or ties only
        reasons = sorted({r["reason"] for r in split.rejects + split.skipped})[:3]
        raise RewardDataError(f"{path}: no usable row among {split.total}" +
                              (f" (e.g. {'; '.join(reasons)})" if reasons else " (the file is empty)"))
    return split


# --------------------------------------------------------------------------------------------------
# Tokenization (Ray Data batch functions: dict of numpy arrays in, dict of numpy arrays out)
# --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def cached_tokenizer(source: str) -> Any:
    return load_tokenizer(source)


def left_truncate(token_lists: Sequence[Sequence[int]], max_length: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Keep the last ``max_length`` tokens of each list; returns arrays and per-row truncated flags."""
    kept = [np.asarray(ids[-max_length:], dtype=np.int32) for ids in token_lists]
    return kept, np.array([len(ids) > max_length for ids in token_lists], dtype=bool)


def _encode(tokenizer: Any, texts: Sequence[str] | np.ndarray, max_length: int) -> tuple[list[np.ndarray], np.ndarray]:
    ids = tokenizer([str(t) for t in texts], add_special_tokens=False)["input_ids"]
    return left_truncate(ids, max_length)


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def tokenize_regression_batch(batch: dict[str, np.ndarray], *, tokenizer: str, max_length: int) -> dict[str, Any]:
    """``text`` -> ``input_ids`` (left-truncated), ``length``, ``truncated``; keeps ``line`` and ``label``."""
    ids, truncated = _encode(cached_tokenizer(tokenizer), batch["text"], max_length)
    return {"line": np.asarray(batch["line"], dtype=np.int64), "input_ids": _ragged(ids),
            "length": np.array([len(x) for x in ids], dtype=np.int32), "truncated": truncated,
            "label": _ragged([np.asarray(v, dtype=np.float32) for v in batch["label"]])}


def tokenize_preference_batch(batch: dict[str, np.ndarray], *, tokenizer: str, max_length: int) -> dict[str, Any]:
    """``chosen``/``rejected`` -> token ids of each side; ``length`` is the longer side (for grouping)."""
    tok = cached_tokenizer(tokenizer)
    chosen, chosen_cut = _encode(tok, batch["chosen"], max_length)
    rejected, rejected_cut = _encode(tok, batch["rejected"], max_length)
    return {"line": np.asarray(batch["line"], dtype=np.int64), "id": np.asarray(batch["id"]).astype(str),
            "chosen_ids": _ragged(chosen), "rejected_ids": _ragged(rejected),
            "length": np.array([max(len(c), len(r)) for c, r in zip(chosen, rejected, strict=True)], dtype=np.int32),
            "truncated": chosen_cut.astype(np.int32) + rejected_cut.astype(np.int32),
            "strength": np.asarray(batch["strength"], dtype=np.float32)}


def tokenize_dataset(rows: list[dict[str, Any]], kind: str, tokenizer: str, max_length: int) -> Any:
    """Validated rows -> a materialized Ray dataset of token ids (left truncation, flagged per row)."""
    import ray.data

    fn = tokenize_regression_batch if kind == REGRESSION else tokenize_preference_batch
    # A block per 16k rows: each block's task starts a worker that imports transformers and loads the tokenizer
    # (~5 s on a 2-core CPU, as long as tokenizing ~10k rows), so small data is fastest in one task (3,557 demo
    # rows: 8.6-9.0 s in 1 block, 18-19 s in 6; run-to-run on a quiet 2-core box).
    blocks = max(1, min(16, len(rows) // 16384))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    return ds.map_batches(cast(Any, fn), fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
                          batch_size=256, num_cpus=0.5).materialize()


def count_truncated(ds: Any) -> int:
    # Reading a materialized column locally is instant; ds.sum() would plan an aggregation job.
    return sum(int(b["truncated"].sum()) for b in ds.iter_batches(batch_format="numpy", batch_size=None))


# --------------------------------------------------------------------------------------------------
# In the worker: rows in memory, collate micro-batches
# --------------------------------------------------------------------------------------------------

def collect_rows(iterable_batches: Any) -> dict[str, list[Any]]:
    """Concatenate numpy batches into column lists, sorted by source ``line`` (same order on every worker)."""
    columns: dict[str, list[Any]] = {}
    for batch in iterable_batches:
        for key, values in batch.items():
            columns.setdefault(key, []).extend(list(values))
    if not columns:
        return columns
    order = np.argsort(np.asarray(columns["line"]), kind="stable")
    return {key: [values[i] for i in order] for key, values in columns.items()}


def collate_regression(rows: dict[str, list[Any]], indices: Sequence[int], pad_id: int) -> dict[str, Any]:
    """Right-padded ``input_ids``/``attention_mask``, float ``labels [B, A]``, and the real token count."""
    import torch

    ids, mask = pad_batch([rows["input_ids"][i] for i in indices], pad_id)
    labels = torch.as_tensor(np.stack([np.asarray(rows["label"][i], dtype=np.float32) for i in indices]))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "tokens": int(mask.sum()),
            "keys": [int(i) for i in indices]}  # which rows: the frozen-prefix cache's keys


def collate_pairs(rows: dict[str, list[Any]], indices: Sequence[int], pad_id: int) -> dict[str, Any]:
    """One forward batch of ``2P`` rows: the P chosen texts, then the P rejected ones; and strengths."""
    import torch

    seqs = [rows["chosen_ids"][i] for i in indices] + [rows["rejected_ids"][i] for i in indices]
    ids, mask = pad_batch(seqs, pad_id)
    strength = torch.as_tensor(np.asarray([rows["strength"][i] for i in indices], dtype=np.float32))
    return {"input_ids": ids, "attention_mask": mask, "strength": strength, "pairs": len(indices),
            "tokens": int(mask.sum()),
            "keys": [2 * int(i) for i in indices] + [2 * int(i) + 1 for i in indices]}  # chosen, then rejected
