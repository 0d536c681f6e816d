"""SteerLM 2.0 stages without Ray: finished samples, label draws, config checks, the trainer's objective on
hand-computed groups, pipeline wiring and round configs, and the report's section."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from steerray.cli import app
from steerray.config import ConfigError, SteerLM2Config, SteerLM2DataConfig, SteerLM2TrainConfig, load_config
from steerray.data.steerlm2 import LOG_PA, LOG_PY, LOG_Q, tokenize_group_batch
from steerray.eval.report import build_blocks, render_markdown
from steerray.models.loading import TINY_ALIAS, load_tokenizer
from steerray.stages.planning import load_pipeline_config, resolve_stages
from steerray.stages.steerlm2 import SteerLM2Error, compare_steering, round_configs
from steerray.stages.steerlm2_data import fitting_rows
from steerray.stages.train_steerlm2 import SteerLM2Task
from steerray.steerlm2_sampling import draw_labels, finished_answer, group_rows
from steerray.training.steerlm2 import avg_tokens, baseline_weights, importance_weights

# --------------------------------------------------------------------------------------------------
# Samples and labels
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("It is tea.\n<extra_id_1>", ("It is tea.", "")),
        ("Two\nlines\n\n<extra_id_1>User", ("Two\nlines\n", "")),  # exactly one newline is the template's
        ("\n<extra_id_1>", ("", "")),  # stopped at once: an empty answer is a sample
        ("It is tea.", (None, "no end")),  # the token budget ran out (or EOS)
        ("It is tea.<extra_id_1>", (None, "marker without newline")),
        ("It is<extra_id_2>verbosity:0\n tea.\n<extra_id_1>", (None, "marker in answer")),
        ("It is <extra_id_0>", (None, "marker in answer")),
    ],
)
def test_finished_answer_cuts_before_exactly_one_newline_and_the_marker(raw, expected):
    assert finished_answer(raw) == expected


def test_labels_are_drawn_per_prompt_reproducibly_over_the_policy_attributes():
    policy = ("verbosity", "humor", "creativity")
    first = draw_labels(7, 3, ["verbosity", "humor"], [0, 4], {"creativity": 2}, policy, seed=1)
    assert first == draw_labels(7, 3, ["verbosity", "humor"], [0, 4], {"creativity": 2}, policy, seed=1)
    assert first != draw_labels(8, 3, ["verbosity", "humor"], [0, 4], {"creativity": 2}, policy, seed=1)
    for label in first:  # canonical order, the fixed attribute at its steering value, drawn ones in {0, 4}
        humor, creativity, verbosity = (int(part.split(":")[1]) for part in label.split(","))
        assert label.startswith("humor:") and creativity == 2 and {humor, verbosity} <= {0, 4}
    full = draw_labels(0, 1, ["verbosity"], [1], {}, None, seed=0)[0]  # a policy trained on full labels
    assert full.endswith("verbosity:1") and full.count(":") == 9


def test_group_rows_drop_label_lines_and_number_groups_stably():
    prompts = [
        {
            "prompt_id": 3,
            "system": "S",
            "context": [
                {"from": "User", "value": "a"},
                {"from": "Assistant", "value": "b", "label": "verbosity:1"},
                {"from": "User", "value": "c"},
            ],
        }
    ]
    rows = group_rows(prompts, 2, ["verbosity"], [2], {}, ("verbosity",), seed=0)
    assert [r["id"] for r in rows] == [6, 7] and [r["label"] for r in rows] == ["verbosity:2"] * 2
    assert json.loads(rows[0]["turns"]) == [
        {"from": "User", "value": "a"},
        {"from": "Assistant", "value": "b"},
        {"from": "User", "value": "c"},
    ]


def test_data_config_demands_samples_from_q_itself():
    with pytest.raises(ConfigError, match=r"temperature=0.7.*density"):
        load_config(SteerLM2DataConfig, "tiny/steerlm2_data", ["sampling.temperature=0.7"])
    with pytest.raises(ConfigError, match="sampling.engine=vllm"):
        load_config(SteerLM2DataConfig, "tiny/steerlm2_data", ["sampling.engine=vllm"])
    with pytest.raises(ConfigError, match="leaves no room for a prompt"):
        load_config(SteerLM2DataConfig, "tiny/steerlm2_data", ["sampling.max_new_tokens=127"])
    with pytest.raises(ConfigError, match="label_values"):
        load_config(SteerLM2DataConfig, None, ["label_values=[5]"])
    # a partial sampling override keeps temperature 1 (the data stage's own defaults)
    assert load_config(SteerLM2DataConfig, None, ["sampling.max_new_tokens=64"]).sampling.temperature == 1.0


# --------------------------------------------------------------------------------------------------
# The trainer's objective on two hand-made groups (one with a NaN log value)
# --------------------------------------------------------------------------------------------------


def group_line(log_q: list[float], values: tuple[str, str] = ("It is tea.", "It is.")) -> str:
    return json.dumps(
        {
            "system": "S",
            "prompt_turns": [{"from": "User", "value": "Tell me."}],
            "label": "verbosity:0",
            "responses": [
                {"from": "Assistant", "value": v, LOG_PA: -1.0 - i, LOG_PY: -3.0, LOG_Q: q}
                for i, (v, q) in enumerate(zip(values, log_q, strict=True))
            ],
        }
    )


def test_objective_weights_loss_and_distance_of_kept_groups_and_skips_nan_groups():
    tokenizer = load_tokenizer(TINY_ALIAS)
    raw = [group_line([-2.0, -4.0]), group_line([float("nan"), -4.0])]
    rows = tokenize_group_batch({"raw": np.array(raw, dtype=object)}, tokenizer, 64, expected_n=2)
    assert list(rows["status"]) == ["ok", "ok"]  # NaN is a JSON number to Python: the trainer skips it
    task = SteerLM2Task(load_config(SteerLM2TrainConfig, "tiny/train_steerlm2"), {})
    columns = {key: list(values) for key, values in rows.items()}
    batch = task.micro_batch(columns, np.array([0, 1]), tokenizer.pad_token_id, "cpu")
    assert task.units(batch) == 1 and batch["input_ids"].shape[0] == 4
    nll = torch.tensor([[1.0, 3.0], [2.0, 2.0]], requires_grad=True)
    loss, kl, kept, skipped = task.objective(nll, batch)
    w = importance_weights([-1.0, -2.0], [-3.0, -3.0], [-2.0, -4.0])  # softmax([0, -1]) -> [0.731, 0.269]
    b = baseline_weights([1.0, 3.0], [-2.0, -4.0])  # softmax([1, 1]) = uniform
    assert torch.allclose(b, torch.tensor([0.5, 0.5], dtype=torch.float64))
    tokens = avg_tokens(batch["trained_tokens"][:1])[0]
    expected = float(((w - b) * torch.tensor([1.0, 3.0], dtype=torch.float64) / tokens).sum())
    assert math.isclose(float(loss.detach()), expected, rel_tol=1e-6) and (kept, skipped) == (1, 1)
    assert math.isclose(kl, float(torch.sum((w + 1e-8) * torch.log((w + 1e-8) / (b + 1e-8)))), rel_tol=1e-9)
    loss.backward()  # the NaN group's NLL gets no gradient, and nothing turns NaN
    assert torch.isfinite(nll.grad).all() and nll.grad[1].abs().sum() == 0


# --------------------------------------------------------------------------------------------------
# Pipeline wiring, rounds, report
# --------------------------------------------------------------------------------------------------


def test_pipeline_wires_steerlm2_after_the_last_sft_and_evaluate_compares(tmp_path):
    cfg = load_pipeline_config(
        None,
        [
            f"runs_dir={tmp_path}",
            "run=t",
            "bootstrap.enabled=true",
            "steerlm2.enabled=true",
            "steerlm2.rounds=2",
        ],
    )
    stages = {s.name: s for s in resolve_stages(cfg)}
    root = tmp_path / "t"
    steer = stages["steerlm2"]
    assert (steer.config.policy, steer.config.data, steer.config.reward_data, steer.config.rounds) == (
        str(root / "bootstrap" / "model"),
        str(root / "annotate"),
        str(root / "prepare"),
        2,
    )
    assert steer.inputs == ("prepare", "reward", "annotate", "bootstrap")
    assert stages["evaluate"].config.steerlm2 == str(root / "steerlm2")
    assert stages["evaluate"].inputs == ("prepare", "reward", "bootstrap", "steerlm2")
    off = {s.name: s for s in resolve_stages(load_pipeline_config(None, [f"runs_dir={tmp_path}", "run=t"]))}
    assert off["steerlm2"].config is None and off["evaluate"].config.steerlm2 is None


def test_round_configs_chain_the_policy_and_check_max_length(tmp_path):
    cfg = SteerLM2Config(
        out=str(tmp_path / "s"),
        data_preset="tiny/steerlm2_data",
        train_preset="tiny/train_steerlm2",
        train_overrides=["train.max_steps=3"],
    )
    data, train = round_configs(cfg, 1, str(tmp_path / "previous" / "model"))
    assert data.policy == train.model.name == str(tmp_path / "previous" / "model")
    assert data.out == train.data == str(tmp_path / "s" / "rounds" / "round_1" / "data")
    assert train.out == str(tmp_path / "s" / "rounds" / "round_1" / "train") and train.train.max_steps == 3
    bad = cfg.model_copy(update={"data_overrides": ["max_length=96", "sampling.max_new_tokens=16"]})
    with pytest.raises(SteerLM2Error, match="max_length=96 but train model.max_length=128"):
        round_configs(bad, 0, "p")
    with pytest.raises(SteerLM2Error, match=r"(?s)round 0: .*train.lr: unknown key"):
        round_configs(cfg.model_copy(update={"train_overrides": ["train.lr=1"]}), 0, "p")


def test_report_sets_the_rounds_and_steering_side_by_side(tmp_path):
    one = {
        "per_attribute": {
            "verbosity": {"spearman": 0.5, "shift": 1.0},
            "humor": {"spearman": 0.1, "shift": 0.2},
        }
    }
    two = {"per_attribute": {"verbosity": {"spearman": 0.75, "shift": 1.5}}}
    rows = compare_steering(one, two)
    assert rows[0] == {
        "attribute": "verbosity",
        "steerlm1_spearman": 0.5,
        "steerlm2_spearman": 0.75,
        "steerlm1_shift": 1.0,
        "steerlm2_shift": 1.5,
        "change": 0.25,
    }
    assert rows[1]["steerlm2_spearman"] is None and rows[1]["change"] is None
    section = {
        "rounds": [
            {
                "round": 0,
                "groups": 20,
                "dropped": 1,
                "mean_effective_samples": 1.5,
                "steps": 12,
                "distance_before": 0.31,
                "distance_after": 0.12,
                "groups_skipped": 0,
            }
        ],
        "final_model": "m",
        "comparison": rows,
    }
    text = render_markdown(build_blocks({"steerlm2": section}, {}), {}, tmp_path)
    assert "## SteerLM 2.0" in text and "| 0 | 20 | 1 | 1.50 | 12 | 0.3100 | 0.1200 | 0 |" in text
    assert "| verbosity | 0.500 | 0.750 | 0.250 | 1.000 | 1.500 |" in text


def test_prompts_that_leave_no_room_for_an_answer_are_left_out_before_sampling():
    long_question = "Tell me everything about " + "tea " * 60 + "."
    prompts = [
        {"prompt_id": i, "system": "S", "context": [{"from": "User", "value": q}]}
        for i, q in enumerate(["Hi?", long_question, "Why?", "How?"])
    ]
    rows = group_rows(prompts, 2, ["verbosity"], [0, 4], {}, ("verbosity",), seed=0)
    cfg = load_config(SteerLM2DataConfig, "tiny/steerlm2_data", [f"policy={TINY_ALIAS}", "max_prompts=2"])
    kept, too_long = fitting_rows(cfg, rows)  # 128 tokens - 24 new - 2: the long question does not fit
    assert too_long == 1 and [r["id"] for r in kept] == [0, 1, 4, 5]  # the first two prompts that fit


# --------------------------------------------------------------------------------------------------
# Bad input refused by the CLI before Ray starts (exit 2: found by the stage's check)
# --------------------------------------------------------------------------------------------------


def train_cli(tmp_path, data, *extra: str) -> str:
    result = CliRunner().invoke(
        app,
        [
            "train-steerlm2",
            "--config",
            "tiny/train_steerlm2",
            "--data",
            str(data),
            "--model",
            TINY_ALIAS,
            "--out",
            str(tmp_path / "out"),
            *extra,
        ],
    )
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    return result.output


def test_train_refuses_missing_unusable_and_mis_scored_data_before_ray(tmp_path):
    assert "no train.jsonl in it" in train_cli(tmp_path, tmp_path / "nothing")
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(
        '{"system": "S"}\n' + group_line([-1.0, -2.0]).replace('"Assistant"', '"User"') + "\n"
    )
    assert "no valid SteerLM 2.0 group" in train_cli(tmp_path, data)
    (data / "train.jsonl").write_text(group_line([-1.0, -2.0]) + "\n")
    (data / "manifest.json").write_text(
        json.dumps({"stage": "steerlm2_data", "config_hash": "x", "config": {"max_length": 96}})
    )
    out = train_cli(tmp_path, data)
    assert "model.max_length=128" in out and "max_length=96" in out
    assert "train.lr: unknown key (did you mean optim.lr?)" in train_cli(tmp_path, data, "train.lr=1")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_data_stage_refuses_a_tempered_sampler_naming_the_key(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "steerlm2-data",
            "--config",
            "tiny/steerlm2_data",
            "--out",
            str(tmp_path),
            "sampling.temperature=0.7",
        ],
    )
    assert result.exit_code == 2 and "sampling.temperature=0.7" in result.output, result.output
