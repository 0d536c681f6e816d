"""The evaluation report: every file written, HTML self-contained, Markdown and HTML agree."""

from __future__ import annotations

import base64
import json
import re

import pytest

from steerray.attributes import ATTRIBUTES
from steerray.eval.report import fmt, write_report
from steerray.eval.steerability import example_answers, summarize_grid


def _results() -> dict:
    rows = []
    for prompt in range(3):
        for value in range(5):
            scores = {name: 2.0 + 0.1 * prompt for name in ATTRIBUTES}
            scores["verbosity"] = value * 0.8 + 0.1 * prompt
            rows.append({"attribute": "verbosity", "value": value, "prompt_id": prompt, "scores": scores,
                         "completion_tokens": 5 + 7 * value, "answer": "word | " * value})
    steer = summarize_grid(rows, list(ATTRIBUTES))
    steer.update(prompts=["Why is the sky blue?", "b", "c"], attributes=["verbosity"], values=[0, 1, 2, 3, 4],
                 examples={"verbosity": example_answers(rows, "verbosity")})
    reward = {"regression": {"n_rows": 40, "mse": 0.25, "per_attribute": {
        "verbosity": {"n": 40, "mse": 0.25, "pearson": 0.9, "spearman": 0.85},
        "humor": {"n": 0, "mse": None, "pearson": None, "spearman": None}}},
        "preference": {"n_pairs": 10, "n_ties": 2, "accuracy": 0.7}}
    boot = {"samples_per_prompt": 4, "selection": "top1", "score": "quality",
            "rounds": [{"round": 0, "prompts": 8, "samples": 32, "mean_score": 2.1, "mean_best": 2.9, "kept": 8,
                        "mean_kept": 2.9}],
            "final": {"prompts": 8, "samples": 32, "mean_score": 2.6, "mean_best": 3.1}}
    return {"title": "test report", "models": {"policy": "runs/x/sft/model"}, "reward": reward,
            "steerability": steer, "bootstrap": boot, "timings": {"steerability": 12.5}}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One report for the tests below: plotting is the slow part."""
    out = tmp_path_factory.mktemp("report")
    return out, write_report(_results(), out)


def test_write_report_files_and_numbers(written):
    tmp_path, paths = written
    for name in ("eval", "markdown", "html", "plot_steering_curves", "plot_verbosity_length", "plot_cross_matrix",
                 "plot_reward_metrics", "plot_bootstrap"):
        assert paths[name].is_file(), name
        assert paths[name].stat().st_size > 0
    for name, path in paths.items():
        if name.startswith("plot_"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["steerability"]["verbosity_length"]["spearman"] == 1.0
    assert data["reward"]["preference"]["accuracy"] == 0.7

    md = (tmp_path / "report.md").read_text()
    assert "![steering_curves](plots/steering_curves.png)" in md
    assert re.search(r"\| verbosity \| 0\.9\d\d \| 1\.000 \|", md)  # rho, and rho per prompt (exactly ordered)
    assert "word \\| word" in md  # pipes inside cells are escaped
    assert "| humor |" not in md.split("## Steerability")[0]  # unlabelled attribute left out of RM table


def test_html_is_self_contained(written):
    tmp_path, _ = written
    page = (tmp_path / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 5
    assert all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing fetched from outside
    assert "pairwise accuracy" in page and "0.700" in page
    assert "Why is the sky blue?" in page


def test_report_without_optional_sections(tmp_path):
    paths = write_report({"reward": {"regression": {"n_rows": 0, "per_attribute": {}}}}, tmp_path)
    assert not any(name.startswith("plot_") for name in paths)
    assert "Reward model" in (tmp_path / "report.md").read_text()


def test_fmt():
    assert fmt(None) == "-" and fmt(float("nan")) == "-" and fmt(3) == "3" and fmt(0.12345) == "0.123"
