"""`steerray render-sft`: shows exactly what training trains on (same functions), in-process CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from steerray.cli import app
from steerray.data.sft import IGNORE_INDEX, render_trained, tokenize_sft
from steerray.templates import make_conversation

SYSTEM = "Be brief."


def conversations() -> list[dict]:
    return [
        make_conversation([("User", "Hi", None), ("Assistant", "Hello!", "verbosity:0")], system=SYSTEM),
        make_conversation([("User", "Hi", None), ("Assistant", "Hello!", "verbosity:0"), ("User", "Why?", None),
                           ("Assistant", "Because.", "verbosity:4")], system=SYSTEM),
    ]


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "conv.jsonl"
    lines = [json.dumps(c) for c in conversations()]
    lines.insert(1, '{"conversations": [{"from": "User", "value": "no answer"}]}')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run(*args: str):
    return CliRunner().invoke(app, ["render-sft", *args])


def test_json_output_is_the_training_function(data_file):
    result = run("--input", str(data_file), "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows == [render_trained(c) for c in conversations()]
    assert rows[0]["trained"] == [[95, 102], [102, 114]]
    assert "conv.jsonl:2: rejected: conversation has no Assistant turn" in result.stderr


def test_marked_text_and_limit(data_file):
    result = run("--input", str(data_file), "--limit", "1")
    assert result.exit_code == 0, result.output
    assert "<extra_id_2>verbosity:0\n⟦Hello!\n<extra_id_1>⟧" in result.stdout  # adjacent spans read as one
    assert "Because" not in result.stdout  # --limit 1 stops after the first shown conversation


def test_token_view_matches_training_labels(data_file, tiny_model_dir):
    from steerray.models.loading import load_tokenizer

    result = run("--input", str(data_file), "--json", "--model", tiny_model_dir, "--max-length", "84")
    assert result.exit_code == 0, result.output
    shown = [json.loads(line) for line in result.stdout.splitlines()]
    tokenizer = load_tokenizer(tiny_model_dir)
    for view, conversation in zip(shown, conversations(), strict=True):
        rendered = render_trained(conversation)
        example = tokenize_sft(rendered, tokenizer, max_length=84)
        offsets = tokenizer(rendered["text"], return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        # Characters of the tokens training takes loss on (label position t is token t + 1) ...
        trained_chars = {c for t, label in enumerate(example.labels) if label != IGNORE_INDEX
                         for c in range(*offsets[t + 1])}
        shown_chars = {c for start, end in view["trained"] for c in range(start, end)}
        assert shown_chars == trained_chars  # ... are exactly the characters render-sft marks
    assert shown[1]["text"].endswith("Because")  # cut at 84 tokens: the rest is not trained
    assert len(shown[1]["text"]) < len(render_trained(conversations()[1])["text"])


def test_only_bad_rows_fail(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"conversations": []}\nnot json\n', encoding="utf-8")
    result = run("--input", str(path))
    assert result.exit_code == 1
    assert "every conversation" in result.stderr and "malformed JSON" in result.stderr


def test_missing_input():
    result = run("--input", "/nonexistent/conv.jsonl")
    assert result.exit_code == 2 and "no such file" in result.stderr


def test_label_attributes_shorten_the_label_line(tmp_path):
    conversation = make_conversation([("User", "Hi", None), ("Assistant", "Hello!", "humor:1,complexity:2,verbosity:0")])
    rendered = render_trained(conversation, ("verbosity",))
    assert "<extra_id_2>verbosity:0\nHello!\n" in rendered["text"] and "humor" not in rendered["text"]
    assert [rendered["text"][a:b] for a, b in rendered["trained"]] == ["Hello!\n", "<extra_id_1>"]
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(conversation) + "\n", encoding="utf-8")
    shown = run("--input", str(path), "--json", "--label-attributes", "verbosity")
    assert shown.exit_code == 0 and json.loads(shown.output.splitlines()[-1]) == rendered
    bad = run("--input", str(path), "--label-attributes", "verbosity,wit")
    assert bad.exit_code != 0 and "--label-attributes" in bad.output and "'wit'" in bad.output
