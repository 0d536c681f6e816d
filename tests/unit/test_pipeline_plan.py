"""Pipeline planning without Ray: config loading, wiring, and the skip / resume / rerun decisions."""

from __future__ import annotations

import json

import pytest

from steerray.artifacts import write_manifest
from steerray.config import ConfigError, dump_yaml
from steerray.stages.planning import (
    StageOutcome,
    apply_pipeline_overrides,
    current_fingerprints,
    decide,
    key_metrics,
    load_pipeline_config,
    load_state,
    plan,
    record_finish,
    record_start,
    resolve_stages,
    summary_table,
)


def _cfg(tmp_path, *overrides):
    return load_pipeline_config(None, [f"runs_dir={tmp_path}", "run=t", *overrides])


def test_overrides_go_to_the_right_place():
    data = apply_pipeline_overrides({"sft": {"preset": "tiny/sft"}}, [
        "sft.train.max_steps=5", "train-reward.lora.enabled=true", "bootstrap.enabled=true", "run=x",
        "evaluate.preset=demo/evaluate"])
    assert data["sft"] == {"preset": "tiny/sft", "overrides": ["train.max_steps=5"]}
    assert data["reward"] == {"overrides": ["lora.enabled=true"]}
    assert data["bootstrap"] == {"enabled": True}
    assert data["evaluate"] == {"preset": "demo/evaluate"}
    assert data["run"] == "x"
    with pytest.raises(ConfigError):
        apply_pipeline_overrides({}, ["sft.overrides=[a]"])


def test_wiring_connects_the_folders(tmp_path):
    cfg = _cfg(tmp_path, "bootstrap.enabled=true", "sft.train.max_steps=17")
    stages = {s.name: s for s in resolve_stages(cfg)}
    root = tmp_path / "t"
    assert stages["prepare"].config.out == str(root / "prepare")
    assert stages["reward"].config.data == str(root / "prepare")
    assert stages["annotate"].config.model == str(root / "reward" / "model")
    assert stages["annotate"].config.input == str(root / "prepare" / "conversations")
    assert stages["sft"].config.data == str(root / "annotate")
    assert stages["sft"].config.train.max_steps == 17
    assert stages["bootstrap"].config.policy == str(root / "sft" / "model")
    # with bootstrapping on, evaluation reads the bootstrapped model and its manifest
    assert stages["evaluate"].config.policy == str(root / "bootstrap" / "model")
    assert stages["evaluate"].config.bootstrap == str(root / "bootstrap")
    assert stages["evaluate"].inputs == ("prepare", "reward", "bootstrap")
    off = {s.name: s for s in resolve_stages(_cfg(tmp_path))}
    assert off["bootstrap"].enabled is False and off["bootstrap"].config is None
    assert off["evaluate"].config.policy == str(root / "sft" / "model")


def test_reward_benchmarks_wire_into_evaluate_when_enabled(tmp_path):
    bench = tmp_path / "pairs.jsonl"
    cfg = _cfg(tmp_path, "evaluate_reward.enabled=true", f"evaluate-reward.bench=[pairs:val={bench}]",
               "evaluate_reward.score=helpsteer2")
    stages = {s.name: s for s in resolve_stages(cfg)}
    root = tmp_path / "t"
    bench_stage = stages["evaluate_reward"]
    assert (bench_stage.config.model, bench_stage.config.out) == (str(root / "reward" / "model"),
                                                                  str(root / "evaluate_reward"))
    assert bench_stage.config.bench == [f"pairs:val={bench}"] and bench_stage.config.score == "helpsteer2"
    assert bench_stage.inputs == ("reward",)
    # evaluate reads its eval.json, and re-runs when the benchmarks re-run
    assert stages["evaluate"].config.reward_bench == str(root / "evaluate_reward")
    assert stages["evaluate"].inputs == ("prepare", "reward", "sft", "evaluate_reward")
    state = load_state(root)
    assert [d.action for d in plan(list(stages.values()), state)][:3] == ["run", "run", "run"]
    off = {s.name: s for s in resolve_stages(_cfg(tmp_path))}
    assert off["evaluate_reward"].config is None and off["evaluate"].config.reward_bench is None
    assert off["evaluate"].inputs == ("prepare", "reward", "sft")
    with pytest.raises(ConfigError, match="evaluate_reward: invalid config"):  # enabled without a benchmark
        resolve_stages(_cfg(tmp_path, "evaluate_reward.enabled=true"))
    with pytest.raises(ConfigError, match="model, out is set by the pipeline"):
        resolve_stages(_cfg(tmp_path, "evaluate_reward.enabled=true", f"evaluate_reward.bench=[pairs={bench}]",
                            "evaluate_reward.out=/x", "evaluate_reward.model=/y"))


def test_problems_are_reported_together_before_anything_runs(tmp_path):
    cfg = _cfg(tmp_path, "reward.preset=no/such", "sft.out=/elsewhere", "evaluate.steerability.values=[0,9]",
               "annotate.enabled=false")
    with pytest.raises(ConfigError) as err:
        resolve_stages(cfg)
    text = str(err.value)
    assert "no/such" in text and "does not exist" in text
    assert "sft: out is set by the pipeline" in text
    assert "evaluate" in text and "0-4" in text
    assert "annotate: cannot be disabled" in text
    with pytest.raises(ConfigError, match="unknown key"):
        resolve_stages(_cfg(tmp_path, "sft.trian.max_steps=3"))
    with pytest.raises(ConfigError, match="plain folder name"):
        _cfg(tmp_path, "run=a/b")


FINISHED = []


def _finish(item, state, fingerprints, seconds=1.0):
    """What a stage does when it finishes (manifest last), and what the pipeline records."""
    record_start(state, item, fingerprints)
    item.folder.mkdir(parents=True, exist_ok=True)
    (item.folder / "config.yaml").write_text(dump_yaml(item.config))
    FINISHED.append(item.name)  # two runs in the same second still write different manifests (metrics)
    manifest = json.loads(write_manifest(item.folder, item.name, item.config,
                                         metrics={"val_loss": 0.5, "run": len(FINISHED)}).read_text())
    record_finish(state, item, manifest, seconds)


def test_fresh_run_then_everything_skips(tmp_path):
    cfg = _cfg(tmp_path)
    stages = resolve_stages(cfg)
    state = load_state(tmp_path / "t")
    assert [d.action for d in plan(stages, state)] == ["run", "run", "disabled", "run", "run", "disabled", "disabled", "run"]
    for item in stages:
        if item.enabled:
            _finish(item, state, current_fingerprints(stages))
    assert [d.action for d in plan(stages, state)] == ["skip", "skip", "disabled", "skip", "skip", "disabled", "disabled", "skip"]
    # a changed config reruns that stage and everything downstream of it, nothing upstream
    changed = resolve_stages(_cfg(tmp_path, "annotate.batch_size=3"))
    decisions = plan(changed, state)
    assert [d.action for d in decisions] == ["skip", "skip", "disabled", "run", "run", "disabled", "disabled", "run"]
    assert decisions[3].reason == "config changed" and decisions[3].clear
    assert decisions[4].reason.startswith("input re-ran: annotate")
    assert decisions[7].reason.startswith("input re-ran: sft")  # evaluate reads the SFT model
    # a change at the end reruns only the end
    assert [d.action for d in plan(resolve_stages(_cfg(tmp_path, "evaluate.reward.batch_size=3")), state)] == [
        "skip", "skip", "disabled", "skip", "skip", "disabled", "disabled", "run"]
    # evaluate reads prepare, reward, sft: after sft reruns it must rerun too (checked on the real state)
    annotate, sft, evaluate = changed[3], changed[4], changed[7]
    _finish(annotate, state, current_fingerprints(changed))
    assert decide(sft, state, current_fingerprints(changed)).reason == "input changed: annotate"
    _finish(sft, state, current_fingerprints(changed))
    assert decide(evaluate, state, current_fingerprints(changed)).reason == "input changed: sft"
    # --rerun reward: reward and everything reading it, directly or not
    assert [d.action for d in plan(changed, state, "train-reward")] == [
        "skip", "run", "disabled", "run", "run", "disabled", "disabled", "run"]


def test_unfinished_stage_resumes_or_clears(tmp_path):
    stages = resolve_stages(_cfg(tmp_path))
    state = load_state(tmp_path / "t")
    prepare = stages[0]
    record_start(state, prepare, {})
    prepare.folder.mkdir(parents=True)
    (prepare.folder / "config.yaml").write_text(dump_yaml(prepare.config))
    (prepare.folder / "part-0.jsonl").write_text("{}\n")  # killed mid-way: outputs, no manifest
    decision = decide(prepare, state, {})
    assert (decision.action, decision.clear) == ("resume", False)
    other = resolve_stages(_cfg(tmp_path, "prepare.seed=99"))[0]
    decision = decide(other, state, {})
    assert (decision.action, decision.clear) == ("run", True)


def test_corrupted_manifest_is_not_trusted(tmp_path):
    stages = resolve_stages(_cfg(tmp_path))
    state = load_state(tmp_path / "t")
    prepare = stages[0]
    _finish(prepare, state, {})
    (prepare.folder / "manifest.json").write_text('{"stage": "prep')
    decision = decide(prepare, state, {})
    assert decision.action == "resume" and decision.drop_manifest and "corrupted" in decision.reason
    (prepare.folder / "manifest.json").write_text('{"hello": 1}')
    assert "not a steerray manifest" in decide(prepare, state, {}).reason


def test_adopts_a_stage_finished_outside_the_pipeline(tmp_path):
    stages = resolve_stages(_cfg(tmp_path))
    prepare = stages[0]
    write_manifest(prepare.folder, "prepare", prepare.config)
    decision = decide(prepare, {"stages": {}}, {})
    assert decision.action == "skip" and "adopted" in decision.reason


def test_key_metrics_and_table():
    manifest = {"metrics": {"train_loss": 1.5, "val_loss": 0.75, "steps": 10, "nested": {"val_mse": 0.2}},
                "counts": {"rows": 3}}
    picked = key_metrics("sft", manifest, limit=2)
    assert list(picked) == ["val_loss", "train_loss"]
    assert key_metrics("prepare", {"counts": {"conversations": {"train": 5}}}) == {"conversations.train": 5}
    reward = {"metrics": {"val": {"mse": 0.5, "baseline_mse": 0.9, "per_attribute": {"quality": {"n": 3}}}},
              "training": {"last_loss": 0.4, "steps": 12}}
    assert key_metrics("reward", reward, limit=3) == {"val.mse": 0.5, "val.baseline_mse": 0.9, "last_loss": 0.4}
    assert key_metrics("x", None) == {}
    table = summary_table([StageOutcome("sft", "ran", "", 12.3, {"val_loss": 0.75})])
    assert "sft" in table and "12 s" in table and "val_loss=0.75" in table
