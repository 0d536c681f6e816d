"""SFT examples: what is trained, as characters (``render_trained``) and as tokens (``tokenize_sft``).

One path from a conversation to training tensors, shared by ``render-sft`` and ``train-sft`` so what a
user sees is what the model learns:

1. :func:`render_trained` validates the conversation and renders it with the SteerLM template
   (``templates.render_sft``): ``{"text": str, "trained": [[start, end], ...]}``, character offsets of
   every span that carries loss (assistant responses with their newline, the ``<extra_id_1>`` that opens
   each later User turn, the final ``<extra_id_1>``; spec 6.2).
2. :func:`tokenize_sft` tokenizes the *whole* rendered string once with the fast tokenizer (no BOS/EOS,
   as the reference and the generation prompts), and maps character spans to tokens with the offset
   mapping. **Token rule:** a token carries loss iff its character range ``[start, end)`` overlaps a
   trained span by at least one character. A token that straddles a boundary, e.g. SmolLM2's ``"\\nĠ"``
   when a response starts with spaces right after the masked label line, holds characters of the
   response, so the model must learn to emit it: it is trained. Tokens with an empty range (added special
   tokens) never are.
3. Right truncation to ``max_length`` tokens (counted), then the next-token shift: ``input_ids = ids[:-1]``,
   ``labels = ids[1:]`` with :data:`IGNORE_INDEX` where the target token carries no loss. A row with no
   trained target left is ``untrained``: counted and skipped, never trained on.

Rows that fail validation (no assistant turn, unknown attribute, bad value, turns out of order, empty
response, malformed JSON) become rejects with the reason.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from steerray.attributes import restrict_label
from steerray.data.readers import decode_json
from steerray.errors import SteerrayError
from steerray.models.loading import load_tokenizer
from steerray.templates import Conversation, ConversationError, render_sft, validate_conversation

IGNORE_INDEX = -100  # a token label that carries no loss (HF / NeMo convention)
STATUS_OK, STATUS_REJECTED, STATUS_UNTRAINED = "ok", "rejected", "untrained"
SPLIT_FILES = ("train.jsonl", "val.jsonl")


class SFTDataError(SteerrayError, ValueError):
    """SFT data that cannot be used at all: missing files, or nothing trainable in them."""


# --------------------------------------------------------------------------------------------------
# Characters: what carries loss
# --------------------------------------------------------------------------------------------------

def render_trained(conversation: Conversation, label_attributes: Sequence[str] | None = None) -> dict[str, Any]:
    """``{"text", "trained": [[start, end], ...]}`` for a valid conversation; ConversationError otherwise.

    ``label_attributes``: keep only these attributes in every label line (a model steered by fewer
    attributes reads a shorter label; serving renders the same subset from the model's config).
    """
    validate_conversation(conversation)
    if label_attributes is not None:
        conversation = {**conversation, "conversations": [
            {**turn, "label": restrict_label(turn["label"], label_attributes)} if isinstance(turn.get("label"), str)
            else turn for turn in conversation["conversations"]]}
    rendered = render_sft(conversation)
    return {"text": rendered.text, "trained": [[start, end] for start, end in rendered.trained]}


def token_loss_mask(offsets: Sequence[Sequence[int]], trained: Sequence[Sequence[int]]) -> list[bool]:
    """Per token: does its character range overlap any trained span? (the rule in the module docstring)."""
    spans = sorted((int(s), int(e)) for s, e in trained if e > s)
    mask = []
    for start, end in offsets:
        mask.append(end > start and any(s < end and start < e for s, e in spans))
    return mask


def token_spans(offsets: Sequence[Sequence[int]], mask: Sequence[bool]) -> list[list[int]]:
    """Character spans covered by the trained tokens, adjacent tokens merged (what ``render-sft --model`` shows)."""
    spans: list[list[int]] = []
    for (start, end), on in zip(offsets, mask, strict=True):
        if not on:
            continue
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], int(end))
        else:
            spans.append([int(start), int(end)])
    return spans


# --------------------------------------------------------------------------------------------------
# Tokens: one example
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SFTExample:
    input_ids: list[int]  # ids[:-1] of the (truncated) rendered text
    labels: list[int]  # ids[1:], IGNORE_INDEX where the target carries no loss
    trained_tokens: int  # labels that carry loss
    truncated: bool  # the rendered text had more than max_length tokens
    full_length: int  # tokens before truncation


def tokenize_sft(rendered: Mapping[str, Any], tokenizer: Any, max_length: int) -> SFTExample:
    """Tokenize a :func:`render_trained` result once and build shifted, masked labels."""
    if max_length < 2:
        raise ValueError("max_length must be >= 2 (one input and one target token)")
    if not getattr(tokenizer, "is_fast", False):
        raise SFTDataError(f"{type(tokenizer).__name__} is a slow tokenizer: SFT masks need a fast tokenizer's "
                           "character offsets (tokenizer.json in the model folder)")
    encoded = tokenizer(rendered["text"], return_offsets_mapping=True, add_special_tokens=False)
    ids = list(encoded["input_ids"])
    mask = token_loss_mask(encoded["offset_mapping"], rendered["trained"])
    full_length = len(ids)
    ids, mask = ids[:max_length], mask[:max_length]
    labels = [token if on else IGNORE_INDEX for token, on in zip(ids[1:], mask[1:], strict=True)]
    trained = sum(1 for label in labels if label != IGNORE_INDEX)
    return SFTExample(ids[:-1], labels, trained, full_length > max_length, full_length)


def example_from_json(raw: str, tokenizer: Any, max_length: int,
                      label_attributes: Sequence[str] | None = None) -> tuple[str, str, SFTExample | None]:
    """``(status, reason, example)`` for one jsonl line: ok, rejected (with why) or untrained."""
    record, why = decode_json(raw)
    if why:
        return STATUS_REJECTED, why, None
    try:
        rendered = render_trained(record, label_attributes)
    except ConversationError as err:
        return STATUS_REJECTED, str(err), None
    example = tokenize_sft(rendered, tokenizer, max_length)
    if example.trained_tokens == 0:
        return STATUS_UNTRAINED, f"nothing trained within max_length={max_length} tokens " \
                                 f"(conversation has {example.full_length})", example
    return STATUS_OK, "", example


# --------------------------------------------------------------------------------------------------
# Batches: the Ray Data transform and the collate function
# --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def cached_tokenizer(source: str, trust_remote_code: bool = False) -> Any:
    """One tokenizer per process and model: Ray reuses worker processes across tasks."""
    return load_tokenizer(source, trust_remote_code=trust_remote_code)


def tokenize_rows(batch: Mapping[str, np.ndarray], *, tokenizer_source: str, max_length: int,
                  trust_remote_code: bool = False, label_attributes: Sequence[str] | None = None,
                  ) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: raw rows ``{file, line, raw, error}`` in, tokenized rows out.

    Output columns: ``file, line, status, reason, input_ids, labels, length, trained_tokens, truncated``
    (``input_ids``/``labels`` are empty for rejected rows), plus ``split`` when the input has it. A plain
    function (tasks, not an actor pool) so warm worker processes and their cached tokenizer are reused.
    """
    return tokenize_batch(batch, cached_tokenizer(tokenizer_source, trust_remote_code), max_length, label_attributes)


def tokenize_batch(batch: Mapping[str, Any], tokenizer: Any, max_length: int,
                   label_attributes: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Pure batch function behind :func:`tokenize_rows` (testable without Ray)."""
    out: dict[str, list[Any]] = {key: [] for key in (
        "file", "line", "status", "reason", "input_ids", "labels", "length", "trained_tokens", "truncated")}
    for i in range(len(batch["raw"])):
        error = str(batch["error"][i]) if "error" in batch else ""
        if error:
            status, reason, example = STATUS_REJECTED, error, None
        else:
            status, reason, example = example_from_json(str(batch["raw"][i]), tokenizer, max_length, label_attributes)
        out["file"].append(str(batch["file"][i]) if "file" in batch else "")
        out["line"].append(int(batch["line"][i]) if "line" in batch else i + 1)
        out["status"].append(status)
        out["reason"].append(reason)
        ids = example.input_ids if example and status == STATUS_OK else []
        labels = example.labels if example and status == STATUS_OK else []
        out["input_ids"].append(np.asarray(ids, dtype=np.int32))
        out["labels"].append(np.asarray(labels, dtype=np.int32))
        out["length"].append(len(ids))
        out["trained_tokens"].append(example.trained_tokens if example else 0)
        out["truncated"].append(bool(example.truncated) if example else False)
    result = {key: np.asarray(values) for key, values in out.items()
              if key not in ("input_ids", "labels")}
    if "split" in batch:
        result["split"] = np.asarray([str(value) for value in batch["split"]])
    for key in ("input_ids", "labels"):  # ragged: an object array of 1-D int arrays
        column = np.empty(len(out[key]), dtype=object)
        column[:] = out[key]
        result[key] = column
    return result


def tokenized_view(rendered: Mapping[str, Any], tokenizer: Any, max_length: int | None) -> dict[str, Any]:
    """What training really sees of a rendered conversation: trained spans snapped to whole tokens by the
    token rule, then right truncation to ``max_length`` tokens (``render-sft --model``)."""
    encoded = tokenizer(rendered["text"], return_offsets_mapping=True, add_special_tokens=False)
    offsets = encoded["offset_mapping"]
    mask = token_loss_mask(offsets, rendered["trained"])
    kept = len(offsets) if max_length is None else min(len(offsets), max_length)
    # The first token is never a target (next-token shift), so it can never carry loss.
    spans = token_spans(offsets[1:kept], mask[1:kept])
    cut = offsets[kept - 1][1] if kept < len(offsets) and kept > 0 else len(rendered["text"])
    return {"text": rendered["text"][:cut], "trained": spans, "tokens": len(offsets),
            "truncated": kept < len(offsets)}


COUNT_COLUMNS = ("file", "line", "split", "status", "reason", "truncated", "length")


def count_rows(batches: Iterable[Mapping[str, Any]]) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Counts per split and status (``train_ok``, ``val_rejected``, ``train_tokens``, ...) of tokenized rows,
    and one reject record (file, line, split, reason) per row that will not train, in file/line order."""
    counts: Counter = Counter()
    rejects = []
    for batch in batches:
        for file, line, split, status, reason, truncated, length in zip(*(batch[c] for c in COUNT_COLUMNS),
                                                                         strict=True):
            counts[f"{split}_{status}"] += 1
            counts[f"{split}_truncated"] += int(truncated)
            counts[f"{split}_tokens"] += int(length)
            if status != STATUS_OK:
                rejects.append({"kind": "rejected" if status == STATUS_REJECTED else "skipped", "file": str(file),
                                "line": int(line), "split": str(split), "reason": str(reason)})
    rejects.sort(key=lambda r: (r["file"], r["line"]))
    return dict(sorted(counts.items())), rejects


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SFTFiles:
    train: list[str]
    val: list[str]  # empty: carve the validation split out of train by val_fraction


def locate_sft_data(path: str | Path) -> SFTFiles:
    """A conversation jsonl file, or a folder with ``train.jsonl`` (+ ``val.jsonl``), or with them under
    ``conversations/`` (prepare's output). Errors say what was looked for."""
    location = Path(path).expanduser()
    if location.is_file():
        return SFTFiles([str(location)], [])
    if location.is_dir():
        for folder in (location, location / "conversations"):
            if (folder / "train.jsonl").is_file():
                val = folder / "val.jsonl"
                return SFTFiles([str(folder / "train.jsonl")], [str(val)] if val.is_file() else [])
        raise SFTDataError(f"{location}: folder has no train.jsonl (nor conversations/train.jsonl); pass a "
                           "conversation jsonl file or the output folder of `steerray annotate` / `prepare`")
    raise SFTDataError(f"{location}: no such file or folder")


def is_val_row(raw: str, val_fraction: float, seed: int) -> bool:
    """Stable split by content: identical lines (e.g. the reference's duplicated epochs) share a split."""
    if val_fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{raw.strip()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction
