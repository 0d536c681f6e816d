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


def finalize_rows(batch: dict[str, Any], *, seed: int, val_fraction: float) -> dict[str, Any]:
    """Ray Data ``map_batches`` body (runs in workers): fill in splits and reject-reason categories."""
    import numpy as np

    splits = batch["split"].astype(object)
    for i in np.flatnonzero(splits == ""):
        splits[i] = assign_split(seed, str(batch["source"][i]), str(batch["group"][i]), val_fraction)
    reasons = np.full(len(splits), "", dtype=object)
    for i in np.flatnonzero(np.isin(batch["kind"], ("reject", "skip"))):
        payload = json.loads(batch["payload"][i])
        reasons[i] = f"{batch['kind'][i]}: {reason_category(payload['reason'])}"
        splits[i] = ""
    return {"source": batch["source"], "kind": batch["kind"], "split": splits, "reason": reasons,
            "payload": batch["payload"], "counts_input": batch["counts_input"]}


PARQUET_SCHEMAS = {
    "regression": (("text", "string"), ("label", "list<double>")),
    "preference": (("id", "string"), ("chosen", "string"), ("rejected", "string"), ("strength", "double"),
                   ("tie", "bool"), ("domain", "string"), ("language", "string")),  # the last two: HelpSteer3
}


class PrepareWriter:
    """Accepts batches of finalized rows; ``finish()`` moves the files into place and returns counts.

    Runs in the driver, so it only groups and writes: splits and reasons were computed by workers.
    """

    def __init__(self, out_dir: str | Path, *, repeat: dict[str, int]):
        self.out = Path(out_dir)
        self.repeat = repeat
        self.tmp_suffix = f".tmp{os.getpid()}"
        self.handles: dict[str, Any] = {}
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.rejects_by_reason: dict[str, Counter] = defaultdict(Counter)

    def _handle(self, relative: str) -> Any:
        if relative not in self.handles:
            path = self.out / (relative + self.tmp_suffix)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handles[relative] = open(path, "w", encoding="utf-8")
        return self.handles[relative]

    def write_batch(self, batch: dict[str, Any]) -> None:
        import numpy as np

        sources, kinds, splits = batch["source"], batch["kind"], batch["split"]
        for source in np.unique(sources):
            of_source = sources == source
            counts = self.counts[str(source)]
            counts["rows_in"] += int(batch["counts_input"][of_source].sum())
            for kind in np.unique(kinds[of_source]):
                rows = of_source & (kinds == kind)
                if kind in ("reject", "skip"):
                    lines = [f'{{"kind": "{kind}", {p[1:]}' for p in batch["payload"][rows]]
                    self._handle("rejects.jsonl").write("\n".join(lines) + "\n")
                    counts["rejected" if kind == "reject" else "skipped"] += len(lines)
                    self.rejects_by_reason[str(source)].update(batch["reason"][rows].tolist())
                    continue
                folder = KIND_OF_ROW[str(kind)]
                for split in np.unique(splits[rows]):
                    chosen = rows & (splits == split)
                    copies = self.repeat.get(str(source), 1) if split == "train" else 1
                    text = "\n".join(batch["payload"][chosen]) + "\n"
                    handle = self._handle(f"{folder}/{split}.jsonl")
                    for _ in range(copies):  # the reference repeats each line; whole batches keep order stable
                        handle.write(text)
                    counts[f"{folder}_{split}"] += int(chosen.sum()) * copies

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
        for path in self.out.rglob(f"*{self.tmp_suffix}"):
            path.unlink()
