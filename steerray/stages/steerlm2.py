"""Stage `steerlm2` (SteerLM 2.0 iteration): rounds of steerlm2-data then train-steerlm2, each round's policy
the next round's Q'. The pipeline runs it after SFT (and bootstrap when that is on) when switched on
(``steerlm2: {enabled: true, overrides: [rounds=2]}``); on its own:

    steerray steerlm2 --config demo/steerlm2 --data runs/demo/annotate --policy runs/demo/sft/model \
        --reward-model runs/demo/reward/model --reward-data runs/demo/prepare --out runs/demo/steerlm2
    ray job submit -- python -m steerray.stages.steerlm2 --config runs/demo/steerlm2/config.yaml

Round r (from the SteerLM-1 policy, then from round r-1's model):
1. rounds/round_r/data: ``steerlm2-data`` (its preset ``data_preset`` + ``data_overrides``) sampling from Q';
2. rounds/round_r/train: ``train-steerlm2`` (``train_preset`` + ``train_overrides``) from Q' on that data.
Each is the stage itself through ``execute``: a finished round is skipped, an interrupted one resumes.
OUT/model points at the last round's model; steerlm2.json and the manifest hold the per-round distance
KL(w||b) before and after, the groups and their effective sample size; ``steerray evaluate --steerlm2 OUT``
puts them, and the steering of the final model beside SteerLM 1's, into the report.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from steerray.artifacts import MANIFEST, atomic_write_json, read_manifest
from steerray.config import ConfigError, SteerLM2Config, SteerLM2DataConfig, SteerLM2TrainConfig, load_config
from steerray.errors import SteerrayError
from steerray.stages import StageResult, execute, job_main
from steerray.stages import steerlm2_data as data_stage
from steerray.stages.bootstrap import point_model_link


class SteerLM2Error(SteerrayError, ValueError):
    """Round configs that do not fit together, or a steerlm2 output that is not finished."""


# 1. Each round's two configs: preset + overrides, with the folders and models set here.
def round_configs(cfg: SteerLM2Config, r: int, policy: str) -> tuple[SteerLM2DataConfig, SteerLM2TrainConfig]:
    round_dir = Path(cfg.out) / "rounds" / f"round_{r}"
    try:
        data = load_config(
            SteerLM2DataConfig,
            cfg.data_preset,
            cfg.data_overrides,
            stage_file="steerlm2_data",
            data=cfg.data,
            policy=policy,
            reward_model=cfg.reward_model,
            reward_data=cfg.reward_data,
            out=str(round_dir / "data"),
        )
        train = load_config(
            SteerLM2TrainConfig,
            cfg.train_preset,
            [*cfg.train_overrides, f"model.name={policy}"],
            stage_file="train_steerlm2",
            data=str(round_dir / "data"),
            out=str(round_dir / "train"),
        )
    except ConfigError as err:
        raise SteerLM2Error(f"steerlm2 round {r}: {err}") from None
    if data.max_length != train.model.max_length:
        raise SteerLM2Error(
            f"steerlm2: data max_length={data.max_length} but train model.max_length="
            f"{train.model.max_length}; log Q' must cover the tokens training trains"
        )
    return data.with_absolute_paths(), train.with_absolute_paths()


def round_row(r: int, policy: str, data: dict[str, Any], train: dict[str, Any]) -> dict[str, Any]:
    return {
        "round": r,
        "policy": policy,
        "model": train.get("model"),
        "groups": data.get("groups"),
        "dropped": data.get("dropped"),
        "mean_effective_samples": data.get("mean_effective_samples"),
        "steps": train.get("steps"),
        "distance_before": train.get("distance_before"),
        "distance_after": train.get("distance_after"),
        "distance_first_step": train.get("distance_first_step"),
        "distance_last_step": train.get("distance_last_step"),
        "groups_skipped": train.get("groups_skipped"),
        "data_seconds": data.get("seconds"),
    }


# 2. The stage.
def check(cfg: SteerLM2Config) -> None:
    data, _ = round_configs(cfg, 0, cfg.policy)
    data_stage.check(data)


def inputs(cfg: SteerLM2Config) -> list[str]:
    data, _ = round_configs(cfg, 0, cfg.policy)
    return data_stage.inputs(data)


def run(cfg: SteerLM2Config) -> StageResult:
    started, policy, rounds = time.time(), cfg.policy, []
    for r in range(cfg.rounds):
        data_cfg, train_cfg = round_configs(cfg, r, policy)
        data = execute("steerlm2_data", data_cfg)
        train = execute("train_steerlm2", train_cfg)
        rounds.append(round_row(r, policy, data, train))
        print(
            f"[steerlm2] round {r}: distance {rounds[-1]['distance_before']} -> {rounds[-1]['distance_after']}"
        )
        policy = str(Path(train_cfg.out) / "model")
    link = point_model_link(Path(cfg.out), Path(policy))
    section = {"rounds": rounds, "start_policy": cfg.policy, "final_model": policy}
    atomic_write_json(Path(cfg.out) / "steerlm2.json", section)
    metrics = {
        "rounds": cfg.rounds,
        "distance_before": rounds[0]["distance_before"],
        "distance_after": rounds[-1]["distance_after"],
    }
    return StageResult(
        {"model": str(link), **metrics, "seconds": round(time.time() - started, 1)},
        {"steerlm2": section, "metrics": metrics, "model": str(link)},
    )


# 3. For the report: the rounds of a finished output, and steering side by side with SteerLM 1.
def rounds_section(folder: str) -> dict[str, Any]:
    """The ``steerlm2`` section of a finished output's manifest (raises naming the folder if unfinished)."""
    manifest = read_manifest(folder, "steerlm2")
    if manifest is None:
        raise SteerLM2Error(
            f"{folder} holds no finished steerlm2 output (no {MANIFEST}); run `steerray steerlm2`"
        )
    return {"folder": folder, **manifest["steerlm2"]}


def compare_steering(steerlm1: dict[str, Any], steerlm2: dict[str, Any]) -> list[dict[str, Any]]:
    """Per attribute of the grid: Spearman and shift of both policies, and the change."""
    rows = []
    for name, curve in steerlm1["per_attribute"].items():
        other = steerlm2["per_attribute"].get(name) or {}
        a, b = curve.get("spearman"), other.get("spearman")
        rows.append(
            {
                "attribute": name,
                "steerlm1_spearman": a,
                "steerlm2_spearman": b,
                "steerlm1_shift": curve.get("shift"),
                "steerlm2_shift": other.get("shift"),
                "change": b - a if a is not None and b is not None else None,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return job_main("steerlm2", argv)


if __name__ == "__main__":
    main()
