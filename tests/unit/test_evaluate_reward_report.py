"""evaluate's report holds the reward benchmarks of a finished evaluate-reward output; without Ray or a model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from steerray.artifacts import write_manifest
from steerray.attributes import ATTRIBUTES
from steerray.config import EvaluateRewardConfig
from steerray.eval import reward_bench as rb
from steerray.eval.report import build_blocks, render_markdown
from steerray.stages import evaluate, evaluate_reward


def length_predictor(texts):
    """Every attribute = the text's length: longer answers win."""
    return np.asarray([[float(len(t))] * len(ATTRIBUTES) for t in texts])


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def bench_output(tmp_path):
    """An evaluate-reward folder as the stage leaves it: report files, then the manifest."""
    rb_file = write_rows(
        tmp_path / "rb.jsonl",
        [
            {"prompt": "Q", "chosen": "a long answer", "rejected": "short", "subset": "alpacaeval-easy"},
            {"prompt": "Q", "chosen": "short", "rejected": "a long answer", "subset": "math-prm"},
            {"prompt": "Q", "chosen": "a long answer", "rejected": "short", "subset": "hep-python"},
        ],
    )
    pairs_file = write_rows(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "Q", "chosen": "a long answer", "rejected": "short", "strength": 2},
            {"prompt": "Q", "chosen": "tiny", "rejected": "a longer one", "strength": 1},
        ],
    )
    benches = [f"rewardbench={rb_file}", f"pairs:val={pairs_file}"]
    score, results = rb.evaluate_benches(rb.parse_bench_specs(benches), length_predictor, ATTRIBUTES)
    out = tmp_path / "evaluate_reward"
    rb.write_bench_report(results, out, score=score, model="m")
    write_manifest(out, "evaluate_reward", EvaluateRewardConfig(bench=benches, out=str(out)))
    return out


def test_evaluate_report_gets_the_benchmark_table(bench_output):
    section = evaluate.reward_bench_section(str(bench_output))
    text = render_markdown(build_blocks({"reward_bench": section}, {}), {}, bench_output)
    assert "## Reward benchmarks" in text and "ranked by helpfulness" in text
    # math-prm (984) wrong, hep-python (164) right: Reasoning = 100 * 164 / 1148
    assert "| rewardbench | rewardbench | 3 / 0 | Reasoning (0-100) | 14.3 |" in text
    assert "| rewardbench | rewardbench | 3 / 0 | accuracy over all rows | 0.667 |" in text
    assert "| val | pairs | 2 / 0 | accuracy (decided pairs) | 0.500 |" in text
    assert "| val | pairs | 2 / 0 | strength-weighted accuracy | 0.667 |" in text
    assert "rewardbench: some RewardBench subsets have no rows" in text
    metrics = evaluate.key_metrics({"reward_bench": section})
    assert metrics["bench_val_accuracy"] == 0.5
    assert metrics["bench_rewardbench_overall"] == pytest.approx((100.0 + 100 * 164 / 1148) / 2)


def test_evaluate_refuses_an_unfinished_benchmark_folder(bench_output):
    (bench_output / "manifest.json").unlink()
    with pytest.raises(evaluate.EvaluateError, match="no finished evaluate-reward output"):
        evaluate.reward_bench_section(str(bench_output))
    assert evaluate.reward_bench_section(None) is None


def test_bench_locations_become_absolute_and_inputs_name_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text("{}\n")
    config = EvaluateRewardConfig(
        bench=["pairs:x=p.jsonl", "rewardbench=hf://datasets/a/b/f.parquet"], model="m", out="o"
    ).with_absolute_paths()
    assert config.bench == [f"pairs:x={tmp_path / 'p.jsonl'}", "rewardbench=hf://datasets/a/b/f.parquet"]
    assert evaluate_reward.inputs(config) == [
        str(tmp_path / "m"),
        str(tmp_path / "p.jsonl"),
        "hf://datasets/a/b/f.parquet",
    ]
    with pytest.raises(rb.BenchError, match="no-such.jsonl: no such file or folder"):
        evaluate_reward.bench_specs(config.model_copy(update={"bench": ["bon=no-such.jsonl"]}))
