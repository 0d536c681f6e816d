"""HelpSteer3-Preference to explicit pairs, ties kept as ties, --filter, and how training reads ties."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest

from steerray.data import readers, sources
from steerray.data.writer import PrepareWriter, finalize_rows
from steerray.templates import SYSTEM_PROMPT
from steerray.training import reward_data as rd

HEAD = f"<extra_id_0>System\n{SYSTEM_PROMPT}\n"


def hs3(context, r1="first answer", r2="second answer", pref=-2, domain="general", language="english", **extra):
    if isinstance(context, str):
        context = [{"role": "user", "content": context}]
    row = {"domain": domain, "language": language, "context": context, "response1": r1, "response2": r2,
           "overall_preference": pref,
           "individual_preference": [{"score": pref, "reasoning": "why", "feedback1": "f1", "feedback2": "f2"}]}
    row.update(extra)
    return row


MULTI_TURN = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
              {"role": "user", "content": "Q2"}]
LINES = [
    hs3("Say hi", "Hello!", "Hey.", pref=-2),                                          # 1: response1 better
    hs3(MULTI_TURN, "R1", "R2", pref=3),                                               # 2: multi-turn, response2
    hs3("Pick one", "left", "right", pref=0),                                          # 3: a tie
    hs3("Code?", "print(1)", "echo 1", pref=1, domain="code", language="python"),      # 4: code
    hs3("Bad", pref=4),                                                                # 5: outside -3..3
    hs3("Empty", r2="   "),                                                            # 6: empty response
    {k: v for k, v in hs3("x").items() if k != "context"},                             # 7: missing column
    hs3(MULTI_TURN[:2]),                                                               # 8: ends with assistant
    hs3([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]),       # 9: unknown role
    '{"domain": "general", "context": [',                                              # 10: malformed JSON
    hs3("Same", "same text", "same text", pref=1),                                     # 11: identical responses
    hs3("Many", pref=2, individual_preference="strong"),                               # 12: bad annotators
]


@pytest.fixture
def hs3_file(tmp_path):
    path = tmp_path / "preference" / "validation.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in LINES))
    return path


def convert(path, row_filter=None):
    rows = []
    for task in readers.plan_reads([str(path)]):
        for raw in readers.read_task_rows(dataclasses.asdict(task)):
            rows += sources.convert_raw_row("helpsteer3", raw, "val", row_filter)
    return rows


def by_line(rows, kind):
    return {r["line"]: json.loads(r["payload"]) for r in rows if r["kind"] == kind}


def test_pairs_ties_and_rejects_are_exact(hs3_file):
    rows = convert(hs3_file)
    assert Counter(r["kind"] for r in rows) == {"preference": 4, "reject": 7, "skip": 1}
    assert sum(r["counts_input"] for r in rows) == len(LINES)
    pairs = by_line(rows, "preference")
    assert pairs[1] == {"id": "validation.jsonl:1", "chosen": f"{HEAD}<extra_id_1>User\nSay hi\n<extra_id_1>Assistant\n"
                        "Hello!\n<extra_id_2>", "rejected": f"{HEAD}<extra_id_1>User\nSay hi\n<extra_id_1>Assistant\n"
                        "Hey.\n<extra_id_2>", "strength": 2.0, "tie": False, "domain": "general", "language": "english"}
    # Multi-turn context: every turn in the SteerLM template, the response as the last Assistant turn.
    assert pairs[2]["chosen"] == (f"{HEAD}<extra_id_1>User\nQ1\n<extra_id_1>Assistant\nA1\n<extra_id_1>User\nQ2\n"
                                  "<extra_id_1>Assistant\nR2\n<extra_id_2>")
    assert pairs[2]["rejected"].endswith("<extra_id_1>Assistant\nR1\n<extra_id_2>") and pairs[2]["strength"] == 3.0
    # A tie stays a tie: both answers, in file order, strength 0; never one answer on both sides.
    assert pairs[3]["tie"] is True and pairs[3]["strength"] == 0.0
    assert pairs[3]["chosen"].endswith("left\n<extra_id_2>") and pairs[3]["rejected"].endswith("right\n<extra_id_2>")
    assert (pairs[4]["domain"], pairs[4]["language"], pairs[4]["chosen"].endswith("echo 1\n<extra_id_2>")) == (
        "code", "python", True)
    rejects = by_line(rows, "reject")
    assert rejects[5]["reason"] == "column 'overall_preference' must be an integer -3..3, got 4"
    assert rejects[6]["reason"] == "column 'response2' is empty or not a string"
    assert rejects[7]["reason"] == "missing column(s): context"
    assert rejects[8]["reason"] == "context must end with a user turn (the responses answer it)"
    assert rejects[9]["reason"] == "context turn 0: role must be 'user' or 'assistant', got 'system'"
    assert rejects[10]["reason"].startswith("malformed JSON") and rejects[10]["file"] == str(hs3_file)
    assert rejects[12]["reason"] == "column 'individual_preference' must be a list of annotator objects"
    assert by_line(rows, "skip")[11]["reason"].startswith("response1 and response2 are identical")


def test_the_same_context_lands_in_one_split_group():
    a = sources.convert_helpsteer3("helpsteer3", hs3(MULTI_TURN, pref=1), file="f", line=1, split="")
    b = sources.convert_helpsteer3("helpsteer3", hs3(MULTI_TURN, "x", "y", pref=-1), file="f", line=2, split="")
    c = sources.convert_helpsteer3("helpsteer3", hs3("Q1"), file="f", line=3, split="")
    assert a[0]["group"] == b[0]["group"] != c[0]["group"]


def test_filter_selects_rows_and_counts_the_rest_as_skips(hs3_file):
    row_filter = sources.source_filter("helpsteer3", "domain=code|stem, language=Python")
    rows = convert(hs3_file, row_filter)
    assert sorted(by_line(rows, "preference")) == [4]
    skips = by_line(rows, "skip")
    assert skips[1]["reason"] == "not selected by --filter domain=code|stem, language=Python: domain='general'"
    assert skips[1]["row"] == {"domain": "general", "language": "english"}  # no full row copied per skip
    # Bad rows stay rejects whatever the filter (validation comes first): 7 rejects, as without a filter.
    assert Counter(r["kind"] for r in rows) == {"preference": 1, "skip": 4, "reject": 7}


def test_parse_row_filter_semantics_and_errors():
    f = sources.parse_row_filter("domain=code,domain=stem,language=english")
    assert f({"domain": "STEM", "language": "english"}) and f({"domain": "code", "language": " English "})
    assert not f({"domain": "general", "language": "english"}) and not f({"domain": "code"})
    assert f.mismatch({"domain": "code", "language": "chinese"}).endswith("language='chinese'")
    for text, message in [("", "--filter is empty"), ("domain", "is not column=value"), ("domain=", "not column=value"),
                          ("domain=a|", "not column=value"), ("=code", "not column=value")]:
        with pytest.raises(sources.SourceError, match=message):
            sources.parse_row_filter(text)
    with pytest.raises(sources.SourceError, match="cannot select on 'split'; it can select on: domain, language"):
        sources.source_filter("helpsteer3", "split=train")
    with pytest.raises(sources.SourceError, match="does not apply to source 'helpsteer2'.*helpsteer3"):
        sources.source_filter("helpsteer2", "domain=code")
    assert sources.source_filter("helpsteer2", None) is None


def test_helpsteer2_preference_ties_use_the_same_pair_schema():
    row = {"prompt": "P", "response_1": "one", "response_2": "two", "preference_strength": 0}
    (pair,) = [json.loads(r["payload"]) for r in sources.convert_raw_row(
        "helpsteer2-preference", {"file": "p.jsonl", "line": 4, "raw": json.dumps(row), "error": ""}, "")]
    assert pair == {"id": "p.jsonl:4", "chosen": f"{HEAD}<extra_id_1>User\nP\n<extra_id_1>Assistant\none\n<extra_id_2>",
                    "rejected": f"{HEAD}<extra_id_1>User\nP\n<extra_id_1>Assistant\ntwo\n<extra_id_2>",
                    "strength": 0.0, "tie": True}


def test_prepare_writer_keeps_ties_and_counts_skips_by_reason(hs3_file, tmp_path):
    rows = convert(hs3_file, sources.source_filter("helpsteer3", "language=english"))
    columns = ("source", "kind", "split", "group", "file", "line", "payload", "counts_input")
    batch = {c: np.asarray([r[c] for r in rows], dtype=object if c != "counts_input" else np.int64) for c in columns}
    writer = PrepareWriter(tmp_path / "out", repeat={})
    writer.write_batch(finalize_rows(batch, seed=1, val_fraction=0.0))
    result = writer.finish()
    counts = result["per_source"]["helpsteer3"]
    assert counts == {"rows_in": 12, "preference_val": 3, "rejected": 7, "skipped": 2}
    assert result["rejects_by_reason"]["helpsteer3"]["skip: not selected by --filter language=english"] == 1
    val = [json.loads(line) for line in (tmp_path / "out" / "preference" / "val.jsonl").open()]
    assert [p["strength"] for p in val] == [2.0, 3.0, 0.0] and [p["tie"] for p in val] == [False, False, True]
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "out" / "preference" / "val.parquet").column("strength").to_pylist() == [2, 3, 0]


def test_training_reader_skips_ties_only_for_losses_without_a_tie_term(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"id": "a", "chosen": "c", "rejected": "r", "strength": 2.0, "tie": False},
            {"id": "b", "chosen": "c", "rejected": "r", "strength": 0.0, "tie": True},
            {"id": "c", "chosen": "c", "rejected": "r", "strength": 0.0},  # a tie written before the flag
            {"id": "d", "chosen": "c", "rejected": "r", "strength": 1.0, "tie": True},
            {"id": "e", "chosen": "c", "rejected": "r", "strength": 1.0, "tie": "yes"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for loss in ("regular_bt", "margin_bt"):
        split = rd.read_split(path, rd.PREFERENCE, ["helpfulness"], loss=loss)
        assert [r["id"] for r in split.rows] == ["a"]
        assert [s["line"] for s in split.skipped] == [2, 3]
        assert split.skipped_by_reason() == {
            f"tie (strength 0): loss={loss} has no tie term and would train it as a preference": 2}
    # scaled_bt weighs a tie 0 and keeps it (the reference's mean counts it); no loss given: nothing skipped.
    for loss in ("scaled_bt", None):
        split = rd.read_split(path, rd.PREFERENCE, ["helpfulness"], loss=loss)
        assert [r["id"] for r in split.rows] == ["a", "b", "c"] and split.skipped == []
    assert [r["reason"] for r in split.rejects] == ["'tie' is true but 'strength' is 1.0 (a tie has strength 0)",
                                                    "'tie' must be true or false, got 'yes'"]


def test_a_split_of_only_ties_is_empty_for_val_and_an_error_for_train(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text(json.dumps({"chosen": "c", "rejected": "r", "strength": 0, "tie": True}) + "\n")
    assert rd.read_split(path, rd.PREFERENCE, ["helpfulness"], loss="regular_bt", allow_empty=True).rows == []
    with pytest.raises(rd.RewardDataError, match=r"no usable row among 1 \(e.g. tie \(strength 0\)"):
        rd.read_split(path, rd.PREFERENCE, ["helpfulness"], loss="regular_bt")
