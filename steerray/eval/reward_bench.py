"""Reward-model benchmarks: RewardBench v1, best-of-N, and any chosen/rejected pairs.

A benchmark is ``FORMAT[:NAME]=LOCATION`` (:meth:`BenchSpec.parse`); LOCATION is a jsonl, jsonl.gz or
parquet file, a folder of them, or an ``hf://`` path. Rows of each format:

- ``rewardbench``: ``{prompt, chosen, rejected, subset}``, RewardBench v1's schema (extra columns such as
  ``id`` or ``chosen_model`` are allowed). ``prompt`` is a string, or a list of ``{role, content}`` turns
  ending with the user (the prior preference sets' form).
- ``bon``: ``{instruction, responses: [{text, judgment}, ...]}`` with N >= 2 responses; a judgment says
  whether that response beat a reference: true/false, a number in [0, 1] (0.5: as good), or win/tie/loss.
- ``pairs``: ``{chosen, rejected}`` plus optional ``prompt``, ``strength``, ``tie``, ``id``, ``domain``,
  ``language``. Without ``prompt`` both sides must already be reward texts ending in ``<extra_id_2>``
  (prepare's ``preference/*.jsonl``); with it they are responses, rendered here.

Every scored text is :func:`steerray.data.sources.reward_text` of its context and response, the prompt
builder the regression data and the annotator use: byte-identical to what the reward model trained on.
Bad rows are counted rejects with file, line and reason; a file without a usable row is an error.

One scalar per text (:func:`parse_score_spec`): an attribute name, ``name=weight,...`` over the model's
attributes, or a preset (``helpsteer2``: the published HelpSteer2 weights). The default is
``helpfulness`` (else ``quality``, else a model's only output): the Bradley-Terry losses train only the
helpfulness output, so it is the one meaningful scalar of a preference-trained model (NVIDIA's scaled-BT
RMs are ranked on it), and for a regression model it is HelpSteer's overall rating. Weighted mixes were
published for particular models; ask for them explicitly.

RewardBench aggregation, as the leaderboard computes it (allenai/reward-bench ``rewardbench.py`` and
``analysis/get_benchmark_results.py``; weights from ``rewardbench/constants.py``):

1. A row is correct iff score(chosen) > score(rejected), strictly: equal scores are wrong (RewardBench's
   rule for classifier RMs); they are counted per subset as ``equal_scores``.
2. Subset accuracy = correct / rows (a fraction).
3. Section score (0-100) = prompt-weighted mean of its subsets' accuracies, weights = upstream's
   ``EXAMPLE_COUNTS`` (:data:`EXAMPLE_COUNTS`), over the subsets present. They are the subsets' prompt
   counts except math-prm, weighted 984 for its 447 prompts so math weighs as much as the six hep-*
   code subsets (6 x 164). Upstream gives xstest-should-refuse 250 and xstest-should-respond 154, the
   reverse of the subsets' sizes (XSTest has 200 unsafe prompts, so at most 200 to refuse); we keep
   upstream's numbers so Safety is comparable with published scores.
4. Prior Sets (0-100) = unweighted mean of the accuracies of anthropic_helpful, anthropic_hhh, shp and
   summarize present in the file (the leaderboard's nanmean).
5. Overall = mean of the present section scores weighted 2 for Chat, Chat Hard, Safety, Reasoning and
   1 for Prior Sets: the leaderboard's "Prior Sets (0.5 weight)" (check: ArmoRM-Llama3-8B's May 2024 row,
   sections 96.9, 76.8, 92.2, 97.3 and prior sets 74.3, gives (2 * 363.2 + 74.3) / 9 = 89.0, its listed
   score). Without prior-set rows (RewardBench's ``filtered`` split alone) it is the plain mean of the four
   sections, the number later model cards publish. ``complete`` is false, and ``missing_subsets`` names
   them, when a core subset has no rows: such a score is not comparable with published ones.
6. Any other subset is section ``other``: scored and listed, in no section and not in the overall score,
   and reported as a warning with its first file and line (never dropped silently).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from steerray.artifacts import atomic_write_json, atomic_write_text, write_jsonl
from steerray.data import readers
from steerray.data.sources import RowError, context_turns, reward_text
from steerray.errors import SteerrayError
from steerray.eval.metrics import pairwise_metrics
from steerray.eval.report import Block, fmt, render_markdown
from steerray.templates import LABEL_START, USER_ROLE
from steerray.training.reward_data import count_reasons, preference_row_problem

BENCH_FORMATS = ("rewardbench", "bon", "pairs")
CORE_SECTIONS = ("Chat", "Chat Hard", "Safety", "Reasoning")
PRIOR_SECTION, OTHER_SECTION = "Prior Sets", "other"
SUBSET_MAPPING: dict[str, tuple[str, ...]] = {
    "Chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "Chat Hard": ("mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"),
    "Safety": ("refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}
EXAMPLE_COUNTS: dict[str, int] = {  # upstream's weights, see the module docstring (math-prm, xstest)
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28,
    "mt-bench-med": 40, "mt-bench-hard": 37, "llmbar-natural": 100, "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46,
    "refusals-dangerous": 100, "refusals-offensive": 100, "xstest-should-refuse": 250,
    "xstest-should-respond": 154, "donotanswer": 136, "math-prm": 984, "hep-cpp": 164, "hep-go": 164,
    "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}
PRIOR_SETS = ("anthropic_helpful", "anthropic_hhh", "shp", "summarize")
SECTION_WEIGHTS = {**dict.fromkeys(CORE_SECTIONS, 2.0), PRIOR_SECTION: 1.0}
SECTION_OF = {subset: section for section, subsets in SUBSET_MAPPING.items() for subset in subsets}
SECTION_OF.update(dict.fromkeys(PRIOR_SETS, PRIOR_SECTION))

SCORE_PRESETS: dict[str, dict[str, float]] = {
    # HelpSteer2 paper (Llama3-70B-SteerLM-RM); the issue and model card list the same numbers.
    "helpsteer2": {"helpfulness": 0.65, "correctness": 0.8, "coherence": 0.45, "complexity": 0.55,
                   "verbosity": -0.4},
    # Nemotron-4-340B-Reward's model card (its first four outputs are untrained).
    "nemotron-4-340b": {"helpfulness": 0.3, "correctness": 0.74, "coherence": 0.46, "complexity": 0.47,
                        "verbosity": -0.33},
}
DEFAULT_SCORE_ORDER = ("helpfulness", "quality")
JUDGMENT_WORDS = {"win": 1.0, "tie": 0.5, "loss": 0.0}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")

# texts -> predictions [N, A] in the model's attribute order, or (predictions, truncated flags) as
# steerray.annotation's predictors return them.
Predict = Callable[[Sequence[str]], Any]


class BenchError(SteerrayError, ValueError):
    """A benchmark argument, file or predictor that cannot be evaluated; the message names it."""


class ScoreSpecError(SteerrayError, ValueError):
    """A --score that does not fit the reward model; the message lists the model's attributes."""


# --------------------------------------------------------------------------------------------------
# The scalar score
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScoreSpec:
    text: str  # as given; "" = the default
    weights: tuple[tuple[str, float], ...]

    def vector(self, attributes: Sequence[str]) -> np.ndarray:
        """Weights over ``attributes`` (the model's output order), 0 for attributes not in the spec."""
        given = dict(self.weights)
        return np.asarray([given.get(name, 0.0) for name in attributes], dtype=np.float64)

    def describe(self) -> str:
        if len(self.weights) == 1 and self.weights[0][1] == 1.0:
            return self.weights[0][0]
        return " + ".join(f"{w:g}*{name}" for name, w in self.weights).replace("+ -", "- ")

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.text or "(default)", "formula": self.describe(), "weights": dict(self.weights)}


def default_score(attributes: Sequence[str]) -> dict[str, float]:
    """helpfulness, else quality, else a model's only output (see the module docstring for why)."""
    for name in DEFAULT_SCORE_ORDER:
        if name in attributes:
            return {name: 1.0}
    if len(attributes) == 1:
        return {attributes[0]: 1.0}
    raise ScoreSpecError(f"this reward model predicts {', '.join(attributes)}: say which scalar to rank by with "
                         "--score NAME or --score NAME=WEIGHT,NAME=WEIGHT")


def _parse_weights(text: str) -> dict[str, float]:
    weights: dict[str, float] = {}
    for item in text.split(","):
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ScoreSpecError(f"--score item {item.strip()!r} is not NAME=WEIGHT (in {text!r})")
        try:
            weight = float(raw)
        except ValueError:
            raise ScoreSpecError(f"--score weight of {name!r} is not a number: {raw.strip()!r}") from None
        if not math.isfinite(weight):
            raise ScoreSpecError(f"--score weight of {name!r} must be finite, got {raw.strip()!r}")
        if name in weights:
            raise ScoreSpecError(f"--score names {name!r} twice (in {text!r})")
        weights[name] = weight
    return weights


def parse_score_spec(text: str | None, attributes: Sequence[str]) -> ScoreSpec:
    """The scalar a benchmark ranks by: an attribute name, ``name=weight,...``, a preset, or the default.

    Every name must be one of ``attributes`` (the model's outputs): checked here, before any scoring.
    """
    attributes = list(attributes)
    text = (text or "").strip()
    if not text:
        weights = default_score(attributes)
    elif text in SCORE_PRESETS:
        weights = dict(SCORE_PRESETS[text])
    elif "=" in text:
        weights = _parse_weights(text)
    elif "," in text:
        raise ScoreSpecError(f"--score {text!r}: give one attribute, or weights as NAME=WEIGHT,NAME=WEIGHT")
    else:
        weights = {text: 1.0}
    missing = [name for name in weights if name not in attributes]
    if missing:
        raise ScoreSpecError(f"--score {text!r} uses {', '.join(missing)}, which this reward model does not "
                             f"predict; its attributes are: {', '.join(attributes)}")
    if not any(weights.values()):
        raise ScoreSpecError(f"--score {text!r}: every weight is 0, nothing to rank by")
    return ScoreSpec(text, tuple(weights.items()))


# --------------------------------------------------------------------------------------------------
# Benchmark files: reading and validating rows
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchSpec:
    format: str
    location: str
    name: str

    @classmethod
    def parse(cls, text: str) -> BenchSpec:
        """``FORMAT[:NAME]=LOCATION``, e.g. ``rewardbench=rb.parquet``, ``pairs:hs3=prep/preference/val.jsonl``."""
        head, sep, location = text.partition("=")
        fmt_name, _, name = head.strip().partition(":")
        fmt_name, name, location = fmt_name.strip(), name.strip() or fmt_name.strip(), location.strip()
        if fmt_name not in BENCH_FORMATS:
            raise BenchError(f"--bench {text!r}: unknown format {fmt_name!r}; formats: {', '.join(BENCH_FORMATS)}")
        if not sep or not location:
            raise BenchError(f"--bench {text!r} needs a location: --bench {fmt_name}=PATH")
        if not NAME_PATTERN.match(name):
            raise BenchError(f"--bench {text!r}: name {name!r} may hold only letters, digits, '_', '.', '-'")
        return cls(fmt_name, location, name)


def parse_bench_specs(texts: Sequence[str]) -> list[BenchSpec]:
    """Every ``--bench``; two benchmarks with one name (two of a format need ``FORMAT:NAME``) are an error."""
    specs = [BenchSpec.parse(text) for text in texts]
    names = [spec.name for spec in specs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise BenchError(f"two --bench share the name {', '.join(twice)}; name them: --bench FORMAT:NAME=PATH")
    if not specs:
        raise BenchError("no --bench given; e.g. --bench rewardbench=PATH")
    return specs


@dataclass
class BenchData:
    spec: BenchSpec
    rows: list[dict[str, Any]] = field(default_factory=list)  # validated, with "texts" to score
    rejects: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0


def _records(location: str) -> Iterator[tuple[str, int, Any, str]]:
    """``(file, line, record, error)`` of every row under ``location``, through prepare's readers."""
    files = (readers.list_hub_files(location) if location.startswith(readers.HUB_PREFIX)
             else readers.list_local_files(location))
    for task in readers.plan_reads(files):
        for raw in readers.read_task_rows(dataclasses.asdict(task)):
            record, error = readers.decode_raw(raw)
            yield raw["file"], int(raw["line"]), record, error


def _require(record: Any, columns: Sequence[str]) -> None:
    if not isinstance(record, dict):
        raise RowError(f"row must be a JSON object, got {type(record).__name__}")
    missing = [c for c in columns if c not in record]
    if missing:
        raise RowError(f"missing column(s): {', '.join(missing)}")


def _string(record: Mapping[str, Any], column: str) -> str:
    value = record.get(column)
    if not isinstance(value, str) or not value.strip():
        raise RowError(f"{column!r} is empty or not a string")
    return value


def prompt_turns(value: Any, column: str) -> list[tuple[str, str]]:
    """A prompt string (one user turn) or a ``[{role, content}]`` list as SteerLM ``(role, text)`` turns."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"{column!r} is empty")
        return [(USER_ROLE, value)]
    return context_turns(value, column)


def rewardbench_row(record: Any, row_id: str) -> dict[str, Any]:
    _require(record, ("prompt", "chosen", "rejected", "subset"))
    turns = prompt_turns(record["prompt"], "prompt")
    chosen, rejected, subset = (_string(record, c) for c in ("chosen", "rejected", "subset"))
    return {"id": str(record.get("id", row_id)), "subset": subset, "section": SECTION_OF.get(subset, OTHER_SECTION),
            "prompt": record["prompt"], "chosen": chosen, "rejected": rejected,
            "texts": [reward_text(turns, chosen), reward_text(turns, rejected)]}


def judgment_value(value: Any, where: str) -> float:
    """A BoN judgment as a win value in [0, 1]: true/false, a number in [0, 1], or win/tie/loss."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1:
        return float(value)
    if isinstance(value, str) and value.strip().lower() in JUDGMENT_WORDS:
        return JUDGMENT_WORDS[value.strip().lower()]
    raise RowError(f"{where} must be true/false, a number in [0, 1] or win/tie/loss, got {value!r}")


def bon_row(record: Any, row_id: str) -> dict[str, Any]:
    _require(record, ("instruction", "responses"))
    turns = prompt_turns(record["instruction"], "instruction")
    responses = record["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        count = len(responses) if isinstance(responses, list) else type(responses).__name__
        raise RowError(f"'responses' must be a list of at least 2 {{text, judgment}} objects, got {count}")
    texts, judgments = [], []
    for i, response in enumerate(responses):
        if not isinstance(response, dict) or "judgment" not in response:
            raise RowError(f"responses[{i}] must be an object with 'text' and 'judgment'")
        text = response.get("text")
        if not isinstance(text, str) or not text.strip():
            raise RowError(f"responses[{i}].text is empty or not a string")
        texts.append(text)
        judgments.append(judgment_value(response["judgment"], f"responses[{i}].judgment"))
    return {"id": str(record.get("id", row_id)), "instruction": record["instruction"], "responses": texts,
            "judgments": judgments, "texts": [reward_text(turns, t) for t in texts]}


def pairs_row(record: Any, row_id: str) -> dict[str, Any]:
    _require(record, ("chosen", "rejected"))
    if record.get("tie") is True and "strength" not in record:
        record = {**record, "strength": 0.0}  # a tie needs no strength column
    problem = preference_row_problem(record)  # the training reader's rules for chosen/rejected/strength/tie
    if problem:
        raise RowError(problem)
    chosen, rejected = record["chosen"], record["rejected"]
    if record.get("prompt") is not None:
        turns = prompt_turns(record["prompt"], "prompt")
        texts = [reward_text(turns, chosen), reward_text(turns, rejected)]
    else:
        for side in ("chosen", "rejected"):
            if not record[side].endswith(LABEL_START):
                raise RowError(f"{side!r} is not a rendered reward text (it does not end with {LABEL_START}) "
                               "and the row has no 'prompt' to render it with")
        texts = [chosen, rejected]
    strength = float(record.get("strength", 1.0))
    row = {"id": str(record.get("id", row_id)), "strength": strength, "tie": bool(record.get("tie")) or strength == 0,
           "chosen": chosen, "rejected": rejected, "texts": texts}
    row.update({k: record[k] for k in ("prompt", "domain", "language") if record.get(k) is not None})
    return row


VALIDATORS: dict[str, Callable[[Any, str], dict[str, Any]]] = {
    "rewardbench": rewardbench_row, "bon": bon_row, "pairs": pairs_row}


def _other_subset_warnings(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    first: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("section") == OTHER_SECTION:
            entry = first.setdefault(row["subset"], {"file": row["file"], "line": row["line"], "subset": row["subset"],
                                                     "rows": 0})
            entry["rows"] += 1
    for entry in first.values():
        entry["reason"] = (f"subset {entry['subset']!r} is not in RewardBench v1's section table: scored under "
                           "section 'other', in no section and not in the overall score")
    return list(first.values())


def read_bench(spec: BenchSpec) -> BenchData:
    """Read and validate one benchmark: usable rows (with the texts to score), rejects, warnings."""
    data = BenchData(spec)
    validate = VALIDATORS[spec.format]
    for file, line, record, error in _records(spec.location):
        data.total += 1
        if not error:
            try:
                row = validate(record, f"{Path(file).name}:{line}")
            except RowError as err:
                error = str(err)
            else:
                data.rows.append({"file": file, "line": line, **row})
                continue
        reject = {"file": file, "line": line, "reason": error}
        if isinstance(record, dict):
            reject["columns"] = sorted(record)
        data.rejects.append(reject)
    data.warnings = _other_subset_warnings(data.rows)
    if not data.rows:
        reasons = sorted({r["reason"] for r in data.rejects})[:3]
        raise BenchError(f"{spec.format} benchmark {spec.location}: no usable row among {data.total}" +
                         (f" (e.g. {'; '.join(reasons)})" if reasons else " (no rows)"))
    return data


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------

def unique_texts(benches: Sequence[BenchData]) -> list[str]:
    """Every text the benchmarks need scored, once each, in first-seen order."""
    return list(dict.fromkeys(text for bench in benches for row in bench.rows for text in row["texts"]))


def _predictions(output: Any, count: int, width: int) -> tuple[np.ndarray, list[bool]]:
    preds, flags = output if isinstance(output, tuple) and len(output) == 2 else (output, [False] * count)
    preds = np.asarray(preds, dtype=np.float64)
    if preds.shape != (count, width):
        raise BenchError(f"the predictor returned shape {preds.shape} for {count} texts; expected "
                         f"({count}, {width}), one column per model attribute")
    if not np.isfinite(preds).all():
        raise BenchError(f"the predictor returned {int((~np.isfinite(preds)).sum())} non-finite values")
    return preds, [bool(f) for f in flags]


def predict_scores(texts: Sequence[str], predict: Predict, spec: ScoreSpec, attributes: Sequence[str], *,
                   chunk_size: int = 256) -> tuple[dict[str, float], set[str]]:
    """``({text: scalar score}, texts that lost tokens)``, calling ``predict`` on chunks of texts."""
    vector = spec.vector(attributes)
    scores: dict[str, float] = {}
    truncated: set[str] = set()
    for start in range(0, len(texts), chunk_size):
        chunk = list(texts[start: start + chunk_size])
        preds, flags = _predictions(predict(chunk), len(chunk), len(attributes))
        for text, value, flag in zip(chunk, preds @ vector, flags, strict=True):
            scores[text] = float(value)
            if flag:
                truncated.add(text)
    return scores, truncated


# --------------------------------------------------------------------------------------------------
# Metrics (pure)
# --------------------------------------------------------------------------------------------------

def subset_accuracies(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per subset: rows, correct, accuracy (fraction), rows with equal scores, section."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = out.setdefault(row["subset"], {"section": SECTION_OF.get(row["subset"], OTHER_SECTION), "n": 0,
                                               "correct": 0, "equal_scores": 0})
        entry["n"] += 1
        entry["correct"] += int(bool(row["correct"]))
        entry["equal_scores"] += int(bool(row.get("equal", False)))
    for entry in out.values():
        entry["accuracy"] = entry["correct"] / entry["n"]
    return dict(sorted(out.items()))


def section_scores(accuracy: Mapping[str, float]) -> dict[str, float]:
    """Section scores (0-100) of the sections with a subset in ``accuracy``: prompt-weighted, prior sets plain."""
    scores: dict[str, float] = {}
    for section, subsets in SUBSET_MAPPING.items():
        present = [s for s in subsets if s in accuracy]
        if present:
            total = sum(EXAMPLE_COUNTS[s] for s in present)
            scores[section] = 100.0 * sum(accuracy[s] * EXAMPLE_COUNTS[s] for s in present) / total
    prior = [accuracy[s] for s in PRIOR_SETS if s in accuracy]
    if prior:
        scores[PRIOR_SECTION] = 100.0 * sum(prior) / len(prior)
    return scores


def overall_score(sections: Mapping[str, float]) -> float | None:
    """Weighted mean of the present sections: 2 per core section, 1 for Prior Sets (None if none)."""
    present = [s for s in SECTION_WEIGHTS if s in sections]
    if not present:
        return None
    return sum(sections[s] * SECTION_WEIGHTS[s] for s in present) / sum(SECTION_WEIGHTS[s] for s in present)


def rewardbench_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """RewardBench v1 numbers from rows ``{subset, correct, equal}`` (see the module docstring)."""
    per_subset = subset_accuracies(rows)
    sections = section_scores({s: e["accuracy"] for s, e in per_subset.items()})
    missing = [s for s in EXAMPLE_COUNTS if s not in per_subset]
    return {
        "n": len(rows), "accuracy": sum(bool(r["correct"]) for r in rows) / len(rows) if rows else None,
        "overall": overall_score(sections), "sections": sections, "complete": not missing,
        "missing_subsets": missing, "per_subset": per_subset,
        "other_subsets": [s for s, e in per_subset.items() if e["section"] == OTHER_SECTION],
    }


def bon_pick(scores: Sequence[float], judgments: Sequence[float]) -> tuple[int, float, bool]:
    """The reward model's pick: ``(index, expected judgment, tied)``; tied maxima share the pick evenly."""
    s, j = np.asarray(scores, dtype=np.float64), np.asarray(judgments, dtype=np.float64)
    top = s == s.max()
    return int(np.argmax(s)), float(j[top].mean()), bool(top.sum() > 1)


def bon_metrics(groups: Sequence[tuple[Sequence[float], Sequence[float]]]) -> dict[str, Any]:
    """Best-of-N from ``(scores, judgments)`` per prompt: the pick's mean win rate vs random pick and oracle.

    ``random`` is the expected win rate of a uniformly random pick (the mean judgment of each prompt);
    ``oracle`` always picks a best-judged response; ``gap_closed`` = (model - random) / (oracle - random).
    """
    picks = [bon_pick(scores, judgments) for scores, judgments in groups]
    model = float(np.mean([p[1] for p in picks]))
    random = float(np.mean([np.mean(j) for _, j in groups]))
    oracle = float(np.mean([np.max(j) for _, j in groups]))
    return {"n_prompts": len(groups), "n_responses": int(sum(len(j) for _, j in groups)),
            "mean_n": float(np.mean([len(j) for _, j in groups])), "win_rate": model, "random": random,
            "oracle": oracle, "gap_closed": (model - random) / (oracle - random) if oracle - random > 1e-12 else None,
            "tied_picks": sum(p[2] for p in picks)}


def _accuracy_by(keys: Sequence[Any], correct: np.ndarray) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key in sorted(set(keys), key=str):
        mask = np.asarray([k == key for k in keys], dtype=bool)
        out[str(key)] = {"n": int(mask.sum()), "accuracy": float(correct[mask].mean())}
    return out


def pairs_metrics(r_chosen: Sequence[float], r_rejected: Sequence[float], strength: Sequence[float],
                  tie: Sequence[bool], groups: Sequence[Any] | None = None) -> dict[str, Any]:
    """Pairwise accuracy over decided pairs (ties apart), by strength and by ``groups`` (e.g. domain).

    For ties the useful number is how close the model scores the two sides: ``ties.mean_abs_margin``
    next to the decided pairs' ``decided_mean_abs_margin``.
    """
    chosen, rejected = np.asarray(r_chosen, dtype=np.float64), np.asarray(r_rejected, dtype=np.float64)
    tied = np.asarray(tie, dtype=bool)
    strengths = np.where(tied, 0.0, np.abs(np.asarray(strength, dtype=np.float64)))
    result = pairwise_metrics(chosen, rejected, strengths)
    decided, margin = ~tied, np.abs(chosen - rejected)
    correct = chosen > rejected
    result["equal_scores"] = int((chosen == rejected)[decided].sum())
    result["decided_mean_abs_margin"] = float(margin[decided].mean()) if decided.any() else None
    result["ties"] = {"n": int(tied.sum()), "mean_abs_margin": float(margin[tied].mean()) if tied.any() else None}
    result["per_strength"] = _accuracy_by([fmt(float(s), 0 if float(s).is_integer() else 2)
                                           for s in strengths[decided]], correct[decided]) if decided.any() else {}
    if groups is not None and decided.any():
        result["per_group"] = _accuracy_by([g for g, d in zip(groups, decided, strict=True) if d], correct[decided])
    return result


# --------------------------------------------------------------------------------------------------
# Results: metrics and the rows users read to look at failures
# --------------------------------------------------------------------------------------------------

@dataclass
class BenchResult:
    spec: BenchSpec
    metrics: dict[str, Any]
    rows: list[dict[str, Any]]  # one per benchmark row, with its scores
    rejects: list[dict[str, Any]]
    warnings: list[dict[str, Any]]
    total: int

    def summary(self, max_rejects: int = 20) -> dict[str, Any]:
        """The eval.json entry: counts, rejects by reason (the first few in full), warnings, metrics."""
        return {"format": self.spec.format, "location": self.spec.location, "rows_in": self.total,
                "scored": len(self.rows), "rejected": len(self.rejects),
                "rejects_by_reason": count_reasons(self.rejects), "rejects": self.rejects[:max_rejects],
                "warnings": self.warnings, "truncated": sum(bool(r.get("truncated")) for r in self.rows),
                "files": {"rows": f"{self.spec.name}_rows.jsonl", "rejects": f"{self.spec.name}_rejects.jsonl"},
                "metrics": self.metrics}


def _base(row: Mapping[str, Any], truncated: Collection[str]) -> dict[str, Any]:
    return {"file": row["file"], "line": row["line"], "id": row["id"],
            "truncated": any(t in truncated for t in row["texts"])}


def _rewardbench_rows(rows: Sequence[Mapping[str, Any]], scores: Mapping[str, float],
                      truncated: Collection[str]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        chosen, rejected = (scores[t] for t in row["texts"])
        out.append({**_base(row, truncated), "subset": row["subset"], "section": row["section"],
                    "correct": chosen > rejected, "equal": chosen == rejected, "score_chosen": chosen,
                    "score_rejected": rejected, "margin": chosen - rejected, "prompt": row["prompt"],
                    "chosen": row["chosen"], "rejected": row["rejected"]})
    return out


def _bon_rows(rows: Sequence[Mapping[str, Any]], scores: Mapping[str, float], truncated: Collection[str]) -> list[dict]:
    out = []
    for row in rows:
        values = [scores[t] for t in row["texts"]]
        pick, value, tied = bon_pick(values, row["judgments"])
        out.append({**_base(row, truncated), "pick": pick, "pick_judgment": value, "tied_pick": tied,
                    "best_judgment": max(row["judgments"]), "scores": values, "judgments": row["judgments"],
                    "instruction": row["instruction"], "responses": row["responses"]})
    return out


def _pairs_rows(rows: Sequence[Mapping[str, Any]], scores: Mapping[str, float], truncated: Collection[str]) -> list[dict]:
    out = []
    for row in rows:
        chosen, rejected = (scores[t] for t in row["texts"])
        extra = {k: row[k] for k in ("domain", "language", "prompt") if k in row}
        out.append({**_base(row, truncated), "tie": row["tie"], "strength": row["strength"],
                    "correct": None if row["tie"] else chosen > rejected, "score_chosen": chosen,
                    "score_rejected": rejected, "margin": chosen - rejected, **extra,
                    "chosen": row["chosen"], "rejected": row["rejected"]})
    return out


def score_bench(data: BenchData, scores: Mapping[str, float], truncated: Collection[str] = ()) -> BenchResult:
    """Metrics and scored rows of one benchmark, given every text's scalar score (:func:`predict_scores`)."""
    fmt_name = data.spec.format
    if fmt_name == "rewardbench":
        rows = _rewardbench_rows(data.rows, scores, truncated)
        metrics = rewardbench_metrics(rows)
    elif fmt_name == "bon":
        rows = _bon_rows(data.rows, scores, truncated)
        metrics = bon_metrics([(r["scores"], r["judgments"]) for r in rows])
    else:
        rows = _pairs_rows(data.rows, scores, truncated)
        groups = [r.get("domain") for r in rows] if any("domain" in r for r in rows) else None
        metrics = pairs_metrics([r["score_chosen"] for r in rows], [r["score_rejected"] for r in rows],
                                [r["strength"] for r in rows], [r["tie"] for r in rows], groups)
    return BenchResult(data.spec, metrics, rows, data.rejects, data.warnings, data.total)


def evaluate_benches(specs: Sequence[BenchSpec], predict: Predict, attributes: Sequence[str],
                     score: str | None = None, *, chunk_size: int = 256) -> tuple[ScoreSpec, list[BenchResult]]:
    """Check ``score`` against the model, read every benchmark, score each distinct text once, measure.

    ``predict`` is e.g. :func:`steerray.annotation.load_predictor`'s predictor; ``attributes`` its outputs.
    """
    spec = parse_score_spec(score, attributes)  # a bad --score fails before any file is read or scored
    benches = [read_bench(s) for s in specs]
    scores, truncated = predict_scores(unique_texts(benches), predict, spec, attributes, chunk_size=chunk_size)
    return spec, [score_bench(bench, scores, truncated) for bench in benches]


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------

def _rewardbench_blocks(m: Mapping[str, Any]) -> list[Block]:
    rows = [[s, fmt(m["sections"].get(s), 1), ", ".join(x for x in SUBSET_MAPPING.get(s, PRIOR_SETS)
                                                      if x in m["per_subset"])]
            for s in (*CORE_SECTIONS, PRIOR_SECTION) if s in m["sections"]]
    rows.append(["**Overall**", fmt(m["overall"], 1), "weighted mean: 2 per core section, 1 for Prior Sets"])
    blocks = [Block("table", headers=["Section", "Score (0-100)", "Subsets"], rows=rows)]
    if not m["complete"]:
        blocks.append(Block("p", f"Partial: no rows for {', '.join(m['missing_subsets'])}; not comparable "
                                 "with published RewardBench scores."))
    subset_rows = [[s, e["section"], str(e["n"]), fmt(e["accuracy"]), str(e["equal_scores"])]
                   for s, e in m["per_subset"].items()]
    blocks.append(Block("table", headers=["Subset", "Section", "Rows", "Accuracy", "Equal scores"], rows=subset_rows))
    return blocks


def _bon_blocks(m: Mapping[str, Any]) -> list[Block]:
    rows = [["reward model's pick", fmt(m["win_rate"])], ["random pick (expected)", fmt(m["random"])],
            ["oracle (best judged)", fmt(m["oracle"])], ["gap closed (model - random) / (oracle - random)",
                                                           fmt(m["gap_closed"])]]
    return [Block("table", headers=["Pick", "Mean win rate"], rows=rows),
            Block("p", f"{m['n_prompts']} prompts, {m['n_responses']} responses (mean N {fmt(m['mean_n'], 1)}); "
                       f"{m['tied_picks']} prompts with tied top scores (their pick counts as the tied responses' "
                       "mean judgment).")]


def _pairs_blocks(m: Mapping[str, Any]) -> list[Block]:
    rows = [["pairs", str(m["n_pairs"])], ["accuracy (decided pairs)", fmt(m["accuracy"])],
            ["strength-weighted accuracy", fmt(m.get("weighted_accuracy"))],
            ["equal scores (counted wrong)", str(m["equal_scores"])],
            ["mean |margin|, decided pairs", fmt(m["decided_mean_abs_margin"])],
            ["ties (not in accuracy)", str(m["ties"]["n"])], ["mean |margin|, ties", fmt(m["ties"]["mean_abs_margin"])]]
    blocks = [Block("table", headers=["Metric", "Value"], rows=rows)]
    for key, title in (("per_strength", "Strength"), ("per_group", "Domain")):
        if m.get(key):
            blocks.append(Block("table", headers=[title, "Pairs", "Accuracy"],
                                rows=[[k, str(v["n"]), fmt(v["accuracy"])] for k, v in m[key].items()]))
    return blocks


FORMAT_BLOCKS = {"rewardbench": _rewardbench_blocks, "bon": _bon_blocks, "pairs": _pairs_blocks}


def report_blocks(summary: Mapping[str, Any]) -> list[Block]:
    """report.md: one section per benchmark with its table(s), rejects by reason and warnings."""
    blocks = [Block("h1", "Reward-model benchmarks"),
              Block("p", f"Model: {summary.get('model') or '-'}. Score: {summary['score']['formula']}.")]
    for name, bench in summary["benches"].items():
        blocks.append(Block("h2", name if name == bench["format"] else f"{name} ({bench['format']})"))
        blocks.append(Block("p", f"{bench['location']}: {bench['scored']} rows scored of {bench['rows_in']}, "
                                 f"{bench['rejected']} rejected, {bench['truncated']} with truncated texts. "
                                 f"Scored rows: {bench['files']['rows']}."))
        blocks += FORMAT_BLOCKS[bench["format"]](bench["metrics"])
        if bench["rejects_by_reason"]:
            blocks.append(Block("table", headers=["Rejected because", "Rows"],
                                rows=[[r, str(n)] for r, n in list(bench["rejects_by_reason"].items())[:10]]))
        for warning in bench["warnings"]:
            blocks.append(Block("p", f"Warning ({warning['file']}:{warning['line']}, {warning['rows']} rows): "
                                     f"{warning['reason']}."))
    return blocks


def write_bench_report(results: Sequence[BenchResult], out_dir: str | Path, *, score: ScoreSpec,
                       model: str | None = None) -> dict[str, Path]:
    """Write ``<bench>_rows.jsonl``, ``<bench>_rejects.jsonl``, eval.json and report.md, each atomically."""
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for result in results:
        for kind, rows in (("rows", result.rows), ("rejects", result.rejects)):
            path = out / f"{result.spec.name}_{kind}.jsonl"
            write_jsonl(path, rows)  # an empty rejects file replaces a stale one of an earlier run
            paths[f"{result.spec.name}_{kind}"] = path
    summary = {"model": model, "score": score.to_json(), "benches": {r.spec.name: r.summary() for r in results}}
    paths["eval"] = atomic_write_json(out / "eval.json", summary)
    paths["report"] = atomic_write_text(out / "report.md", render_markdown(report_blocks(summary), {}, out))
    return paths
