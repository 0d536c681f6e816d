"""Annotation: score conversations with the reward model and write label strings, once for every path.

The offline annotator (Ray Data actor pool), ``annotate --via URL`` and the Serve deployment all go
through :func:`plan_scoring` -> a predictor -> :meth:`ScoringPlan.finish`:

1. prompts come from :func:`steerray.templates.reward_prompts` with ``labelled_only=False``: the
   reference annotator scores every Assistant turn whose ``label`` key is present and not None
   (``""`` included); ``all_assistant_turns=True`` also scores Assistant turns without a label key;
2. a *predictor* maps texts to ``(predictions [N, A] float32, truncated flags)``: the model in this
   process (:class:`ModelPredictor`) or a running ``serve-reward`` (:class:`HttpPredictor`);
3. each scored turn gets a label string over all the model's attributes, clipped to 0-4 and rounded
   half to even (:func:`steerray.attributes.predictions_to_label`). Like the reference, predictions
   replace human labels; with ``keep_human_labels`` the attributes a human label has keep their human
   value and only the missing ones are filled in from the model.

Resumable files: :func:`plan_blocks` cuts each input file into blocks of ``block_size`` lines (a block is
a :class:`steerray.data.readers.ReadTask`, so Ray Data reads it with the prepare stage's reader), and
:func:`annotate_block` reads one block and scores it with :func:`annotate_rows` (the pure transform over
numbered raw rows); the actor pool runs it where the model is and writes the block's part file there.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from steerray.artifacts import atomic_path
from steerray.attributes import LabelError, encode_label, parse_label, predictions_to_label
from steerray.auth import auth_headers
from steerray.data.readers import ReadTask, decode_json, decode_raw, read_task_rows
from steerray.errors import SteerrayError
from steerray.models.precision import inference_dtype
from steerray.models.reward import load_reward_model, predict_texts
from steerray.templates import (
    ASSISTANT_ROLE,
    ConversationError,
    RewardPrompt,
    reward_prompts,
    validate_conversation,
)

# texts -> (predictions float32 [N, A] in the model's attribute order, truncated flag per text)
Predictor = Callable[[Sequence[str]], tuple[np.ndarray, list[bool]]]

# Row status values in the annotate stream.
OK, REJECT = "ok", "reject"


class AnnotationError(SteerrayError, RuntimeError):
    """Annotation cannot go on: a server that answers errors, a model that does not fit the data."""


# --------------------------------------------------------------------------------------------------
# Scoring: conversations -> prompts -> predictions -> labels
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScoredTurn:
    turn_index: int
    predictions: list[float]  # raw outputs in the model's attribute order
    label: str  # the label string written into the turn
    truncated: bool  # the prompt lost tokens from the left

    def to_json(self, attributes: Sequence[str]) -> dict[str, Any]:
        return {"turn_index": self.turn_index, "predictions": dict(zip(attributes, self.predictions, strict=True)),
                "label": self.label, "truncated": self.truncated}


@dataclass
class AnnotatedConversation:
    conversation: dict[str, Any]  # a copy of the input with the scored turns' labels replaced
    turns: list[ScoredTurn] = field(default_factory=list)


def scoring_prompts(conversation: Mapping[str, Any], *, all_assistant_turns: bool = False) -> list[RewardPrompt]:
    """The prompts to score for one conversation (the annotator's rule, see the module docstring)."""
    if all_assistant_turns:
        # Give unlabelled Assistant turns an empty label so the one prompt builder selects them too.
        conversation = dict(conversation)
        conversation["conversations"] = [
            {**turn, "label": ""} if turn.get("from") == ASSISTANT_ROLE and turn.get("label") is None else turn
            for turn in conversation["conversations"]]
    return reward_prompts(conversation, labelled_only=False)


def turn_label(predictions: Sequence[float], attributes: Sequence[str], human_label: str | None = None,
               keep_human_labels: bool = False) -> str:
    """The label string for one scored turn: predictions over all ``attributes``, human values kept if asked."""
    predicted = parse_label(predictions_to_label(predictions, attributes))
    if keep_human_labels and human_label:
        try:
            human = parse_label(human_label)
        except LabelError:  # validated rows cannot get here; keep the predictions rather than fail
            human = {}
        predicted.update(human)
    return encode_label(predicted)


@dataclass
class ScoringPlan:
    """Which texts to score for a list of conversations; :meth:`finish` turns predictions into labels."""

    conversations: list[Mapping[str, Any]]
    prompts: list[list[RewardPrompt]]

    @property
    def texts(self) -> list[str]:
        return [prompt.text for prompts in self.prompts for prompt in prompts]

    def finish(self, predictions: np.ndarray, truncated: Sequence[bool], attributes: Sequence[str],
               *, keep_human_labels: bool = False) -> list[AnnotatedConversation]:
        predictions = np.asarray(predictions, dtype=np.float32)
        if predictions.shape != (len(self.texts), len(attributes)):
            raise AnnotationError(f"expected predictions of shape {(len(self.texts), len(attributes))}, "
                                  f"got {predictions.shape}")
        results, k = [], 0
        for conversation, prompts in zip(self.conversations, self.prompts, strict=True):
            out = copy.deepcopy(dict(conversation))
            turns = []
            for prompt in prompts:
                values = [float(v) for v in predictions[k]]
                label = turn_label(values, attributes, prompt.label, keep_human_labels)
                out["conversations"][prompt.turn_index]["label"] = label
                turns.append(ScoredTurn(prompt.turn_index, values, label, bool(truncated[k])))
                k += 1
            results.append(AnnotatedConversation(out, turns))
        return results


def plan_scoring(conversations: Iterable[Mapping[str, Any]], *, all_assistant_turns: bool = False) -> ScoringPlan:
    conversations = list(conversations)
    return ScoringPlan(conversations, [scoring_prompts(c, all_assistant_turns=all_assistant_turns)
                                       for c in conversations])


def score_conversations(conversations: Iterable[Mapping[str, Any]], predict: Predictor,
                        attributes: Sequence[str], *, keep_human_labels: bool = False,
                        all_assistant_turns: bool = False) -> list[AnnotatedConversation]:
    """Annotate conversations with one predictor call for all their scored turns."""
    plan = plan_scoring(conversations, all_assistant_turns=all_assistant_turns)
    texts = plan.texts
    if texts:
        predictions, truncated = predict(texts)
    else:
        predictions, truncated = np.zeros((0, len(attributes)), dtype=np.float32), []
    return plan.finish(predictions, truncated, attributes, keep_human_labels=keep_human_labels)


# --------------------------------------------------------------------------------------------------
# Predictors
# --------------------------------------------------------------------------------------------------

def training_max_length(folder: str | Path) -> int | None:
    """``model.max_length`` the reward model was trained with, from train-reward's manifest beside it."""
    manifest = Path(folder).resolve().parent / "manifest.json"
    try:
        value = json.loads(manifest.read_text(encoding="utf-8"))["config"]["model"]["max_length"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def default_max_length(tokenizer: Any, model_config: Any, folder: str | Path | None = None, cap: int = 4096) -> int:
    """A reward model's length: what it was trained with, else the tokenizer's limit, else its positions.

    The tokenizer's and the positions' limits are capped at ``cap`` tokens (attention cost grows with it).
    """
    trained = training_max_length(folder) if folder is not None else None
    if trained:
        return trained
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit <= 1_000_000:
        return min(limit, cap)
    positions = getattr(model_config, "max_position_embeddings", None) or cap
    return int(min(positions, cap))


class ModelPredictor:
    """Scores texts with a reward model in this process (batched, sorted by length, left-truncated)."""

    def __init__(self, model: Any, tokenizer: Any, attributes: Sequence[str], *, max_length: int,
                 batch_size: int = 16) -> None:
        self.model, self.tokenizer, self.attributes = model, tokenizer, list(attributes)
        self.max_length, self.batch_size = max_length, batch_size

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        return predict_texts(self.model, self.tokenizer, list(texts), max_length=self.max_length,
                             batch_size=self.batch_size)

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text as the model sees them (no special tokens), before any truncation."""
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def threads_for(reserved_cpus: float) -> int:
    """Torch threads for a model holder that reserved ``reserved_cpus`` Ray CPUs (Ray's own convention).

    More threads than reserved cores is not free: on a busy machine OpenMP's threads wait for each other,
    and a tiny model's forward pass measured 10x slower with 2 threads than with 1 on a loaded 2-core box.
    """
    return max(1, int(reserved_cpus))


def load_predictor(folder: str | Path, *, max_length: int | None = None, batch_size: int = 16,
                   precision: str = "auto", threads: int | None = None,
                   trust_remote_code: bool = False) -> ModelPredictor:
    """Load a reward-model folder for scoring: on the GPU when there is one, in bf16 where the device computes it
    natively (``precision="auto"``, see :mod:`steerray.models.precision`), else fp32.

    ``threads`` sets torch's CPU threads (None keeps the process's setting: OMP_NUM_THREADS in Ray workers).
    """
    import torch

    on_gpu = torch.cuda.is_available()
    if threads and not on_gpu:
        torch.set_num_threads(threads)
    dtype = inference_dtype(precision, "cuda" if on_gpu else "cpu")
    model, tokenizer, attributes = load_reward_model(folder, dtype=dtype, device="cuda" if on_gpu else None,
                                                     trust_remote_code=trust_remote_code)
    length = max_length or default_max_length(tokenizer, model.config, folder)
    return ModelPredictor(model, tokenizer, attributes, max_length=length, batch_size=batch_size)


class HttpPredictor:
    """Scores texts through a running ``serve-reward`` (``POST {url}/score`` with ``texts``).

    Texts are sent with ``truncation="left"`` so over-long prompts are cut exactly as offline; transient
    failures (connection refused, 503) are retried with backoff; a 4xx is an error naming the reason.
    """

    def __init__(self, url: str, token: str | None = None, *, timeout_s: float = 300.0,
                 retries: int = 5, chunk_size: int = 256) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.client = httpx.Client(timeout=timeout_s, headers=auth_headers(token))
        self.retries, self.chunk_size = retries, chunk_size
        self.attributes = self.health()["attributes"]

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        for attempt in range(self.retries + 1):
            try:
                response = self.client.request(method, f"{self.url}{path}", **kwargs)
            except httpx.TransportError as err:
                if attempt == self.retries:
                    raise AnnotationError(f"reward server {self.url} unreachable: {err}") from None
            else:
                if response.status_code < 400:
                    return response.json()
                if response.status_code not in (502, 503, 504) or attempt == self.retries:
                    raise AnnotationError(f"reward server {self.url}{path} answered {response.status_code}: "
                                          f"{_error_message(response)}")
            time.sleep(min(2.0**attempt * 0.25, 5.0))
        raise AssertionError("unreachable")

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        rows, flags = [], []
        for start in range(0, len(texts), self.chunk_size):
            body = {"texts": list(texts[start: start + self.chunk_size]), "truncation": "left"}
            for item in self._request("POST", "/score", json=body)["results"]:
                rows.append([item["predictions"][name] for name in self.attributes])
                flags.append(bool(item["truncated"]))
        return np.asarray(rows, dtype=np.float32).reshape(len(rows), len(self.attributes)), flags


def _error_message(response: Any) -> str:
    try:
        return response.json()["error"]["message"]
    except Exception:  # not our JSON shape (a proxy in between): show the start of the body
        return response.text[:300]


# --------------------------------------------------------------------------------------------------
# Resumable files: blocks of lines, the batch transform, part files
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    split: str  # output file name, e.g. "train.jsonl"
    index: int  # block number within the file
    task: ReadTask  # byte range and first line number, read by steerray.data.readers
    rows: int  # non-blank lines in the block: the rows the block must produce


@dataclass(frozen=True)
class FilePlan:
    path: str
    split: str
    sha256: str
    lines: int
    rows: int
    blocks: list[Block]


def _counts_as_row(line: bytes) -> bool:
    # Mirrors the reader: undecodable lines become reject rows, blank ones produce nothing.
    try:
        return bool(line.decode("utf-8").strip())
    except UnicodeDecodeError:
        return True


def plan_blocks(path: str | Path, block_size: int, split: str | None = None) -> FilePlan:
    """Cut a jsonl file into blocks of ``block_size`` lines, with its digest (one streaming pass)."""
    path = Path(path)
    split = split or path.name
    digest = hashlib.sha256()
    blocks: list[Block] = []
    start = position = line_no = rows_total = block_rows = 0
    with open(path, "rb") as handle:
        for line in handle:
            digest.update(line)
            position += len(line)
            line_no += 1
            counted = _counts_as_row(line)
            block_rows += counted
            rows_total += counted
            if line_no % block_size == 0:
                blocks.append(Block(split, len(blocks), ReadTask(str(path), start, position, line_no - block_size + 1),
                                    block_rows))
                start, block_rows = position, 0
    if line_no % block_size or not blocks:
        first = line_no - line_no % block_size + 1
        blocks.append(Block(split, len(blocks), ReadTask(str(path), start, -1, first), block_rows))
    return FilePlan(str(path), split, digest.hexdigest(), line_no, rows_total, blocks)


def parse_conversation(row: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """``(conversation, "")`` or ``(None, reason)`` for one numbered raw row."""
    record, reason = decode_raw(dict(row))
    if reason:
        return None, reason
    try:
        validate_conversation(record, require_assistant=True)
    except ConversationError as err:
        return None, f"invalid conversation: {err}"
    return record, ""


def annotate_rows(batch: Mapping[str, Any], predict: Predictor, attributes: Sequence[str], *,
                  keep_human_labels: bool = False, all_assistant_turns: bool = False) -> dict[str, np.ndarray]:
    """Ray Data batch transform: numbered raw rows in, one output row per input row.

    In: columns ``split, block, file, line, raw, error``. Out: ``split, block, line, status`` (ok or
    reject), ``out`` (the annotated conversation, or the reject record, as JSON text), ``turns`` (scored
    turns) and ``truncated`` (of those, how many lost tokens from the left).
    """
    n = len(batch["line"])
    parsed = [parse_conversation({"file": batch["file"][i], "line": int(batch["line"][i]),
                                  "raw": batch["raw"][i], "error": batch["error"][i]}) for i in range(n)]
    good = [i for i in range(n) if parsed[i][0] is not None]
    annotated = score_conversations([parsed[i][0] or {} for i in good], predict, attributes,
                                    keep_human_labels=keep_human_labels, all_assistant_turns=all_assistant_turns)
    outputs: list[str] = [""] * n
    turns, truncated, status = [0] * n, [0] * n, [REJECT] * n
    for i, result in zip(good, annotated, strict=True):
        outputs[i] = json.dumps(result.conversation, ensure_ascii=False)
        turns[i], truncated[i], status[i] = len(result.turns), sum(t.truncated for t in result.turns), OK
    for i in range(n):
        if status[i] == REJECT:
            outputs[i] = json.dumps(reject_record(batch["split"][i], batch["file"][i], int(batch["line"][i]),
                                                  parsed[i][1], batch["raw"][i]), ensure_ascii=False)
    return {"split": np.asarray(batch["split"], dtype=object), "block": np.asarray(batch["block"], dtype=np.int64),
            "line": np.asarray(batch["line"], dtype=np.int64), "status": np.asarray(status, dtype=object),
            "out": np.asarray(outputs, dtype=object), "turns": np.asarray(turns, dtype=np.int64),
            "truncated": np.asarray(truncated, dtype=np.int64)}


def reject_record(split: str, file: str, line: int, reason: str, raw: str) -> dict[str, Any]:
    """One line of ``rejects.jsonl``: where the row was, why it was rejected, and the row itself."""
    value, why = decode_json(raw) if raw else (None, "")
    row: Any = raw if why else value  # a line that does not decode is kept as its text
    return {"split": split, "file": file, "line": line, "reason": reason, "row": row}


@dataclass
class BlockResult:
    """A finished block, as stored in its part file: a JSON header line, then the annotated rows."""

    split: str
    index: int
    rows: list[str]  # annotated conversations as JSON text, in line order
    rejects: list[dict[str, Any]]
    turns: int = 0
    truncated: int = 0

    def header(self) -> dict[str, Any]:
        return {"split": self.split, "block": self.index, "rows": len(self.rows), "rejects": self.rejects,
                "turns": self.turns, "truncated": self.truncated}


def block_result(split: str, index: int, rows: Iterable[Mapping[str, Any]]) -> BlockResult:
    """Assemble a block's output rows (any order) into a :class:`BlockResult` in line order."""
    result = BlockResult(split, index, [], [])
    for row in sorted(rows, key=lambda r: int(r["line"])):
        if row["status"] == OK:
            result.rows.append(row["out"])
            result.turns += int(row["turns"])
            result.truncated += int(row["truncated"])
        else:
            result.rejects.append(json.loads(row["out"]))
    return result


def annotate_block(block: Mapping[str, Any], predict: Predictor, attributes: Sequence[str], *,
                   keep_human_labels: bool = False, all_assistant_turns: bool = False) -> BlockResult:
    """Read one block (``split``, ``block`` and its read task: ``file, start, end, first_line``), annotate its
    rows with one predictor call, and return them in line order: the unit a part file holds."""
    split, index = str(block["split"]), int(block["block"])
    rows = list(read_task_rows({"file": str(block["file"]), "start": int(block["start"]),
                                "end": int(block["end"]), "first_line": int(block["first_line"])}))
    if not rows:
        return BlockResult(split, index, [], [])
    columns = {"split": [split] * len(rows), "block": [index] * len(rows),
               **{key: [row[key] for row in rows] for key in ("file", "line", "raw", "error")}}
    out = annotate_rows(columns, predict, attributes, keep_human_labels=keep_human_labels,
                        all_assistant_turns=all_assistant_turns)
    return block_result(split, index, [{name: out[name][i] for name in out} for i in range(len(rows))])


def write_part(path: str | Path, result: BlockResult) -> None:
    """Write a block's part file atomically: it exists whole or not at all (the resume unit)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(result.header(), ensure_ascii=False) + "\n")
        for row in result.rows:
            handle.write(row + "\n")


def read_part_header(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.loads(handle.readline())


def copy_part_rows(path: str | Path, out: Any) -> int:
    """Append a part file's rows (everything after the header) to the open text file ``out``."""
    count = 0
    with open(path, encoding="utf-8") as handle:
        handle.readline()
        for line in handle:
            out.write(line)
            count += 1
    return count

