"""The whole loop through the real CLI on the tiny preset: interrupted mid-stage, resumed, then all skipped;
and run from an empty folder with a relative run name, as a new user runs it.

Each `steerray pipeline` run is its own process (its own embedded Ray), as a user runs it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from steerray.cli import app
from steerray.stages import PIPELINE_STAGES

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# The stages the tiny preset runs (bootstrap included); every other pipeline stage is switched off there
# (evaluate_reward, for one, needs RewardBench files).
TINY_STAGES = ("prepare", "reward", "annotate", "sft", "bootstrap", "evaluate")
TINY_OFF = {stage: "disabled" for stage in PIPELINE_STAGES if stage not in TINY_STAGES}
ALL_SKIPPED = {**{stage: "skipped" for stage in TINY_STAGES}, **TINY_OFF}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "RAY_AUTH_MODE": "disabled",
       "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}


def _command(runs: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "steerray.cli", "pipeline", "--config", "tiny", f"runs_dir={runs}", *extra]


def _summary(runs: Path, run: str = "tiny") -> dict[str, str]:
    summary = json.loads((runs / run / "summary.json").read_text())
    # the box's matmul speed, at the start and the end, stands beside the run's times
    assert all(summary["box"][when][f"matmul_gflops_{p}"] > 0 for when in ("at_start", "at_end") for p in ("fp32", "bf16"))
    return {stage["name"]: stage["action"] for stage in summary["stages"]}


def test_bad_configs_fail_before_anything_starts(tmp_path):
    runner = CliRunner()
    for override, expected in (("reward.preset=tiny/nope", "does not exist"),
                               ("sft.model.name=/nowhere/model", "/nowhere/model"),
                               ("evaluate.steerability.attributes=[loudness]", "unknown attribute"),
                               ("prepare.sources=[oasst1=/nowhere/oasst.jsonl]", "does not exist")):
        result = runner.invoke(app, ["pipeline", "--config", "tiny/pipeline", f"runs_dir={tmp_path}", override])
        assert result.exit_code == 2, (override, result.output)
        assert expected in result.output and "nothing was started" in result.output, result.output
    assert not any(tmp_path.iterdir())  # not even a run folder


def _start_and_interrupt_in_sft(runs: Path) -> subprocess.CompletedProcess:
    """Run the pipeline and press Ctrl-C once the SFT stage has started training."""
    log = runs.parent / "run1.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_command(runs), cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        marker = runs / "tiny" / "sft" / "checkpoints"
        deadline = time.time() + 400
        while proc.poll() is None and not marker.exists() and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("the pipeline did not stop on Ctrl-C within 2 minutes")
    return subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(), "")


def test_tiny_pipeline_interrupted_resumed_and_skipped(tmp_path):
    runs = tmp_path / "runs"
    first = _start_and_interrupt_in_sft(runs)
    assert first.returncode != 0, first.stdout[-3000:]
    assert "resume with:" in first.stdout, first.stdout[-3000:]
    root = runs / "tiny"
    for stage in ("prepare", "reward", "annotate"):
        assert (root / stage / "manifest.json").is_file(), stage
    assert not (root / "sft" / "manifest.json").exists()
    assert _summary(runs)["sft"] == "interrupted"

    started = time.time()
    second = subprocess.run(_command(runs), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-4000:]
    assert _summary(runs) == {"prepare": "skipped", "reward": "skipped", "annotate": "skipped",
                              "sft": "resumed", "bootstrap": "ran", "evaluate": "ran", **TINY_OFF}
    print(f"resumed run: {time.time() - started:.0f} s")

    # the report: self-contained, with the steerability numbers and plots
    page = (root / "evaluate" / "report.html").read_text()
    assert len(re.findall(r'src="data:image/png;base64,', page)) >= 4
    results = json.loads((root / "evaluate" / "eval.json").read_text())
    assert set(results["steerability"]["per_attribute"]) == {"verbosity", "humor"}
    assert results["steerability"]["rows"] == 2 * 2 * 3
    assert results["reward"]["regression"]["n_rows"] > 0
    assert results["bootstrap"]["rounds"][0]["samples"] == 12
    # bootstrapping fine-tuned again and evaluation used that model
    assert (root / "bootstrap" / "model" / "config.json").is_file()
    assert json.loads((root / "evaluate" / "manifest.json").read_text())["config"]["policy"] == str(root / "bootstrap" / "model")
    assert f"steerray serve --model {root / 'bootstrap' / 'model'}" in second.stderr

    started = time.time()
    third = subprocess.run(_command(runs), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr[-3000:]
    assert _summary(runs) == ALL_SKIPPED
    assert time.time() - started < 30  # nothing runs, Ray does not even start


def test_relative_run_name_from_an_empty_folder(tmp_path):
    """`steerray pipeline --config tiny --run NAME` in a fresh folder: outputs under ./runs/NAME, every stage
    (bootstrap too: the tiny preset enables it) finishes, and the same command again skips them all."""
    work = tmp_path / "work"
    work.mkdir()
    command = [sys.executable, "-m", "steerray.cli", "pipeline", "--config", "tiny", "--run", "rel"]
    first = subprocess.run(command, cwd=work, env=ENV, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    root = work / "runs" / "rel"
    assert sorted(p.name for p in work.iterdir()) == ["runs"]  # nothing written outside the run folder
    assert _summary(work / "runs", "rel") == {**{stage: "ran" for stage in TINY_STAGES}, **TINY_OFF}
    for stage in TINY_STAGES:
        manifest = json.loads((root / stage / "manifest.json").read_text())
        assert manifest["stage"] == stage, stage
    # paths were resolved against the working folder, so the recorded config works from anywhere
    assert json.loads((root / "evaluate" / "manifest.json").read_text())["config"]["policy"] == str(
        root / "bootstrap" / "model")
    assert (root / "bootstrap" / "model" / "config.json").is_file()

    started = time.time()
    second = subprocess.run(command, cwd=work, env=ENV, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-3000:]
    assert _summary(work / "runs", "rel") == ALL_SKIPPED
    assert time.time() - started < 30  # nothing runs, Ray does not even start
