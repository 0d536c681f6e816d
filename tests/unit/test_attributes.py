"""The SteerLM label contract: order, encode/parse round trips, errors, rounding."""

import json

import pytest

from steerray.attributes import (
    ATTRIBUTES,
    DEFAULT_STEERING,
    HELPFULNESS_INDEX,
    IGNORE_VALUE,
    LabelError,
    check_range,
    clip_round,
    encode_label,
    label_vector,
    parse_label,
    predictions_to_label,
    steering_label,
)


def test_attribute_order_is_the_reference_head_order():
    assert ATTRIBUTES == ("quality", "toxicity", "humor", "creativity", "helpfulness", "correctness",
                          "coherence", "complexity", "verbosity")
    assert HELPFULNESS_INDEX == 4


def test_encode_uses_canonical_order_and_integers():
    assert encode_label({"verbosity": 1, "helpfulness": 4.0}) == "helpfulness:4,verbosity:1"
    assert encode_label({"quality": -2}) == "quality:-2"
    assert encode_label({}) == ""


def test_parse_round_trips_and_partial_strings():
    text = "helpfulness:3,correctness:3,coherence:4,complexity:2,verbosity:1"
    assert encode_label(parse_label(text)) == text
    assert parse_label("") == {}
    assert parse_label("quality:2.5") == {"quality": 2.5}


@pytest.mark.parametrize("bad, fragment", [
    ("helpfulnes:3", "unknown attribute 'helpfulnes'"),
    ("helpfulness:x", "non-numeric value 'x'"),
    ("helpfulness", "malformed pair"),
    ("helpfulness:1,helpfulness:2", "appears twice"),
    ("helpfulness:nan", "non-finite"),
])
def test_parse_errors_name_the_problem(bad, fragment):
    with pytest.raises(LabelError, match=fragment):
        parse_label(bad)


def test_integers_and_range_checks():
    with pytest.raises(LabelError, match="whole number"):
        parse_label("verbosity:1.5", integers=True)
    with pytest.raises(LabelError, match="outside 0..4"):
        check_range({"verbosity": 5})
    check_range({"quality": -3}, allow_preference=True)


def test_label_vector_marks_missing_attributes():
    vector = label_vector("helpfulness:4,correctness:4,coherence:4,complexity:3,verbosity:2")
    assert vector == [IGNORE_VALUE] * 4 + [4.0, 4.0, 4.0, 3.0, 2.0]


def test_clip_round_is_half_to_even_after_clipping():
    assert [clip_round(v) for v in (2.5, 3.5, -1.0, 7.2, 0.5, 1.49)] == [2, 4, 0, 4, 0, 1]
    assert predictions_to_label([2.5] * 9) == ",".join(f"{name}:2" for name in ATTRIBUTES)


def test_steering_label_defaults_and_validation():
    assert steering_label() == encode_label(DEFAULT_STEERING)
    assert "verbosity:0" in steering_label({"verbosity": 0})
    with pytest.raises(LabelError):
        steering_label({"verbosity": 5})
    with pytest.raises(LabelError):
        steering_label({"verbosity": 1.5})
    with pytest.raises(LabelError):
        steering_label({"wit": 2})


def test_label_attribute_subsets_for_training_and_steering(tmp_path):
    from steerray.attributes import check_label_attributes, model_label_attributes, restrict_label

    assert check_label_attributes(["verbosity", "humor"]) == ("humor", "verbosity")  # canonical order
    for bad in (["verbosity", "verbosity"], [], ["wit"]):
        with pytest.raises(LabelError):
            check_label_attributes(bad)
    assert restrict_label("quality:3,humor:1,verbosity:2", ("humor", "verbosity")) == "humor:1,verbosity:2"
    assert restrict_label("quality:3", None) == "quality:3"
    # steering a subset model: only its attributes, defaults filled, anything else refused by name
    assert steering_label({"verbosity": 0}, attributes=("complexity", "verbosity")) == "complexity:4,verbosity:0"
    with pytest.raises(LabelError, match="cannot steer 'humor'.*complexity, verbosity only"):
        steering_label({"humor": 2}, attributes=("complexity", "verbosity"))
    # a model folder records its subset in config.json; no key, no folder, or a hub id: full labels
    (tmp_path / "config.json").write_text(json.dumps({"steerlm_label_attributes": ["verbosity", "humor"]}))
    assert model_label_attributes(str(tmp_path)) == ("humor", "verbosity")
    assert model_label_attributes(str(tmp_path / "missing")) is None
    assert model_label_attributes("HuggingFaceTB/SmolLM2-135M-Instruct") is None
