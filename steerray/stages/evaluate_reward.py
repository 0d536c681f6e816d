"""Stage `evaluate-reward`: the reward model on benchmark files: RewardBench v1, best-of-N, chosen/rejected pairs.

Launch it through the CLI (embedded Ray by default, --address to submit to a cluster):

    steerray evaluate-reward --model runs/demo/reward/model --bench rewardbench=rewardbench.parquet \
        --bench pairs:hs3=runs/hs3/prepare/preference/val.jsonl [--score helpfulness] --out runs/demo/evaluate_reward

or as a Ray job:  ray job submit -- python -m steerray.stages.evaluate_reward --config CONFIG.yaml

1. Check, before Ray starts or a model loads: every --bench parses and its local files exist, and every
   name in --score is one of the model's attributes (the error lists them).
2. Read and validate every benchmark (a bad row is a reject with file, line and reason), then score each
   distinct text once with annotate's predictor (``load_predictor``): in this process when there are few
   (``in_process_max_texts``), else in a Ray Data actor pool.
3. Measure (steerray/eval/reward_bench.py) and write under `out`: eval.json, report.md (a table per
   benchmark), <bench>_rows.jsonl (every row with its scores, to look at failures), <bench>_rejects.jsonl,
   and manifest.json last (rejects counted by reason, headline metrics, time per 1,000 rows).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from steerray.annotation import ModelPredictor, load_predictor, threads_for
from steerray.config import EvaluateRewardConfig
from steerray.data.readers import HUB_PREFIX
from steerray.eval.reward_bench import (
    BenchError,
    BenchResult,
    BenchSpec,
    parse_bench_specs,
    parse_score_spec,
    predict_scores,
    read_bench,
    score_bench,
    unique_texts,
    write_bench_report,
)
from steerray.models.reward import reward_model_attributes
from steerray.runtime import cluster_gpus, init_ray
from steerray.stages import StageResult, job_main

# The numbers of each format the manifest, the pipeline summary and evaluate's report show.
HEADLINE = {
    "rewardbench": ("overall", "accuracy"),
    "bon": ("win_rate", "random", "oracle", "gap_closed"),
    "pairs": ("accuracy", "weighted_accuracy"),
}


def say(message: str) -> None:
    print(f"[evaluate-reward] {message}", file=sys.stderr, flush=True)


# 1. The benchmarks and the score, checked before Ray starts or a model loads.
def bench_specs(config: EvaluateRewardConfig) -> list[BenchSpec]:
    """Every --bench parsed; a local location that does not exist is an error naming it."""
    specs = parse_bench_specs(config.bench)
    for spec in specs:
        if not spec.location.startswith(HUB_PREFIX) and not Path(spec.location).expanduser().exists():
            raise BenchError(f"--bench {spec.name}: {spec.location}: no such file or folder")
    return specs


def check(config: EvaluateRewardConfig) -> None:
    bench_specs(config)
    parse_score_spec(config.score, reward_model_attributes(config.model, config.trust_remote_code))


def inputs(config: EvaluateRewardConfig) -> list[str]:
    return [config.model] + [spec.location for spec in parse_bench_specs(config.bench)]


# 2. Scoring: annotate's predictor, in this process or as a Ray Data actor pool.
def open_predictor(config: EvaluateRewardConfig, threads: int | None) -> ModelPredictor:
    return load_predictor(
        config.model,
        max_length=config.max_length,
        batch_size=config.batch_size,
        precision=config.precision,
        threads=threads,
        trust_remote_code=config.trust_remote_code,
    )


class BenchScorer:
    """Ray Data actor: loads the model once, then scores ``text`` batches in batched forward passes."""

    def __init__(self, config: dict[str, Any]) -> None:
        cfg = EvaluateRewardConfig.model_validate(config)
        self.predict = open_predictor(cfg, cfg.threads_per_actor or threads_for(cfg.cpus_per_actor))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        preds, truncated = self.predict([str(t) for t in batch["text"]])
        return {
            "id": batch["id"],
            "scores": np.asarray(preds, dtype=np.float64),
            "truncated": np.asarray(truncated, dtype=bool),
        }


def score_with_ray(config: EvaluateRewardConfig, texts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
    """Predictions [N, A] and truncated flags of ``texts``, from an actor pool of :class:`BenchScorer`."""
    import ray.data

    init_ray()
    # Shortest first: every batch holds texts of similar length, so padding costs little. With batches a
    # multiple of the predictor's, its forward passes are the ones it makes scoring all texts in process.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    ds: Any = ray.data.from_items([{"id": i, "text": texts[i]} for i in order])
    ds = ds.map_batches(
        BenchScorer,
        fn_constructor_kwargs={"config": config.model_dump(mode="json")},
        batch_size=config.batch_size * 4,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=config.num_actors),
        num_cpus=config.cpus_per_actor,
        num_gpus=1 if cluster_gpus() > 0 else 0,
    )
    rows: dict[int, tuple[np.ndarray, bool]] = {}
    with tqdm(
        total=len(texts),
        desc="evaluate-reward",
        unit="text",
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
    ) as progress:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i, scores, flag in zip(batch["id"], batch["scores"], batch["truncated"], strict=True):
                rows[int(i)] = (np.asarray(scores, dtype=np.float64), bool(flag))
            progress.update(len(batch["id"]))
    if len(rows) != len(texts):
        raise BenchError(f"the scoring pool returned {len(rows)} of {len(texts)} texts")
    return np.stack([rows[i][0] for i in range(len(texts))]), [rows[i][1] for i in range(len(texts))]


def score_texts(config: EvaluateRewardConfig, texts: Sequence[str]) -> tuple[np.ndarray, list[bool], str]:
    """``(predictions [N, A], truncated flags, where)``: a few texts in this process (no pool to start)."""
    if len(texts) <= config.in_process_max_texts:
        preds, flags = open_predictor(config, config.threads_per_actor)(list(texts))
        return np.asarray(preds, dtype=np.float64), list(flags), "in process"
    preds, flags = score_with_ray(config, texts)
    return preds, flags, f"Ray Data actor pool ({config.num_actors} actor(s))"


def lookup(texts: Sequence[str], preds: np.ndarray, flags: Sequence[bool]) -> Any:
    """The predictions made, as the library's predictor callable: ``chunk -> (predictions, flags)``."""
    index = {text: i for i, text in enumerate(texts)}

    def predict(chunk: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        rows = [index[text] for text in chunk]
        return preds[rows], [flags[i] for i in rows]

    return predict


# 3. The numbers the manifest and the pipeline show; the stage.
def headline(result: BenchResult) -> dict[str, Any]:
    metrics = result.metrics
    picked = {key: metrics.get(key) for key in HEADLINE[result.spec.format]}
    if result.spec.format == "rewardbench":
        picked.update(metrics["sections"], complete=metrics["complete"])
    return picked


def bench_counts(result: BenchResult) -> dict[str, Any]:
    summary = result.summary()
    return {
        key: summary[key]
        for key in ("format", "location", "rows_in", "scored", "rejected", "rejects_by_reason", "truncated")
    } | {"warnings": len(result.warnings)}


def run(config: EvaluateRewardConfig) -> StageResult:
    started = time.perf_counter()
    attributes = reward_model_attributes(config.model, config.trust_remote_code)
    score = parse_score_spec(config.score, attributes)
    benches = [read_bench(spec) for spec in bench_specs(config)]
    texts = unique_texts(benches)
    rows = sum(len(bench.rows) for bench in benches)
    say(
        f"{rows} rows in {len(benches)} benchmark(s), {len(texts)} distinct texts; score = {score.describe()}"
    )
    scoring = time.perf_counter()
    preds, flags, where = score_texts(config, texts)
    scoring = time.perf_counter() - scoring
    scores, truncated = predict_scores(texts, lookup(texts, preds, flags), score, attributes)
    results = [score_bench(bench, scores, truncated) for bench in benches]
    paths = write_bench_report(results, config.out, score=score, model=config.model)
    for result in results:
        for warning in result.warnings:
            say(f"{result.spec.name}: {warning['file']}:{warning['line']}: {warning['reason']}")
    metrics = {r.spec.name: headline(r) for r in results}
    run_stats = {
        "rows": rows,
        "texts": len(texts),
        "truncated_texts": len(truncated),
        "scored": where,
        "seconds_scoring": round(scoring, 3),
        "seconds": round(time.perf_counter() - started, 3),
        "seconds_per_1000_rows": round(1000 * scoring / rows, 3),
    }
    rejected = sum(len(r.rejects) for r in results)
    say(f"{rows} rows scored ({where}, {scoring:.1f} s), {rejected} rejected -> {paths['report']}")
    return StageResult(
        {
            "out": config.out,
            "report": str(paths["report"]),
            "rows": rows,
            "rejected": rejected,
            "seconds": run_stats["seconds"],
            **{
                f"{r.spec.name}.{key}": metrics[r.spec.name][key]
                for r in results
                for key in HEADLINE[r.spec.format]
            },
        },
        {
            "metrics": metrics,
            "benches": {r.spec.name: bench_counts(r) for r in results},
            "score": score.to_json(),
            "attributes": attributes,
            "run": run_stats,
            "outputs": {name: str(p) for name, p in paths.items()},
        },
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return job_main("evaluate_reward", argv)


if __name__ == "__main__":
    main()
