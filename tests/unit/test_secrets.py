"""Secrets never reach a manifest: the recorded command line is redacted."""

from __future__ import annotations

from steerray.artifacts import redacted_command


def test_token_options_and_secret_environment_values_are_redacted(monkeypatch):
    monkeypatch.setenv("STEERRAY_API_TOKEN", "env-secret-123")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh")
    argv = ["steerray", "annotate", "--token", "cli-secret-456", "--token=other-secret",
            "--via", "http://127.0.0.1:8001/?t=env-secret-123", "out=runs/x", "--api-key", "k3y-s3cret"]
    command = redacted_command(argv)
    assert command == ("steerray annotate --token *** --token=*** --via http://127.0.0.1:8001/?t=*** out=runs/x "
                       "--api-key ***")
    for secret in ("cli-secret-456", "other-secret", "env-secret-123", "k3y-s3cret"):
        assert secret not in command


def test_short_or_unrelated_environment_values_stay(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # "TOKEN" in the name, but not a secret we hide
    assert redacted_command(["steerray", "train-sft", "logging.progress_bar=false"]) == \
        "steerray train-sft logging.progress_bar=false"
