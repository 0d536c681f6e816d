"""Write ``prepare``'s output folder from a stream of converted rows, counting everything.

Files are written under temporary names and moved into place only when the stream has ended, so an
interrupted run never leaves a half-written split; ``manifest.json`` (written by the job) comes last.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

SPLITS = ("train", "val")
KINDS = ("conversations", "regression", "preference")
KIND_OF_ROW = {"conversation": "conversations", "regression": "regression", "preference": "preference"}
PARQUET_KINDS = ("regression", "preference")  # what training stages read; columns are flat


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


class PrepareWriter:
    """Accepts batches of converted rows; ``finish()`` moves the files into place and returns counts."""

    def __init__(self, out_dir: str | Path, *, seed: int, val_fraction: float, repeat: dict[str, int]):
        self.out = Path(out_dir)
        self.seed, self.val_fraction, self.repeat = seed, val_fraction, repeat
        self.tmp_suffix = f".tmp{os.getpid()}"
        self.handles: dict[str, Any] = {}
        self.parquet_rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.parquet_writers: dict[str, Any] = {}
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.rejects_by_reason: dict[str, Counter] = defaultdict(Counter)

    def _handle(self, relative: str) -> Any:
        if relative not in self.handles:
            path = self.out / (relative + self.tmp_suffix)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handles[relative] = open(path, "w", encoding="utf-8")
        return self.handles[relative]

    def write_batch(self, batch: dict[str, Any]) -> None:
        for i in range(len(batch["kind"])):
            self.write_row({key: batch[key][i] for key in batch})

    def write_row(self, row: dict[str, Any]) -> None:
        source, kind = str(row["source"]), str(row["kind"])
        counts = self.counts[source]
        counts["rows_in"] += int(row.get("counts_input", 0))
        if kind in ("reject", "skip"):
            payload = json.loads(row["payload"])
            self._handle("rejects.jsonl").write(json.dumps({"kind": kind, **payload}, ensure_ascii=False) + "\n")
            counts["rejected" if kind == "reject" else "skipped"] += 1
            self.rejects_by_reason[source][f"{kind}: {reason_category(payload['reason'])}"] += 1
            return
        folder = KIND_OF_ROW[kind]
        split = str(row["split"]) or assign_split(self.seed, source, str(row["group"]), self.val_fraction)
        copies = self.repeat.get(source, 1) if split == "train" else 1
        line = row["payload"] + "\n"
        handle = self._handle(f"{folder}/{split}.jsonl")
        for _ in range(copies):
            handle.write(line)
        counts[f"{folder}_{split}"] += copies
        if folder in PARQUET_KINDS:
            record = json.loads(row["payload"])
            self.parquet_rows[f"{folder}/{split}"].extend([record] * copies)
            if len(self.parquet_rows[f"{folder}/{split}"]) >= 8192:
                self._flush_parquet(f"{folder}/{split}")

    def _flush_parquet(self, key: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = self.parquet_rows.pop(key, [])
        if not rows:
            return
        table = pa.Table.from_pylist(rows)
        if key not in self.parquet_writers:
            path = self.out / f"{key}.parquet{self.tmp_suffix}"
            self.parquet_writers[key] = pq.ParquetWriter(str(path), table.schema)
        self.parquet_writers[key].write_table(table.cast(self.parquet_writers[key].schema))

    def finish(self) -> dict[str, Any]:
        """Close everything, create empty splits for kinds that have data, move files into place."""
        for key in list(self.parquet_rows):
            self._flush_parquet(key)
        written_kinds = {rel.split("/")[0] for rel in self.handles if "/" in rel}
        for folder in written_kinds:
            for split in SPLITS:
                self._handle(f"{folder}/{split}.jsonl")  # an empty val split is still a file
        self._handle("rejects.jsonl")
        for handle in self.handles.values():
            handle.close()
        for writer in self.parquet_writers.values():
            writer.close()
        targets = list(self.handles) + [f"{key}.parquet" for key in self.parquet_writers]
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
        for writer in self.parquet_writers.values():
            writer.close()
        for path in self.out.rglob(f"*{self.tmp_suffix}"):
            path.unlink()
