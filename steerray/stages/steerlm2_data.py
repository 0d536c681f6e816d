"""Stage `steerlm2-data` (SteerLM 2.0, spec 7.2): groups of n responses from the SteerLM-1 policy Q', with the
three log values train-steerlm2 weighs them by, in the reference's record schema.

Launch it through the CLI (embedded Ray by default, --address to submit to a cluster), or as a Ray job:

    steerray steerlm2-data --config demo/steerlm2_data --data runs/demo/annotate --policy runs/demo/sft/model \
        --reward-model runs/demo/reward/model --reward-data runs/demo/prepare --out runs/demo/steerlm2_data
    ray job submit -- python -m steerray.stages.steerlm2_data --config runs/demo/steerlm2_data/config.yaml

1. Prompts: every distinct context before a training conversation's last answer (bootstrap's rule); per
   prompt ``labels_per_prompt`` target labels, the ``label_attributes`` drawn uniformly from ``label_values``
   (seeded per prompt), the policy's other label attributes at ``steering`` over the defaults.
2. The likelihood: sigmas fitted on the reward model's residuals over REWARD_DATA/regression/val.jsonl
   (a Ray task, on a GPU where there is one) -> likelihood.json and the manifest's ``likelihood_params``.
3. Sampling and scoring in a Ray Data actor pool (``steerray.steerlm2_sampling.SteerLM2Sampler``): n samples
   per group from Q' at temperature 1, unfinished samples drawn again, then log Q', log P(y|x), log P(a|x,y).
4. Outputs: train.jsonl and val.jsonl (split by prompt; exactly the reference's schema), groups.jsonl (every
   group: status, drop reason, attempts, reward predictions), likelihood.json, manifest.json last.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import numpy as np

from steerray import runtime
from steerray.artifacts import atomic_write_json, read_jsonl, write_jsonl
from steerray.attributes import ATTRIBUTES, model_label_attributes
from steerray.bootstrapping import training_prompts
from steerray.config import SteerLM2DataConfig
from steerray.data.steerlm2 import parse_line, steerlm2_prompt, write_records
from steerray.data.writer import assign_split, reason_category
from steerray.errors import SteerrayError
from steerray.eval.attribute_likelihood import likelihood_params
from steerray.eval.sampling import map_rows
from steerray.models.loading import load_tokenizer, resolve_model
from steerray.models.reward import reward_model_attributes
from steerray.stages import StageResult, job_main
from steerray.stages.bootstrap import conversation_file
from steerray.steerlm2_sampling import OK, SteerLM2Sampler, fit_sigmas, group_rows
from steerray.training.reward_data import REGRESSION, read_split


class SteerLM2DataError(SteerrayError, ValueError):
    """Missing or unusable steerlm2-data inputs; the message names the file or key."""


# 1. Inputs and labels, checked before Ray starts.
def label_plan(cfg: SteerLM2DataConfig) -> tuple[list[str], tuple[str, ...] | None]:
    """(attributes drawn at random, the policy's label attributes or None for full labels)."""
    trained = model_label_attributes(cfg.policy)
    drawn = list(cfg.label_attributes or trained or [])
    if not drawn:
        raise SteerLM2DataError(
            f"{cfg.policy} records no label attributes (trained on full labels): set "
            "label_attributes to the attributes whose values are drawn, e.g. [verbosity]"
        )
    extra = [a for a in [*drawn, *cfg.steering] if trained is not None and a not in trained]
    if extra:
        raise SteerLM2DataError(
            f"label_attributes/steering name {extra}, which {cfg.policy} was not trained on "
            f"(its label attributes: {', '.join(trained or ())})"
        )
    return drawn, trained


def val_file(cfg: SteerLM2DataConfig) -> Path:
    return Path(cfg.reward_data) / REGRESSION / "val.jsonl"


def check(cfg: SteerLM2DataConfig) -> None:
    if conversation_file(cfg.data, "train") is None:
        raise SteerLM2DataError(
            f"no training conversations at {cfg.data} (a jsonl file, or a folder with train.jsonl)"
        )
    for model in (cfg.policy, cfg.reference):
        if model:
            resolve_model(model)
    if not val_file(cfg).is_file():
        raise SteerLM2DataError(
            f"{val_file(cfg)}: missing; reward_data must be a prepare output whose labelled "
            "validation rows fit the label likelihood's sigmas"
        )
    drawn, trained = label_plan(cfg)
    needed = set(trained or ATTRIBUTES) | set(drawn)
    missing = sorted(needed - set(reward_model_attributes(cfg.reward_model)))
    if missing:
        raise SteerLM2DataError(f"the labels carry {missing}, which {cfg.reward_model} does not predict")


def inputs(cfg: SteerLM2DataConfig) -> list[str]:
    return [
        str(conversation_file(cfg.data, "train")),
        cfg.policy,
        cfg.reference or "",
        cfg.reward_model,
        str(val_file(cfg)),
    ]


# 2. The label likelihood's parameters, fitted where the reward model can run.
def likelihood(cfg: SteerLM2DataConfig, needed: set[str]) -> dict[str, Any]:
    import ray

    split = read_split(val_file(cfg), REGRESSION, ATTRIBUTES, allow_empty=True)
    rows = split.rows[: cfg.sigma_rows]
    gpus = int(ray.cluster_resources().get("GPU", 0))
    task = cast(Any, ray.remote(**({"num_gpus": 1} if gpus else {"num_cpus": 0.5})))(fit_sigmas)
    sigmas, cells, _ = ray.get(
        task.remote(
            cfg.reward_model,
            [r["text"] for r in rows],
            [r["label"] for r in rows],
            max_length=cfg.reward_max_length,
            batch_size=cfg.reward_batch_size,
            precision=cfg.sampling.precision,
            threads=None if gpus else 2,
        )
    )
    missing = sorted(needed - set(sigmas))
    if missing:
        raise SteerLM2DataError(
            f"{val_file(cfg)}: fewer than 2 labelled rows for {missing} among {len(rows)} rows "
            "(and rejects: " + str(len(split.rejects)) + "); no sigma to score those labels"
        )
    return {**likelihood_params(sigmas, cells), "fitted_on": str(val_file(cfg)), "rows": len(rows)}


# 3. Sampling and scoring, on prompts that leave room for an answer (the first max_prompts of them).
def fitting_rows(cfg: SteerLM2DataConfig, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The groups of the first ``max_prompts`` prompts whose every label's prompt leaves ``max_new_tokens``
    (and the end marker) within ``max_length``; and how many prompts were too long."""
    tokenizer, room = load_tokenizer(cfg.policy), cfg.max_length - cfg.sampling.max_new_tokens - 2
    texts = [steerlm2_prompt(r["system"], json.loads(r["turns"]), r["label"]) for r in rows]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    long = {r["prompt_id"] for r, n in zip(rows, lengths, strict=True) if n > room}
    keep = [p for p in dict.fromkeys(r["prompt_id"] for r in rows) if p not in long][: cfg.max_prompts]
    kept = set(keep)
    return [r for r in rows if r["prompt_id"] in kept], len(long)


def sample(
    cfg: SteerLM2DataConfig, rows: list[dict[str, Any]], sigmas: dict[str, float]
) -> list[dict[str, Any]]:
    kwargs = {
        "policy": cfg.policy,
        "reference": cfg.reference,
        "reward_model": cfg.reward_model,
        "sigmas": sigmas,
        "n": cfg.samples_per_prompt,
        "max_length": cfg.max_length,
        "sampling": cfg.sampling.model_dump(),
        "max_attempts": cfg.max_attempts,
        "reward_max_length": cfg.reward_max_length,
        "reward_batch_size": cfg.reward_batch_size,
        "score_batch_size": cfg.score_batch_size,
    }
    groups = max(1, cfg.sampling.batch_size // cfg.samples_per_prompt)
    return map_rows(rows, SteerLM2Sampler, kwargs, batch_size=groups, desc="steerlm2-data: sample + score")


def weight_stats(records: list[Any]) -> dict[str, Any]:
    """Means of the log values and of the self-normalised weights' effective sample size (1..n per group)."""
    if not records:
        return {}
    ess: list[float] = []
    logs: dict[str, list[float]] = {"log_pa": [], "log_py": [], "log_q": []}
    for record in records:
        log_pa, log_py, log_q = (np.asarray(v, dtype=np.float64) for v in record.log_values())
        for key, values in zip(logs, (log_pa, log_py, log_q), strict=True):
            logs[key].extend(values.tolist())
        log_w = log_pa + log_py - log_q
        if np.isfinite(log_w).all():
            w = np.exp(log_w - log_w.max())
            w /= w.sum()
            ess.append(float(1.0 / np.sum(w * w)))
    finite = {key: [v for v in values if math.isfinite(v)] for key, values in logs.items()}
    return {"mean_" + key: float(np.mean(v)) if v else None for key, v in finite.items()} | {
        "mean_effective_samples": float(np.mean(ess)) if ess else None,
        "n": records[0].n,
    }


# 4. The stage.
def write_outputs(cfg: SteerLM2DataConfig, results: list[dict[str, Any]]) -> tuple[dict[str, Any], list[Any]]:
    out = Path(cfg.out)
    kept: dict[str, list[Any]] = {"train": [], "val": []}
    diagnostics: list[dict[str, Any]] = []
    reasons: Counter = Counter()
    redraws: Counter = Counter()
    for row in results:
        split = assign_split(cfg.sampling.seed, "steerlm2", str(row["prompt_id"]), cfg.val_fraction)
        if row["status"] == OK:
            kept[split].append(parse_line(str(row["record"]), expected_n=cfg.samples_per_prompt))
        else:
            reasons[reason_category(str(row["reason"]))] += 1
        redraws.update(json.loads(str(row["redraws"])))
        diagnostics.append(
            {key: row[key] for key in ("id", "prompt_id", "label", "status", "reason", "attempts")}
            | {
                "split": split,
                "redraws": json.loads(str(row["redraws"])),
                "predictions": json.loads(str(row["predictions"])),
            }
        )
    for split, records in kept.items():
        write_records(out / f"{split}.jsonl", records)
    write_jsonl(out / "groups.jsonl", diagnostics)
    counts = {
        "groups": len(results),
        "train_groups": len(kept["train"]),
        "val_groups": len(kept["val"]),
        "dropped": dict(reasons),
        "samples_drawn": int(sum(int(r["attempts"]) for r in results)),
        "samples_redrawn": dict(redraws),
    }
    return counts, kept["train"] + kept["val"]


def run(cfg: SteerLM2DataConfig) -> StageResult:
    started, out = time.time(), Path(cfg.out)
    drawn, trained = label_plan(cfg)
    train_file = conversation_file(cfg.data, "train")
    prompts = training_prompts(read_jsonl(train_file)) if train_file else []
    rows = group_rows(
        prompts, cfg.labels_per_prompt, drawn, cfg.label_values, cfg.steering, trained, cfg.sampling.seed
    )
    rows, too_long = fitting_rows(cfg, rows)
    if not rows:
        raise SteerLM2DataError(
            f"{train_file} has no conversation with a user turn before an assistant answer "
            f"whose prompt leaves sampling.max_new_tokens in max_length ({too_long} too long)"
        )
    runtime.init_ray()
    params = likelihood(cfg, set(trained or ATTRIBUTES) | set(drawn))
    atomic_write_json(out / "likelihood.json", params)
    counts, records = write_outputs(cfg, sample(cfg, rows, params["sigmas"]))
    counts["prompts_too_long"] = too_long
    if not records:
        raise SteerLM2DataError(
            f"no group finished: {counts['dropped']}; raise sampling.max_new_tokens or "
            f"max_attempts (see {out / 'groups.jsonl'})"
        )
    weights = weight_stats(records)
    print(
        f"[steerlm2-data] {counts['train_groups']} train + {counts['val_groups']} val groups of "
        f"{cfg.samples_per_prompt}; dropped {counts['dropped']}; mean effective samples "
        f"{weights['mean_effective_samples']}; data: {out / 'train.jsonl'}"
    )
    summary = {
        "data": str(out),
        "groups": counts["train_groups"] + counts["val_groups"],
        "dropped": sum(counts["dropped"].values()),
        "mean_effective_samples": weights["mean_effective_samples"],
        "seconds": round(time.time() - started, 1),
    }
    return StageResult(
        summary,
        {
            "counts": counts,
            "likelihood_params": params,
            "weights": weights,
            "labels": {"drawn": drawn, "values": cfg.label_values, "policy_attributes": trained},
            "outputs": ["train.jsonl", "val.jsonl", "groups.jsonl", "likelihood.json"],
        },
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return job_main("steerlm2_data", argv)


if __name__ == "__main__":
    main()
