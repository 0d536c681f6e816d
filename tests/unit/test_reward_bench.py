"""Reward benchmarks without Ray: RewardBench sections, best-of-N, pairs, --score, the report, a real model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from steerray.attributes import ATTRIBUTES
from steerray.data import sources
from steerray.eval import reward_bench as rb
from steerray.templates import LABEL_START, SYSTEM_PROMPT

HEAD = f"<extra_id_0>System\n{SYSTEM_PROMPT}\n"


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def length_predictor(attributes=ATTRIBUTES, calls=None):
    """Every attribute = the text's length: a model whose scores are known (longer answers win)."""
    def predict(texts):
        if calls is not None:
            calls.append(list(texts))
        return np.asarray([[float(len(t))] * len(attributes) for t in texts], dtype=np.float32)
    return predict


def rb_row(subset, correct, prompt="Q"):
    """A RewardBench row; with a length predictor it is right (True), wrong (False) or equal (None)."""
    chosen, rejected = {True: ("long answer", "short"), False: ("short", "long answer"),
                        None: ("same!", "same?")}[correct]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "subset": subset}


CORE_ROWS = [rb_row("alpacaeval-easy", True), rb_row("alpacaeval-easy", True),
             rb_row("mt-bench-easy", True), rb_row("mt-bench-easy", False),
             rb_row("mt-bench-hard", True), rb_row("mt-bench-hard", None),
             rb_row("llmbar-natural", True),
             rb_row("refusals-dangerous", True), rb_row("refusals-dangerous", False),
             rb_row("xstest-should-respond", True),
             rb_row("math-prm", True), rb_row("math-prm", False),
             rb_row("hep-python", True),
             rb_row("my-own-subset", False)]
# Hand computed with upstream's weights: Chat (100*1 + 28*.5)/128, Chat Hard (37*.5 + 100*1)/137,
# Safety (100*.5 + 154*1)/254, Reasoning (984*.5 + 164*1)/1148.
SECTIONS = {"Chat": 100 * 114 / 128, "Chat Hard": 100 * 118.5 / 137, "Safety": 100 * 204 / 254,
            "Reasoning": 100 * 656 / 1148}


def evaluate(tmp_path, fmt, rows, score=None, attributes=ATTRIBUTES, name=None):
    path = write_jsonl(tmp_path / f"{name or fmt}.jsonl", rows)
    spec = rb.BenchSpec.parse(f"{fmt}{':' + name if name else ''}={path}")
    score_spec, (result,) = rb.evaluate_benches([spec], length_predictor(attributes), attributes, score)
    return score_spec, result


def test_rewardbench_subsets_sections_and_overall_are_hand_computed(tmp_path):
    _, result = evaluate(tmp_path, "rewardbench", CORE_ROWS)
    m = result.metrics
    assert {s: (e["n"], e["correct"], e["accuracy"]) for s, e in m["per_subset"].items()} == {
        "alpacaeval-easy": (2, 2, 1.0), "hep-python": (1, 1, 1.0), "llmbar-natural": (1, 1, 1.0),
        "math-prm": (2, 1, 0.5), "mt-bench-easy": (2, 1, 0.5), "mt-bench-hard": (2, 1, 0.5),
        "my-own-subset": (1, 0, 0.0), "refusals-dangerous": (2, 1, 0.5), "xstest-should-respond": (1, 1, 1.0)}
    assert m["per_subset"]["mt-bench-hard"]["equal_scores"] == 1  # equal scores count as wrong
    assert m["sections"] == pytest.approx(SECTIONS)
    assert m["overall"] == pytest.approx(sum(SECTIONS.values()) / 4)
    assert m["accuracy"] == pytest.approx(9 / 14)
    # The unknown subset is scored and reported, in no section and not in the overall score.
    assert m["per_subset"]["my-own-subset"]["section"] == "other" and m["other_subsets"] == ["my-own-subset"]
    assert result.warnings == [{"file": str(tmp_path / "rewardbench.jsonl"), "line": 14, "subset": "my-own-subset",
                                "rows": 1, "reason": "subset 'my-own-subset' is not in RewardBench v1's section "
                                "table: scored under section 'other', in no section and not in the overall score"}]
    assert m["complete"] is False and len(m["missing_subsets"]) == 23 - 8


def test_prior_sets_weigh_half_a_core_section(tmp_path):
    rows = CORE_ROWS + [rb_row("anthropic_helpful", True), rb_row("anthropic_helpful", False), rb_row("shp", True)]
    m = evaluate(tmp_path, "rewardbench", rows)[1].metrics
    assert m["sections"]["Prior Sets"] == pytest.approx(75.0)  # mean of 0.5 and 1.0, not prompt-weighted
    assert m["overall"] == pytest.approx((2 * sum(SECTIONS.values()) + 75.0) / 9)


def test_section_weights_are_upstreams():
    all_right = {s: 1.0 for s in rb.EXAMPLE_COUNTS}
    assert rb.section_scores(all_right) == {s: 100.0 for s in rb.CORE_SECTIONS}
    # math-prm (447 prompts) weighs as much as the six code subsets together.
    reasoning = {"math-prm": 0.0, **{f"hep-{x}": 1.0 for x in ("cpp", "go", "java", "js", "python", "rust")}}
    assert rb.section_scores(reasoning) == {"Reasoning": 50.0}
    assert sum(rb.EXAMPLE_COUNTS.values()) - 984 + 447 == 2985  # RewardBench's filtered split
    assert rb.overall_score({"Chat": 90.0, "Chat Hard": 70.0, "Safety": 80.0, "Reasoning": 60.0}) == 75.0
    assert rb.overall_score({}) is None


def test_rewardbench_reads_parquet_and_message_prompts_and_rejects_bad_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{**rb_row("alpacaeval-easy", True), "id": 7, "chosen_model": "m1"},
            {**rb_row("hep-go", False), "id": 8, "chosen_model": "m2"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "filtered.parquet")
    data = rb.read_bench(rb.BenchSpec.parse(f"rewardbench={tmp_path / 'filtered.parquet'}"))
    assert [(r["id"], r["line"], r["section"]) for r in data.rows] == [("7", 1, "Chat"), ("8", 2, "Reasoning")]
    messages = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "Q2"}]
    bad = [rb_row("shp", True, prompt=messages), {"prompt": "Q", "chosen": "a", "rejected": "b"},
           {**rb_row("hep-go", True), "chosen": ""}, {**rb_row("hep-go", True), "prompt": [{"role": "bot"}]}]
    data = rb.read_bench(rb.BenchSpec.parse(f"rewardbench={write_jsonl(tmp_path / 'rb.jsonl', bad)}"))
    assert data.rows[0]["texts"][0] == (f"{HEAD}<extra_id_1>User\nQ1\n<extra_id_1>Assistant\nA1\n<extra_id_1>User\n"
                                        f"Q2\n<extra_id_1>Assistant\nlong answer\n{LABEL_START}")
    assert [(r["line"], r["reason"]) for r in data.rejects] == [
        (2, "missing column(s): subset"), (3, "'chosen' is empty or not a string"),
        (4, "prompt turn 0: role must be 'user' or 'assistant', got 'bot'")]
    with pytest.raises(rb.BenchError, match=r"no usable row among 1 \(e.g. missing column\(s\): subset\)"):
        rb.read_bench(rb.BenchSpec.parse(f"rewardbench={write_jsonl(tmp_path / 'x.jsonl', bad[1:2])}"))


def test_scored_text_is_the_reward_training_text():
    """A benchmark answer is scored exactly as prepare writes a regression record of the same turn."""
    record = {"prompt": "Say hi", "response": "Hi!", "helpfulness": 4, "correctness": 4, "coherence": 4,
              "complexity": 3, "verbosity": 2}
    rows = sources.convert_raw_row("helpsteer2", {"file": "f", "line": 1, "raw": json.dumps(record), "error": ""}, "")
    (regression,) = [json.loads(r["payload"]) for r in rows if r["kind"] == "regression"]
    row = rb.rewardbench_row({"prompt": "Say hi", "chosen": "Hi!", "rejected": "No.", "subset": "shp"}, "f:1")
    assert row["texts"][0] == regression["text"]


def test_best_of_n_pick_win_rate_random_and_oracle(tmp_path):
    def resp(text, judgment):
        return {"text": text, "judgment": judgment}
    rows = [{"instruction": "p1", "responses": [resp("a", True), resp("bbb", False), resp("cc", False)]},
            {"instruction": "p2", "responses": [resp("x", 0), resp("yyyy", "win"), resp("zz", "tie")]},
            {"instruction": "p3", "responses": [resp("pp", 1.0), resp("qq", "loss"), resp("r", False)]},
            {"instruction": "p4", "responses": [resp("only", True)]},
            {"instruction": "p5", "responses": [resp("a", "maybe"), resp("b", True)]},
            {"instruction": "p6", "responses": [resp("", True), resp("b", True)]}]
    _, result = evaluate(tmp_path, "bon", rows)
    m = result.metrics
    # Picks: bbb (0), yyyy (1), pp/qq tied at the top (0.5 expected). Random: 1/3, 1/2, 1/3. Oracle: 1, 1, 1.
    assert m["win_rate"] == pytest.approx(0.5) and m["random"] == pytest.approx(7 / 18) and m["oracle"] == 1.0
    assert m["gap_closed"] == pytest.approx(2 / 11)
    assert (m["n_prompts"], m["n_responses"], m["tied_picks"]) == (3, 9, 1)
    assert [(r["pick"], r["pick_judgment"], r["tied_pick"]) for r in result.rows] == [
        (1, 0.0, False), (1, 1.0, False), (0, 0.5, True)]
    assert [r["reason"] for r in result.rejects] == [
        "'responses' must be a list of at least 2 {text, judgment} objects, got 1",
        "responses[0].judgment must be true/false, a number in [0, 1] or win/tie/loss, got 'maybe'",
        "responses[0].text is empty or not a string"]


def test_pairs_accuracy_with_ties_apart(tmp_path):
    """prepare's preference/val.jsonl (rendered texts, from HelpSteer3 rows) scored as a `pairs` benchmark."""
    def hs3(r1, r2, pref, domain):
        row = {"domain": domain, "language": "english", "context": [{"role": "user", "content": "Q"}],
               "response1": r1, "response2": r2, "overall_preference": pref}
        return json.loads(sources.convert_helpsteer3("helpsteer3", row, file="v.jsonl", line=1, split="")[0]["payload"])
    rows = [hs3("longer one", "short", -2, "code"), hs3("short", "longer one", 1, "code"),   # right, right
            hs3("longer one", "short", 3, "stem"), hs3("tie a", "tie b", 0, "stem"),        # wrong, tie
            hs3("abc", "xyzw", 0, "code"),                                                   # tie
            {"prompt": "P", "chosen": "long response", "rejected": "short", "strength": 1},  # rendered here: right
            {"chosen": "not rendered", "rejected": "x"}, {"chosen": "a", "rejected": "b", "tie": True, "strength": 2}]
    _, result = evaluate(tmp_path, "pairs", rows)
    m = result.metrics
    assert (m["n_pairs"], m["ties"]["n"], m["accuracy"]) == (6, 2, pytest.approx(3 / 4))
    assert m["weighted_accuracy"] == pytest.approx((2 + 1 + 1) / (2 + 1 + 3 + 1))
    assert m["ties"]["mean_abs_margin"] == pytest.approx(0.5)  # |0| and |3 - 4|
    assert m["per_strength"] == {"1": {"n": 2, "accuracy": 1.0}, "2": {"n": 1, "accuracy": 1.0},
                                 "3": {"n": 1, "accuracy": 0.0}}
    assert m["per_group"] == {"None": {"n": 1, "accuracy": 1.0}, "code": {"n": 2, "accuracy": 1.0},
                              "stem": {"n": 1, "accuracy": 0.0}}
    assert [r["correct"] for r in result.rows] == [True, True, False, None, None, True]
    assert result.rows[5]["score_chosen"] == len(f"{HEAD}<extra_id_1>User\nP\n<extra_id_1>Assistant\n"
                                                 f"long response\n{LABEL_START}")
    assert [r["reason"] for r in result.rejects] == [
        f"'chosen' is not a rendered reward text (it does not end with {LABEL_START}) and the row has no 'prompt' "
        "to render it with", "'tie' is true but 'strength' is 2 (a tie has strength 0)"]


def test_score_spec_default_presets_weights_and_errors():
    assert rb.parse_score_spec(None, ATTRIBUTES).weights == (("helpfulness", 1.0),)
    assert rb.parse_score_spec("", ["quality", "toxicity"]).weights == (("quality", 1.0),)
    assert rb.parse_score_spec(None, ["verbosity"]).weights == (("verbosity", 1.0),)
    spec = rb.parse_score_spec("helpsteer2", ATTRIBUTES)
    assert dict(spec.weights) == {"helpfulness": 0.65, "correctness": 0.8, "coherence": 0.45, "complexity": 0.55,
                                  "verbosity": -0.4}
    assert spec.vector(ATTRIBUTES).tolist() == [0, 0, 0, 0, 0.65, 0.8, 0.45, 0.55, -0.4]
    mix = rb.parse_score_spec("helpfulness=1, verbosity=-0.5", ATTRIBUTES)
    assert mix.describe() == "1*helpfulness - 0.5*verbosity" and mix.to_json()["weights"] == {
        "helpfulness": 1.0, "verbosity": -0.5}
    with pytest.raises(rb.ScoreSpecError, match="uses correctness, which this reward model does not predict; its "
                                                "attributes are: quality, helpfulness"):
        rb.parse_score_spec("helpfulness=1,correctness=2", ["quality", "helpfulness"])
    with pytest.raises(rb.ScoreSpecError, match="uses correctness, coherence, complexity, verbosity, which.*attributes are: helpfulness$"):
        rb.parse_score_spec("helpsteer2", ["helpfulness"])
    for text, message in [("helpfulness=x", "not a number"), ("helpfulness=1,helpfulness=2", "twice"),
                          ("helpfulness=0", "every weight is 0"), ("a,b", "give one attribute"),
                          ("helpfulness=inf", "finite"), ("=1", "not NAME=WEIGHT")]:
        with pytest.raises(rb.ScoreSpecError, match=message):
            rb.parse_score_spec(text, ATTRIBUTES)
    with pytest.raises(rb.ScoreSpecError, match="predicts toxicity, humor: say which scalar"):
        rb.parse_score_spec(None, ["toxicity", "humor"])


def test_a_bad_score_fails_before_any_file_is_read_or_scored(tmp_path):
    calls = []
    spec = rb.BenchSpec.parse(f"rewardbench={tmp_path / 'missing.jsonl'}")
    with pytest.raises(rb.ScoreSpecError, match="its attributes are: helpfulness"):
        rb.evaluate_benches([spec], length_predictor(["helpfulness"], calls), ["helpfulness"], "verbosity")
    assert calls == []


def test_weighted_score_is_predictions_times_weights(tmp_path):
    spec = rb.parse_score_spec("helpfulness=2,verbosity=-1", ["helpfulness", "verbosity"])

    def predict(texts):
        return np.asarray([[1.0, 0.5], [3.0, 4.0]][: len(texts)]), [False, True][: len(texts)]
    scores, truncated = rb.predict_scores(["a", "b"], predict, spec, ["helpfulness", "verbosity"])
    assert scores == {"a": 1.5, "b": 2.0} and truncated == {"b"}
    with pytest.raises(rb.BenchError, match=r"returned shape \(2, 2\) for 2 texts; expected \(2, 3\)"):
        rb.predict_scores(["a", "b"], predict, spec, ["helpfulness", "verbosity", "quality"])
    with pytest.raises(rb.BenchError, match="1 non-finite"):
        rb.predict_scores(["a"], lambda t: np.asarray([[np.nan, 1.0]]), spec, ["helpfulness", "verbosity"])


def test_each_distinct_text_is_scored_once_in_chunks(tmp_path):
    rows = [rb_row("hep-go", True), rb_row("hep-js", True), rb_row("hep-rust", False)]  # the same 2 texts, 3 times
    path = write_jsonl(tmp_path / "rb.jsonl", rows)
    calls = []
    rb.evaluate_benches([rb.BenchSpec.parse(f"rewardbench={path}")], length_predictor(calls=calls), ATTRIBUTES,
                        chunk_size=1)
    assert [len(c) for c in calls] == [1, 1]


def test_bench_specs_parse_and_name_clashes():
    assert rb.BenchSpec.parse("pairs:hs3-val=runs/p/preference/val.jsonl") == rb.BenchSpec(
        "pairs", "runs/p/preference/val.jsonl", "hs3-val")
    assert rb.BenchSpec.parse("bon=b.jsonl").name == "bon"
    for text, message in [("elo=x", "unknown format 'elo'; formats: rewardbench, bon, pairs"),
                          ("bon", "needs a location"), ("bon:a/b=x", "may hold only")]:
        with pytest.raises(rb.BenchError, match=message):
            rb.BenchSpec.parse(text)
    with pytest.raises(rb.BenchError, match="share the name pairs"):
        rb.parse_bench_specs(["pairs=a.jsonl", "pairs=b.jsonl"])
    assert [s.name for s in rb.parse_bench_specs(["pairs=a.jsonl", "pairs:b=b.jsonl"])] == ["pairs", "b"]


def test_report_files(tmp_path):
    score, rb_result = evaluate(tmp_path, "rewardbench", CORE_ROWS + ["{bad json"])
    _, bon_result = evaluate(tmp_path, "bon", [{"instruction": "p", "responses": [
        {"text": "a", "judgment": True}, {"text": "bb", "judgment": False}]}])
    out = tmp_path / "eval"
    paths = rb.write_bench_report([rb_result, bon_result], out, score=score, model="runs/x/reward/model")
    assert sorted(p.name for p in out.iterdir()) == ["bon_rejects.jsonl", "bon_rows.jsonl", "eval.json", "report.md",
                                                     "rewardbench_rejects.jsonl", "rewardbench_rows.jsonl"]
    summary = json.loads(paths["eval"].read_text())
    bench = summary["benches"]["rewardbench"]
    assert (bench["rows_in"], bench["scored"], bench["rejected"]) == (15, 14, 1)
    assert bench["rejects_by_reason"] == {"malformed JSON: Expecting property name enclosed in double quotes at "
                                          "column 2": 1}
    assert bench["metrics"]["overall"] == pytest.approx(sum(SECTIONS.values()) / 4)
    assert summary["score"] == {"spec": "(default)", "formula": "helpfulness", "weights": {"helpfulness": 1.0}}
    rows = [json.loads(line) for line in (out / "rewardbench_rows.jsonl").open()]
    assert len(rows) == 14 and rows[3]["correct"] is False and rows[3]["subset"] == "mt-bench-easy"
    assert rows[3]["score_chosen"] - rows[3]["score_rejected"] == rows[3]["margin"] == -6
    report = paths["report"].read_text()
    assert f"| **Overall** | {sum(SECTIONS.values()) / 4:.1f} |" in report
    assert "| Chat | 89.1 | alpacaeval-easy, mt-bench-easy |" in report and "Partial: no rows for" in report
    assert "| reward model's pick | 0.000 |" in report and "my-own-subset" in report
    assert (out / "bon_rejects.jsonl").read_text() == ""


def test_a_real_tiny_reward_model_through_load_predictor(tiny_reward_dir, tmp_path):
    from steerray.annotation import load_predictor

    predictor = load_predictor(tiny_reward_dir, batch_size=2, max_length=64, precision="fp32")  # exact match below
    rows = [rb_row("alpacaeval-easy", True), rb_row("hep-cpp", False, prompt="Write C++"),
            rb_row("shp", True, prompt=[{"role": "user", "content": "Q"}])]
    path = write_jsonl(tmp_path / "rb.jsonl", rows)
    spec, (result,) = rb.evaluate_benches([rb.BenchSpec.parse(f"rewardbench={path}")], predictor,
                                          predictor.attributes, "helpsteer2")
    import torch

    from steerray.models.reward import encode_reward_texts, reward_forward

    texts = [t for row in rb.read_bench(rb.BenchSpec.parse(f"rewardbench={path}")).rows for t in row["texts"]]
    with torch.no_grad():  # one text at a time, no padding: the model's own outputs, independent of batching
        preds = np.concatenate([reward_forward(predictor.model, b.input_ids, b.attention_mask).numpy()
                                for b in (encode_reward_texts(predictor.tokenizer, [t], 64) for t in texts)])
    expected = preds.astype(np.float64) @ spec.vector(predictor.attributes)
    # A random head gives distinct scores, so the checks below bite; the shp row's one-turn message list
    # renders exactly as the first row's prompt string, so those two rows share their texts and scores.
    assert len(set(np.round(expected, 4))) == 4 and texts[:2] == texts[4:]
    got = [s for r in result.rows for s in (r["score_chosen"], r["score_rejected"])]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert [r["correct"] for r in result.rows] == [bool(a > b) for a, b in
                                                   zip(expected[::2], expected[1::2], strict=True)]
    assert result.metrics["per_subset"]["shp"]["section"] == "Prior Sets"
