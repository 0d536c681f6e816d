"""Stage `annotate`: label every scored assistant turn of a conversation dataset with the reward model.

Launch it through the CLI (embedded Ray by default, --address to submit to a cluster):

    steerray annotate --model runs/exp/reward/model --input runs/exp/prepare --out runs/exp/annotate \
        [--keep-human-labels] [--via http://127.0.0.1:8000]

or as a Ray job:  ray job submit -- python -m steerray.stages.annotate --config CONFIG.yaml

Input: a conversation jsonl file, or a folder of them (a prepare output folder: its `conversations/`).
Outputs under `out`: one annotated file per input file, same name and row order (train.jsonl,
val.jsonl, ...), rejects.jsonl (file, line and reason of every malformed row), manifest.json last.

Each input file is cut into blocks of `block_size` lines; Ray Data hands one block at a time to an actor
of the pool, which reads it, scores it in batched forward passes (or, with `via`, a Ray Data task posts it
to a running `serve-reward`) and writes it there as an atomic part file under `out/.parts/` (so on a
cluster `out` must be shared storage). Killed at any moment, the job loses at most the block each actor
was scoring; re-run with the same command, it skips the finished blocks and redoes the rest, so the merged
output holds exactly one row per input row, in input order.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from steerray.annotation import (
    Block,
    BlockResult,
    FilePlan,
    HttpPredictor,
    annotate_block,
    block_result,
    copy_part_rows,
    load_predictor,
    plan_blocks,
    read_part_header,
    threads_for,
    write_part,
)
from steerray.artifacts import atomic_path, atomic_write_json, config_hash, content_fingerprint, write_jsonl
from steerray.auth import token_from_env
from steerray.config import AnnotateConfig
from steerray.errors import SteerrayError
from steerray.models.reward import RewardModelError, reward_model_attributes
from steerray.runtime import cluster_gpus, init_ray
from steerray.stages import StageResult, job_main

PARTS, REJECTS = ".parts", "rejects.jsonl"


class AnnotateInputError(SteerrayError, ValueError):
    """An input path that cannot be annotated (missing, empty, or the same as the output)."""


# 1. Find the input files (before Ray starts, so a bad path fails at once) and plan their blocks.
def locate_inputs(input_path: str, out: str) -> list[Path]:
    path = Path(input_path).expanduser()
    if not path.exists():
        raise AnnotateInputError(f"input {input_path}: no such file or folder")
    if path.is_dir() and (path / "conversations").is_dir():
        path = path / "conversations"  # a prepare output folder
    files = [path] if path.is_file() else sorted(p for p in path.glob("*.jsonl") if p.name != REJECTS)
    if not files:
        raise AnnotateInputError(f"input {input_path}: no .jsonl conversation files in it")
    for file in files:
        if (Path(out) / file.name).resolve() == file.resolve():
            raise AnnotateInputError(f"output {out} would overwrite the input {file}; choose another --out")
    return files


def fingerprint(config: AnnotateConfig, plans: list[FilePlan]) -> str:
    """What the output depends on: a part written under another fingerprint is never reused."""
    model = config.via or content_fingerprint([config.model])
    return config_hash({"model": model, "inputs": [(p.split, p.sha256) for p in plans],
                        "keep_human_labels": config.keep_human_labels, "max_length": config.max_length,
                        "all_assistant_turns": config.all_assistant_turns, "block_size": config.block_size})


# 2. Keep the finished parts of an earlier run with the same fingerprint; drop everything else.
def open_parts(out: Path, key: str) -> Path:
    parts = out / PARTS
    meta = parts / "meta.json"
    if parts.exists() and (not meta.exists() or json.loads(meta.read_text()).get("fingerprint") != key):
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    for stray in parts.rglob(".*.tmp"):  # temp files of a write that was killed
        stray.unlink()
    if not meta.exists():
        atomic_write_json(meta, {"fingerprint": key})
    return parts


def part_path(parts: Path, split: str, index: int) -> Path:
    return parts / split / f"{index:06d}.part.jsonl"


# 3. Where a block is scored, its part is written: a Ray Data batch is one block descriptor, so a kill loses
# at most the block each actor (or HTTP task) is working on, never blocks already scored but not yet handed
# back to the driver. On a cluster `out` must therefore be storage every node sees (as for checkpoints).
def score_blocks(batch: dict[str, Any], parts: str, annotate: Callable[[dict[str, Any]], BlockResult]
                 ) -> dict[str, Any]:
    """Score each block descriptor of ``batch``, write its part atomically, return ``split, block, rows, part``."""
    results, paths = [], []
    for i in range(len(batch["block"])):
        result = annotate({name: batch[name][i] for name in batch})
        paths.append(str(part_path(Path(parts), result.split, result.index)))
        write_part(paths[-1], result)
        results.append(result)
    return {"split": np.asarray([r.split for r in results], dtype=object),
            "block": np.asarray([r.index for r in results], dtype=np.int64),
            "rows": np.asarray([len(r.rows) + len(r.rejects) for r in results], dtype=np.int64),
            "part": np.asarray(paths, dtype=object)}


class Annotator:
    """The scoring actor: loads the model once, then scores blocks in batched forward passes."""

    def __init__(self, config: dict[str, Any], parts: str) -> None:
        cfg = AnnotateConfig.model_validate(config)
        self.predict = load_predictor(cfg.model, max_length=cfg.max_length, batch_size=cfg.batch_size,
                                      precision=cfg.precision, trust_remote_code=cfg.trust_remote_code,
                                      threads=cfg.threads_per_actor or threads_for(cfg.cpus_per_actor))
        self.parts = parts
        self.options = {"keep_human_labels": cfg.keep_human_labels, "all_assistant_turns": cfg.all_assistant_turns}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return score_blocks(batch, self.parts, lambda block: annotate_block(
            block, self.predict, self.predict.attributes, **self.options))


def annotate_via_server(batch: dict[str, Any], config: dict[str, Any], token: str | None,
                        parts: str) -> dict[str, Any]:
    """Ray Data task body for ``via``: the same blocks, scored by a running serve-reward."""
    cfg = AnnotateConfig.model_validate(config)
    assert cfg.via is not None
    predict = HttpPredictor(cfg.via, token, timeout_s=cfg.timeout_s)
    return score_blocks(batch, parts, lambda block: annotate_block(
        block, predict, predict.attributes, keep_human_labels=cfg.keep_human_labels,
        all_assistant_turns=cfg.all_assistant_turns))


# 4. Stream the pending blocks through Ray Data, one block per batch; the driver only counts what is done.
def scoring_dataset(config: AnnotateConfig, pending: list[Block], parts: Path, token: str | None) -> Any:
    import ray.data

    items = [{"split": b.split, "block": b.index, "file": b.task.file, "start": b.task.start, "end": b.task.end,
              "first_line": b.task.first_line} for b in pending]
    ds: Any = ray.data.from_items(items, override_num_blocks=len(items))
    if config.via:
        # HTTP clients need no model: plain tasks on Ray's already-warm workers, no actor to start.
        return ds.map_batches(annotate_via_server, batch_size=1, batch_format="numpy", num_cpus=0.25,
                              fn_kwargs={"config": config.model_dump(mode="json"), "token": token,
                                         "parts": str(parts)}, concurrency=config.num_actors)
    return ds.map_batches(
        Annotator, fn_constructor_kwargs={"config": config.model_dump(mode="json"), "parts": str(parts)},
        batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=config.num_actors),
        num_cpus=config.cpus_per_actor, num_gpus=1 if cluster_gpus() > 0 else 0)


def run_blocks(config: AnnotateConfig, pending: list[Block], parts: Path, token: str | None) -> dict[str, int]:
    counts = {"rows": 0, "blocks": 0}
    progress = tqdm(total=sum(b.rows for b in pending), desc="annotate", unit="row", file=sys.stderr,
                    disable=not sys.stderr.isatty())
    for batch in scoring_dataset(config, pending, parts, token).iter_batches(batch_size=None, batch_format="numpy"):
        for path in batch["part"]:
            if not Path(path).is_file():  # written on another node, into a folder this one does not share
                raise SteerrayError(f"a scoring worker wrote {path}, but it is not visible here: on a cluster, "
                                    f"`out` ({config.out}) must be a folder every node shares")
        counts["blocks"] += len(batch["block"])
        counts["rows"] += int(batch["rows"].sum())
        progress.update(int(batch["rows"].sum()))
    progress.close()
    unfinished = sorted((b.split, b.index) for b in pending if not part_path(parts, b.split, b.index).exists())
    if unfinished:
        raise SteerrayError(f"annotation stream ended with {len(unfinished)} unfinished blocks "
                            f"(first: {unfinished[0]}); re-run to resume")
    return counts


# 5. Merge the parts in input order; rejects beside them; the manifest last, then drop the parts.
def merge(out: Path, parts: Path, plans: list[FilePlan]) -> dict[str, Any]:
    outputs: dict[str, Any] = {}
    rejects: list[dict[str, Any]] = []
    for plan in plans:
        stats = {"input_rows": plan.rows, "rows": 0, "rejects": 0, "turns_scored": 0, "truncated": 0}
        with atomic_path(out / plan.split) as tmp, open(tmp, "w", encoding="utf-8") as handle:
            for block in plan.blocks:
                header = read_part_header(part_path(parts, block.split, block.index))
                stats["rows"] += copy_part_rows(part_path(parts, block.split, block.index), handle)
                stats["rejects"] += len(header["rejects"])
                stats["turns_scored"] += header["turns"]
                stats["truncated"] += header["truncated"]
                rejects.extend(header["rejects"])
        if stats["rows"] + stats["rejects"] != plan.rows:
            raise SteerrayError(f"{plan.split}: {stats['rows']} rows + {stats['rejects']} rejects != "
                                f"{plan.rows} input rows; delete {parts} and re-run")
        outputs[plan.split] = stats
    write_jsonl(out / REJECTS, rejects)
    return outputs


def check(config: AnnotateConfig) -> None:
    locate_inputs(config.input, config.out)
    if not config.via and not (Path(config.model) / "config.json").is_file():
        raise RewardModelError(f"{config.model} is not a reward-model folder (no config.json); "
                               "pass the `model` folder that train-reward wrote, or --via a running serve-reward")


def inputs(config: AnnotateConfig) -> list[str]:
    return [str(f) for f in locate_inputs(config.input, config.out)] + [config.via or config.model]


# 6. The stage: plan blocks, score the ones not done yet, merge.
def run(config: AnnotateConfig) -> StageResult:
    out = Path(config.out)
    plans = [plan_blocks(file, config.block_size) for file in locate_inputs(config.input, config.out)]
    key = fingerprint(config, plans)
    started = time.perf_counter()
    token = token_from_env(config.token_env)
    # Fails early when the server is unreachable or the folder is not a reward model.
    attributes = HttpPredictor(config.via, token).attributes if config.via else reward_model_attributes(config.model, config.trust_remote_code)
    parts = open_parts(out, key)
    blocks = [b for plan in plans for b in plan.blocks]
    pending = [b for b in blocks if not part_path(parts, b.split, b.index).exists()]
    for block in [b for b in pending if b.rows == 0]:  # blank-only blocks need no Ray
        write_part(part_path(parts, block.split, block.index), block_result(block.split, block.index, []))
    pending = [b for b in pending if b.rows > 0]
    print(f"[steerray] annotate: {len(blocks) - len(pending)} of {len(blocks)} blocks already done, "
          f"{sum(b.rows for b in pending)} rows to score", file=sys.stderr, flush=True)
    counts = {"rows": 0, "blocks": 0}
    if pending:
        init_ray()
        counts = run_blocks(config, pending, parts, token)
    elapsed = time.perf_counter() - started
    outputs = merge(out, parts, plans)
    totals = {name: sum(s[name] for s in outputs.values())
              for name in ("input_rows", "rows", "rejects", "turns_scored", "truncated")}
    shutil.rmtree(parts, ignore_errors=True)
    print(f"[steerray] annotate: {totals['rows']} rows annotated ({totals['turns_scored']} turns, "
          f"{totals['truncated']} truncated from the left), {totals['rejects']} rejected -> {out}",
          file=sys.stderr, flush=True)
    run_stats = {"scored_rows": counts["rows"], "blocks_done_before": len(blocks) - len(pending),
                 "seconds": round(elapsed, 3), "rows_per_s": round(counts["rows"] / elapsed, 2) if counts["rows"] else None}
    return StageResult(
        {"out": str(out), **totals, "seconds": round(elapsed, 3)},
        {"fingerprint": key, "totals": totals, "outputs": outputs, "attributes": attributes, "run": run_stats,
         "model": config.via or str(Path(config.model).resolve()),
         "inputs": [{"file": p.path, "split": p.split, "sha256": p.sha256, "lines": p.lines, "rows": p.rows}
                    for p in plans]})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return job_main("annotate", argv)


if __name__ == "__main__":
    main()
