"""SteerLM 2.0 stages on the session's local Ray, through the CLI: `steerlm2-data` then `train-steerlm2`.

The policy Q' is tiny-llama fitted for a few seconds (plain torch, no Ray) on short templated answers, so
its samples at temperature 1 mostly end with "\\n<extra_id_1>" like a SteerLM-1 model's; the reward model
is the session's tiny random one. Checked:

1. steerlm2-data: the files hold exactly the reference's schema; log Q' of a written response equals the
   policy's own summed NLL on the trainer's tokens (to 1e-4); log P(a|x,y) equals the likelihood of the recorded
   predictions under the manifest's sigmas; drops and redraws are counted.
2. train-steerlm2 on those groups plus bad lines (mixed n, a missing log field, a string log value, an
   untrained label attribute) and a NaN group: the four are rejected with file, line and reason and
   counted, the NaN group is skipped at every step and counted, a worker failure resumes from the
   checkpoint; at theta = Q' (step 1, the held-out pass before training) the trainer's baseline is uniform,
   so its distance is KL(w || uniform) of the file's values (to 1e-4); the distance KL(w||b) falls over the steps and on the held-out groups, the export loads.
3. `steerlm2` runs two rounds (each round's model the next round's Q'); evaluate with `steerlm2=OUT` puts the
   per-round distances and both policies' steering side by side in eval.json and the report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from steerray.attributes import ATTRIBUTES, IGNORE_VALUE, LABEL_ATTRIBUTES_KEY
from steerray.cli import app
from steerray.data.sft import tokenize_sft
from steerray.data.steerlm2 import LOG_FIELDS, LOG_PA, LOG_Q, parse_line, render_response, steerlm2_prompt
from steerray.data.steerlm2 import tokenize_group as group_tokens
from steerray.eval.attribute_likelihood import label_log_likelihoods
from steerray.models.loading import TINY_ALIAS, load_causal_lm, load_tokenizer
from steerray.models.reward import reward_model_attributes
from steerray.templates import make_conversation, reward_prompts
from steerray.training.batching import collate_sft
from steerray.training.steerlm2 import distance, importance_weights, response_nll

pytestmark = pytest.mark.ray

TOPICS = ["the sky", "rain", "cats", "tea", "maps", "bread", "music", "stars"]
SYSTEM = "Be brief."


def answer(topic: str, verbosity: int) -> str:
    return f"It is {topic}." if verbosity == 0 else f"It is {topic}. It is {topic} again."


def finishing_policy(out: Path, steps: int = 100, lr: float = 5e-3) -> str:
    """tiny-llama fitted on "It is X." answers ending in "\\n<extra_id_1>", with label attribute verbosity."""
    torch.manual_seed(0)
    tokenizer, model = load_tokenizer(TINY_ALIAS), load_causal_lm(TINY_ALIAS)
    examples = [
        tokenize_sft(
            render_response(
                steerlm2_prompt(SYSTEM, [("User", f"Tell me about {t}.")], f"verbosity:{v}"), answer(t, v)
            ),
            tokenizer,
            128,
        )
        for t in TOPICS
        for v in (0, 4)
    ]
    batch = collate_sft([e.input_ids for e in examples], [e.labels for e in examples], tokenizer.pad_token_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    trained = batch["labels"] != -100
    for _ in range(steps):  # logits at the trained positions only: the 49k-token head is the cost here
        hidden = model.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[trained]), batch["labels"][trained])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    setattr(model.config, LABEL_ATTRIBUTES_KEY, ["verbosity"])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def write_inputs(root: Path) -> tuple[Path, Path]:
    """Training conversations (their contexts are the prompts) and a prepare-like regression/val.jsonl."""
    conversations = [
        make_conversation(
            [("User", f"Tell me about {t}.", None), ("Assistant", answer(t, v), f"verbosity:{v}")],
            system=SYSTEM,
        )
        for t in TOPICS
        for v in (0,)
    ]
    data = root / "annotate"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conversations))
    val = root / "prepare" / "regression"
    val.mkdir(parents=True)
    rows = []
    for i, conversation in enumerate(conversations):
        label = [IGNORE_VALUE] * len(ATTRIBUTES)
        label[ATTRIBUTES.index("verbosity")] = float(i % 5)
        rows.append({"text": reward_prompts(conversation)[-1].text, "label": label})
    (val / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "prepare" / "conversations").mkdir()  # held-out prompts for evaluate's grid
    (root / "prepare" / "conversations" / "val.jsonl").write_text(
        "".join(json.dumps(c) + "\n" for c in conversations[:2])
    )
    return data, root / "prepare"


def cli(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_data_output(out: Path, policy: str) -> list[dict]:
    """Schema exactly the reference's; log Q' and log P(a|x,y) recomputed from their definitions."""
    records = read(out / "train.jsonl") + read(out / "val.jsonl")
    assert len(records) >= 4
    for record in records:
        assert list(record) == ["system", "prompt_turns", "label", "responses"]
        assert record["label"] in ("verbosity:0", "verbosity:4") and len(record["responses"]) == 2
        for response in record["responses"]:
            assert list(response) == ["from", "value", *LOG_FIELDS] and response["from"] == "Assistant"
            assert all(
                isinstance(response[key], float) and math.isfinite(response[key]) for key in LOG_FIELDS
            )
            assert response[LOG_Q] < 0 and response[LOG_PA] < 0
    manifest = json.loads((out / "manifest.json").read_text())
    params = manifest["likelihood_params"]
    assert params["kind"] == "discretised_gaussian" and params["sigmas"]["verbosity"] > 0
    counts = manifest["counts"]
    assert counts["groups"] == 8 and counts["train_groups"] + counts["val_groups"] == len(records)
    assert counts["samples_drawn"] >= 16 and sum(counts["dropped"].values()) == 8 - len(records)
    assert counts["prompts_too_long"] == 0

    record = parse_line(json.dumps(records[0]))
    tokenizer, model = load_tokenizer(policy), load_causal_lm(policy).eval()
    examples = group_tokens(record, tokenizer, 128)
    nll = response_nll(
        model, [e.input_ids for e in examples], [e.labels for e in examples], tokenizer.pad_token_id
    )
    # The generator's log Q' (written to the file) is the policy's own NLL of the trainer's tokens, to 1e-4.
    assert torch.allclose(
        -nll.double(),
        torch.tensor([r.log_q for r in record.responses], dtype=torch.float64),
        rtol=0.0,
        atol=1e-4,
    )
    groups = read(out / "groups.jsonl")
    assert len(groups) == 8 and all(len(g["predictions"]) == 2 for g in groups if g["status"] == "ok")
    assert all(g["reason"].startswith("unfinished") for g in groups if g["status"] != "ok")
    return records


@pytest.fixture(scope="module")
def steerlm2_data(ray_session, tiny_reward_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("steerlm2")
    policy = finishing_policy(root / "policy")
    data, prepare = write_inputs(root)
    out = root / "steerlm2_data"
    cli(
        "steerlm2-data",
        "--config",
        "tiny/steerlm2_data",
        "--data",
        str(data),
        "--policy",
        policy,
        "--reward-model",
        tiny_reward_dir,
        "--reward-data",
        str(prepare),
        "--out",
        str(out),
    )
    return root, policy, out, data, prepare


def test_data_files_hold_the_reference_schema_and_the_log_values(steerlm2_data, tiny_reward_dir):
    _, policy, out, _, _ = steerlm2_data
    records = check_data_output(out, policy)
    sigmas = json.loads((out / "manifest.json").read_text())["likelihood_params"]["sigmas"]
    attributes = reward_model_attributes(tiny_reward_dir)
    by_label = {}
    for group in read(out / "groups.jsonl"):
        if group["status"] == "ok":
            by_label.setdefault(group["label"], []).append(group)
    for record in records:
        candidates = by_label[record["label"]]
        expected = [r[LOG_PA] for r in record["responses"]]
        assert any(
            np.allclose(
                label_log_likelihoods(g["predictions"], attributes, [record["label"]] * 2, sigmas), expected
            )
            for g in candidates
        )


def initial_distance(record: dict) -> float:
    """KL(w || uniform): the distance at theta = Q', where the baseline is uniform."""
    parsed = parse_line(json.dumps(record))
    w = importance_weights(*(torch.tensor(v, dtype=torch.float64) for v in parsed.log_values()))
    return float(distance(w, torch.full_like(w, 1.0 / len(w))))


BAD_LINES = {
    "group size": lambda r: {**r, "responses": r["responses"] + r["responses"][:1]},
    "missing log field": lambda r: {
        **r,
        "responses": [{k: v for k, v in r["responses"][0].items() if k != LOG_Q}, r["responses"][1]],
    },
    "log field not a number": lambda r: {
        **r,
        "responses": [{**r["responses"][0], LOG_PA: "-1.5"}, r["responses"][1]],
    },
    "label attribute not trained": lambda r: {**r, "label": "humor:2,verbosity:0"},
}


def test_train_rejects_bad_lines_skips_nan_groups_resumes_and_the_distance_falls(steerlm2_data):
    root, policy, data_out, _, _ = steerlm2_data
    good = read(data_out / "train.jsonl") + read(data_out / "val.jsonl")
    good = good[: (len(good) - 1) // 2 * 2 + 1]  # odd: with the NaN group, one global batch of every group
    nan_group = {
        **good[0],
        "responses": [{**good[0]["responses"][0], LOG_Q: float("nan")}, good[0]["responses"][1]],
    }
    data = root / "train_data"
    data.mkdir()
    lines = [json.dumps(r) for r in good] + [json.dumps(make(good[0])) for make in BAD_LINES.values()]
    lines.append(json.dumps(nan_group))  # json writes NaN: valid to Python, skipped by the trainer
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    # Held out: the two groups whose weights are furthest from uniform, where Q' (b uniform) is furthest off.
    far = sorted(good, key=lambda r: -initial_distance(r))[:2]
    (data / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in far))
    out = root / "train"
    cli(
        "train-steerlm2",
        "--config",
        "tiny/train_steerlm2",
        "--data",
        str(data),
        "--model",
        policy,
        "--out",
        str(out),
        f"train.global_batch_size={len(good) + 1}",
        "train.max_steps=8",
        "train.checkpoint_every=4",
        "train.fail_after_step=4",
        "scaling.max_failures=1",
    )

    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert (
        counts["train_rejected"] == 4
        and counts["train_nonfinite"] == 1
        and counts["train_ok"] == len(good) + 1
    )
    assert sorted(counts["rejects_by_reason"]) == sorted(BAD_LINES)
    rejects = read(out / "rejects.jsonl")
    assert [r["line"] for r in rejects] == [len(good) + i for i in range(1, 5)]
    assert all(r["file"] == str(data / "train.jsonl") for r in rejects)

    steps = [r for r in read(out / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 9))  # resumed after step 4, each step logged once
    assert all(r["groups_skipped"] == 1 and r["groups_kept"] == len(good) for r in steps)
    distances = [r["distance"] for r in steps]
    # Step 1 and the held-out pass before training run at theta = Q': the trainer's own NLL (DDP workers, other
    # padding) equals the file's -log Q', so its baseline is uniform and the distance is KL(w || uniform).
    assert distances[0] == pytest.approx(np.mean([initial_distance(r) for r in good]), abs=1e-4)
    assert distances[0] > 0 and distances[-1] < 0.7 * distances[0], distances
    summary = manifest["summary"]
    assert summary["resumed_from"] == 4 and summary["groups_skipped"] == 8
    assert summary["val_distance_before"] == pytest.approx(
        np.mean([initial_distance(r) for r in far]), abs=1e-4
    )
    assert summary["val_distance_after"] < 0.7 * summary["val_distance_before"]
    config = json.loads((out / "model" / "config.json").read_text())
    assert config[LABEL_ATTRIBUTES_KEY] == ["verbosity"] and config["use_cache"] is True


def test_two_rounds_chain_the_policy_and_evaluate_compares_with_steerlm1(steerlm2_data, tiny_reward_dir):
    root, policy, _, data, prepare = steerlm2_data
    out = root / "iterate"
    cli(
        "steerlm2",
        "--config",
        "tiny/steerlm2",
        "--data",
        str(data),
        "--policy",
        policy,
        "--reward-model",
        tiny_reward_dir,
        "--reward-data",
        str(prepare),
        "--rounds",
        "2",
        "--out",
        str(out),
        "train_overrides=[train.max_steps=2, train.global_batch_size=2, train.checkpoint_every=2]",
    )
    manifest = json.loads((out / "manifest.json").read_text())
    rounds = manifest["steerlm2"]["rounds"]
    round0_model = str(out / "rounds" / "round_0" / "train" / "model")
    assert [r["policy"] for r in rounds] == [policy, round0_model]
    assert (
        json.loads((out / "rounds" / "round_1" / "data" / "manifest.json").read_text())["config"]["policy"]
        == round0_model
    )
    assert all(r["steps"] == 2 and r["distance_before"] is not None for r in rounds)
    assert (out / "model").resolve() == (out / "rounds" / "round_1" / "train" / "model").resolve()

    report = root / "evaluate"
    cli(
        "evaluate",
        "--config",
        "tiny/evaluate",
        "--reward-model",
        tiny_reward_dir,
        "--policy",
        policy,
        "--data",
        str(prepare),
        "--out",
        str(report),
        f"steerlm2={out}",
        "steerability.attributes=[verbosity]",
        "steerability.prompt_sets={}",
    )
    results = json.loads((report / "eval.json").read_text())
    section = results["steerlm2"]
    assert [r["round"] for r in section["rounds"]] == [0, 1]
    assert [c["attribute"] for c in section["comparison"]] == ["verbosity"]
    assert section["steerability"]["rows"] == results["steerability"]["rows"] == 2 * 3
    text = (report / "report.md").read_text()
    assert "## SteerLM 2.0" in text and "rho SteerLM 2" in text
