"""The SteerLM attributes and their label strings: the one place the data contract lives.

A label string is comma-joined ``name:value`` pairs with no spaces, attributes in the canonical
order below, e.g. ``helpfulness:3,correctness:3,coherence:4,complexity:2,verbosity:1``. The index
order of :data:`ATTRIBUTES` is load-bearing: it is the reward model's output order, and the
scaled Bradley-Terry loss reads the reward from the ``helpfulness`` output.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from steerray.errors import SteerrayError

OASST_ATTRIBUTES: tuple[str, ...] = ("quality", "toxicity", "humor", "creativity")
HELPSTEER_ATTRIBUTES: tuple[str, ...] = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
ATTRIBUTES: tuple[str, ...] = OASST_ATTRIBUTES + HELPSTEER_ATTRIBUTES
ATTRIBUTE_INDEX: dict[str, int] = {name: i for i, name in enumerate(ATTRIBUTES)}
HELPFULNESS_INDEX = ATTRIBUTE_INDEX["helpfulness"]
QUALITY_INDEX = ATTRIBUTE_INDEX["quality"]

# Value written into regression labels for an attribute the row does not carry (NeMo-Aligner's).
IGNORE_VALUE = -100.0
MIN_VALUE, MAX_VALUE = 0, 4
# HelpSteer2-Preference hijacks the quality slot for the signed preference strength (-3..3).
PREFERENCE_RANGE = (-3, 3)

# The reference's inference defaults (spec 6.4): "best" answer, no toxicity/humor/creativity.
DEFAULT_STEERING: dict[str, int] = {
    "quality": 4, "toxicity": 0, "humor": 0, "creativity": 0,
    "helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 4, "verbosity": 4,
}


class LabelError(SteerrayError, ValueError):
    """A label string or attribute value that does not follow the SteerLM contract."""


def check_attribute(name: str) -> str:
    if name not in ATTRIBUTE_INDEX:
        raise LabelError(f"unknown attribute {name!r}; known attributes: {', '.join(ATTRIBUTES)}")
    return name


def _format_value(value: float) -> str:
    # Integers are written without a decimal point, as the reference's preprocessors do.
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def encode_label(values: Mapping[str, float]) -> str:
    """Encode ``{attribute: value}`` as a label string in canonical attribute order."""
    for name in values:
        check_attribute(name)
    parts = []
    for name in ATTRIBUTES:
        if name in values and values[name] is not None:
            value = values[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise LabelError(f"attribute {name!r} has a non-numeric value {value!r}")
            parts.append(f"{name}:{_format_value(value)}")
    return ",".join(parts)


def parse_label(label: str, *, integers: bool = False) -> dict[str, float]:
    """Parse ``name:value,...`` into a dict. Raises :class:`LabelError` naming what is wrong.

    ``integers=True`` additionally demands whole numbers (what SFT conditioning and serving use).
    An empty string parses to ``{}``.
    """
    if not isinstance(label, str):
        raise LabelError(f"label must be a string, got {type(label).__name__}")
    if label.strip() == "":
        return {}
    values: dict[str, float] = {}
    for pair in label.split(","):
        name, sep, raw = pair.partition(":")
        name, raw = name.strip(), raw.strip()
        if not sep or not name or not raw:
            raise LabelError(f"malformed pair {pair!r} in label {label!r}; expected name:value")
        check_attribute(name)
        if name in values:
            raise LabelError(f"attribute {name!r} appears twice in label {label!r}")
        try:
            value = float(raw)
        except ValueError:
            raise LabelError(f"attribute {name!r} has a non-numeric value {raw!r}") from None
        if not math.isfinite(value):
            raise LabelError(f"attribute {name!r} has a non-finite value {raw!r}")
        if integers and not value.is_integer():
            raise LabelError(f"attribute {name!r} must be a whole number, got {raw!r}")
        values[name] = value
    return values


def check_range(values: Mapping[str, float], *, allow_preference: bool = False) -> None:
    """Every value within 0-4 (the quality slot may hold a signed preference strength)."""
    for name, value in values.items():
        low, high = MIN_VALUE, MAX_VALUE
        if allow_preference and name == "quality":  # a 0-4 quality or a signed strength
            low = PREFERENCE_RANGE[0]
        if not low <= value <= high:
            raise LabelError(f"attribute {name!r} = {_format_value(value)} is outside {low}..{high}")


def label_vector(label: str | Mapping[str, float], attributes: Sequence[str] = ATTRIBUTES) -> list[float]:
    """Regression target: one float per attribute, :data:`IGNORE_VALUE` where the label lacks one."""
    values = parse_label(label) if isinstance(label, str) else dict(label)
    return [float(values[name]) if name in values else IGNORE_VALUE for name in attributes]


def clip_round(value: float) -> int:
    """Clip to 0-4, then round half to even (Python's ``round``), as the reference annotator does."""
    return int(round(min(max(float(value), MIN_VALUE), MAX_VALUE)))


def predictions_to_label(predictions: Iterable[float], attributes: Sequence[str] = ATTRIBUTES) -> str:
    """Turn raw reward-model outputs into a label string over all ``attributes``."""
    preds = list(predictions)
    if len(preds) != len(attributes):
        raise LabelError(f"got {len(preds)} predictions for {len(attributes)} attributes")
    return encode_label({name: clip_round(p) for name, p in zip(attributes, preds, strict=True)})


def steering_label(steering: Mapping[str, int] | None = None,
                   defaults: Mapping[str, int] = DEFAULT_STEERING,
                   attributes: Sequence[str] | None = None) -> str:
    """The label string a user steers with: ``steering`` over the documented defaults, validated.

    ``attributes``: the label attributes the model was trained with (see :func:`model_label_attributes`);
    the label then carries only those, as in training, and steering any other attribute is an error.
    """
    merged = dict(defaults)
    for name, value in (steering or {}).items():
        check_attribute(name)
        if attributes is not None and name not in attributes:
            raise LabelError(f"cannot steer {name!r}: this model was trained on labels of "
                             f"{', '.join(attributes)} only")
        if isinstance(value, bool) or not isinstance(value, int) and not (
                isinstance(value, float) and value.is_integer()):
            raise LabelError(f"steering value for {name!r} must be an integer 0-4, got {value!r}")
        merged[name] = int(value)
    check_range(merged)
    if attributes is not None:
        merged = {name: value for name, value in merged.items() if name in attributes}
    return encode_label(merged)


# An SFT model trained on labels over some attributes only records them in its config.json under this
# key; serving, sampling and evaluation read it so that prompts carry the label the model learnt.
LABEL_ATTRIBUTES_KEY = "steerlm_label_attributes"


def check_label_attributes(names: Sequence[str]) -> tuple[str, ...]:
    """Known, distinct attribute names in canonical order (the order labels are written in)."""
    for name in names:
        check_attribute(name)
    if not names or len(set(names)) != len(names):
        raise LabelError(f"label attributes must be distinct and not empty, got {list(names)}")
    return tuple(name for name in ATTRIBUTES if name in names)


def restrict_label(label: str, attributes: Sequence[str] | None) -> str:
    """``label`` with only ``attributes`` kept (all of it when ``attributes`` is None)."""
    if attributes is None:
        return label
    return encode_label({name: value for name, value in parse_label(label).items() if name in attributes})


def model_label_attributes(model: str) -> tuple[str, ...] | None:
    """The label attributes a model folder was fine-tuned on; None for full labels or a non-folder name."""
    import json
    from pathlib import Path

    config = Path(model).expanduser() / "config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text(encoding="utf-8")).get(LABEL_ATTRIBUTES_KEY)
    return check_label_attributes(value) if value else None
