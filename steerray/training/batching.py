"""Deterministic, length-grouped batching and gradient-accumulation math, shared by reward and SFT training.

Every worker holds the same rows (in the same order) and computes the same plan, then takes its part:

- an epoch is a seeded permutation of all rows; optimizer step ``s`` of the run takes the rows
  ``perm[(s % steps_per_epoch) * G : ... + G]`` of epoch ``s // steps_per_epoch`` (G = global batch);
- those G rows are sorted by length and cut into ``world_size * accumulation`` micro-batches of
  ``micro_batch`` rows each (similar lengths together: little padding), dealt to workers in snake order
  so every worker gets a similar number of tokens. With ``row_affinity`` (train-reward's frozen-prefix
  cache) each worker instead owns the rows ``row % world_size == rank``, takes its share of every step from
  its own seeded permutation of them and groups them by length itself: a row comes back to the worker that
  cached it.

Because the plan is a pure function of ``(step, seed)``, resuming at step ``s`` replays exactly the rows
an uninterrupted run would have seen: no iterator state to checkpoint. Grouping happens *within* a
global batch, so which rows form a step never depends on their lengths (no bias towards short rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from steerray.config import ConfigError
from steerray.data.sft import IGNORE_INDEX


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-batches per worker per optimizer step; the global batch must split evenly."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ConfigError(
            f"train.global_batch_size={global_batch} is not a multiple of train.micro_batch_size "
            f"({micro_batch}) x workers ({world_size}) = {per_step}; pick e.g. "
            f"{max(per_step, global_batch // per_step * per_step)}")
    return global_batch // per_step


def steps_per_epoch(num_rows: int, global_batch: int) -> int:
    """Full global batches in one pass (the incomplete tail is dropped, as Megatron's sampler does)."""
    if num_rows < global_batch:
        raise ConfigError(f"the training data has {num_rows} rows, fewer than one global batch "
                          f"(train.global_batch_size={global_batch}); lower it or add data")
    return num_rows // global_batch


def epoch_permutation(num_rows: int, epoch: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def _deal(num_chunks: int, world_size: int, rank: int) -> list[int]:
    """Chunk indices for ``rank``, dealt in snake order (0..W-1, W-1..0, ...) to balance tokens."""
    mine = []
    for chunk in range(num_chunks):
        round_, pos = divmod(chunk, world_size)
        owner = pos if round_ % 2 == 0 else world_size - 1 - pos
        if owner == rank:
            mine.append(chunk)
    return mine


@dataclass(frozen=True)
class StepPlan:
    step: int
    epoch: int
    micro_batches: list[np.ndarray]  # row indices of this worker's micro-batches for this step


def owned_rows(num_rows: int, epoch: int, seed: int, world_size: int, rank: int, start: int, count: int) -> np.ndarray:
    """Rows ``start .. start + count`` of an epoch's seeded permutation of the rows ``rank`` owns (``row %
    world_size == rank``): with ``world_size`` workers taking ``count`` each, a step's rows, stratified by owner."""
    mine = np.arange(rank, num_rows, world_size)
    return mine[np.random.default_rng([seed, epoch, rank]).permutation(len(mine))][start: start + count]


def plan_step(lengths: Sequence[int] | np.ndarray, step: int, *, global_batch: int, micro_batch: int,
              world_size: int = 1, rank: int = 0, seed: int = 0, length_grouping: bool = True,
              row_affinity: bool = False) -> StepPlan:
    """This worker's micro-batches (row indices) for optimizer step ``step`` (0-based).

    ``row_affinity`` sends a row to the same worker every epoch (:func:`owned_rows`), for a task that keeps
    per-row work on its worker (train-reward's frozen-prefix cache): a step then takes an equal share of rows
    from each worker's rows (another sample than without it, as random) and each worker groups its own by length.
    """
    lengths = np.asarray(lengths)
    accumulation_steps(global_batch, micro_batch, world_size)
    per_epoch = steps_per_epoch(len(lengths), global_batch)
    epoch, within = divmod(step, per_epoch)
    if row_affinity and world_size > 1:
        share = global_batch // world_size  # per_epoch * share <= rows // world_size: every worker owns enough
        mine = owned_rows(len(lengths), epoch, seed, world_size, rank, within * share, share)
        if length_grouping:
            mine = mine[np.argsort(-lengths[mine], kind="stable")]
        return StepPlan(step, epoch, [mine[i: i + micro_batch] for i in range(0, len(mine), micro_batch)])
    rows = epoch_permutation(len(lengths), epoch, seed)[within * global_batch: (within + 1) * global_batch]
    if length_grouping:
        rows = rows[np.argsort(-lengths[rows], kind="stable")]
    chunks = [rows[i: i + micro_batch] for i in range(0, global_batch, micro_batch)]
    return StepPlan(step, epoch, [chunks[c] for c in _deal(len(chunks), world_size, rank)])


def eval_micro_batches(lengths: Sequence[int] | np.ndarray, micro_batch: int, world_size: int = 1,
                       rank: int = 0) -> list[tuple[np.ndarray, bool]]:
    """Every row exactly once over all workers, as ``(indices, is_filler)`` pairs of equal count per worker.

    Sharded models need every worker in every forward pass, so workers with fewer batches run filler
    batches (a copy of a real one) whose outputs are discarded.
    """
    lengths = np.asarray(lengths)
    if len(lengths) == 0:
        return []
    order = np.argsort(-lengths, kind="stable")
    chunks = [order[i: i + micro_batch] for i in range(0, len(order), micro_batch)]
    per_worker = -(-len(chunks) // world_size)
    mine = [(chunks[c], False) for c in range(rank, len(chunks), world_size)]
    while len(mine) < per_worker:
        mine.append((chunks[-1], True))
    return mine


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, *, side: str = "right",
              multiple_of: int = 1) -> tuple[Any, Any]:
    """``(input_ids, attention_mask)`` LongTensors ``[B, T]``; T rounded up to ``multiple_of``."""
    import torch

    if not sequences:
        raise ValueError("pad_batch: no sequences")
    width = max(len(s) for s in sequences)
    width = -(-width // multiple_of) * multiple_of
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        if n == 0:
            continue
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, cols] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
        mask[row, cols] = 1
    return ids, mask


def padding_efficiency(lengths: Sequence[int] | np.ndarray, micro_batches: Sequence[Sequence[int]]) -> float:
    """Real tokens / computed tokens (padding included) for a set of micro-batches."""
    lengths = np.asarray(lengths)
    real = sum(int(lengths[list(mb)].sum()) for mb in micro_batches)
    computed = sum(int(lengths[list(mb)].max()) * len(mb) for mb in micro_batches if len(mb))
    return real / computed if computed else 1.0


def collate_sft(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int,
                multiple_of: int = 8) -> dict[str, Any]:
    """Right-pad a micro-batch: ``input_ids`` with ``pad_id``, ``labels`` with IGNORE_INDEX, plus the mask.

    Width rounds up to ``multiple_of`` (the reference pads to a multiple of 8). Labels are already shifted:
    position t's label is the token after t, so use the loss with ``shift=False``.
    """
    import torch

    ids, attention = pad_batch(input_ids, pad_id, side="right", multiple_of=multiple_of)
    target = torch.full_like(ids, IGNORE_INDEX)
    for row, seq in enumerate(labels):
        target[row, : len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
    return {"input_ids": ids, "attention_mask": attention, "labels": target}
