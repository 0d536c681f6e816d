"""Deterministic length-grouped batching: every row of a step once, same plan on resume, less padding."""

from __future__ import annotations

import numpy as np
import pytest

from steerray.config import ConfigError
from steerray.training.batching import (
    accumulation_steps,
    eval_micro_batches,
    pad_batch,
    padding_efficiency,
    plan_step,
    steps_per_epoch,
)


def test_accumulation_math():
    assert accumulation_steps(128, 2, 8) == 8
    assert accumulation_steps(8, 2, 2) == 2
    with pytest.raises(ConfigError, match="not a multiple"):
        accumulation_steps(10, 2, 4)
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        steps_per_epoch(5, 8)
    assert steps_per_epoch(50, 8) == 6  # the incomplete tail is dropped


def test_plan_step_covers_the_global_batch_once_across_workers():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=100)
    kw = dict(global_batch=16, micro_batch=2, world_size=4, seed=3)
    seen_in_epoch = []
    for step in range(steps_per_epoch(100, 16)):
        rows = [r for rank in range(4) for mb in plan_step(lengths, step, rank=rank, **kw).micro_batches
                for r in mb]
        assert len(rows) == 16 and len(set(rows)) == 16
        plans = [plan_step(lengths, step, rank=rank, **kw) for rank in range(4)]
        assert all(len(p.micro_batches) == 2 for p in plans)  # accumulation 16 / (2 x 4)
        seen_in_epoch += rows
    assert len(set(seen_in_epoch)) == len(seen_in_epoch)  # no row twice within an epoch
    assert plan_step(lengths, 6, rank=0, **kw).epoch == 1


def test_plan_is_a_pure_function_of_step_and_seed():
    lengths = np.arange(1, 41)
    a = plan_step(lengths, 7, global_batch=8, micro_batch=2, world_size=2, rank=1, seed=5)
    b = plan_step(lengths, 7, global_batch=8, micro_batch=2, world_size=2, rank=1, seed=5)
    c = plan_step(lengths, 7, global_batch=8, micro_batch=2, world_size=2, rank=1, seed=6)
    assert [m.tolist() for m in a.micro_batches] == [m.tolist() for m in b.micro_batches]
    assert [m.tolist() for m in a.micro_batches] != [m.tolist() for m in c.micro_batches]


def test_length_grouping_keeps_the_rows_and_cuts_padding():
    rng = np.random.default_rng(1)
    lengths = rng.integers(10, 1000, size=256)
    kw = dict(global_batch=64, micro_batch=4, world_size=1, rank=0, seed=0)
    grouped = plan_step(lengths, 0, length_grouping=True, **kw).micro_batches
    plain = plan_step(lengths, 0, length_grouping=False, **kw).micro_batches
    assert sorted(np.concatenate(grouped).tolist()) == sorted(np.concatenate(plain).tolist())
    assert padding_efficiency(lengths, grouped) > 0.9 > padding_efficiency(lengths, plain)


def _cache_hit_share(lengths, steps, world_size, row_affinity):
    """Share of row visits that find the row already seen on the same worker (an unbounded per-worker cache)."""
    seen = [set() for _ in range(world_size)]
    hits = visits = 0
    for step in range(steps):
        for rank in range(world_size):
            plan = plan_step(lengths, step, global_batch=16, micro_batch=4, world_size=world_size, rank=rank,
                             seed=1234, row_affinity=row_affinity)
            for row in np.concatenate(plan.micro_batches).tolist():
                hits += row in seen[rank]
                visits += 1
                seen[rank].add(row)
    return hits / visits


def test_row_affinity_brings_every_row_back_to_the_worker_that_first_saw_it():
    rng = np.random.default_rng(2)
    lengths = rng.integers(20, 256, size=601)  # the demo's reward data: 601 rows, 96 steps of 16 (2.6 epochs)
    kw = dict(global_batch=16, micro_batch=4, world_size=2, seed=1234, row_affinity=True)
    in_epoch: list[int] = []
    for step in range(steps_per_epoch(601, 16)):
        plans = [plan_step(lengths, step, rank=rank, **kw) for rank in range(2)]
        assert all([len(mb) for mb in p.micro_batches] == [4, 4] for p in plans)  # same accumulation
        for rank, plan in enumerate(plans):
            for mb in plan.micro_batches:  # a worker's own rows, grouped by length
                assert all(r % 2 == rank for r in mb) and list(lengths[mb]) == sorted(lengths[mb], reverse=True)
            in_epoch += np.concatenate(plan.micro_batches).tolist()
    assert len(in_epoch) == len(set(in_epoch)) == 37 * 16  # no row twice within an epoch, as without it
    # 601 rows visited 1,536 times: at most 1 - 601 / 1536 = 60.9% of the visits can find their row cached.
    assert _cache_hit_share(lengths, 96, 2, False) < 0.50
    assert _cache_hit_share(lengths, 96, 2, True) == pytest.approx(1 - 601 / 1536)
    one_worker = dict(global_batch=16, micro_batch=4, world_size=1, seed=1)
    assert [m.tolist() for m in plan_step(lengths, 3, row_affinity=True, **one_worker).micro_batches] == \
        [m.tolist() for m in plan_step(lengths, 3, **one_worker).micro_batches]


def test_eval_batches_cover_every_row_once_with_equal_counts():
    lengths = np.arange(13)  # 7 batches of <= 2 over 3 workers: 3 each, 2 of them fillers
    per_rank = [eval_micro_batches(lengths, 2, world_size=3, rank=r) for r in range(3)]
    assert [len(p) for p in per_rank] == [3, 3, 3]  # every worker runs the same number of forward passes
    real = sorted(i for p in per_rank for idx, filler in p if not filler for i in idx.tolist())
    assert real == list(range(13))
    assert sum(filler for p in per_rank for _, filler in p) == 2
    assert eval_micro_batches([], 2) == []


def test_pad_batch_right_and_left():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, multiple_of=4)
    assert ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    ids, mask = pad_batch([[5, 6], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6], [0, 8]] and mask.tolist() == [[1, 1], [0, 1]]
