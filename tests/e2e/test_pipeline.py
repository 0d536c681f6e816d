"""`steerray pipeline` refuses a bad config before anything starts, naming the key, and writes nothing.

(The whole loop through the installed CLI, interrupted, resumed and skipped: tests/e2e/test_installed.py.)
"""

from __future__ import annotations

from typer.testing import CliRunner

from steerray.cli import app


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
