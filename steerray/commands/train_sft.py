"""`steerray train-sft` (attribute-conditioned SFT as a Ray job) and `steerray render-sft` (what is trained)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from steerray.commands.common import ADDRESS_HELP, OVERRIDES_HELP, echo, fail, resolve_stage_config, run_stage
from steerray.config import SFTConfig
from steerray.data.sft import SFTDataError, locate_sft_data, render_trained, token_loss_mask, token_spans
from steerray.templates import ConversationError

# How trained text is marked for a terminal (colour) and for pipes and files (brackets).
OPEN_MARK, CLOSE_MARK = "⟦", "⟧"


def train_sft(
    config: str | None = typer.Option(None, "--config", "-c", help="YAML preset (e.g. jobs/configs/demo/sft.yaml)."),
    data: str | None = typer.Option(None, "--data", "-d", help="Conversation jsonl, or a folder with "
                                       "train.jsonl (+ val.jsonl): the annotate or prepare output."),
    out: str | None = typer.Option(None, "--out", "-o", help="Output folder (model/, metrics, samples)."),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Fine-tune a causal LM on labelled conversations (answer-only loss), export it to OUT/model/."""
    resolved = resolve_stage_config(SFTConfig, config, overrides, data=data, out=out)
    try:
        locate_sft_data(resolved.data)  # a wrong path fails here, before Ray starts
    except SFTDataError as err:
        fail(str(err))
    summary = run_stage("train_sft", resolved, resolved.out, address)
    if isinstance(summary, dict):
        echo(f"[train-sft] done: {summary.get('steps')} steps, val loss {summary.get('val_loss_first')} -> "
             f"{summary.get('val_loss')}; model in {summary.get('model')}; samples in {summary.get('samples')}")


def _input_lines(path: str) -> Iterator[tuple[str, int, str]]:
    """(file, line number, text) of every non-blank line: a jsonl file, or a folder's train.jsonl/val.jsonl."""
    try:
        files = locate_sft_data(path)
    except SFTDataError as err:
        fail(str(err))
        return
    for file in files.train + files.val:
        with open(file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield file, number, line


def _tokenized_view(rendered: dict[str, Any], tokenizer: Any, max_length: int | None) -> dict[str, Any]:
    """The spans the tokens carry after the token rule and right truncation (what training really sees)."""
    encoded = tokenizer(rendered["text"], return_offsets_mapping=True, add_special_tokens=False)
    offsets = encoded["offset_mapping"]
    mask = token_loss_mask(offsets, rendered["trained"])
    kept = len(offsets) if max_length is None else min(len(offsets), max_length)
    # The first token is never a target (next-token shift), so it can never carry loss.
    spans = token_spans(offsets[1:kept], mask[1:kept])
    cut = offsets[kept - 1][1] if kept < len(offsets) and kept > 0 else len(rendered["text"])
    return {"text": rendered["text"][:cut], "trained": spans, "tokens": len(offsets),
            "truncated": kept < len(offsets)}


def marked_text(text: str, trained: list[list[int]], colour: bool) -> str:
    """``text`` with trained spans wrapped in brackets, or shown green on a terminal."""
    merged: list[list[int]] = []
    for start, end in trained:  # adjacent spans (a response and its turn-end marker) read as one
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    parts, position = [], 0
    for start, end in merged:
        parts.append(text[position:start])
        piece = text[start:end]
        parts.append(typer.style(piece, fg=typer.colors.GREEN, bold=True, underline=True) if colour
                     else f"{OPEN_MARK}{piece}{CLOSE_MARK}")
        position = end
    parts.append(text[position:])
    return "".join(parts)


def render_sft_command(
    input: str = typer.Option(..., "--input", "-i", help="Conversation jsonl file (or a folder with train.jsonl)."),
    limit: int | None = typer.Option(None, "--limit", "-n", min=1, help="Show at most N conversations."),
    as_json: bool = typer.Option(False, "--json", help='One {"text", "trained": [[start, end], ...]} per line.'),
    model: str | None = typer.Option(None, "--model", help="Also apply this model's tokenizer: trained spans "
                                        "snap to token boundaries, as training sees them."),
    max_length: int | None = typer.Option(None, "--max-length", min=2, help="With --model: right-truncate "
                                             "to this many tokens, as training does."),
    label_attributes: str | None = typer.Option(None, "--label-attributes", help="Comma-separated: keep only "
                                                "these attributes in label lines, as train-sft's label_attributes."),
) -> None:
    """Show exactly what SFT trains on: each conversation rendered, the parts that carry loss marked."""
    from steerray.attributes import LabelError, check_label_attributes

    try:
        keep = check_label_attributes(label_attributes.split(",")) if label_attributes else None
    except LabelError as err:
        fail(f"--label-attributes: {err}")
    tokenizer = None
    if model is not None:
        from steerray.models.loading import load_tokenizer

        tokenizer = load_tokenizer(model)
    elif max_length is not None:
        fail("--max-length needs --model (truncation counts tokens)")
    colour = sys.stdout.isatty() and not as_json
    shown = rejected = 0
    if not as_json:
        legend = "green" if colour else f"{OPEN_MARK}...{CLOSE_MARK}"
        print(f"# trained text is marked {legend}; everything else is context without loss")
    for file, number, line in _input_lines(input):
        if limit is not None and shown >= limit:
            break
        try:
            rendered = render_trained(json.loads(line), keep)
        except json.JSONDecodeError as err:
            rejected += 1
            echo(f"{file}:{number}: rejected: malformed JSON: {err.msg} at column {err.colno}")
            continue
        except ConversationError as err:
            rejected += 1
            echo(f"{file}:{number}: rejected: {err}")
            continue
        view = _tokenized_view(rendered, tokenizer, max_length) if tokenizer is not None else rendered
        shown += 1
        if as_json:
            print(json.dumps({"text": view["text"], "trained": view["trained"]}, ensure_ascii=False))
            continue
        chars = sum(end - start for start, end in view["trained"])
        extra = f", {view['tokens']} tokens" + (" (truncated)" if view["truncated"] else "") if tokenizer else ""
        print(f"\n# {Path(file).name}:{number}: {chars} trained characters in {len(view['trained'])} spans{extra}")
        print(marked_text(view["text"], view["trained"], colour).rstrip("\n"))
        if tokenizer is not None and view["truncated"]:
            print(f"# ... cut here: right truncation to {max_length} tokens")
        if not view["trained"]:
            print("# nothing carries loss: training counts this conversation and skips it")
    if shown == 0 and rejected:
        fail(f"every conversation in {input} was rejected ({rejected}); see the reasons above", code=1)
    if rejected:
        echo(f"# {rejected} conversation(s) rejected (reasons above)")


def register(app: typer.Typer) -> None:
    app.command("train-sft")(train_sft)
    app.command("render-sft")(render_sft_command)
