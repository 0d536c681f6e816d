"""SteerLM 2.0 data: the reference's record schema, its validation, rendering to tokens, and the writer.

One JSON object per line, as NeMo-Aligner's ``SteerLM2Dataset`` reads it (spec 7.2)::

    {"system": str,
     "prompt_turns": [{"from": "User", "value": str}, {"from": "Assistant", ...}, {"from": "User", ...}],
     "label": "helpfulness:4,verbosity:1",
     "responses": [{"from": "Assistant", "value": y_i, "log(P(a|x,y))": float, "log(P(y|x))": float,
                    "log(Q(y|a,x))": float}, ... n items]}

Validation (:func:`parse_record`) demands what the reference's code needs and what training needs: an odd
number of alternating prompt turns starting and ending with User, a label whose attributes the policy was
trained on, ``n >= 2`` Assistant responses, the same ``n`` as the file's other groups (the trainer keeps
groups together and needs one ``n``), and the three log fields as JSON numbers (the reference's doc shows
strings; its code adds them). Every reason reads ``category: detail`` so the stage can count rejects by
category (``steerray.data.writer.reason_category``). ``NaN`` and ``Infinity`` are JSON numbers to Python and
pass validation: the trainer's per-group finite check skips such groups and counts them.

Rendering (:func:`render_group`) is the reference's: prompt = system block + the prompt turns in the SteerLM
template + the response header + the label line; each response text = prompt + ``y`` + ``\\n<extra_id_1>``.
Loss is taken on every token overlapping ``y\\n<extra_id_1>`` (``steerray.data.sft``'s token rule, from
character offsets of one tokenization), so the data generator's ``log Q'`` and the trainer's NLL cover the
same tokens. The unconditioned rendering (no label line) is the text ``log P(y|x)`` is scored on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from steerray.artifacts import write_jsonl
from steerray.attributes import LabelError, check_range, parse_label
from steerray.data.sft import STATUS_OK, STATUS_REJECTED, SFTExample, tokenize_sft
from steerray.errors import SteerrayError
from steerray.templates import ASSISTANT_ROLE, ROLES, TURN_START, label_line, system_block, turn_header

LOG_PA, LOG_PY, LOG_Q = "log(P(a|x,y))", "log(P(y|x))", "log(Q(y|a,x))"
LOG_FIELDS = (LOG_PA, LOG_PY, LOG_Q)
MIN_GROUP_SIZE = 2  # with one response w = b = 1 and the loss is zero: a group of one teaches nothing


class SteerLM2RecordError(SteerrayError, ValueError):
    """A SteerLM 2.0 record that breaks the schema; the message is ``category: detail``."""


@dataclass(frozen=True)
class SteerLM2Response:
    value: str
    log_pa: float  # log P(a|x,y), reward model
    log_py: float  # log P(y|x), reference model, unconditioned prompt
    log_q: float  # log Q'(y|a,x), the sampling policy
    role: str = ASSISTANT_ROLE


@dataclass(frozen=True)
class SteerLM2Record:
    system: str
    prompt_turns: tuple[tuple[str, str], ...]  # (from, value), User first, odd count
    label: str
    responses: tuple[SteerLM2Response, ...]

    @property
    def n(self) -> int:
        return len(self.responses)

    @property
    def finite(self) -> bool:
        """All log fields finite (a group with NaN/inf is skipped by the trainer, never trained on)."""
        return all(math.isfinite(v) for r in self.responses for v in (r.log_pa, r.log_py, r.log_q))

    def log_values(self) -> tuple[list[float], list[float], list[float]]:
        """``(log_pa, log_py, log_q)``, one value per response."""
        return ([r.log_pa for r in self.responses], [r.log_py for r in self.responses],
                [r.log_q for r in self.responses])

    def to_json(self) -> dict[str, Any]:
        """The reference's schema exactly; log fields as floats."""
        return {
            "system": self.system,
            "prompt_turns": [{"from": role, "value": value} for role, value in self.prompt_turns],
            "label": self.label,
            "responses": [{"from": r.role, "value": r.value, LOG_PA: float(r.log_pa), LOG_PY: float(r.log_py),
                           LOG_Q: float(r.log_q)} for r in self.responses],
        }


def make_record(system: str, prompt_turns: Sequence[Mapping[str, str] | tuple[str, str]], label: str,
                values: Sequence[str], log_pa: Sequence[float], log_py: Sequence[float],
                log_q: Sequence[float]) -> SteerLM2Record:
    """Build a record from the generator's columns (one entry per sampled response), validated."""
    if not len(values) == len(log_pa) == len(log_py) == len(log_q):
        raise SteerLM2RecordError(f"group size: {len(values)} responses but {len(log_pa)}/{len(log_py)}/"
                                  f"{len(log_q)} log values")
    responses = [{"from": ASSISTANT_ROLE, "value": v, LOG_PA: float(a), LOG_PY: float(p), LOG_Q: float(q)}
                 for v, a, p, q in zip(values, log_pa, log_py, log_q, strict=True)]
    return parse_record({"system": system, "prompt_turns": _turn_dicts(prompt_turns), "label": label,
                         "responses": responses})


def _turn_dicts(turns: Sequence[Mapping[str, str] | tuple[str, str]]) -> list[dict[str, Any]]:
    return [dict(turn) if isinstance(turn, Mapping) else {"from": turn[0], "value": turn[1]} for turn in turns]


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------

def _prompt_turns(raw: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise SteerLM2RecordError("bad prompt_turns: must be a non-empty list of {from, value} objects")
    if len(raw) % 2 == 0:
        raise SteerLM2RecordError(f"bad prompt_turns: {len(raw)} turns; the count must be odd (User first and "
                                  "last, alternating with Assistant)")
    turns = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, Mapping):
            raise SteerLM2RecordError(f"bad prompt_turns: turn {i} is not an object")
        role, value = turn.get("from"), turn.get("value")
        if role != ROLES[i % 2]:
            raise SteerLM2RecordError(f"bad prompt_turns: turn {i} must be from {ROLES[i % 2]!r}, got {role!r}")
        if not isinstance(value, str) or not value.strip():
            raise SteerLM2RecordError(f"bad prompt_turns: turn {i} ({role}) has an empty or missing 'value'")
        turns.append((role, value))
    return tuple(turns)


def _label(raw: Any, label_attributes: Sequence[str] | None) -> str:
    if raw is None:
        raise SteerLM2RecordError("bad label: missing; SteerLM 2.0 conditions on a label string a")
    try:
        values = parse_label(raw, integers=True)
        check_range(values)
    except LabelError as err:
        raise SteerLM2RecordError(f"bad label: {err}") from None
    if not values:
        raise SteerLM2RecordError("bad label: empty; SteerLM 2.0 conditions on a label string a")
    if label_attributes is not None:
        extra = [name for name in values if name not in label_attributes]
        if extra:
            raise SteerLM2RecordError(f"label attribute not trained: {', '.join(extra)} in {raw!r}; the policy "
                                      f"was trained on {', '.join(label_attributes)} only")
    return raw


def _log_value(response: Mapping[str, Any], key: str, index: int) -> float:
    if key not in response:
        raise SteerLM2RecordError(f"missing log field: responses[{index}] has no {key!r}")
    value = response[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = " (the SteerLM 2.0 doc shows strings; the reference's code adds them, so write JSON numbers)" \
            if isinstance(value, str) else ""
        raise SteerLM2RecordError(f"log field not a number: responses[{index}] {key!r} is "
                                  f"{type(value).__name__} {value!r}{hint}")
    return float(value)


def _responses(raw: Any, expected_n: int | None, min_group_size: int) -> tuple[SteerLM2Response, ...]:
    if not isinstance(raw, list):
        raise SteerLM2RecordError("bad responses: must be a list of response objects")
    if len(raw) < min_group_size:
        raise SteerLM2RecordError(f"group size: {len(raw)} responses; a group needs at least {min_group_size}")
    if expected_n is not None and len(raw) != expected_n:
        raise SteerLM2RecordError(f"group size: {len(raw)} responses, but the other groups have {expected_n} "
                                  "(all groups must have the same n)")
    responses = []
    for i, response in enumerate(raw):
        if not isinstance(response, Mapping):
            raise SteerLM2RecordError(f"bad response: responses[{i}] is not an object")
        if response.get("from") != ASSISTANT_ROLE:
            raise SteerLM2RecordError(f"bad response: responses[{i}] must be from {ASSISTANT_ROLE!r}, "
                                      f"got {response.get('from')!r}")
        if not isinstance(response.get("value"), str):  # "" is a legitimate sample: the policy stopped at once
            raise SteerLM2RecordError(f"bad response: responses[{i}] has no string 'value'")
        log_pa, log_py, log_q = (_log_value(response, key, i) for key in LOG_FIELDS)
        responses.append(SteerLM2Response(response["value"], log_pa, log_py, log_q))
    return tuple(responses)


def parse_record(obj: Any, *, expected_n: int | None = None, label_attributes: Sequence[str] | None = None,
                 min_group_size: int = MIN_GROUP_SIZE) -> SteerLM2Record:
    """Validate one parsed line; :class:`SteerLM2RecordError` (``category: detail``) if it breaks the schema.

    ``expected_n``: the group size every record of the data must have (None: any n >= ``min_group_size``).
    ``label_attributes``: the attributes the policy was trained on (``model_label_attributes``); None
    accepts any known attribute. Extra keys are ignored, as the reference does.
    """
    if not isinstance(obj, Mapping):
        raise SteerLM2RecordError(f"not an object: the line holds a JSON {type(obj).__name__}")
    for key in ("system", "prompt_turns", "label", "responses"):
        if key not in obj:
            raise SteerLM2RecordError(f"missing key: {key!r}")
    if not isinstance(obj["system"], str):
        raise SteerLM2RecordError(f"bad system: must be a string, got {type(obj['system']).__name__}")
    return SteerLM2Record(obj["system"], _prompt_turns(obj["prompt_turns"]), _label(obj["label"], label_attributes),
                          _responses(obj["responses"], expected_n, min_group_size))


def parse_line(raw: str, **kwargs: Any) -> SteerLM2Record:
    """:func:`parse_record` of one jsonl line (``malformed JSON: ...`` if it does not decode)."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        raise SteerLM2RecordError(f"malformed JSON: {err.msg} at column {err.colno}") from None
    return parse_record(obj, **kwargs)


@dataclass(frozen=True)
class Reject:
    file: str
    line: int  # 1-based
    reason: str  # category: detail


def read_records(path: str | Path, *, expected_n: int | None = None,
                 label_attributes: Sequence[str] | None = None) -> tuple[list[SteerLM2Record], list[Reject]]:
    """Read a SteerLM 2.0 jsonl file: valid records, and rejects with file, line and reason.

    Without ``expected_n`` the first valid record fixes the group size for the rest of the file.
    """
    records: list[SteerLM2Record] = []
    rejects: list[Reject] = []
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = parse_line(raw, expected_n=expected_n, label_attributes=label_attributes)
            except SteerLM2RecordError as err:
                rejects.append(Reject(str(path), number, str(err)))
                continue
            expected_n = record.n if expected_n is None else expected_n
            records.append(record)
    return records, rejects


# --------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------

def dumps_record(record: SteerLM2Record) -> str:
    """One jsonl line (no newline), ``ensure_ascii=False`` like the reference's preprocessors."""
    return json.dumps(record.to_json(), ensure_ascii=False)


def write_records(path: str | Path, records: Iterable[SteerLM2Record]) -> int:
    """Write records atomically as jsonl in the reference's schema; returns how many were written."""
    return write_jsonl(path, (record.to_json() for record in records))


# --------------------------------------------------------------------------------------------------
# Rendering and tokens
# --------------------------------------------------------------------------------------------------

def steerlm2_prompt(system: str, prompt_turns: Sequence[Mapping[str, str] | tuple[str, str]],
                    label: str | None, role: str = ASSISTANT_ROLE) -> str:
    """The reference's prompt: system block, the turns as they are (no label lines), the response header,
    then ``<extra_id_2>{label}\\n`` unless ``label`` is None (the unconditioned prompt of ``P(y|x)``).

    The data generator samples from exactly this string, so ``log Q'`` is the policy's own probability.
    """
    text = system_block(system)
    for turn in _turn_dicts(prompt_turns):
        text += turn_header(turn["from"]) + f"{turn['value']}\n"
    return text + turn_header(role) + (label_line(label) if label is not None else "")


def render_response(prompt: str, value: str) -> dict[str, Any]:
    """``{"text", "trained"}`` of one response (the shape ``tokenize_sft`` takes): loss on ``y\\n<extra_id_1>``."""
    text = prompt + value + "\n" + TURN_START
    return {"text": text, "trained": [[len(prompt), len(text)]]}


def render_group(record: SteerLM2Record, *, conditioned: bool = True) -> list[dict[str, Any]]:
    """Every response of a group rendered; ``conditioned=False`` drops the label line (for ``log P(y|x)``)."""
    prompt = steerlm2_prompt(record.system, record.prompt_turns, record.label if conditioned else None)
    return [render_response(prompt, response.value) for response in record.responses]


def tokenize_group(record: SteerLM2Record, tokenizer: Any, max_length: int, *,
                   conditioned: bool = True) -> list[SFTExample]:
    """One shifted, masked example per response (``input_ids``, ``labels`` with -100 on the prompt)."""
    return [tokenize_sft(rendered, tokenizer, max_length) for rendered in render_group(record, conditioned=conditioned)]


@dataclass(frozen=True)
class TokenizedGroup:
    input_ids: list[list[int]]  # one shifted example per response
    labels: list[list[int]]
    trained_tokens: list[int]
    log_pa: list[float]
    log_py: list[float]
    log_q: list[float]


def tokenized_group(record: SteerLM2Record, tokenizer: Any, max_length: int) -> TokenizedGroup:
    """Tokens and log fields of a group; ``truncated: ...`` error if a response does not fit ``max_length``
    (its ``log Q'`` covers tokens training would cut, so its importance weight would be wrong)."""
    examples = tokenize_group(record, tokenizer, max_length)
    for i, example in enumerate(examples):
        if example.truncated:
            raise SteerLM2RecordError(f"truncated: responses[{i}] renders to {example.full_length} tokens > "
                                      f"max_length {max_length}; log Q' would cover tokens training cuts")
    log_pa, log_py, log_q = record.log_values()
    return TokenizedGroup([e.input_ids for e in examples], [e.labels for e in examples],
                          [e.trained_tokens for e in examples], log_pa, log_py, log_q)


GROUP_COLUMNS = ("input_ids", "labels", "lengths", "trained_tokens", "log_pa", "log_py", "log_q")


def tokenize_group_batch(batch: Mapping[str, Any], tokenizer: Any, max_length: int, *, expected_n: int,
                         label_attributes: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` body: raw rows ``{file, line, raw, error}`` in, one row per group out.

    Columns: ``file, line, status, reason, n``, plus per group 1-D arrays (Arrow-friendly, as
    ``steerray.data.sft``): ``input_ids``/``labels`` (all responses concatenated), ``lengths`` (one per
    response), ``trained_tokens``, ``log_pa``, ``log_py``, ``log_q``. :func:`unpack_group` reverses it.
    """
    out: dict[str, list[Any]] = {key: [] for key in ("file", "line", "status", "reason", "n", *GROUP_COLUMNS)}
    for i in range(len(batch["raw"])):
        group, reason = None, str(batch["error"][i]) if "error" in batch else ""
        if not reason:
            try:
                record = parse_line(str(batch["raw"][i]), expected_n=expected_n, label_attributes=label_attributes)
                group = tokenized_group(record, tokenizer, max_length)
            except SteerLM2RecordError as err:
                reason = str(err)
        out["file"].append(str(batch["file"][i]) if "file" in batch else "")
        out["line"].append(int(batch["line"][i]) if "line" in batch else i + 1)
        out["status"].append(STATUS_OK if group else STATUS_REJECTED)
        out["reason"].append(reason)
        out["n"].append(len(group.input_ids) if group else 0)
        for key, values in _group_arrays(group).items():
            out[key].append(values)
    result = {key: np.asarray(out[key]) for key in ("file", "line", "status", "reason", "n")}
    for key in GROUP_COLUMNS:  # ragged: an object array of 1-D arrays
        column = np.empty(len(out[key]), dtype=object)
        column[:] = out[key]
        result[key] = column
    return result


def _group_arrays(group: TokenizedGroup | None) -> dict[str, np.ndarray]:
    if group is None:
        return {key: np.zeros(0, dtype=np.float64 if key.startswith("log") else np.int32) for key in GROUP_COLUMNS}
    return {
        "input_ids": np.asarray([t for ids in group.input_ids for t in ids], dtype=np.int32),
        "labels": np.asarray([t for labels in group.labels for t in labels], dtype=np.int32),
        "lengths": np.asarray([len(ids) for ids in group.input_ids], dtype=np.int32),
        "trained_tokens": np.asarray(group.trained_tokens, dtype=np.int32),
        "log_pa": np.asarray(group.log_pa, dtype=np.float64),
        "log_py": np.asarray(group.log_py, dtype=np.float64),
        "log_q": np.asarray(group.log_q, dtype=np.float64),
    }


def unpack_group(row: Mapping[str, Any]) -> TokenizedGroup:
    """A :class:`TokenizedGroup` from one ok row of :func:`tokenize_group_batch`."""
    bounds = np.cumsum([0, *np.asarray(row["lengths"]).tolist()])
    ids, labels = np.asarray(row["input_ids"]).tolist(), np.asarray(row["labels"]).tolist()
    return TokenizedGroup([ids[s:e] for s, e in zip(bounds[:-1], bounds[1:], strict=True)],
                          [labels[s:e] for s, e in zip(bounds[:-1], bounds[1:], strict=True)],
                          np.asarray(row["trained_tokens"]).tolist(), np.asarray(row["log_pa"]).tolist(),
                          np.asarray(row["log_py"]).tolist(), np.asarray(row["log_q"]).tolist())
