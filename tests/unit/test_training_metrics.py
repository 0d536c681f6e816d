"""Reward metrics on labelled cells only, pairwise accuracy without ties, metrics.jsonl on resume, wandb gate."""

from __future__ import annotations

import json

import numpy as np
import pytest

from steerray.eval.metrics import label_means, pairwise_metrics, regression_metrics
from steerray.training.metrics import MetricsWriter, Throughput, read_metrics, wandb_wanted


def test_regression_metrics_use_labelled_cells_only():
    preds = np.array([[1.0, 0.0], [2.0, 5.0], [3.0, 1.0], [9.0, 2.0]])
    labels = np.array([[1.0, -100.0], [2.5, 4.0], [3.5, -100.0], [-100.0, -100.0]])
    m = regression_metrics(preds, labels, ["quality", "toxicity"], baseline=[2.0, 4.0])
    q, t = m["per_attribute"]["quality"], m["per_attribute"]["toxicity"]
    assert q["n"] == 3 and q["mse"] == pytest.approx((0 + 0.25 + 0.25) / 3)
    assert q["pearson"] == pytest.approx(np.corrcoef([1, 2, 3], [1, 2.5, 3.5])[0, 1])
    assert q["spearman"] == pytest.approx(1.0)
    assert q["baseline_mse"] == pytest.approx((1 + 0.25 + 2.25) / 3)
    assert t["n"] == 1 and t["mse"] == pytest.approx(1.0) and t["pearson"] is None  # undefined on one point
    assert m["n_cells"] == 4 and m["mse"] == pytest.approx((0 + 0.25 + 0.25 + 1.0) / 4)
    assert m["baseline_mse"] == pytest.approx((1 + 0.25 + 2.25 + 0) / 4)
    empty = regression_metrics(preds, np.full((4, 2), -100.0), ["quality", "toxicity"])
    assert empty["mse"] is None and empty["per_attribute"]["quality"] == {"n": 0}


def test_label_means_skip_missing():
    assert label_means([[1.0, -100.0], [3.0, -100.0]]) == [2.0, 0.0]


def test_pairwise_accuracy_leaves_ties_out():
    m = pairwise_metrics([2.0, 0.0, 1.0, 5.0], [1.0, 1.0, 1.0, 0.0], [3, 1, 0, 1])
    assert m["n_pairs"] == 4 and m["n_ties"] == 1
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["weighted_accuracy"] == pytest.approx((3 + 1) / 5)


def test_metrics_writer_drops_lines_past_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path)
    for step in range(1, 6):
        writer.write({"split": "train", "step": step, "loss": float(step), "nan": float("nan")})
    with open(path, "a") as handle:
        handle.write('{"cut by a cra')
    MetricsWriter(path, resume_step=3).write({"split": "train", "step": 4, "loss": 0.5})
    rows = read_metrics(path, "train")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 0.5
    assert rows[0]["nan"] is None  # NaN is not JSON
    MetricsWriter(tmp_path / "other.jsonl", enabled=False).write({"step": 1})
    assert not (tmp_path / "other.jsonl").exists()
    json.loads(path.read_text().splitlines()[0])


def test_throughput_and_mfu():
    t = Throughput(num_params=1000, peak_flops_per_worker=6e6, world_size=2)
    t.start -= 2.0  # pretend two seconds passed
    t.add(4000)
    rates = t.rates()
    assert rates["tokens_per_s"] == pytest.approx(2000, rel=0.01)
    assert rates["mfu"] == pytest.approx(2000 * 6 * 1000 / 12e6, rel=0.01)


def test_wandb_only_when_asked(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert not wandb_wanted()
    monkeypatch.delenv("WANDB_MODE")
    assert not wandb_wanted()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_wanted()


def test_matmul_size_shrinks_to_the_time_budget_so_an_emulated_dtype_cannot_stall_a_run():
    """A pipeline measures the box's fp32 and bf16 matmul speed at its start and end. On a CPU without
    native bf16 one 1024^3 bf16 multiply took ~2.6 s, and five of them made a run that skipped every stage
    take 30 s: the size follows the budget instead (a tenth of it per multiply, judged from a small one)."""
    import torch

    from steerray.training.metrics import cpu_matmul_size, measure_matmul_peak

    for dtype in (torch.float32, torch.bfloat16):
        assert cpu_matmul_size(dtype, largest=1024, seconds=1e-9) == 64  # no budget: the smallest size
        assert cpu_matmul_size(dtype, largest=1024, seconds=1e9) == 1024  # any budget: never above the cap
        assert cpu_matmul_size(dtype, largest=1024, seconds=0.5) % 64 == 0
    assert measure_matmul_peak("cpu", torch.float32, seconds=0.05) > 1e8  # a real rate, in FLOP/s
