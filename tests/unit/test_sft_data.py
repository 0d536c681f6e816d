"""SFT masks: exactly which tokens carry loss, checked against hand-derived positions (SmolLM2 tokenizer).

Token layout of the SmolLM2 tokenizer used below (derived by hand from its BPE, checked once):
``<extra_id_N>`` is 7 tokens ``< extra _ id _ N >``; ``System``, ``User``, ``Hi``, ``Hello``, ``Why``,
``Ok``, ``Because``, ``\\n`` are one token each; ``Assistant`` is ``Ass istant``; ``verbosity`` is
``verb osity``; ``helpfulness`` is ``help fulness``; ``Be brief.`` is ``Be Ġbrief .``; ``Bye.`` is ``By e .``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from steerray.data.sft import (
    IGNORE_INDEX,
    STATUS_OK,
    STATUS_REJECTED,
    STATUS_UNTRAINED,
    SFTDataError,
    example_from_json,
    is_val_row,
    locate_sft_data,
    render_trained,
    token_loss_mask,
    token_spans,
    tokenize_batch,
    tokenize_sft,
)
from steerray.templates import make_conversation
from steerray.training.batching import collate_sft

SYSTEM = "Be brief."


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from steerray.models.loading import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def two_turn() -> dict:
    return make_conversation([("User", "Hi", None), ("Assistant", "Hello!", "verbosity:0")], system=SYSTEM)


def multi_turn() -> dict:
    return make_conversation([
        ("User", "Hi", None), ("Assistant", "Hello!", "verbosity:0"),
        ("User", "Why?", None), ("Assistant", "Because.", None),  # an unlabelled turn: no label line
        ("User", "Ok", None), ("Assistant", "Bye.", "helpfulness:4,verbosity:1"),
    ], system=SYSTEM)


def trained_targets(example, tokenizer) -> list[str]:
    return [tokenizer.decode([label]) for label in example.labels if label != IGNORE_INDEX]


def trained_positions(example) -> list[int]:
    return [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]


MARKER = ["<", "extra", "_", "id", "_", "1", ">"]


def test_two_turn_exact_mask(tokenizer):
    rendered = render_trained(two_turn())
    assert rendered["text"] == ("<extra_id_0>System\nBe brief.\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n"
                                "<extra_id_2>verbosity:0\nHello!\n<extra_id_1>")
    # Characters: the response with its newline, then the appended turn-end marker.
    assert rendered["trained"] == [[95, 102], [102, 114]]
    assert rendered["text"][95:114] == "Hello!\n<extra_id_1>"
    example = tokenize_sft(rendered, tokenizer, max_length=512)
    # Tokens: system block 0-12 (7 + System + \n + 3 + \n), user turn 13-23 (7 + User + \n + Hi + \n),
    # assistant header 24-33 (7 + Ass istant + \n), label line 34-45 (7 + verb osity : 0 + \n),
    # trained: Hello ! \n = tokens 46-48, final marker = tokens 49-55. 56 tokens in all.
    assert len(example.input_ids) == 55 and len(example.labels) == 55  # shifted: 56 - 1
    # Label position t predicts token t + 1: trained tokens 46..55 are labels at 45..54.
    assert trained_positions(example) == list(range(45, 55))
    assert trained_targets(example, tokenizer) == ["Hello", "!", "\n", *MARKER]
    assert example.trained_tokens == 10 and not example.truncated


def test_multi_turn_exact_mask(tokenizer):
    rendered = render_trained(multi_turn())
    text = rendered["text"]
    # Per spec 6.2: each response + newline, the <extra_id_1> opening each later User turn (it ends the
    # previous answer), and the final <extra_id_1>. Headers, label lines and User texts are context.
    assert [text[s:e] for s, e in rendered["trained"]] == [
        "Hello!\n", "<extra_id_1>", "Because.\n", "<extra_id_1>", "Bye.\n", "<extra_id_1>"]
    example = tokenize_sft(rendered, tokenizer, max_length=512)
    # Tokens as in the two-turn case up to 55; "User \n Why ? \n" 56-60; marker 61-67; "Ass istant \n"
    # 68-70 (no label line: the turn is unlabelled); "Because . \n" 71-73; the marker opening turn 4 74-80;
    # "User \n Ok \n" 81-84; header 85-94; label line 95-111 (7 + help fulness : 4 , verb osity : 1 + \n);
    # "By e . \n" 112-115; final marker 116-122.
    trained_tokens = [*range(46, 56), *range(71, 81), *range(112, 123)]
    assert trained_positions(example) == [t - 1 for t in trained_tokens]
    assert trained_targets(example, tokenizer) == [
        "Hello", "!", "\n", *MARKER, "Because", ".", "\n", *MARKER, "By", "e", ".", "\n", *MARKER]
    # The role names after the trained markers are not trained: the model only learns to end its turn.
    assert "User" not in trained_targets(example, tokenizer)


def test_token_rule_overlap():
    # Tokens [0,3) [3,5) [5,8) [8,8) (an empty-range special token) [8,10); trained chars [4,6) and [9,10).
    offsets = [(0, 3), (3, 5), (5, 8), (8, 8), (8, 10)]
    assert token_loss_mask(offsets, [[4, 6], [9, 10]]) == [False, True, True, False, True]
    assert token_loss_mask(offsets, [[3, 3]]) == [False] * 5  # an empty span trains nothing
    assert token_spans(offsets, [False, True, True, False, True]) == [[3, 10]]  # adjacent tokens merge


def test_straddling_token_is_trained(tokenizer):
    # A response starting with spaces: SmolLM2 merges the label line's "\n" with the first space into one
    # token "\nĠ" that straddles masked and trained characters. It holds response characters, so it is
    # trained (the model must learn to emit it); the label before it is not.
    conversation = make_conversation([("User", "Hi", None), ("Assistant", "  indented", "verbosity:0")],
                                     system=SYSTEM)
    rendered = render_trained(conversation)
    encoded = tokenizer(rendered["text"], return_offsets_mapping=True, add_special_tokens=False)
    start = rendered["trained"][0][0]
    straddler = next(i for i, (s, e) in enumerate(encoded["offset_mapping"]) if s < start < e)
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"][straddler]) == "ĊĠ"
    example = tokenize_sft(rendered, tokenizer, max_length=512)
    assert example.labels[straddler - 1] == encoded["input_ids"][straddler]
    assert example.labels[straddler - 2] == IGNORE_INDEX  # the label value "0" stays context


def test_right_truncation_counted_and_untrained_skipped(tokenizer):
    rendered = render_trained(two_turn())
    cut = tokenize_sft(rendered, tokenizer, max_length=50)  # keeps tokens 0-49: Hello ! \n < trained
    assert cut.truncated and cut.full_length == 56 and len(cut.input_ids) == 49
    assert trained_targets(cut, tokenizer) == ["Hello", "!", "\n", "<"]
    status, reason, example = example_from_json(json.dumps(two_turn()), tokenizer, max_length=46)
    assert status == STATUS_UNTRAINED and "nothing trained" in reason and example.trained_tokens == 0


@pytest.mark.parametrize("record, reason", [
    ({"conversations": [{"from": "User", "value": "hi"}]}, "no Assistant turn"),
    (make_conversation([("User", "a", None), ("Assistant", "b", "wit:3")]), "unknown attribute 'wit'"),
    (make_conversation([("User", "a", None), ("Assistant", "b", "verbosity:9")]), "outside 0..4"),
    (make_conversation([("User", "a", None), ("Assistant", "b", "verbosity:high")]), "non-numeric"),
    (make_conversation([("Assistant", "b", None), ("User", "a", None)]), "expected a User turn"),
    (make_conversation([("User", "a", None), ("Assistant", "  ", "verbosity:1")]), "empty"),
])
def test_invalid_conversations_rejected_with_reason(tokenizer, record, reason):
    status, why, example = example_from_json(json.dumps(record), tokenizer, 64)
    assert status == STATUS_REJECTED and reason in why and example is None


def test_tokenize_batch_and_collate(tokenizer):
    raws = [json.dumps(two_turn()), "{broken", json.dumps(multi_turn())]
    batch = {"file": np.array(["f"] * 3), "line": np.array([1, 2, 3]), "raw": np.array(raws),
             "error": np.array(["", "", ""]), "split": np.array(["train", "train", "val"])}
    out = tokenize_batch(batch, tokenizer, 512)
    assert list(out["status"]) == [STATUS_OK, STATUS_REJECTED, STATUS_OK]
    assert out["reason"][1].startswith("malformed JSON")
    assert list(out["length"]) == [55, 0, 122] and list(out["split"]) == ["train", "train", "val"]
    collated = collate_sft([out["input_ids"][0], out["input_ids"][2]], [out["labels"][0], out["labels"][2]],
                           pad_id=tokenizer.pad_token_id, multiple_of=8)
    assert tuple(collated["input_ids"].shape) == (2, 128)  # 122 rounded up to a multiple of 8
    assert int(collated["attention_mask"][0].sum()) == 55
    assert (collated["input_ids"][0, 55:] == tokenizer.pad_token_id).all()
    assert (collated["labels"][0, 55:] == IGNORE_INDEX).all()
    assert int((collated["labels"] != IGNORE_INDEX).sum()) == 10 + 31


def test_loss_normalised_over_micro_batches_equals_whole_batch(tokenizer, tiny_model_dir):
    # Two micro-batches with different numbers of trained tokens: the summed, globally normalised parts
    # must equal the token mean of the whole batch (not the mean of the two micro-batch means).
    import torch

    from steerray.models.loading import load_causal_lm
    from steerray.training.losses import normalize_loss, token_cross_entropy_sum

    model = load_causal_lm(tiny_model_dir)
    a, b = (tokenize_sft(render_trained(c), tokenizer, 512) for c in (two_turn(), multi_turn()))
    whole = collate_sft([a.input_ids, b.input_ids], [a.labels, b.labels], tokenizer.pad_token_id)
    parts = [collate_sft([x.input_ids], [x.labels], tokenizer.pad_token_id) for x in (a, b)]
    with torch.no_grad():
        def summed(batch):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return token_cross_entropy_sum(logits, batch["labels"], shift=False)

        total, count = summed(whole)
        sums = [summed(p) for p in parts]
    global_count = sum(int(c) for _, c in sums)
    assert global_count == int(count) == 41
    combined = sum(float(normalize_loss(s, global_count, 1)) for s, _ in sums)
    assert combined == pytest.approx(float(total / count), rel=1e-5)
    mean_of_means = sum(float(s / c) for s, c in sums) / 2
    assert abs(mean_of_means - combined) > 1e-3  # the naive average is measurably different


def test_locate_and_split(tmp_path):
    file = tmp_path / "c.jsonl"
    file.write_text("{}\n")
    assert locate_sft_data(file).train == [str(file)] and locate_sft_data(file).val == []
    folder = tmp_path / "prep" / "conversations"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("{}\n")
    (folder / "val.jsonl").write_text("{}\n")
    found = locate_sft_data(tmp_path / "prep")
    assert found.train == [str(folder / "train.jsonl")] and found.val == [str(folder / "val.jsonl")]
    with pytest.raises(SFTDataError, match="no train.jsonl"):
        locate_sft_data(tmp_path)
    with pytest.raises(SFTDataError, match="no such file"):
        locate_sft_data(tmp_path / "missing")
    rows = [json.dumps({"i": i}) for i in range(2000)]
    held_out = [r for r in rows if is_val_row(r, 0.1, seed=3)]
    assert 150 < len(held_out) < 250  # about 10 %
    assert held_out == [r for r in rows if is_val_row(r, 0.1, seed=3)]  # stable
    assert not any(is_val_row(r, 0.0, seed=3) for r in rows)
