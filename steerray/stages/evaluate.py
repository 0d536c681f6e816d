"""Evaluate a SteerLM run: reward-model quality on the validation split, and how far steering moves the model.

Launch it through the CLI (embedded Ray by default, --address to submit to a cluster), or as a Ray job:

    steerray evaluate --config demo/evaluate --reward-model runs/demo/reward/model \
        --policy runs/demo/sft/model --data runs/demo/prepare --out runs/demo/evaluate
    ray job submit -- python -m steerray.stages.evaluate --config runs/demo/evaluate/config.yaml

1. Reward model: score the prepare output's regression/val.jsonl (per-attribute MSE, Pearson, Spearman on
   labelled cells, next to the MSE of predicting the training mean) and preference/val.jsonl (pairwise
   accuracy on the helpfulness output), in a Ray Data actor pool.
2. Steerability: for held-out prompts (first user turns of conversations/val.jsonl, or the config's),
   generate at each requested value of each steered attribute with the others at their defaults, score
   every answer with the reward model, and correlate requested with measured values; verbosity is also
   checked against answer length. Generation is the slow part on a CPU: size the grid in the preset.
3. Report: eval.json (every number), report.html (self-contained), report.md, plots/*.png, grid.jsonl
   (every answer with its scores), and manifest.json last.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from steerray import runtime
from steerray.artifacts import MANIFEST, read_manifest, write_jsonl
from steerray.attributes import ATTRIBUTES, LabelError, model_label_attributes, steering_label
from steerray.config import EvaluateConfig
from steerray.errors import SteerrayError
from steerray.eval.metrics import label_means, pairwise_metrics, regression_metrics
from steerray.eval.probe import probe_items, probe_policy
from steerray.eval.report import write_report
from steerray.eval.sampling import SKIPPED, SampleScorer, TextScorer, map_rows
from steerray.eval.steerability import build_grid, example_answers, held_out_prompts, summarize_grid
from steerray.models.loading import load_causal_lm, load_tokenizer, resolve_model
from steerray.models.precision import inference_dtype
from steerray.models.reward import reward_model_attributes
from steerray.stages import StageResult, job_main
from steerray.stages.steerlm2 import compare_steering, rounds_section

log = logging.getLogger("steerray.evaluate")


class EvaluateError(SteerrayError, ValueError):
    """Missing or unusable evaluation inputs."""


# --------------------------------------------------------------------------------------------------
# 1. Inputs
# --------------------------------------------------------------------------------------------------

def read_split(data: str | None, kind: str, split: str, limit: int | None) -> list[dict[str, Any]]:
    """``DATA/<kind>/<split>.jsonl`` of a prepare output, the first ``limit`` rows; [] when absent."""
    if not data:
        return []
    path = Path(data) / kind / f"{split}.jsonl"
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise EvaluateError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
    return rows


# --------------------------------------------------------------------------------------------------
# 2. Reward-model quality
# --------------------------------------------------------------------------------------------------

def score_texts(cfg: EvaluateConfig, texts: list[str], desc: str) -> list[list[float]]:
    rows = map_rows([{"id": i, "text": t} for i, t in enumerate(texts)], TextScorer,
                    {"reward_model": cfg.reward_model, "max_length": cfg.reward.max_length,
                     "batch_size": cfg.reward.batch_size, "precision": cfg.reward.precision}, batch_size=max(cfg.reward.batch_size, 32), desc=desc)
    return [json.loads(r["scores"]) for r in rows]


def reward_quality(cfg: EvaluateConfig, attributes: list[str]) -> dict[str, Any] | None:
    columns = [ATTRIBUTES.index(a) for a in attributes]  # prepare's labels are always in ATTRIBUTES order
    result: dict[str, Any] = {}
    val = read_split(cfg.data, "regression", "val", cfg.reward.max_rows)
    if val:
        preds = score_texts(cfg, [r["text"] for r in val], "reward model: regression val")
        labels = [[float(r["label"][j]) for j in columns] for r in val]
        train = read_split(cfg.data, "regression", "train", 50_000)
        baseline = label_means([[float(r["label"][j]) for j in columns] for r in train]) if train else None
        result["regression"] = regression_metrics(preds, labels, attributes, baseline=baseline)
    pairs = read_split(cfg.data, "preference", "val", cfg.reward.max_rows)
    if pairs and "helpfulness" in attributes:
        h = attributes.index("helpfulness")
        scores = score_texts(cfg, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                             "reward model: preference val")
        n = len(pairs)
        result["preference"] = pairwise_metrics([s[h] for s in scores[:n]], [s[h] for s in scores[n:]],
                                                [p.get("strength", 1.0) for p in pairs])
    return result or None


# --------------------------------------------------------------------------------------------------
# 3. Steerability
# --------------------------------------------------------------------------------------------------

def grid_prompts(cfg: EvaluateConfig) -> list[str]:
    steer = cfg.steerability
    if steer.prompts:
        return steer.prompts[: steer.num_prompts]
    conversations = read_split(cfg.data, "conversations", "val", None)
    if not conversations:
        raise EvaluateError(f"no held-out prompts: {cfg.data}/conversations/val.jsonl is missing or empty; "
                            "set steerability.prompts or point data at a prepare output with a val split")
    return held_out_prompts(conversations, steer.num_prompts)


def steerability(cfg: EvaluateConfig, attributes: list[str]
                 ) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """The grid on the held-out prompts and on every named prompt set, in one pass of the actor pool:
    (held-out summary, summaries of the other sets, every scored row)."""
    steer = cfg.steerability
    assert cfg.policy is not None
    sets = {"held_out": grid_prompts(cfg), **steer.prompt_sets}
    label_attributes = model_label_attributes(cfg.policy)
    grid: list[dict[str, Any]] = []
    for name, prompts in sets.items():
        for row in build_grid(prompts, steer.attributes, steer.values, label_attributes=label_attributes):
            grid.append({**row, "id": len(grid), "set": name, "messages": json.dumps(row["messages"])})
    rows = map_rows(grid, SampleScorer, {"policy": cfg.policy, "reward_model": cfg.reward_model,
                                         "sampling": steer.sampling.model_dump(),
                                         "reward_max_length": cfg.reward.max_length},
                    batch_size=steer.sampling.batch_size, desc="steerability grid")
    for row in rows:
        row["scores"] = json.loads(row["scores"])
        row["messages"] = json.loads(row["messages"])
    summaries = {name: summarize_set(cfg, [r for r in rows if r["set"] == name], prompts, attributes)
                 for name, prompts in sets.items()}
    held_out = summaries.pop("held_out")
    return held_out, summaries, rows


def summarize_set(cfg: EvaluateConfig, rows: list[dict[str, Any]], prompts: list[str],
                  attributes: list[str]) -> dict[str, Any]:
    steer = cfg.steerability
    scored = [r for r in rows if r["finish_reason"] != SKIPPED]
    summary = summarize_grid(scored, attributes)
    example_attribute = "verbosity" if "verbosity" in steer.attributes else steer.attributes[0]
    summary.update(prompts=prompts, attributes=steer.attributes, values=steer.values,
                   skipped_prompt_too_long=len(rows) - len(scored), sampling=steer.sampling.model_dump(),
                   examples={example_attribute: example_answers(scored, example_attribute)})
    return summary


def label_probe(cfg: EvaluateConfig) -> dict[str, Any] | None:
    """The label probe on held-out conversations: forward passes only, in one Ray task (on a GPU if any)."""
    import ray

    conversations = read_split(cfg.data, "conversations", "val", None)
    if not (cfg.probe.enabled and cfg.policy and conversations):
        return None
    trained = model_label_attributes(cfg.policy)
    items = probe_items(conversations, trained, cfg.probe.num_conversations)
    wanted = [a for a in (cfg.probe.attributes or cfg.steerability.attributes) if trained is None or a in trained]
    task = ray.remote(num_cpus=1, num_gpus=1 if runtime.cluster_gpus() else 0)(probe_task)
    return ray.get(task.remote(cfg.policy, cfg.steerability.sampling.precision, items, wanted, cfg.probe.values))


def probe_task(policy: str, precision: str, items: list[Any], attributes: list[str], values: list[int]) -> dict:
    import os

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))  # Ray gives a task one thread
    model = load_causal_lm(policy, dtype=inference_dtype(precision, device)).to(device).eval()
    return probe_policy(model, load_tokenizer(policy), items, attributes, values)


# --------------------------------------------------------------------------------------------------
# 4. Bootstrapping, from its manifest
# --------------------------------------------------------------------------------------------------

def bootstrap_section(folder: str | None) -> dict[str, Any] | None:
    if not folder:
        return None
    manifest = read_manifest(folder, "bootstrap")
    if manifest is None:
        raise EvaluateError(f"{folder} holds no finished bootstrap output (no {MANIFEST})")
    return manifest.get("bootstrap")


def reward_bench_section(folder: str | None) -> dict[str, Any] | None:
    """The eval.json of a finished evaluate-reward output: its benchmark tables go into this report."""
    if not folder:
        return None
    if read_manifest(folder, "evaluate_reward") is None:
        raise EvaluateError(f"{folder} holds no finished evaluate-reward output (no {MANIFEST}); "
                            "run `steerray evaluate-reward` first")
    try:
        return {"folder": folder, **json.loads((Path(folder) / "eval.json").read_text(encoding="utf-8"))}
    except (OSError, ValueError) as err:
        raise EvaluateError(f"{folder}/eval.json is unreadable ({err}); run evaluate-reward again") from None


def steerlm2_section(cfg: EvaluateConfig, attributes: list[str], steerlm1: dict[str, Any] | None
                     ) -> dict[str, Any] | None:
    """A steerlm2 output's rounds (distance before/after each), and its final model through the same grid as
    the policy, so the report sets SteerLM 2.0's steering beside SteerLM 1's."""
    if not cfg.steerlm2:
        return None
    section = rounds_section(cfg.steerlm2)
    if steerlm1 is not None:
        grid_cfg = cfg.model_copy(update={"policy": section["final_model"]})
        section["steerability"], section["steerability_sets"], _ = steerability(grid_cfg, attributes)
        section["comparison"] = compare_steering(steerlm1, section["steerability"])
    return section


BENCH_HEADLINE = {"rewardbench": "overall", "bon": "win_rate", "pairs": "accuracy"}


def key_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """The few numbers the pipeline summary and the manifest show."""
    metrics: dict[str, Any] = {}
    regression = (results.get("reward") or {}).get("regression")
    if regression:
        metrics["reward_val_mse"] = regression.get("mse")
        metrics["reward_val_baseline_mse"] = regression.get("baseline_mse")
    preference = (results.get("reward") or {}).get("preference")
    if preference:
        metrics["pairwise_accuracy"] = preference.get("accuracy")
    steer = results.get("steerability")
    if steer:
        metrics["steer_mean_spearman"] = steer.get("mean_spearman")
        for name, curve in steer["per_attribute"].items():
            metrics[f"steer_spearman_{name}"] = curve.get("spearman")
        if steer.get("verbosity_length"):
            metrics["verbosity_length_spearman"] = steer["verbosity_length"]["spearman"]
        metrics["answers_at_cap"] = steer.get("at_cap")
    for set_name, summary in (results.get("steerability_sets") or {}).items():
        for name, curve in summary["per_attribute"].items():
            metrics[f"steer_spearman_{name}_{set_name}"] = curve.get("spearman")
    for name, probe in (results.get("probe") or {}).items():
        metrics[f"probe_gain_{name}"] = probe.get("mean_gain_nats")
    steerlm2 = results.get("steerlm2") or {}
    if steerlm2.get("rounds"):
        metrics["steerlm2_distance_after"] = steerlm2["rounds"][-1].get("distance_after")
    for row in steerlm2.get("comparison") or []:
        metrics[f"steerlm2_spearman_{row['attribute']}"] = row["steerlm2_spearman"]
    for name, bench in ((results.get("reward_bench") or {}).get("benches") or {}).items():
        key = BENCH_HEADLINE[bench["format"]]
        metrics[f"bench_{name}_{key}"] = bench["metrics"].get(key)
    return metrics


def check(cfg: EvaluateConfig) -> None:
    """Models, data and the grid's steering, before Ray starts or any model runs."""
    reward_model_attributes(cfg.reward_model)
    if cfg.data and not Path(cfg.data).is_dir():
        raise EvaluateError(f"data {cfg.data} is not a folder (a prepare output)")
    if cfg.bootstrap and read_manifest(cfg.bootstrap, "bootstrap") is None:
        raise EvaluateError(f"{cfg.bootstrap} holds no finished bootstrap output (no {MANIFEST})")
    reward_bench_section(cfg.reward_bench)
    if cfg.steerlm2:
        rounds_section(cfg.steerlm2)
    if not (cfg.steerability.enabled and cfg.policy):
        return
    resolve_model(cfg.policy)
    trained = model_label_attributes(cfg.policy)
    for name in cfg.steerability.attributes:
        try:
            steering_label({name: cfg.steerability.values[0]}, attributes=trained)
        except LabelError as err:
            raise EvaluateError(f"steerability.attributes: {err}") from None


def inputs(cfg: EvaluateConfig) -> list[str]:
    return [cfg.reward_model, cfg.data or "", cfg.policy or "", cfg.bootstrap or "", cfg.reward_bench or "",
            cfg.steerlm2 or ""]


def run(cfg: EvaluateConfig) -> StageResult:
    out = Path(cfg.out)
    attributes = reward_model_attributes(cfg.reward_model)
    runtime.init_ray()
    results: dict[str, Any] = {"title": f"steerray evaluation: {out}", "models": {
        "reward model": cfg.reward_model, "policy": cfg.policy or "-", "data": cfg.data or "-"}}
    timings: dict[str, float] = {}
    if cfg.reward.enabled:
        start = time.time()
        results["reward"] = reward_quality(cfg, attributes)
        timings["reward model"] = time.time() - start
    grid_rows: list[dict[str, Any]] = []
    if cfg.steerability.enabled and cfg.policy:
        start = time.time()
        results["steerability"], results["steerability_sets"], grid_rows = steerability(cfg, attributes)
        timings["steerability"] = time.time() - start
        start = time.time()
        results["probe"] = label_probe(cfg)
        timings["label probe"] = time.time() - start
        write_jsonl(out / "grid.jsonl", grid_rows)
    results["bootstrap"] = bootstrap_section(cfg.bootstrap)
    results["reward_bench"] = reward_bench_section(cfg.reward_bench)
    start = time.time()
    results["steerlm2"] = steerlm2_section(cfg, attributes, results.get("steerability"))
    if results["steerlm2"]:
        timings["steerlm2 grid"] = time.time() - start
    results["timings"] = timings
    paths = write_report(results, out)
    metrics = key_metrics(results)
    print(f"[evaluate] report: {paths['html']}", file=sys.stderr)
    return StageResult({"report": str(paths["html"]), **metrics},
                       {"metrics": metrics, "timings": timings, "counts": {"grid_answers": len(grid_rows)},
                        "outputs": {name: str(path) for name, path in paths.items()} | {"grid": str(out / "grid.jsonl")}})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return job_main("evaluate", argv)


if __name__ == "__main__":
    main()
