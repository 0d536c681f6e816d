"""Stage `prepare`: read SteerLM sources with Ray Data and write the data contract every later stage reads.

Launch it through the CLI (embedded Ray by default, --address to submit to a cluster):

    steerray prepare --source helpsteer2 --source oasst1=PATH --out runs/exp/prepare [--val-fraction 0.05]
        [--seed 10] [--repeat helpsteer2=4]

or as a Ray job:  ray job submit -- python -m steerray.stages.prepare --config CONFIG.yaml

Outputs under `out`: conversations/{train,val}.jsonl (NeMo-Aligner conversation schema),
regression/{train,val}.jsonl|.parquet ({"text", "label": 9 floats, -100 = missing}),
preference/{train,val}.jsonl|.parquet (explicit pairs), rejects.jsonl, manifest.json (written last).

Ray workers convert the rows and write them as shard files under `out` (so on a cluster `out` must be
storage every node sees, as for every stage); the driver only appends the shards to the outputs in input
order, so its memory stays flat however large the input is. A plain source (one row per input line) is
read, converted and written in one worker step per read task (a 32 MiB piece of a jsonl file, or one
gzip or parquet file): that task is its shard. OASST trees, the demo and --max-rows-per-source go row by
row through Ray Data, and a shard is one Ray Data block. A shard's train rows are what --repeat copies
in a row, and its rejects come before its skips in rejects.jsonl.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from steerray.config import PrepareConfig
from steerray.data import readers, sources
from steerray.data.demo import demo_conversation
from steerray.data.writer import PrepareWriter, finalize_rows, finalized, write_shard, write_shard_rows
from steerray.runtime import init_ray
from steerray.stages import StageResult, job_main


# 1. Find every source's files before anything starts, so a bad path or an offline hub fails at once.
def locate(spec: sources.SourceSpec) -> list[dict[str, Any]]:
    """Read tasks for one source, each with the split its file name implies (hub and folder splits)."""
    if spec.name == "demo":
        return []
    default_hub, patterns = sources.SOURCES[spec.name]
    location = spec.location or default_hub
    local = Path(location).expanduser()
    looks_local = local.exists() or location.endswith(readers.DATA_SUFFIXES) or location.startswith(
        (".", "/", "~")) or location.count("/") != 1
    if looks_local and not location.startswith(readers.HUB_PREFIX):
        files = readers.list_local_files(location)
        split_from_names = local.is_dir()
    else:
        # A hub dataset: its train/validation files decide the split.
        files = readers.list_hub_files(location, patterns if location == default_hub else ())
        split_from_names = True
    tasks = []
    for task in readers.plan_reads(files):
        split = split_of_file(task.file) if split_from_names else ""
        tasks.append({**dataclasses.asdict(task), "split": split})
    return tasks


def split_of_file(file: str) -> str:
    name = Path(file).name.lower()
    if any(tag in name for tag in ("validation", "valid", "val.", "val-", "_val", "test")):
        return "val"
    return "train" if "train" in name else ""


def specs_of(config: PrepareConfig) -> list[sources.SourceSpec]:
    return [sources.SourceSpec.parse(text) for text in config.sources]


def check(config: PrepareConfig) -> None:
    """Source names, duplicates and --repeat names, before Ray starts."""
    names = [spec.name for spec in specs_of(config)]
    duplicates = {name for name in names if names.count(name) > 1}
    if duplicates:
        raise sources.SourceError(f"source(s) given twice: {', '.join(sorted(duplicates))}")
    if config.row_filter is not None:
        takers = [name for name in names if name in sources.FILTER_COLUMNS]
        if not takers:
            raise sources.SourceError(f"--filter {config.row_filter!r} applies to none of the sources given; "
                                      f"sources that take it: {', '.join(sources.FILTER_COLUMNS)}")
        for name in takers:
            sources.source_filter(name, config.row_filter)  # its columns exist for that source
    unknown_repeats = set(config.repeat) - set(names)
    if unknown_repeats:
        raise sources.SourceError(f"--repeat names source(s) not given with --source: {', '.join(sorted(unknown_repeats))}")


def inputs(config: PrepareConfig) -> list[str]:
    """Local source files (content-fingerprinted by the runner); hub sources and the demo count by name."""
    found = []
    for spec in specs_of(config):
        tasks = locate(spec)
        found += sorted({t["file"] for t in tasks}) if tasks else [f"{spec.name}:{spec.location or 'default'}"]
    return found


# 2. One Ray Data pipeline per source. Workers convert the rows and write them as shard files; the driver
# gets one small description per shard (see steerray.data.writer).
ROW_SOURCES = ("demo", "oasst1")  # no input lines (demo), or rows regrouped across lines (OASST trees)


def shard_dataset(spec: sources.SourceSpec, tasks: list[dict[str, Any]], config: PrepareConfig,
                  shard_dir: Path) -> Any:
    """Descriptions of the shards the source's rows were written to, in input order (``{"shard"}`` rows)."""
    import ray.data

    split_args: dict[str, Any] = {"seed": config.seed, "val_fraction": config.val_fraction}
    if spec.name in ROW_SOURCES or config.max_rows_per_source is not None:
        return source_dataset(spec, tasks, config).map_batches(
            finalize_rows, fn_kwargs=split_args, batch_format="numpy", batch_size=4096).map_batches(
            write_shard, fn_kwargs={"shard_dir": str(shard_dir)}, batch_format="numpy", batch_size=None)
    # Each read task is read, converted and written by one worker in one step: no row becomes an Arrow row
    # (the row path converts each one three times), which is what let the stage outrun a plain loop.
    return ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks))).map(functools.partial(
        shard_read_task, name=spec.name, row_filter=_row_filter(spec.name, config), shard_dir=str(shard_dir),
        **split_args))


def shard_read_task(task: dict[str, Any], *, name: str, row_filter: sources.RowFilter | None, shard_dir: str,
                     seed: int, val_fraction: float) -> dict[str, Any]:
    """Ray Data ``map`` body: one read task of a plain source in, the description of its shard out."""
    converted = (row for raw in readers.read_task_rows(task)
                 for row in sources.convert_raw_row(name, raw, task["split"], row_filter))
    shard = write_shard_rows(finalized(converted, seed=seed, val_fraction=val_fraction), Path(shard_dir))
    return {"shard": json.dumps(shard)}


def _row_filter(name: str, config: PrepareConfig) -> sources.RowFilter | None:
    return sources.source_filter(name, config.row_filter) if name in sources.FILTER_COLUMNS else None


def source_dataset(spec: sources.SourceSpec, tasks: list[dict[str, Any]], config: PrepareConfig) -> Any:
    """The source's converted rows as a Ray Data dataset, row by row (OASST trees, demo, --max-rows-per-source)."""
    import ray.data

    name = spec.name
    if name == "demo":
        count = config.demo_conversations if config.max_rows_per_source is None else min(
            config.demo_conversations, config.max_rows_per_source)
        seed = config.seed
        return ray.data.range(count).flat_map(lambda row: _demo_rows(int(row["id"]), seed))
    raw = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks))).flat_map(_read_with_split)
    if config.max_rows_per_source is not None:
        raw = raw.limit(config.max_rows_per_source)
    row_filter = _row_filter(name, config)
    converted = raw.flat_map(lambda row: sources.convert_raw_row(name, row, row["split"], row_filter))
    if name != "oasst1":
        return converted
    # Flat OASST messages are keyed by tree in the first pass; a group-by gathers each tree.
    messages = converted.filter(expr="kind == 'oasst_message'")
    others = converted.filter(expr="kind != 'oasst_message'")
    partitions = max(1, min(64, sum(t["end"] - t["start"] if t["end"] > 0 else 32 * 1024**2 for t in tasks)
                               // (8 * 1024**2)))  # a few MB of messages per shuffle partition
    trees = messages.groupby("group", num_partitions=partitions).map_groups(_expand_tree_group, batch_format="pandas")
    return others.union(trees)


def _read_with_split(task: dict[str, Any]) -> Any:
    for row in readers.read_task_rows(task):
        yield {**row, "split": task["split"]}


def _demo_rows(index: int, seed: int) -> list[dict[str, Any]]:
    rows = sources.convert_conversation("demo", demo_conversation(index, seed), file="demo", line=index, split="")
    rows[0]["counts_input"] = 1
    return rows


def _expand_tree_group(group: Any) -> Any:
    import json

    import pandas as pd

    messages = [json.loads(p) for p in group["payload"]]
    tree_id, split = str(group["group"].iloc[0]), str(group["split"].iloc[0])
    rows = sources.expand_oasst_messages("oasst1", messages, tree_id, split)
    first_input = group["counts_input"].sum()  # the messages were counted as inputs in the first pass
    frame = pd.DataFrame(rows, columns=["source", "kind", "split", "group", "file", "line", "payload", "counts_input"])
    if len(frame):
        frame.loc[0, "counts_input"] = first_input
    return frame


# 3. The stage.
def run(config: PrepareConfig) -> StageResult:
    specs = specs_of(config)
    tasks_by_source = {spec.name: locate(spec) for spec in specs}
    out = Path(config.out)
    init_ray()
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # stable output order
    started = time.time()
    writer = PrepareWriter(out, repeat=config.repeat)
    try:
        for spec in specs:
            print(f"[prepare] reading {spec.name} {spec.location or '(default)'}", file=sys.stderr)
            dataset = shard_dataset(spec, tasks_by_source[spec.name], config, writer.shard_dir)
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                for shard in batch["shard"]:
                    writer.add_shard(json.loads(shard))
        result = writer.finish()
    except BaseException:
        writer.abort()
        raise
    seconds = time.time() - started
    totals = result["totals"]
    summary = {"out": str(out), "seconds": round(seconds, 2), "rows_in": totals.get("rows_in", 0),
               "rows_per_second": round(totals.get("rows_in", 0) / max(seconds, 1e-9), 1), **totals}
    _report(out, result)
    files = {name: sorted({t["file"] for t in tasks}) for name, tasks in tasks_by_source.items()}
    return StageResult(summary, {"inputs": files, **result})


def _report(out: Path, result: dict[str, Any]) -> None:
    for source, counts in result["per_source"].items():
        parts = ", ".join(f"{key}={value}" for key, value in sorted(counts.items()))
        print(f"[prepare] {source}: {parts}", file=sys.stderr)
        for reason, count in sorted(result["rejects_by_reason"].get(source, {}).items()):
            print(f"[prepare]   {count:6d} x {reason}", file=sys.stderr)
    print(f"[prepare] wrote {out}/ ({', '.join(result['outputs'])}); rejects with reasons: {out}/rejects.jsonl",
          file=sys.stderr)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return job_main("prepare", argv)


if __name__ == "__main__":
    main()
