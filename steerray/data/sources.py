"""The data sources ``prepare`` knows, and the pure functions that turn their rows into SteerLM records.

Every converter takes one decoded row (plus where it came from) and returns output rows of one shape::

    {"source", "kind", "split", "group", "file", "line", "payload"}

``kind`` is ``conversation`` | ``regression`` | ``preference`` | ``reject`` | ``skip``; ``payload`` is the
record as JSON text; ``split`` is ``train``/``val`` when the source decides it, else ``""`` (then a
seeded hash of ``group`` decides, so rows that must stay together, such as one OASST tree or one
HelpSteer prompt, land in the same split). ``reject`` rows are bad input; ``skip`` rows are dropped by
design (deleted OASST messages, prompts with no reply). Both are counted and written to rejects.jsonl.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from steerray.attributes import HELPSTEER_ATTRIBUTES, OASST_ATTRIBUTES, LabelError, encode_label, label_vector
from steerray.errors import SteerrayError
from steerray.templates import (
    ASSISTANT_ROLE,
    SYSTEM_PROMPT,
    USER_ROLE,
    ConversationError,
    make_conversation,
    reward_prompts,
    validate_conversation,
)

# name -> (default hub location, hub file patterns)
SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "helpsteer": ("nvidia/HelpSteer", ("*.jsonl.gz",)),
    "helpsteer2": ("nvidia/HelpSteer2", ("train.jsonl.gz", "validation.jsonl.gz")),
    "helpsteer2-helpfulness": ("nvidia/HelpSteer2", ("train.jsonl.gz", "validation.jsonl.gz")),
    "helpsteer2-preference": ("nvidia/HelpSteer2", ("preference/preference.jsonl.gz",)),
    "oasst1": ("OpenAssistant/oasst1", ("data/*.parquet",)),
    "conversations": ("", ()),
    "demo": ("", ()),
}
HELPSTEER_COLUMNS = ("prompt", "response", *HELPSTEER_ATTRIBUTES)
PREFERENCE_REQUIRED = ("prompt", "response_1", "response_2", "preference_strength")
PREFERENCE_OPTIONAL = ("split", "preference_statement", "preference_elaboration")
OASST_ROLES = {"prompter": USER_ROLE, "assistant": ASSISTANT_ROLE}
LIKERT_MAX = 4  # OASST labels are 0-1; the reference maps them to 0-4 with value * (5 - 1)


class SourceError(SteerrayError, ValueError):
    """An unknown source name or a malformed --source argument."""


class RowError(ValueError):
    """Why one row cannot be used; becomes a reject with this message."""


@dataclass(frozen=True)
class SourceSpec:
    name: str
    location: str  # local path, hub id or hf:// path; "" = the public default (or built in)

    @classmethod
    def parse(cls, text: str) -> SourceSpec:
        name, _, location = text.partition("=")
        name, location = name.strip(), location.strip()
        if name not in SOURCES:
            raise SourceError(f"unknown source {name!r}; known sources: {', '.join(SOURCES)}")
        if name == "conversations" and not location:
            raise SourceError("source 'conversations' needs a location: --source conversations=PATH")
        if name == "demo" and location:
            raise SourceError("source 'demo' is built in and takes no location")
        return cls(name, location)


def out_row(source: str, kind: str, payload: Any, *, split: str = "", group: str = "", file: str = "",
            line: int = 0) -> dict[str, Any]:
    return {"source": source, "kind": kind, "split": split, "group": group, "file": file, "line": line,
            "payload": json.dumps(payload, ensure_ascii=False), "counts_input": 0}


def reject_row(source: str, file: str, line: int, reason: str, record: Any = None, kind: str = "reject") -> dict:
    return out_row(source, kind, {"source": source, "file": file, "line": line, "reason": reason,
                                  "row": record}, file=file, line=line)


def conversation_rows(source: str, conversation: dict[str, Any], *, split: str, group: str, file: str,
                      line: int) -> list[dict[str, Any]]:
    """A conversation plus one regression record per labelled assistant turn (NeMo's converter)."""
    rows = [out_row(source, "conversation", conversation, split=split, group=group, file=file, line=line)]
    for prompt in reward_prompts(conversation, labelled_only=True):
        rows.append(out_row(source, "regression", {"text": prompt.text, "label": label_vector(prompt.label)},
                            split=split, group=group, file=file, line=line))
    return rows


# --------------------------------------------------------------------------------------------------
# HelpSteer / HelpSteer2 (one prompt-response pair per row, 5 attributes 0-4)
# --------------------------------------------------------------------------------------------------

def _score(record: Mapping[str, Any], name: str) -> int:
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        raise RowError(f"column {name!r} must be an integer 0-4, got {value!r}")
    if not 0 <= value <= 4:
        raise RowError(f"column {name!r} = {value} is outside 0-4")
    return int(value)


def _text(record: Mapping[str, Any], name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise RowError(f"column {name!r} is empty or not a string")
    return value


def _check_columns(record: Any, required: Iterable[str], optional: Iterable[str] = ()) -> None:
    if not isinstance(record, dict):
        raise RowError(f"row must be a JSON object, got {type(record).__name__}")
    required = list(required)
    missing = [c for c in required if c not in record]
    if missing:
        raise RowError(f"missing column(s): {', '.join(missing)}")
    extra = sorted(set(record) - set(required) - set(optional))
    if extra:
        raise RowError(f"unexpected column(s): {', '.join(extra)}")


def convert_helpsteer(source: str, record: Any, *, file: str, line: int, split: str) -> list[dict[str, Any]]:
    _check_columns(record, HELPSTEER_COLUMNS)
    prompt, response = _text(record, "prompt"), _text(record, "response")
    scores = {name: _score(record, name) for name in HELPSTEER_ATTRIBUTES}
    if source == "helpsteer2-helpfulness":
        scores = {"helpfulness": scores["helpfulness"]}
    conversation = make_conversation([(USER_ROLE, prompt, None), (ASSISTANT_ROLE, response, encode_label(scores))])
    return conversation_rows(source, conversation, split=split, group=prompt, file=file, line=line)


def convert_preference(source: str, record: Any, *, file: str, line: int, split: str) -> list[dict[str, Any]]:
    """One explicit pair per row: ``{"id", "chosen", "rejected", "strength"}`` (strength >= 0; 0 = tie).

    The sign convention is HelpSteer2-Preference's: negative -> response_1 preferred, positive ->
    response_2 preferred. Pairs never depend on file adjacency downstream.
    """
    _check_columns(record, PREFERENCE_REQUIRED, PREFERENCE_OPTIONAL)
    prompt = _text(record, "prompt")
    first, second = _text(record, "response_1"), _text(record, "response_2")
    raw = record["preference_strength"]
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or float(raw) != int(raw) or not -3 <= raw <= 3:
        raise RowError(f"column 'preference_strength' must be an integer -3..3, got {raw!r}")
    strength = int(raw)
    row_split = record.get("split")
    if row_split is not None:
        split = "train" if row_split == "train" else "val"

    def text(response: str) -> str:
        conversation = make_conversation([(USER_ROLE, prompt, None), (ASSISTANT_ROLE, response, "")])
        return reward_prompts(conversation, labelled_only=False)[0].text

    chosen, rejected = (first, second) if strength < 0 else (second, first)
    pair = {"id": f"{file.rsplit('/', 1)[-1]}:{line}", "chosen": text(chosen), "rejected": text(rejected),
            "strength": float(abs(strength))}
    return [out_row(source, "preference", pair, split=split, group=prompt, file=file, line=line)]


# --------------------------------------------------------------------------------------------------
# Ready-made SteerLM conversations
# --------------------------------------------------------------------------------------------------

def convert_conversation(source: str, record: Any, *, file: str, line: int, split: str) -> list[dict[str, Any]]:
    try:
        validate_conversation(record)
    except ConversationError as err:
        raise RowError(str(err)) from None
    group = record.get("id") or "".join(t["value"] for t in record["conversations"])
    return conversation_rows(source, dict(record), split=split, group=str(group), file=file, line=line)


# --------------------------------------------------------------------------------------------------
# OpenAssistant oasst1: flat message rows (hub parquet) or the nested trees dump
# --------------------------------------------------------------------------------------------------

def oasst_label(labels: Any) -> str | None:
    """OASST labels (flat ``{name[], value[]}`` or trees-dump ``{name: {value}}``) -> 0-4 label string.

    None when the message has no labels at all (such turns stay unlabelled), "" when it has labels but
    none of quality/toxicity/humor/creativity. Values are scaled by 4 and banker's-rounded, as the
    reference does; toxicity keeps "higher = more toxic".
    """
    if not labels:
        return None
    if isinstance(labels.get("name"), list):
        values = dict(zip(labels["name"], labels.get("value") or [], strict=False))  # lenient: a short list drops names
    else:
        values = {name: entry.get("value") if isinstance(entry, dict) else entry for name, entry in labels.items()}
    scaled = {}
    for name in OASST_ATTRIBUTES:
        value = values.get(name)
        if value is not None:
            if not 0 <= float(value) <= 1:
                raise RowError(f"OASST label {name!r} = {value} is outside 0-1")
            scaled[name] = round(float(value) * LIKERT_MAX)
    return encode_label(scaled)


def oasst_message_key(source: str, record: Any, *, file: str, line: int, split: str) -> list[dict[str, Any]]:
    """First pass for flat rows: key each message by its tree, so a group-by gathers whole trees.

    A trees-dump row is a whole tree already and is expanded at once.
    """
    if isinstance(record, dict) and isinstance(record.get("prompt"), dict):
        return expand_oasst_tree(source, record["prompt"], record.get("message_tree_id") or
                                 record["prompt"].get("message_id", f"line{line}"), split=split, file=file,
                                 line=line)
    _check_columns(record, ("message_id", "parent_id", "text", "role", "message_tree_id"), optional=record.keys()
                   if isinstance(record, dict) else ())
    message = {"file": file, "line": line, "record": record}
    return [out_row(source, "oasst_message", message, split=split, group=str(record["message_tree_id"]),
                    file=file, line=line)]


def expand_oasst_messages(source: str, messages: list[dict[str, Any]], tree_id: str, split: str) -> list[dict]:
    """Second pass for flat rows: rebuild one tree from its messages and expand it.

    Messages that cannot be reached from the tree's single root (a missing parent or root) are
    rejected one by one, so every input message is accounted for.
    """
    by_id = {m["record"]["message_id"]: m for m in messages}
    children: dict[str, list[dict[str, Any]]] = {}
    roots = []
    for m in sorted(messages, key=lambda m: (m["file"], m["line"])):
        parent = m["record"].get("parent_id")
        if parent is None:
            roots.append(m)
        else:
            children.setdefault(parent, []).append(m)

    def nested(m: dict[str, Any]) -> dict[str, Any]:
        node = dict(m["record"])
        node["_where"] = (m["file"], m["line"])
        node["replies"] = [nested(c) for c in children.get(m["record"]["message_id"], [])]
        return node

    rows: list[dict[str, Any]] = []
    reachable: set[str] = set()
    if len(roots) == 1:
        tree = nested(roots[0])
        reachable = _subtree_ids(tree)
        rows += expand_oasst_tree(source, tree, tree_id, split=split, file=roots[0]["file"], line=roots[0]["line"])
    for m in sorted(messages, key=lambda m: (m["file"], m["line"])):
        if m["record"]["message_id"] in reachable:
            continue
        why = (f"tree {tree_id} has {len(roots)} root messages" if len(roots) != 1 else
               f"not connected to the root of tree {tree_id} (parent {m['record'].get('parent_id')} missing)")
        if m["record"].get("parent_id") is not None and m["record"]["parent_id"] not in by_id:
            why = f"parent message {m['record']['parent_id']} not found in tree {tree_id}"
        rows.append(reject_row(source, m["file"], m["line"], why, {"message_id": m["record"]["message_id"]}))
    return rows


def _subtree_ids(node: dict[str, Any]) -> set[str]:
    ids = {node.get("message_id")}
    for reply in node.get("replies") or []:
        ids |= _subtree_ids(reply)
    return ids


def expand_oasst_tree(source: str, root: dict[str, Any], tree_id: str, *, split: str, file: str,
                      line: int) -> list[dict[str, Any]]:
    """Every root-to-leaf path of non-deleted messages becomes one conversation (length >= 2)."""
    rows: list[dict[str, Any]] = []
    paths: list[list[dict[str, Any]]] = []

    def where(node: dict[str, Any]) -> tuple[str, int]:
        return tuple(node.get("_where") or (file, line))  # type: ignore[return-value]

    def skip_subtree(node: dict[str, Any], reason: str) -> None:
        f, ln = where(node)
        rows.append(reject_row(source, f, ln, reason, {"message_id": node.get("message_id")}, kind="skip"))
        for reply in node.get("replies") or []:
            skip_subtree(reply, "reply to a deleted message")

    def walk(node: dict[str, Any], path: list[dict[str, Any]]) -> None:
        if node.get("deleted"):
            skip_subtree(node, "deleted message")
            return
        path = path + [node]
        replies = node.get("replies") or []
        for reply in replies:
            walk(reply, path)
        if not any(not r.get("deleted") for r in replies):
            paths.append(path)

    walk(root, [])
    for path in paths:
        if len(path) < 2:
            f, ln = where(path[0])
            rows.append(reject_row(source, f, ln, "prompt without any reply", {"message_id": path[0].get("message_id")},
                                   kind="skip"))
            continue
        try:
            conversation = _oasst_path_conversation(path)
        except RowError as err:
            f, ln = where(path[-1])
            rows.append(reject_row(source, f, ln, str(err), {"message_id": path[-1].get("message_id")}))
            continue
        conversation["id"] = f"oasst:{path[-1].get('message_id')}"
        rows += conversation_rows(source, conversation, split=split, group=tree_id, file=file, line=line)
    return rows


def _oasst_path_conversation(path: list[dict[str, Any]]) -> dict[str, Any]:
    turns = []
    for node in path:
        role = OASST_ROLES.get(node.get("role"))
        if role is None:
            raise RowError(f"message {node.get('message_id')} has unknown role {node.get('role')!r}")
        text = node.get("text")
        if not isinstance(text, str) or not text.strip():
            raise RowError(f"message {node.get('message_id')} has empty text")
        label = oasst_label(node.get("labels")) if role == ASSISTANT_ROLE else None
        turns.append({"from": role, "value": text, "label": label, "_has_labels": node.get("labels") is not None})
    conversation = {"system": SYSTEM_PROMPT, "mask": USER_ROLE, "type": "VALUE_TO_TEXT", "conversations": []}
    for turn in turns:
        entry = {"from": turn["from"], "value": turn["value"]}
        # Unlabelled assistant messages carry no label key at all (the reference's distinction).
        if turn["from"] == USER_ROLE or turn["_has_labels"]:
            entry["label"] = turn["label"]
        conversation["conversations"].append(entry)
    try:
        validate_conversation(conversation)
    except ConversationError as err:
        raise RowError(str(err)) from None
    return conversation


CONVERTERS = {
    "helpsteer": convert_helpsteer,
    "helpsteer2": convert_helpsteer,
    "helpsteer2-helpfulness": convert_helpsteer,
    "helpsteer2-preference": convert_preference,
    "oasst1": oasst_message_key,
    "conversations": convert_conversation,
    "demo": convert_conversation,
}


def convert_raw_row(source: str, raw_row: Mapping[str, Any], split: str) -> list[dict[str, Any]]:
    """Decode one raw row and run its source's converter; every failure becomes a reject row."""
    from steerray.data.readers import decode_raw

    file, line = raw_row["file"], int(raw_row["line"])
    record, error = decode_raw(dict(raw_row))
    if error:
        rows = [reject_row(source, file, line, error, raw_row["raw"][:2000] or None)]
    else:
        try:
            rows = CONVERTERS[source](source, record, file=file, line=line, split=split)
        except (RowError, LabelError) as err:
            rows = [reject_row(source, file, line, str(err), record)]
        except (KeyError, TypeError, AttributeError, ValueError) as err:  # shapes no check anticipated
            rows = [reject_row(source, file, line, f"unusable row ({type(err).__name__}: {err})", record)]
    rows[0]["counts_input"] = 1  # lets the writer count input rows without remembering them
    return rows
