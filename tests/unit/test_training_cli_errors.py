"""`steerray train-reward` refuses bad input with a clear message before Ray or any worker starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from steerray.cli import app

runner = CliRunner()
ROW = {"text": "<extra_id_1>Assistant\nhi\n<extra_id_2>", "label": [-100] * 4 + [3, 3, 4, 2, 1]}


def _folder(root: Path, rows: list, kind: str = "regression") -> Path:
    (root / kind).mkdir(parents=True)
    (root / kind / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _run(tmp_path: Path, data: Path, *extra: str) -> str:
    result = runner.invoke(app, ["train-reward", "--config", "tiny/reward", "--data", str(data),
                                 "--out", str(tmp_path / "out"), *extra])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    return result.output


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    """Every case must fail before Ray starts: make starting it an error."""
    import steerray.runtime

    def refuse(*_a, **_k):
        raise AssertionError("Ray was started for input that should have been refused")

    monkeypatch.setattr(steerray.runtime, "init_ray", refuse)


def test_missing_data_folder(tmp_path):
    assert "does not exist" in _run(tmp_path, tmp_path / "nothing")


def test_folder_without_the_expected_files(tmp_path):
    data = _folder(tmp_path / "d", [ROW])
    out = _run(tmp_path, data, "--loss", "scaled_bt")
    assert "preference/train.jsonl not found" in out and "loss=regression" in out


def test_labels_of_the_wrong_length(tmp_path):
    data = _folder(tmp_path / "d", [{"text": "x", "label": [1, 2, 3, 4, 5]}] * 4)
    out = _run(tmp_path, data)
    assert "no usable row among 4" in out and "has 5 values, expected 9" in out


def test_unknown_model_name(tmp_path):
    data = _folder(tmp_path / "d", [ROW] * 16)
    out = _run(tmp_path, data, "model.name=no-such-model")
    assert "no-such-model" in out and "not an alias" in out


def test_attribute_count_that_does_not_match_the_start_model(tmp_path, tiny_model_dir):
    from steerray.models.reward import build_reward_model

    start = tmp_path / "start"
    build_reward_model(tiny_model_dir, ["helpfulness"]).save_pretrained(start)
    data = _folder(tmp_path / "d", [ROW] * 16)
    out = _run(tmp_path, data, "--init-from", str(start))
    assert "predicts ['helpfulness']" in out


def test_bradley_terry_needs_the_helpfulness_output(tmp_path):
    data = _folder(tmp_path / "d", [{"id": "a", "chosen": "x", "rejected": "y", "strength": 1}], "preference")
    out = _run(tmp_path, data, "--loss", "scaled_bt", "attributes=[quality]")
    assert "helpfulness" in out


def test_batch_that_does_not_split_over_workers(tmp_path):
    data = _folder(tmp_path / "d", [ROW] * 16)
    out = _run(tmp_path, data, "train.global_batch_size=6")
    assert "not a multiple" in out


def test_config_typo_is_named(tmp_path):
    data = _folder(tmp_path / "d", [ROW] * 16)
    out = _run(tmp_path, data, "train.max_stepz=3")
    assert "train.max_stepz: unknown key" in out
