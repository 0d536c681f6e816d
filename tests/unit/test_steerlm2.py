"""SteerLM 2.0 (issue 16): weights, baseline, loss and distance on hand-computed groups; the label
likelihood; the record schema, its rejects and round trip; rendering masks; log Q' == the trainer's NLL.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from steerray.attributes import IGNORE_VALUE
from steerray.data.sft import IGNORE_INDEX
from steerray.data.steerlm2 import (
    LOG_FIELDS,
    LOG_PA,
    LOG_PY,
    LOG_Q,
    Reject,
    SteerLM2RecordError,
    dumps_record,
    make_record,
    parse_line,
    parse_record,
    read_records,
    render_group,
    steerlm2_prompt,
    tokenize_group,
    tokenize_group_batch,
    tokenized_group,
    unpack_group,
    write_records,
)
from steerray.data.writer import reason_category
from steerray.eval.attribute_likelihood import (
    LikelihoodError,
    fit_residual_sigma,
    label_log_likelihoods,
    likelihood_params,
    log_label_likelihood,
    log_ndtr,
    log_value_probabilities,
    log_value_probability,
    sigmas_from_params,
)
from steerray.training.batching import collate_sft
from steerray.training.losses import normalize_loss
from steerray.training.steerlm2 import (
    avg_tokens,
    baseline_weights,
    distance,
    group_weights,
    importance_weights,
    nonfinite_groups,
    response_nll,
    sequence_nll,
    steerlm2_loss,
    steerlm2_loss_sum,
)

LN2, LN3 = math.log(2.0), math.log(3.0)
EPS = 1e-8


def close(actual, expected, tol: float) -> None:
    """Element-wise |actual - expected| <= tol for nested lists (pytest.approx takes flat ones only)."""
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), rtol=0.0, atol=tol)


def kl_eps(w: list[float], b: list[float]) -> float:
    """KL(w || b) with the reference's 1e-8 on both sides, by hand."""
    return sum((wi + EPS) * math.log((wi + EPS) / (bi + EPS)) for wi, bi in zip(w, b, strict=True))


# --------------------------------------------------------------------------------------------------
# Weights, baseline, distance, loss: hand-computed groups
# --------------------------------------------------------------------------------------------------

# Group A (n=2): log w = log_pa + log_py - log_q = [-3, -3 + ln 3] -> w = [1/4, 3/4];
# -NLL - log Q' = [2, 2 - ln 3] -> b = [3/4, 1/4].
A = {"log_pa": [-2.0, -1.0], "log_py": [-5.0, -6.0 + LN3], "log_q": [-4.0, -4.0], "nll": [2.0, 2.0 + LN3]}
# Group B (n=3): log_py - log_q = 6 -> log w = ln [1, 2, 3] + 5 -> w = [1/6, 1/3, 1/2];
# NLL = -log Q' (theta = Q') -> b uniform.
B = {"log_pa": [-1.0, -1.0 + LN2, -1.0 + LN3], "log_py": [-2.0, -3.0, -4.0], "log_q": [-8.0, -9.0, -10.0],
     "nll": [8.0, 9.0, 10.0]}


def test_group_of_two_exact():
    w = importance_weights(A["log_pa"], A["log_py"], A["log_q"])
    b = baseline_weights(A["nll"], A["log_q"])
    assert w.dtype == torch.float64 and w.tolist() == pytest.approx([0.25, 0.75], abs=1e-15)
    assert b.tolist() == pytest.approx([0.75, 0.25], abs=1e-15)
    # KL(w||b) = 1/4 ln(1/3) + 3/4 ln 3 = ln(3)/2 without the eps; with it, the reference's number.
    assert float(distance(w, b)) == pytest.approx(kl_eps([0.25, 0.75], [0.75, 0.25]), abs=1e-15)
    assert float(distance(w, b)) == pytest.approx(LN3 / 2, abs=1e-7)


def test_group_of_three_exact():
    w = importance_weights(B["log_pa"], B["log_py"], B["log_q"])
    assert w.tolist() == pytest.approx([1 / 6, 1 / 3, 1 / 2], abs=1e-15)
    b = baseline_weights(B["nll"], B["log_q"])
    assert b.tolist() == pytest.approx([1 / 3] * 3, abs=1e-15)
    assert float(distance(w, b)) == pytest.approx(kl_eps([1 / 6, 1 / 3, 1 / 2], [1 / 3] * 3), abs=1e-15)
    # Without the eps: sum w ln(3 w) = ln 3 - H(w).
    entropy = -(1 / 6 * math.log(1 / 6) + 1 / 3 * math.log(1 / 3) + 1 / 2 * math.log(1 / 2))
    assert float(distance(w, b)) == pytest.approx(LN3 - entropy, abs=1e-7)


def test_batch_of_groups_is_per_group():
    # Softmax over the last axis only: a [G, n] batch equals its groups one by one.
    log_pa = torch.tensor([A["log_pa"], [0.0, LN2 * 2]], dtype=torch.float64)
    log_py = torch.tensor([A["log_py"], [0.0, 0.0]], dtype=torch.float64)
    log_q = torch.tensor([A["log_q"], [0.0, 0.0]], dtype=torch.float64)
    w = importance_weights(log_pa, log_py, log_q)
    close(w, [[0.25, 0.75], [0.2, 0.8]], 1e-15)
    assert distance(w, w).tolist() == pytest.approx([0.0, 0.0], abs=1e-15)


def test_loss_matches_reference_micro_batches_and_sum_form():
    # Two groups of n=2, micro-batch size 1 -> 4 micro-batches, 2 per group.
    # Group A: w = [1/4, 3/4], b = [3/4, 1/4], NLL = [2, 2 + ln 3], loss tokens [4, 6] (mean 5).
    # Group C: w = [0.2, 0.8] (log w = [0, ln 4]), b = [1/2, 1/2] (NLL = [1, 2], log Q' = [-1, -2]), tokens [2, 2].
    log_pa = torch.tensor([A["log_pa"], [0.0, 2 * LN2]], dtype=torch.float64)
    log_py = torch.tensor([A["log_py"], [-1.0, -2.0]], dtype=torch.float64)  # cancels log Q' in group C's w
    log_q = torch.tensor([A["log_q"], [-1.0, -2.0]], dtype=torch.float64)
    nll = torch.tensor([A["nll"], [1.0, 2.0]], dtype=torch.float32, requires_grad=True)
    tokens = torch.tensor([[4, 6], [2, 2]])
    weights = group_weights(log_pa, log_py, log_q, nll.detach())
    close(weights.baseline, [[0.75, 0.25], [0.5, 0.5]], 1e-7)  # NLL in float32
    # The reference: avg_tokens = group mean / (micro-batches per group = 4 / 2) = [2.5, 1].
    ref_avg = avg_tokens(tokens, num_microbatches=4)
    assert ref_avg.tolist() == [[2.5, 2.5], [1.0, 1.0]] and ref_avg.dtype == torch.float64
    per_response = steerlm2_loss(nll, weights.weights, weights.baseline, ref_avg)
    # By hand: (1/4-3/4)*2/2.5 = -0.4; (3/4-1/4)(2+ln3)/2.5 = 0.4 + 0.2 ln 3; (0.2-0.5)*1/1 = -0.3; 0.3*2 = 0.6.
    close(per_response, [[-0.4, 0.4 + 0.2 * LN3], [-0.3, 0.6]], 1e-6)
    reference_step_loss = per_response.reshape(-1).mean()  # mean over the 4 one-response micro-batches
    assert float(reference_step_loss.detach()) == pytest.approx((0.3 + 0.2 * LN3) / 4, abs=1e-6)
    # The sum form over the global group count gives the same number, whatever the micro-batching.
    loss_sum, groups = steerlm2_loss_sum(nll, weights.weights, weights.baseline, tokens)
    assert groups == 2
    step_loss = normalize_loss(loss_sum, global_count=groups)
    assert float(step_loss.detach()) == pytest.approx(float(reference_step_loss.detach()), abs=1e-6)
    # Gradient: d loss / d NLL_i = (w_i - b_i) / (mean tokens * groups): no gradient through the weights.
    step_loss.backward()
    close(nll.grad, [[-0.5 / 10, 0.5 / 10], [-0.3 / 4, 0.3 / 4]], 1e-7)


def test_loss_group_of_three_one_micro_batch_each():
    # Two groups of n=3, micro-batch size 3 -> 2 micro-batches, one per group: avg_tokens = the plain mean.
    w = importance_weights([B["log_pa"], [0.0] * 3], [B["log_py"], [0.0] * 3], [B["log_q"], [0.0] * 3])
    b = torch.full((2, 3), 1 / 3, dtype=torch.float64)
    nll = torch.tensor([[6.0, 3.0, 2.0], [5.0, 5.0, 5.0]])
    tokens = torch.tensor([[2, 3, 4], [1, 1, 4]])
    assert avg_tokens(tokens, num_microbatches=2).tolist() == [[3.0] * 3, [2.0] * 3]
    loss = steerlm2_loss(nll, w, b, avg_tokens(tokens, num_microbatches=2))
    # Group 1: w - b = [-1/6, 0, 1/6] -> (-6/6 + 0 + 2/6) / 3 = -2/9; group 2: w = b -> 0.
    assert loss.sum(dim=-1).tolist() == pytest.approx([-2 / 9, 0.0], abs=1e-7)
    assert float(loss.sum(dim=-1).mean()) == pytest.approx(-1 / 9, abs=1e-7)  # mean over the 2 micro-batches


def test_nonfinite_groups_are_skipped_and_never_weighted():
    inf, nan = math.inf, math.nan
    log_pa = torch.tensor([[0.0, 0.0], [nan, 0.0], [0.0, -inf], [0.0, 2 * LN2]], dtype=torch.float64)
    log_py = torch.zeros(4, 2, dtype=torch.float64)
    log_q = torch.tensor([[-inf, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    nll = torch.zeros(4, 2)
    assert nonfinite_groups(log_pa, log_q).tolist() == [True, True, True, False]
    weights = group_weights(log_pa, log_py, log_q, nll)
    assert weights.skip.tolist() == [True, True, True, False]
    assert weights.weights[:3].abs().sum() == 0 and weights.baseline[:3].abs().sum() == 0
    assert weights.weights[3].tolist() == pytest.approx([0.2, 0.8], abs=1e-15)
    # distance averages the kept group only: KL([.2, .8] || [.5, .5]).
    assert weights.distance == pytest.approx(kl_eps([0.2, 0.8], [0.5, 0.5]), abs=1e-15)
    # A NaN NLL under theta (a diverging model) also skips its group; all skipped -> distance 0.
    assert group_weights(log_pa[3:], log_py[3:], log_q[3:], torch.tensor([[nan, 0.0]])).skip.tolist() == [True]
    assert group_weights(log_pa[:1], log_py[:1], log_q[:1], nll[:1]).distance == 0.0


def test_sequence_nll_exact_on_hand_logits():
    # Vocabulary of 2, uniform logits: every trained token costs ln 2. Row 0 trains 2 positions, row 1 one.
    logits = torch.zeros(2, 3, 2)
    labels = torch.tensor([[1, IGNORE_INDEX, 0], [IGNORE_INDEX, IGNORE_INDEX, 1]])
    assert sequence_nll(logits, labels).tolist() == pytest.approx([2 * LN2, LN2], abs=1e-6)
    logits[0, 0] = torch.tensor([0.0, math.log(3.0)])  # p(1) = 3/4 at position 0
    assert float(sequence_nll(logits, labels)[0]) == pytest.approx(-math.log(0.75) + LN2, abs=1e-6)
    mask = torch.tensor([[0, 0, 1], [0, 0, 0]])  # an explicit mask overrides the ignore index
    assert sequence_nll(logits, labels, mask).tolist() == pytest.approx([LN2, 0.0], abs=1e-6)


# --------------------------------------------------------------------------------------------------
# The label likelihood P(a|x,y)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred", [-7.0, -0.6, 0.0, 1.3, 2.0, 3.5, 4.0, 4.49, 11.0])
@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0, 2.5, 40.0])
def test_value_probabilities_are_normalised_over_0_to_4(pred, sigma):
    logs = log_value_probabilities(pred, sigma)
    assert all(math.isfinite(x) and x <= 0 for x in logs)
    assert sum(math.exp(x) for x in logs) == pytest.approx(1.0, abs=1e-12)


def test_value_probability_exact_values():
    # Interior bin, prediction at its centre: Phi(.5/s) - Phi(-.5/s) = erf(.5 / (s sqrt 2)).
    assert math.exp(log_value_probability(2, 2.0, 1.0)) == pytest.approx(math.erf(0.5 / math.sqrt(2)), abs=1e-15)
    # Open end bin: P(4 | mu = 3.5) = 1/2 exactly; P(0 | mu = 0.5) = 1/2.
    assert log_value_probability(4, 3.5, 0.7) == pytest.approx(math.log(0.5), abs=1e-15)
    assert log_value_probability(0, 0.5, 0.7) == pytest.approx(math.log(0.5), abs=1e-15)
    # Mirror symmetry about 2: P(v | mu) = P(4 - v | 4 - mu).
    assert log_value_probabilities(0.3, 0.8) == pytest.approx(log_value_probabilities(3.7, 0.8)[::-1], abs=1e-12)
    # Far tails stay finite: mu = 4, sigma = 0.05, v = 0 is z < -70, where erfc underflows.
    far = log_value_probability(0, 4.0, 0.05)
    assert math.isfinite(far) and far == pytest.approx(float(torch.special.log_ndtr(
        torch.tensor(-70.0, dtype=torch.float64))), rel=1e-9)


def test_log_ndtr_matches_torch_in_both_tails_and_across_the_branch():
    xs = [-300.0, -45.0, -20.000001, -20.0, -19.999999, -5.0, -0.1, 0.0, 0.1, 5.0, 9.0, 30.0]
    expected = torch.special.log_ndtr(torch.tensor(xs, dtype=torch.float64)).tolist()
    for x, want in zip(xs, expected, strict=True):
        assert log_ndtr(x) == pytest.approx(want, rel=1e-10, abs=1e-300), x
    assert log_ndtr(math.inf) == 0.0 and log_ndtr(-math.inf) == -math.inf


def test_label_likelihood_sums_attributes_and_checks_inputs():
    sigmas = {"helpfulness": 0.5, "verbosity": 1.0}
    preds = {"helpfulness": 3.2, "verbosity": 0.4, "coherence": 4.0}
    want = log_value_probability(4, 3.2, 0.5) + log_value_probability(1, 0.4, 1.0)
    assert log_label_likelihood(preds, "helpfulness:4,verbosity:1", sigmas) == pytest.approx(want, abs=1e-15)
    assert log_label_likelihood(preds, {"helpfulness": 4, "verbosity": 1}, sigmas) == pytest.approx(want, abs=1e-15)
    with pytest.raises(LikelihoodError, match="no fitted sigma for 'coherence'"):
        log_label_likelihood(preds, "coherence:4", sigmas)
    with pytest.raises(LikelihoodError, match="does not predict"):
        log_label_likelihood(preds, "humor:1", {**sigmas, "humor": 1.0})
    with pytest.raises(LikelihoodError, match="not a whole number"):
        log_label_likelihood(preds, {"helpfulness": 5}, sigmas)
    with pytest.raises(Exception, match="whole number"):
        log_label_likelihood(preds, "helpfulness:2.5", sigmas)
    batch = label_log_likelihoods([[3.2, 0.4], [0.0, 4.0]], ["helpfulness", "verbosity"],
                                  ["helpfulness:4,verbosity:1", "verbosity:4"], sigmas)
    assert batch.tolist() == pytest.approx([want, log_value_probability(4, 4.0, 1.0)], abs=1e-15)


def test_fit_residual_sigma_ignores_missing_cells_and_serialises():
    ignore = IGNORE_VALUE
    preds = [[3.0, 1.0, 0.0], [2.0, 0.5, 9.0], [4.5, 2.0, 1.0]]
    labels = [[4.0, 1.0, ignore], [2.0, 1.0, ignore], [ignore, 2.0, 1.0]]
    sigmas = fit_residual_sigma(preds, labels, ["helpfulness", "verbosity", "humor"], min_sigma=0.05)
    # helpfulness residuals [-1, 0] -> sqrt(1/2); verbosity [0, -0.5, 0] -> sqrt(0.25/3); humor has 1 cell: left out.
    assert sigmas == pytest.approx({"helpfulness": math.sqrt(0.5), "verbosity": math.sqrt(0.25 / 3)}, abs=1e-15)
    assert fit_residual_sigma([[1.0], [2.0]], [[1.0], [2.0]], ["verbosity"]) == {"verbosity": 0.05}  # floored
    params = json.loads(json.dumps(likelihood_params(sigmas, cells={"helpfulness": 2, "verbosity": 3})))
    assert params["kind"] == "discretised_gaussian" and params["values"] == [0, 1, 2, 3, 4]
    assert list(params["sigmas"]) == ["helpfulness", "verbosity"] and params["validation_cells"]["verbosity"] == 3
    assert sigmas_from_params(params) == sigmas
    with pytest.raises(LikelihoodError, match="'sigmas'"):
        sigmas_from_params({"kind": "discretised_gaussian"})
    with pytest.raises(LikelihoodError, match="preds"):
        fit_residual_sigma([[1.0, 2.0]], [[1.0]], ["verbosity"])


# --------------------------------------------------------------------------------------------------
# The record schema
# --------------------------------------------------------------------------------------------------

def record_json(n: int = 2, **changes) -> dict:
    base = {
        "system": "Be brief.",
        "prompt_turns": [{"from": "User", "value": "Hi"}, {"from": "Assistant", "value": "Hello!"},
                         {"from": "User", "value": "Why?"}],
        "label": "helpfulness:4,verbosity:1",
        "responses": [{"from": "Assistant", "value": f"Because {i}.", LOG_PA: -1.0 - i, LOG_PY: -20.5 - i,
                       LOG_Q: -18.25 - i} for i in range(n)],
    }
    base.update(changes)
    return base


def with_response(index: int, n: int = 2, **changes) -> dict:
    record = record_json(n=n)
    record["responses"][index] = {**record["responses"][index], **changes}
    return record


def without_log_field(key: str) -> dict:
    record = record_json()
    del record["responses"][1][key]
    return record


@pytest.mark.parametrize("record, category, detail", [
    (record_json(prompt_turns=[{"from": "User", "value": "Hi"}, {"from": "Assistant", "value": "Yo"}]),
     "bad prompt_turns", "2 turns; the count must be odd"),
    (record_json(prompt_turns=[{"from": "Assistant", "value": "Hi"}]), "bad prompt_turns", "must be from 'User'"),
    (record_json(prompt_turns=[{"from": "User", "value": " "}]), "bad prompt_turns", "empty or missing 'value'"),
    (record_json(prompt_turns=[]), "bad prompt_turns", "non-empty list"),
    (without_log_field(LOG_Q), "missing log field", "responses[1] has no 'log(Q(y|a,x))'"),
    (with_response(0, **{LOG_PA: "-1.5"}), "log field not a number", "doc shows strings"),
    (with_response(1, **{LOG_PY: True}), "log field not a number", "bool True"),
    (with_response(1, **{LOG_PY: None}), "log field not a number", "NoneType"),
    (with_response(0, **{"from": "User"}), "bad response", "must be from 'Assistant'"),
    (with_response(0, value=3), "bad response", "no string 'value'"),
    (record_json(n=3), "group size", "3 responses, but the other groups have 2"),
    (record_json(n=1), "group size", "at least 2"),
    (record_json(label="wit:3"), "bad label", "unknown attribute 'wit'"),
    (record_json(label="helpfulness:7"), "bad label", "outside 0..4"),
    (record_json(label="helpfulness:2.5"), "bad label", "whole number"),
    (record_json(label=None), "bad label", "missing"),
    (record_json(label="humor:2"), "label attribute not trained", "humor in 'humor:2'"),
    (record_json(system=None), "bad system", "must be a string"),
    ({k: v for k, v in record_json().items() if k != "responses"}, "missing key", "'responses'"),
    ([1, 2], "not an object", "list"),
])
def test_schema_rejects_with_category_and_reason(record, category, detail):
    with pytest.raises(SteerLM2RecordError) as err:
        parse_record(record, expected_n=2, label_attributes=("helpfulness", "verbosity"))
    assert reason_category(str(err.value)) == category
    assert detail in str(err.value)


def test_non_finite_numbers_pass_validation_for_the_trainer_to_skip():
    line = json.dumps(with_response(1, **{LOG_Q: float("-inf"), LOG_PA: float("nan")}))
    assert "-Infinity" in line and "NaN" in line  # what Python's json writes and reads (and the reference reads)
    record = parse_line(line)
    assert not record.finite and math.isinf(record.responses[1].log_q) and math.isnan(record.responses[1].log_pa)
    assert parse_line(json.dumps(record_json())).finite


def test_reference_documented_layout_parses():
    # The layout of the reference's docs/user-guide/steerlm2.rst, with numbers where its code needs them
    # (and an extra key on a prompt turn, which the reference ignores, as do we).
    line = ('{"system": "A chat between a curious user and an artificial intelligence assistant.", '
            '"prompt_turns": [{"from": "User", "value": "What is 2+2?", "label": null}], '
            '"label": "quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,coherence:4,'
            'complexity:4,verbosity:2", '
            '"responses": [{"from": "Assistant", "value": "4", "log(P(a|x,y))": -0.5, "log(P(y|x))": -3, '
            '"log(Q(y|a,x))": -2.25}, {"from": "Assistant", "value": "Four.", "log(P(a|x,y))": -1.5, '
            '"log(P(y|x))": -4.5, "log(Q(y|a,x))": -3.0}]}')
    record = parse_line(line)
    assert record.n == 2 and record.prompt_turns == (("User", "What is 2+2?"),)
    assert record.log_values() == ([-0.5, -1.5], [-3.0, -4.5], [-2.25, -3.0])
    assert isinstance(record.responses[0].log_py, float)


def test_writer_round_trip_and_exact_schema(tmp_path):
    record = make_record("Sé breve.", [{"from": "User", "value": "¿Por qué? 日本"}], "helpfulness:4",
                         ["Porque sí.", ""], [-1, -2.5], [-30.125, -7e-5], [-28, -1.0 / 3.0])
    path = tmp_path / "steerlm2.jsonl"
    assert write_records(path, [record, record]) == 2
    raw = path.read_text(encoding="utf-8")
    assert "日本" in raw and "Sé" in raw  # ensure_ascii=False
    obj = json.loads(raw.splitlines()[0])
    assert list(obj) == ["system", "prompt_turns", "label", "responses"]
    assert list(obj["responses"][0]) == ["from", "value", *LOG_FIELDS]
    assert obj["responses"][0][LOG_PA] == -1.0 and isinstance(obj["responses"][0][LOG_PA], float)
    assert '"log(Q(y|a,x))": -28.0' in raw  # integers are written as floats
    records, rejects = read_records(path)
    assert rejects == [] and records == [record, record]
    assert records[0].responses[1].log_q == -1.0 / 3.0  # floats survive exactly
    assert dumps_record(record) == raw.splitlines()[0]


def test_read_records_counts_rejects_with_file_and_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(record_json(n=3)), "{not json", json.dumps(record_json(n=2)), "",
             json.dumps(with_response(0, n=3, **{LOG_Q: "x"})), json.dumps(record_json(n=3))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    records, rejects = read_records(path)  # the first valid group fixes n = 3
    assert [r.n for r in records] == [3, 3]
    assert [(r.file, r.line, reason_category(r.reason)) for r in rejects] == [
        (str(path), 2, "malformed JSON"), (str(path), 3, "group size"), (str(path), 5, "log field not a number")]
    assert isinstance(rejects[0], Reject)


# --------------------------------------------------------------------------------------------------
# Rendering and masks
# --------------------------------------------------------------------------------------------------

PROMPT = ("<extra_id_0>System\nBe brief.\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\nHello!\n"
          "<extra_id_1>User\nWhy?\n<extra_id_1>Assistant\n")
MARKER = ["<", "extra", "_", "id", "_", "1", ">"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from steerray.models.loading import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def sample_record(values=("Because.", "  ok", "")) -> object:
    n = len(values)
    return make_record("Be brief.", [("User", "Hi"), ("Assistant", "Hello!"), ("User", "Why?")],
                       "helpfulness:4,verbosity:1", list(values), [-1.0] * n, [-2.0] * n, [-3.0] * n)


def test_render_group_exact_text_and_spans():
    record = sample_record()
    prompt = PROMPT + "<extra_id_2>helpfulness:4,verbosity:1\n"
    assert steerlm2_prompt(record.system, record.prompt_turns, record.label) == prompt
    rendered = render_group(record)
    assert [r["text"] for r in rendered] == [prompt + "Because.\n<extra_id_1>", prompt + "  ok\n<extra_id_1>",
                                             prompt + "\n<extra_id_1>"]
    assert [r["trained"] for r in rendered] == [[[len(prompt), len(r["text"])]] for r in rendered]
    # Earlier assistant turns carry no label line (the reference's get_prompt); P(y|x) drops the label.
    assert [r["text"] for r in render_group(record, conditioned=False)][0] == PROMPT + "Because.\n<extra_id_1>"


def test_token_masks_train_the_response_and_the_stop(tokenizer):
    record = sample_record()
    examples = tokenize_group(record, tokenizer, max_length=512)
    targets = [[tokenizer.decode([t]) for t in e.labels if t != IGNORE_INDEX] for e in examples]
    assert targets[0] == ["Because", ".", "\n", *MARKER]
    assert targets[1] == ["\n ", " ok", "\n", *MARKER]  # "\nĠ" straddles label line and response: trained
    assert targets[2] == ["\n", *MARKER]  # an empty sample: only the stop
    for example in examples:  # everything before the response is context: all prompt labels are ignored
        first = next(i for i, t in enumerate(example.labels) if t != IGNORE_INDEX)
        assert all(t != IGNORE_INDEX for t in example.labels[first:])
        assert example.trained_tokens == len(example.labels) - first
    # log P(y|x) is scored on the same response tokens without the label line.
    plain = tokenize_group(record, tokenizer, max_length=512, conditioned=False)
    assert [[t for t in e.labels if t != IGNORE_INDEX] for e in plain] == \
        [[t for t in e.labels if t != IGNORE_INDEX] for e in examples]


def test_truncated_group_rejected_and_batch_round_trip(tokenizer):
    record = sample_record()
    with pytest.raises(SteerLM2RecordError, match=r"truncated: responses\[0\] renders to 86 tokens > max_length 64"):
        tokenized_group(record, tokenizer, max_length=64)
    good = dumps_record(record)
    batch = {"file": ["d.jsonl"] * 3, "line": [1, 2, 3], "raw": [good, json.dumps(record_json(n=2)), good],
             "error": ["", "", ""]}
    out = tokenize_group_batch(batch, tokenizer, 512, expected_n=3)
    assert out["status"].tolist() == ["ok", "rejected", "ok"]
    assert reason_category(out["reason"][1]) == "group size" and out["n"].tolist() == [3, 0, 3]
    group = unpack_group({key: out[key][0] for key in out})
    assert group == tokenized_group(record, tokenizer, 512)
    assert group.log_q == [-3.0] * 3 and group.trained_tokens == [10, 10, 8]


# --------------------------------------------------------------------------------------------------
# log Q' from the generator == the trainer's NLL (tiny random Llama)
# --------------------------------------------------------------------------------------------------

def test_generator_log_q_equals_trainer_nll(tiny_model_dir, tokenizer):
    from steerray.models.loading import load_causal_lm

    torch.manual_seed(0)
    policy = load_causal_lm(tiny_model_dir).eval()
    record = sample_record(("Because it is late and the answer is long enough to pad.", "  ok", "", "No."))
    examples = tokenize_group(record, tokenizer, max_length=512)
    ids, labels = [e.input_ids for e in examples], [e.labels for e in examples]
    # Generator: the whole group padded together, no grad.
    log_q = (-response_nll(policy, ids, labels, tokenizer.pad_token_id, micro_batch=4)).tolist()
    record = make_record(record.system, record.prompt_turns, record.label, [r.value for r in record.responses],
                         [-1.0] * 4, [-2.0] * 4, log_q)
    group = tokenized_group(parse_line(dumps_record(record)), tokenizer, 512)  # through the file format
    # Trainer: train mode, with grad, other micro-batch compositions and padding.
    policy.train()
    for micro in (1, 3):
        nll = []
        for start in range(0, 4, micro):
            batch = collate_sft(group.input_ids[start:start + micro], group.labels[start:start + micro],
                                tokenizer.pad_token_id)
            logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll.extend(sequence_nll(logits, batch["labels"]).tolist())
        assert nll == pytest.approx([-q for q in group.log_q], abs=1e-4)
    # An independent check: HF's own shifted loss on the unshifted sequence, times the trained-token count.
    full = examples[0].input_ids + [examples[0].labels[-1]]
    hf_labels = [IGNORE_INDEX] + examples[0].labels
    out = policy(input_ids=torch.tensor([full]), labels=torch.tensor([hf_labels]))
    assert float(out.loss.detach()) * examples[0].trained_tokens == pytest.approx(-log_q[0], abs=1e-4)
    # At theta = Q' the baseline is uniform.
    b = baseline_weights(torch.tensor(nll, dtype=torch.float64), group.log_q)
    assert b.tolist() == pytest.approx([0.25] * 4, abs=1e-4)
