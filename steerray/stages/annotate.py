"""Stage `annotate`: label every scored assistant turn of a conversation dataset with the reward model.

Launch it through the CLI (embedded Ray by default, --address to submit to a cluster):

    steerray annotate --model runs/exp/reward/model --input runs/exp/prepare --out runs/exp/annotate \
        [--keep-human-labels] [--via http://127.0.0.1:8000]

or as a Ray job:  ray job submit -- python -m steerray.stages.annotate --config CONFIG.yaml

Input: a conversation jsonl file, or a folder of them (a prepare output folder: its `conversations/`).
Outputs under `out`: one annotated file per input file, same name and row order (train.jsonl,
val.jsonl, ...), rejects.jsonl (file, line and reason of every malformed row), manifest.json last.

Ray Data reads each input file in blocks of `block_size` lines; an actor pool scores them in batched
forward passes (or, with `via`, Ray Data tasks post them to a running `serve-reward`); each finished
block is written at once as an atomic part file under `out/.parts/`. Killed at any moment and re-run with the same
command, the job skips the finished blocks and redoes the rest, so the merged output holds exactly one
row per input row, in input order.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from steerray.annotation import (
    Block,
    FilePlan,
    HttpPredictor,
    annotate_rows,
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
from steerray.data.readers import read_task_rows
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


def part_path(parts: Path, block: Block) -> Path:
    return parts / block.split / f"{block.index:06d}.part.jsonl"


# 3. The scoring actor: loads the model once, then annotates batches in batched forward passes.
class Annotator:
    def __init__(self, config: dict[str, Any]) -> None:
        cfg = AnnotateConfig.model_validate(config)
        self.predict = load_predictor(cfg.model, max_length=cfg.max_length, batch_size=cfg.batch_size,
                                      precision=cfg.precision, trust_remote_code=cfg.trust_remote_code,
                                      threads=cfg.threads_per_actor or threads_for(cfg.cpus_per_actor))
        self.attributes = self.predict.attributes
        self.options = {"keep_human_labels": cfg.keep_human_labels, "all_assistant_turns": cfg.all_assistant_turns}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return annotate_rows(batch, self.predict, self.attributes, **self.options)


def annotate_via_server(batch: dict[str, Any], config: dict[str, Any], token: str | None) -> dict[str, Any]:
    """Ray Data task body for ``via``: the same batch transform, scored by a running serve-reward."""
    cfg = AnnotateConfig.model_validate(config)
    assert cfg.via is not None
    predict = HttpPredictor(cfg.via, token, timeout_s=cfg.timeout_s)
    return annotate_rows(batch, predict, predict.attributes, keep_human_labels=cfg.keep_human_labels,
                         all_assistant_turns=cfg.all_assistant_turns)


def read_block(block: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray Data ``flat_map``: one block descriptor in, its numbered raw rows out (prepare's reader)."""
    return [{**row, "split": block["split"], "block": block["block"]} for row in read_task_rows(block)]


# 4. Stream the pending blocks through Ray Data; write each block's part once all its rows are back.
def run_blocks(config: AnnotateConfig, pending: list[Block], parts: Path, token: str | None) -> dict[str, int]:
    import ray.data

    expected = {(b.split, b.index): b for b in pending}
    gathered: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    use_gpu = cluster_gpus() > 0
    ds: Any = ray.data.from_items([{"split": b.split, "block": b.index, "file": b.task.file, "start": b.task.start,
                               "end": b.task.end, "first_line": b.task.first_line} for b in pending])
    ds = ds.flat_map(read_block)
    if config.via:
        # HTTP clients need no model: plain tasks on Ray's already-warm workers, no actor to start.
        ds = ds.map_batches(annotate_via_server, fn_kwargs={"config": config.model_dump(mode="json"), "token": token},
                            batch_size=config.batch_size * 4, batch_format="numpy", num_cpus=0.25,
                            concurrency=config.num_actors)
    else:
        ds = ds.map_batches(
            Annotator, fn_constructor_kwargs={"config": config.model_dump(mode="json")},
            batch_size=config.batch_size * 4, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=config.num_actors),
            num_cpus=config.cpus_per_actor, num_gpus=1 if use_gpu else 0)
    counts = {"rows": 0, "blocks": 0}
    progress = tqdm(total=sum(b.rows for b in pending), desc="annotate", unit="row", file=sys.stderr,
                    disable=not sys.stderr.isatty())
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["line"])):
            key = (str(batch["split"][i]), int(batch["block"][i]))
            gathered[key].append({name: batch[name][i] for name in batch})
            if len(gathered[key]) == expected[key].rows:
                write_part(part_path(parts, expected[key]), block_result(key[0], key[1], gathered.pop(key)))
                counts["blocks"] += 1
        counts["rows"] += len(batch["line"])
        progress.update(len(batch["line"]))
    progress.close()
    unfinished = sorted(k for k, block in expected.items() if not part_path(parts, block).exists())
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
                header = read_part_header(part_path(parts, block))
                stats["rows"] += copy_part_rows(part_path(parts, block), handle)
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
    pending = [b for b in blocks if not part_path(parts, b).exists()]
    for block in [b for b in pending if b.rows == 0]:  # blank-only blocks need no Ray
        write_part(part_path(parts, block), block_result(block.split, block.index, []))
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
