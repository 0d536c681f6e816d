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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from steerray.attributes import HELPSTEER_ATTRIBUTES, OASST_ATTRIBUTES, LabelError, encode_label, label_vector
from steerray.data.readers import decode_raw
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
    "helpsteer3": ("nvidia/HelpSteer3", ("preference/train.jsonl.gz", "preference/validation.jsonl.gz")),
    "oasst1": ("OpenAssistant/oasst1", ("data/*.parquet",)),
    "conversations": ("", ()),
    "demo": ("", ()),
}
HELPSTEER_COLUMNS = ("prompt", "response", *HELPSTEER_ATTRIBUTES)
PREFERENCE_REQUIRED = ("prompt", "response_1", "response_2", "preference_strength")
PREFERENCE_OPTIONAL = ("split", "preference_statement", "preference_elaboration")
HELPSTEER3_REQUIRED = ("domain", "language", "context", "response1", "response2", "overall_preference")
HELPSTEER3_OPTIONAL = ("individual_preference",)
CONTEXT_ROLES = {"user": USER_ROLE, "assistant": ASSISTANT_ROLE}
# Columns ``--filter`` may select on, per source (the values are compared case-insensitively).
FILTER_COLUMNS: dict[str, tuple[str, ...]] = {"helpsteer3": ("domain", "language")}
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


@dataclass(frozen=True)
class RowFilter:
    """A row selection such as ``domain=code,language=python|javascript_html_css``.

    Items are ``column=value``; several values of one column (``a|b``, or the column repeated) are
    alternatives, different columns must all match. Values compare case-insensitively.
    """

    text: str
    allowed: tuple[tuple[str, frozenset[str]], ...]

    def mismatch(self, record: Mapping[str, Any]) -> str | None:
        """Why ``record`` is not selected (the skip reason), or None when it is."""
        for column, values in self.allowed:
            value = record.get(column)
            if not isinstance(value, str) or value.strip().casefold() not in values:
                return f"not selected by --filter {self.text}: {column}={value!r}"
        return None

    def __call__(self, record: Mapping[str, Any]) -> bool:
        return self.mismatch(record) is None


def parse_row_filter(text: str, columns: Sequence[str] | None = None) -> RowFilter:
    """Parse ``--filter`` text into a :class:`RowFilter`; ``columns`` limits what may be filtered on.

    >>> parse_row_filter("domain=code,language=english")({"domain": "Code", "language": "english"})
    True
    """
    if not isinstance(text, str) or not text.strip():
        raise SourceError("--filter is empty; expected column=value[,column=value...], e.g. domain=code")
    allowed: dict[str, set[str]] = {}
    for item in text.split(","):
        column, sep, values = item.partition("=")
        column = column.strip()
        options = {v.strip().casefold() for v in values.split("|")}
        if not sep or not column or "" in options:
            raise SourceError(f"--filter item {item.strip()!r} is not column=value (in {text!r})")
        if columns is not None and column not in columns:
            raise SourceError(f"--filter cannot select on {column!r}; it can select on: {', '.join(columns)}")
        allowed.setdefault(column, set()).update(options)
    return RowFilter(text.strip(), tuple((c, frozenset(v)) for c, v in allowed.items()))


def source_filter(source: str, text: str | None) -> RowFilter | None:
    """The row filter for one source (None without ``text``); an error if the source has no filterable columns."""
    if text is None:
        return None
    if source not in FILTER_COLUMNS:
        raise SourceError(f"--filter does not apply to source {source!r}; sources that take it: "
                          f"{', '.join(FILTER_COLUMNS)}")
    return parse_row_filter(text, FILTER_COLUMNS[source])


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
        rows.append(out_row(source, "regression", {"text": prompt.text, "label": label_vector(prompt.label or "")},
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
    validate_conversation(conversation)  # template markers in the text (flattened HS2 turns aside) are rejects
    return conversation_rows(source, conversation, split=split, group=prompt, file=file, line=line)


def reward_text(context: Sequence[tuple[str, str]], response: str) -> str:
    """The reward-model text for ``response`` after ``context`` turns ``(role, text)`` (User first).

    Built by the one prompt builder the regression data and the annotator use, so a pair's texts are
    byte-identical to what the reward model is trained and scored on.
    """
    turns = [(role, text, None) for role, text in context] + [(ASSISTANT_ROLE, response, "")]
    conversation = make_conversation(turns)
    validate_conversation(conversation)  # a marker inside a turn would fake turns or a label: a reject
    return reward_prompts(conversation, labelled_only=False)[-1].text


def _preference_score(record: Mapping[str, Any], name: str) -> int:
    raw = record[name]
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or float(raw) != int(raw) or not -3 <= raw <= 3:
        raise RowError(f"column {name!r} must be an integer -3..3, got {raw!r}")
    return int(raw)


def preference_pair(pair_id: str, context: Sequence[tuple[str, str]], first: str, second: str,
                    preference: int) -> dict[str, Any]:
    """An explicit pair from two responses and a signed preference (negative: the first is better).

    ``strength = |preference|``. A tie (0) stays a tie: ``"tie": true``, strength 0, the two responses
    as chosen/rejected in file order; never one answer on both sides. Losses that cannot learn from a
    tie skip it when they read the pairs (``steerray.training.reward_data.read_split``).
    """
    chosen, rejected = (second, first) if preference > 0 else (first, second)
    return {"id": pair_id, "chosen": reward_text(context, chosen), "rejected": reward_text(context, rejected),
            "strength": float(abs(preference)), "tie": preference == 0}


def _pair_id(file: str, line: int) -> str:
    return f"{file.rsplit('/', 1)[-1]}:{line}"


def convert_preference(source: str, record: Any, *, file: str, line: int, split: str) -> list[dict[str, Any]]:
    """One explicit pair per row: ``{"id", "chosen", "rejected", "strength", "tie"}`` (strength >= 0).

    The sign convention is HelpSteer2-Preference's: negative -> response_1 preferred, positive ->
    response_2 preferred, 0 -> a tie. Pairs never depend on file adjacency downstream.
    """
    _check_columns(record, PREFERENCE_REQUIRED, PREFERENCE_OPTIONAL)
    prompt = _text(record, "prompt")
    first, second = _text(record, "response_1"), _text(record, "response_2")
    strength = _preference_score(record, "preference_strength")
    row_split = record.get("split")
    if row_split is not None:
        split = "train" if row_split == "train" else "val"
    pair = preference_pair(_pair_id(file, line), [(USER_ROLE, prompt)], first, second, strength)
    return [out_row(source, "preference", pair, split=split, group=prompt, file=file, line=line)]


# --------------------------------------------------------------------------------------------------
# HelpSteer3-Preference (multi-turn context, two responses, overall preference -3..3)
# --------------------------------------------------------------------------------------------------

def context_turns(context: Any, column: str = "context") -> list[tuple[str, str]]:
    """A ``[{role, content}]`` context (user first, alternating, ending with the user) as SteerLM turns."""
    if not isinstance(context, list) or not context:
        raise RowError(f"column {column!r} must be a non-empty list of {{role, content}} turns")
    turns = []
    for i, turn in enumerate(context):
        if not isinstance(turn, dict):
            raise RowError(f"{column} turn {i} is not an object")
        role = CONTEXT_ROLES.get(turn.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise RowError(f"{column} turn {i}: role must be 'user' or 'assistant', got {turn.get('role')!r}")
        if role != (USER_ROLE, ASSISTANT_ROLE)[i % 2]:
            raise RowError(f"{column} turn {i}: turns must alternate user/assistant, starting with the user")
        content = turn.get("content")
        if not isinstance(content, str) or not content.strip():
            raise RowError(f"{column} turn {i} ({turn['role']}): empty or missing 'content'")
        turns.append((role, content))
    if turns[-1][0] != USER_ROLE:
        raise RowError(f"{column} must end with a user turn (the responses answer it)")
    return turns


def _check_individual_preference(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise RowError("column 'individual_preference' must be a list of annotator objects")
    for i, entry in enumerate(value):
        score = entry.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, int) or not -3 <= score <= 3):
            raise RowError(f"individual_preference[{i}].score must be an integer -3..3, got {score!r}")


def convert_helpsteer3(source: str, record: Any, *, file: str, line: int, split: str,
                       row_filter: RowFilter | None = None) -> list[dict[str, Any]]:
    """One explicit pair per row: ``{"id", "chosen", "rejected", "strength", "tie", "domain", "language"}``.

    ``strength = |overall_preference|`` (negative: response1 is better). Multi-turn contexts are rendered
    with the SteerLM template exactly as the other sources. Rows ``row_filter`` does not select are skips
    (counted by reason), checked after validation so a malformed row is a reject whatever the filter.
    """
    _check_columns(record, HELPSTEER3_REQUIRED, HELPSTEER3_OPTIONAL)
    domain, language = _text(record, "domain"), _text(record, "language")
    turns = context_turns(record["context"])
    first, second = _text(record, "response1"), _text(record, "response2")
    preference = _preference_score(record, "overall_preference")
    _check_individual_preference(record.get("individual_preference"))
    if row_filter is not None and (why := row_filter.mismatch(record)):
        return [reject_row(source, file, line, why, {"domain": domain, "language": language}, kind="skip")]
    if first == second:
        return [reject_row(source, file, line, "response1 and response2 are identical: no preference to learn",
                           {"domain": domain, "language": language}, kind="skip")]
    pair = preference_pair(_pair_id(file, line), turns, first, second, preference)
    pair.update(domain=domain, language=language)
    group = "\x1f".join(text for _, text in turns)  # one context, one split
    return [out_row(source, "preference", pair, split=split, group=group, file=file, line=line)]


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
    ids = {str(node.get("message_id"))}
    for reply in node.get("replies") or []:
        ids |= _subtree_ids(reply)
    return ids


def expand_oasst_tree(source: str, root: dict[str, Any], tree_id: str, *, split: str, file: str,
                      line: int) -> list[dict[str, Any]]:
    """Every root-to-leaf path of non-deleted messages becomes one conversation (length >= 2)."""
    rows: list[dict[str, Any]] = []
    paths: list[list[dict[str, Any]]] = []

    def where(node: dict[str, Any]) -> tuple[str, int]:
        found = node.get("_where")
        return (str(found[0]), int(found[1])) if found else (file, line)

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
        role = OASST_ROLES.get(str(node.get("role")))
        if role is None:
            raise RowError(f"message {node.get('message_id')} has unknown role {node.get('role')!r}")
        text = node.get("text")
        if not isinstance(text, str) or not text.strip():
            raise RowError(f"message {node.get('message_id')} has empty text")
        label = oasst_label(node.get("labels")) if role == ASSISTANT_ROLE else None
        turns.append({"from": role, "value": text, "label": label, "_has_labels": node.get("labels") is not None})
    entries: list[dict[str, Any]] = []
    conversation = {"system": SYSTEM_PROMPT, "mask": USER_ROLE, "type": "VALUE_TO_TEXT", "conversations": entries}
    for turn in turns:
        entry = {"from": turn["from"], "value": turn["value"]}
        # Unlabelled assistant messages carry no label key at all (the reference's distinction).
        if turn["from"] == USER_ROLE or turn["_has_labels"]:
            entry["label"] = turn["label"]
        entries.append(entry)
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
    "helpsteer3": convert_helpsteer3,
    "oasst1": oasst_message_key,
    "conversations": convert_conversation,
    "demo": convert_conversation,
}


def convert_raw_row(source: str, raw_row: Mapping[str, Any], split: str,
                    row_filter: RowFilter | None = None) -> list[dict[str, Any]]:
    """Decode one raw row and run its source's converter; every failure becomes a reject row.

    ``row_filter`` (from :func:`source_filter`) selects rows of the sources in :data:`FILTER_COLUMNS`.
    """
    if row_filter is not None and source not in FILTER_COLUMNS:
        raise SourceError(f"--filter does not apply to source {source!r}")
    options = {"row_filter": row_filter} if row_filter is not None else {}
    file, line = raw_row["file"], int(raw_row["line"])
    record, error = decode_raw(dict(raw_row))
    if error:
        rows = [reject_row(source, file, line, error, raw_row["raw"][:2000] or None)]
    else:
        try:
            rows = CONVERTERS[source](source, record, file=file, line=line, split=split, **options)
        except (RowError, LabelError, ConversationError) as err:
            rows = [reject_row(source, file, line, str(err), record)]
        except (KeyError, TypeError, AttributeError, ValueError) as err:  # shapes no check anticipated
            rows = [reject_row(source, file, line, f"unusable row ({type(err).__name__}: {err})", record)]
    rows[0]["counts_input"] = 1  # lets the writer count input rows without remembering them
    return rows
