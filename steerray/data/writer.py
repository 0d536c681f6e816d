"""Write ``prepare``'s output folder from a stream of converted rows, counting everything.

Ray Data workers write the rows as shard files (:func:`write_shard_rows`), one shard per block or read
task; the driver appends the shards to the outputs in input order (:class:`PrepareWriter`), so no row
passes through the driver and its memory does not grow with the input. Files are
written under temporary names and moved into place only when the stream has ended, so an interrupted
run never leaves a half-written split; ``manifest.json`` (written by the job) comes last.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from steerray.errors import SteerrayError

SPLITS = ("train", "val")
KINDS = ("conversations", "regression", "preference")
KIND_OF_ROW = {"conversation": "conversations", "regression": "regression", "preference": "preference"}
PARQUET_KINDS = ("regression", "preference")  # what training stages read; columns are flat
REJECT_KINDS = ("reject", "skip")  # rows that go to rejects.jsonl, with their reason
# A finalized row: source, kind, split, reason category (rejects only), payload (JSON text), counts_input.
FinalRow = tuple[str, str, str, str, str, int]
SHARDS = ".shards"  # workers' block files under `out`, until the driver has appended them to the outputs


def assign_split(seed: int, source: str, group: str, val_fraction: float) -> str:
    """Seeded, stable split by group: the same group always lands in the same split."""
    if val_fraction <= 0:
        return "train"
    digest = hashlib.sha256(f"{seed}:{source}:{group}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def reason_category(reason: str) -> str:
    """Group reject reasons for the manifest: the text before details such as names and numbers."""
    head = re.split(r"[:(]", reason, maxsplit=1)[0].strip()
    return re.sub(r"\b[0-9a-f-]{8,}\b|\d+", "N", head)[:80] or "unknown"


def finalize_row(source: str, kind: str, split: str, group: str, payload: str, *, seed: int,
                 val_fraction: float) -> tuple[str, str]:
    """A converted row's ``(split, reason)``: its split by group hash where the source left it open; a
    reject or skip row goes to no split and gets its reason's category (what the manifest counts)."""
    if kind in REJECT_KINDS:
        return "", f"{kind}: {reason_category(json.loads(payload)['reason'])}"
    return split or assign_split(seed, source, group, val_fraction), ""


def finalize_rows(batch: dict[str, Any], *, seed: int, val_fraction: float) -> dict[str, Any]:
    """Ray Data ``map_batches`` body (runs in workers): fill in splits and reject-reason categories."""
    import numpy as np

    columns = zip(batch["source"], batch["kind"], batch["split"], batch["group"], batch["payload"], strict=True)
    done = [finalize_row(str(source), str(kind), str(split), str(group), payload, seed=seed,
                         val_fraction=val_fraction) for source, kind, split, group, payload in columns]
    splits, reasons = np.empty(len(done), dtype=object), np.empty(len(done), dtype=object)
    splits[:], reasons[:] = [split for split, _ in done], [reason for _, reason in done]
    return {"source": batch["source"], "kind": batch["kind"], "split": splits, "reason": reasons,
            "payload": batch["payload"], "counts_input": batch["counts_input"]}


def finalized(rows: Iterable[dict[str, Any]], *, seed: int, val_fraction: float) -> Iterator[FinalRow]:
    """Converted rows (as the source converters return them) as finalized rows, one by one."""
    for row in rows:
        split, reason = finalize_row(row["source"], row["kind"], row["split"], row["group"], row["payload"],
                                     seed=seed, val_fraction=val_fraction)
        yield row["source"], row["kind"], split, reason, row["payload"], row["counts_input"]


PARQUET_SCHEMAS = {
    "regression": (("text", "string"), ("label", "list<double>")),
    "preference": (("id", "string"), ("chosen", "string"), ("rejected", "string"), ("strength", "double"),
                   ("tie", "bool"), ("domain", "string"), ("language", "string")),  # the last two: HelpSteer3
}


def write_shard(batch: dict[str, Any], *, shard_dir: str) -> dict[str, Any]:
    """Ray Data ``map_batches`` body (runs in workers): write one block of finalized rows as shard files.

    Returns the block's shard description (what :meth:`PrepareWriter.add_shard` appends, as JSON text), so
    only a few hundred bytes per block travel back to the driver, however large the block is.
    """
    import numpy as np

    return {"shard": np.asarray([json.dumps(write_shard_rows(batch_rows(batch), Path(shard_dir)))], dtype=object)}


def batch_rows(batch: dict[str, Any]) -> Iterator[FinalRow]:
    """The finalized rows of a batch (columns as :func:`finalize_rows` returns them)."""
    return zip(batch["source"], batch["kind"], batch["split"], batch["reason"], batch["payload"],
               batch["counts_input"], strict=True)


def write_shard_rows(rows: Iterable[FinalRow], shard_dir: Path) -> dict[str, Any]:
    """Write finalized rows into one file per (source, kind, split), each line exactly as it goes into the
    outputs, and describe them.

    The description: ``rows_in`` per source (only sources with rows), ``parts`` as ``[source, kind, split,
    path, rows]`` and ``reasons`` (reason counts per source and reject kind, in first-seen order).
    """
    shard_dir.mkdir(parents=True, exist_ok=True)  # on a node that does not share `out`, the driver says so
    stem = uuid.uuid4().hex  # a retried task writes new files, never into a half-written earlier try
    handles: dict[tuple[str, str, str], Any] = {}
    parts: dict[tuple[str, str, str], list[Any]] = {}
    rows_in: Counter = Counter()
    reasons: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    try:
        for source, kind, split, reason, payload, counts_input in rows:
            key = (str(source), str(kind), str(split))
            if key not in handles:
                path = shard_dir / f"{stem}.{len(handles)}.jsonl"
                handles[key] = open(path, "w", encoding="utf-8")
                parts[key] = [*key, str(path), 0]
            if kind in REJECT_KINDS:
                handles[key].write(f'{{"kind": "{kind}", {payload[1:]}\n')
                reasons[key[0]][key[1]][str(reason)] += 1
            else:
                handles[key].write(payload + "\n")
            parts[key][4] += 1
            rows_in[key[0]] += int(counts_input)
    finally:
        for handle in handles.values():
            handle.close()
    return {"rows_in": dict(rows_in), "parts": list(parts.values()),
            "reasons": {source: {kind: dict(c) for kind, c in kinds.items()} for source, kinds in reasons.items()}}


def _append_file(target: BinaryIO, path: Path) -> None:
    """Append the file at ``path`` to ``target``."""
    with open(path, "rb") as source:
        if not _kernel_copy(source, target):
            shutil.copyfileobj(source, target, 1024**2)


def _kernel_copy(source: BinaryIO, target: BinaryIO) -> bool:
    """Copy all of ``source`` to ``target``'s position inside the kernel (the bytes never pass through
    Python); False, with nothing copied, where the system or filesystem cannot (macOS, some network mounts)."""
    if not hasattr(os, "copy_file_range"):
        return False
    size, offset = os.fstat(source.fileno()).st_size, 0
    while offset < size:
        try:
            sent = os.copy_file_range(source.fileno(), target.fileno(), size - offset, offset)
        except OSError:
            if offset:  # part of it is in the output already: only a refusal of the first call can fall back
                raise
            return False
        if not sent:
            raise OSError(errno.EIO, f"{source.name} ended after {offset} of its {size} bytes")
        offset += sent
    return True


class PrepareWriter:
    """Appends shards of finalized rows in order; ``finish()`` moves the files into place and returns counts.

    Workers write the rows to shard files under ``shard_dir``; the driver only appends those files to the
    outputs in input order and adds up their counts. Within a shard, each output gets the shard's rows in
    their order, rejects before skips, and ``repeat`` copies a shard's train rows in a row. The writer runs
    under the stage's run lock, so shards of an earlier, killed run of this folder are nobody's: removed.
    """

    def __init__(self, out_dir: str | Path, *, repeat: dict[str, int]):
        self.out = Path(out_dir)
        self.repeat = repeat
        self.tmp_suffix = f".tmp{os.getpid()}"
        self.handles: dict[str, BinaryIO] = {}
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.rejects_by_reason: dict[str, Counter] = defaultdict(Counter)
        for stale in self.out.glob(f"{SHARDS}.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.shard_dir = self.out / f"{SHARDS}{self.tmp_suffix}"

    def _handle(self, relative: str) -> BinaryIO:
        if relative not in self.handles:
            path = self.out / (relative + self.tmp_suffix)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handles[relative] = open(path, "wb", buffering=0)  # only whole files are appended to it
        return self.handles[relative]

    def write_batch(self, batch: dict[str, Any]) -> None:
        """Write one batch of finalized rows from this process (what workers do with :func:`write_shard`)."""
        self.add_shard(write_shard_rows(batch_rows(batch), self.shard_dir))

    def add_shard(self, shard: dict[str, Any]) -> None:
        """Append one shard's files to the outputs and count them, source by source, kind by kind."""
        parts = sorted(shard["parts"])  # by source, kind, split: each output gets the block's rows in order
        for source in sorted(shard["rows_in"]):
            counts = self.counts[source]
            counts["rows_in"] += shard["rows_in"][source]
            for _, kind, split, path, rows in (part for part in parts if part[0] == source):
                if not Path(path).is_file():  # written on another node, into a folder this one does not share
                    raise SteerrayError(f"a prepare worker wrote {path}, but it is not visible here: on a "
                                        f"cluster, `out` ({self.out}) must be a folder every node shares")
                if kind in REJECT_KINDS:
                    relative, copies = "rejects.jsonl", 1
                    counts["rejected" if kind == "reject" else "skipped"] += rows
                    self.rejects_by_reason[source].update(shard["reasons"][source][kind])
                else:
                    folder = KIND_OF_ROW[kind]
                    relative = f"{folder}/{split}.jsonl"
                    copies = self.repeat.get(source, 1) if split == "train" else 1
                    counts[f"{folder}_{split}"] += rows * copies
                handle = self._handle(relative)
                for _ in range(copies):  # the reference repeats each line; whole shards keep the order stable
                    _append_file(handle, Path(path))
                os.unlink(path)  # the shard folder holds only shards not appended yet

    def _write_parquet(self, folder: str, split: str) -> str:
        """Stream a finished jsonl split into parquet with pyarrow's C++ reader."""
        import pyarrow as pa
        import pyarrow.json as pj
        import pyarrow.parquet as pq

        types = {"string": pa.string(), "double": pa.float64(), "bool": pa.bool_(),
                 "list<double>": pa.list_(pa.float64())}
        schema = pa.schema([(name, types[kind]) for name, kind in PARQUET_SCHEMAS[folder]])
        source = self.out / f"{folder}/{split}.jsonl{self.tmp_suffix}"
        relative = f"{folder}/{split}.parquet"
        with pq.ParquetWriter(str(self.out / (relative + self.tmp_suffix)), schema) as writer:
            if source.stat().st_size:
                reader = pj.open_json(str(source), parse_options=pj.ParseOptions(
                    explicit_schema=schema, unexpected_field_behavior="ignore"))
                for block in reader:
                    writer.write_table(pa.Table.from_batches([block]).cast(schema))
        return relative

    def finish(self) -> dict[str, Any]:
        """Close everything, create empty splits for kinds that have data, move files into place."""
        written_kinds = {rel.split("/")[0] for rel in self.handles if "/" in rel}
        for folder in written_kinds:
            for split in SPLITS:
                self._handle(f"{folder}/{split}.jsonl")  # an empty val split is still a file
        self._handle("rejects.jsonl")
        for handle in self.handles.values():
            handle.close()
        shutil.rmtree(self.shard_dir, ignore_errors=True)  # left: files of task tries that Ray retried
        targets = list(self.handles)
        targets += [self._write_parquet(folder, split) for folder in sorted(written_kinds & set(PARQUET_KINDS))
                    for split in SPLITS]
        for folder in KINDS:  # stale outputs of an earlier run with other sources must not survive
            if folder not in written_kinds and (self.out / folder).exists():
                for stale in (self.out / folder).iterdir():
                    stale.unlink()
        for relative in targets:
            os.replace(self.out / (relative + self.tmp_suffix), self.out / relative)
        return {
            "outputs": sorted(targets),
            "per_source": {source: dict(counts) for source, counts in self.counts.items()},
            "rejects_by_reason": {source: dict(c) for source, c in self.rejects_by_reason.items()},
            "totals": self.totals(),
        }

    def totals(self) -> dict[str, int]:
        total: Counter = Counter()
        for counts in self.counts.values():
            total.update(counts)
        return dict(total)

    def abort(self) -> None:
        for handle in self.handles.values():
            handle.close()
        shutil.rmtree(self.shard_dir, ignore_errors=True)
        for path in self.out.rglob(f"*{self.tmp_suffix}"):
            path.unlink()
