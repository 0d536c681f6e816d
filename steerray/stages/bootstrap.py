"""Bootstrap (SteerLM phase 4): sample at top quality, score with the reward model, keep the best, fine-tune again.

The reference skips this phase; this is the paper's loop made concrete. Launch it through the CLI
(embedded Ray by default, --address to submit to a cluster), or as a Ray job:

    steerray bootstrap --config demo/bootstrap --data runs/demo/annotate --policy runs/demo/sft/model \
        --reward-model runs/demo/reward/model --out runs/demo/bootstrap
    ray job submit -- python -m steerray.stages.bootstrap --config runs/demo/bootstrap/config.yaml

Each round r (from the SFT model, then from the previous round's model):
1. prompts: every distinct context before a training conversation's last answer (``max_prompts`` cap);
2. sample K answers per prompt conditioned on the top-quality label (``steering`` on top of the defaults)
   and score each with the reward model, in a Ray Data actor pool -> rounds/round_r/samples.jsonl;
3. select by score (top-1 / threshold / weight) and relabel with the reward model's predictions
   -> rounds/round_r/data/train.jsonl (+ the original val split, so validation loss stays comparable);
4. fine-tune with the SFT stage itself (skipped when that round already finished) -> rounds/round_r/sft/model.
Then the final model answers ``eval_prompts`` prompts again, so the manifest records how the reward-model
scores moved from the SFT model to the bootstrapped one. OUT/model points at the final model.
A re-run skips finished parts: samples files are written atomically, each round's SFT has its manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from steerray import runtime
from steerray.artifacts import atomic_write_json, read_jsonl, read_manifest, write_jsonl
from steerray.attributes import model_label_attributes, steering_label
from steerray.bootstrapping import (
    round_stats,
    sample_rows,
    score_movement,
    select_samples,
    training_prompts,
    training_rows,
)
from steerray.config import (
    BootstrapConfig,
    ConfigError,
    SFTConfig,
    apply_overrides,
    load_config,
    validate_config,
)
from steerray.errors import SteerrayError
from steerray.eval.sampling import SampleScorer, map_rows
from steerray.models.reward import reward_model_attributes
from steerray.stages import StageResult, execute, job_main


class BootstrapError(SteerrayError, ValueError):
    """Missing or unusable bootstrap inputs."""


# --------------------------------------------------------------------------------------------------
# 1. Inputs
# --------------------------------------------------------------------------------------------------

def conversation_file(data: str, split: str) -> Path | None:
    path = Path(data)
    if path.is_file():
        return path if split == "train" else None
    candidate = path / f"{split}.jsonl"
    return candidate if candidate.is_file() else None


def base_sft_config(cfg: BootstrapConfig) -> dict[str, Any]:
    """The SFT settings each round fine-tunes with: a preset, or what the policy's SFT stage ran with."""
    if cfg.sft_preset:
        return load_config(SFTConfig, cfg.sft_preset).model_dump(mode="json")
    manifest = read_manifest(Path(cfg.policy).parent)
    if manifest is None or "config" not in manifest:
        raise BootstrapError(f"{cfg.policy} has no SFT manifest beside it ({Path(cfg.policy).parent}/manifest.json); "
                             "set sft_preset (e.g. sft_preset=demo/sft) to say how to fine-tune")
    return dict(manifest["config"])


def round_sft_config(cfg: BootstrapConfig, base: dict[str, Any], policy: str, round_dir: Path) -> SFTConfig:
    data = json.loads(json.dumps(base))
    data.update(data=str(round_dir / "data"), out=str(round_dir / "sft"))
    data.setdefault("model", {})["name"] = policy
    apply_overrides(data, cfg.sft_overrides)
    return validate_config(SFTConfig, data, f"bootstrap round SFT config ({round_dir})")


# --------------------------------------------------------------------------------------------------
# 2. Sampling and scoring
# --------------------------------------------------------------------------------------------------

def sample_and_score(cfg: BootstrapConfig, policy: str, prompts: list[dict[str, Any]], path: Path,
                     desc: str) -> list[dict[str, Any]]:
    """K scored samples per prompt, cached in ``path`` (written whole, so a killed run just redoes it)."""
    if path.is_file():
        return read_jsonl(path)
    rows = sample_rows(prompts, cfg.samples_per_prompt, steering_label(cfg.steering, attributes=model_label_attributes(policy)))
    scored = map_rows(rows, SampleScorer, {"policy": policy, "reward_model": cfg.reward_model,
                                           "sampling": cfg.sampling.model_dump()},
                      batch_size=cfg.sampling.batch_size, desc=desc)
    for row in scored:
        row["scores"] = json.loads(row["scores"])
        row["messages"] = json.loads(row["messages"])
    write_jsonl(path, scored)
    return scored


# --------------------------------------------------------------------------------------------------
# 3. One round, and the final model's move
# --------------------------------------------------------------------------------------------------

def point_model_link(out: Path, target: Path) -> Path:
    """OUT/model -> the final round's model (a relative symlink; a copy where links are not allowed)."""
    link = out / "model"
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    try:
        link.symlink_to(os.path.relpath(target, out), target_is_directory=True)
    except OSError:
        shutil.copytree(target, link)
    return link


def run_round(cfg: BootstrapConfig, r: int, policy: str, prompts: list[dict[str, Any]], base: dict[str, Any],
              attributes: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """Sample, score, select, relabel, fine-tune: the round's statistics, its samples and its model."""
    round_dir = Path(cfg.out) / "rounds" / f"round_{r}"
    samples = sample_and_score(cfg, policy, prompts, round_dir / "samples.jsonl", f"round {r}: sample + score")
    kept = select_samples(samples, cfg.score_weights, cfg.selection, threshold=cfg.threshold,
                          weight_temperature=cfg.weight_temperature)
    rows = training_rows(kept, {p["prompt_id"]: p for p in prompts}, cfg.relabel, attributes)
    train_file, val_file = conversation_file(cfg.data, "train"), conversation_file(cfg.data, "val")
    if cfg.include_original and train_file:
        rows += read_jsonl(train_file)
    if not rows:
        raise BootstrapError(f"round {r}: no sample was kept (selection={cfg.selection}, threshold={cfg.threshold});"
                             " lower the threshold or use top1")
    write_jsonl(round_dir / "data" / "train.jsonl", rows)
    if val_file is not None:  # the original val split, so validation loss stays comparable
        write_jsonl(round_dir / "data" / "val.jsonl", read_jsonl(val_file))
    stats = {"round": r, "policy": policy, "training_rows": len(rows), **round_stats(samples, cfg.score_weights, kept)}
    print(f"[bootstrap] round {r}: mean score {stats['mean_score']}, best-of-K {stats['mean_best']}, "
          f"kept {stats['kept']} rows", file=sys.stderr)
    sft_cfg = round_sft_config(cfg, base, policy, round_dir)
    execute("sft", sft_cfg)  # the SFT stage itself: skipped when this round already finished
    return stats, samples, str(Path(sft_cfg.out) / "model")


def final_movement(cfg: BootstrapConfig, policy: str, prompts: list[dict[str, Any]],
                   first_samples: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The final model answers the first ``eval_prompts`` prompts again: how far the scores moved."""
    if not cfg.eval_prompts:
        return None, None
    eval_set = prompts[: cfg.eval_prompts]
    ids = {p["prompt_id"] for p in eval_set}
    final_samples = sample_and_score(cfg, policy, eval_set, Path(cfg.out) / "final_samples.jsonl",
                                     "final model: sample + score")
    final = {"policy": policy, **round_stats(final_samples, cfg.score_weights)}
    before = round_stats(first_samples, cfg.score_weights, prompt_ids=ids)
    print(f"[bootstrap] same {len(ids)} prompts: mean score {before['mean_score']} -> {final['mean_score']}",
          file=sys.stderr)
    return final, {"before": before, "after": final, "change": score_movement(before, final)}


# --------------------------------------------------------------------------------------------------
# 4. The stage
# --------------------------------------------------------------------------------------------------

def check(cfg: BootstrapConfig) -> None:
    if conversation_file(cfg.data, "train") is None:
        raise BootstrapError(f"no training conversations at {cfg.data} (a jsonl file, or a folder with train.jsonl)")
    attributes = reward_model_attributes(cfg.reward_model)
    missing = [a for a in cfg.score_weights if a not in attributes]
    if missing:
        raise BootstrapError(f"score_weights name {missing}, which the reward model does not predict ({attributes})")
    try:
        base_sft_config(cfg)
    except ConfigError as err:
        raise BootstrapError(f"sft_preset: {err}") from None


def inputs(cfg: BootstrapConfig) -> list[str]:
    return [cfg.data, cfg.policy, cfg.reward_model]


def run(cfg: BootstrapConfig) -> StageResult:
    out = Path(cfg.out)
    train_file = conversation_file(cfg.data, "train")
    prompts = training_prompts(read_jsonl(train_file), cfg.max_prompts) if train_file else []
    if not prompts:
        raise BootstrapError(f"{train_file} has no conversation with a user turn before an assistant answer")
    base, attributes = base_sft_config(cfg), reward_model_attributes(cfg.reward_model)
    runtime.init_ray()
    policy, rounds, started = cfg.policy, [], time.time()
    first_samples: list[dict[str, Any]] = []
    for r in range(cfg.rounds):
        stats, samples, policy = run_round(cfg, r, policy, prompts, base, attributes)
        rounds.append(stats)
        first_samples = first_samples or samples
    final, movement = final_movement(cfg, policy, prompts, first_samples)
    model_link = point_model_link(out, Path(policy))
    section = {"samples_per_prompt": cfg.samples_per_prompt, "selection": cfg.selection,
               "score": " + ".join(f"{w:g}*{a}" for a, w in cfg.score_weights.items()),
               "label": steering_label(cfg.steering), "rounds": rounds, "final": final, "movement": movement}
    atomic_write_json(out / "bootstrap.json", section)
    metrics = {"round0_mean_score": rounds[0]["mean_score"], "round0_mean_best": rounds[0]["mean_best"]}
    if movement and final:
        metrics.update(final_mean_score=final["mean_score"], score_change=movement["change"]["mean_score"])
    return StageResult({"model": str(model_link), **metrics, "seconds": round(time.time() - started, 1)},
                       {"bootstrap": section, "metrics": metrics, "model": str(model_link), "final_model": policy})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return job_main("bootstrap", argv)


if __name__ == "__main__":
    main()
