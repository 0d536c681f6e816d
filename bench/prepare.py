"""Benchmark `prepare`: rows/s and peak memory on a large HelpSteer2-schema file, against a plain loop.

    python bench/prepare.py [--rows 1000000] [--small 100000] [--workdir /tmp/steerray-bench]

Makes a synthetic HelpSteer2-schema jsonl of --rows rows (and one of --small rows), runs the prepare
stage on each (embedded Ray, this machine's CPUs), and a single-process baseline (read, json.loads,
the same converters, write) on the large one. Prints rows/s, peak RSS of the driver and of the whole
process tree (driver + Ray workers), and the ratios: steerray vs the plain loop, and peak memory (driver,
tree) at --rows vs --small (streaming means it should stay flat while the input grows 10x).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steerray.config import PrepareConfig  # noqa: E402
from steerray.data.sources import convert_raw_row  # noqa: E402
from steerray.runtime import init_ray  # noqa: E402
from steerray.stages import execute  # noqa: E402

WORDS = "the model answers questions about data systems clearly and helps users learn quickly".split()


def make_file(path: Path, rows: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as handle:
        for i in range(rows):
            prompt = f"question {i}: " + " ".join(rng.choices(WORDS, k=12))
            response = " ".join(rng.choices(WORDS, k=rng.randint(20, 80)))
            scores = {k: rng.randint(0, 4) for k in ("helpfulness", "correctness", "coherence", "complexity", "verbosity")}
            handle.write(json.dumps({"prompt": prompt, "response": response, **scores}) + "\n")


class PeakMemory:
    """Samples RSS of this process and of the whole process tree under it (Ray workers included)."""

    def __init__(self) -> None:
        self.driver = self.tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                driver = me.memory_info().rss
                tree = driver + sum(c.memory_info().rss for c in me.children(recursive=True))
            except psutil.Error:
                continue
            self.driver, self.tree = max(self.driver, driver), max(self.tree, tree)
            time.sleep(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_prepare(path: Path, out: Path) -> tuple[float, PeakMemory]:
    shutil.rmtree(out, ignore_errors=True)  # a finished folder would be skipped, not measured
    config = PrepareConfig(sources=[f"helpsteer2={path}"], out=str(out), val_fraction=0.05)
    with PeakMemory() as memory:
        started = time.perf_counter()
        execute("prepare", config)
        seconds = time.perf_counter() - started
    return seconds, memory


def run_plain_loop(path: Path, out: Path) -> tuple[float, PeakMemory]:
    out.mkdir(parents=True, exist_ok=True)
    with PeakMemory() as memory, open(out / "regression.jsonl", "w") as reg, open(out / "conv.jsonl", "w") as conv:
        started = time.perf_counter()
        with open(path) as handle:
            for line_no, line in enumerate(handle, 1):
                raw = {"file": str(path), "line": line_no, "raw": line.rstrip("\n"), "error": ""}
                for row in convert_raw_row("helpsteer2", raw, "train"):
                    (reg if row["kind"] == "regression" else conv).write(row["payload"] + "\n")
        seconds = time.perf_counter() - started
    return seconds, memory


def plain_in_subprocess(path: Path, out: Path) -> tuple[float, float]:
    """The baseline in a fresh process, so its peak memory is its own."""
    import subprocess

    done = subprocess.run([sys.executable, __file__, "--plain-only", str(path), "--workdir", str(out)],
                          check=True, capture_output=True, text=True)
    seconds, peak = done.stdout.split()
    return float(seconds), float(peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--workdir", default="/tmp/steerray-bench-prepare")
    parser.add_argument("--object-store-mb", type=int, default=1024, help="Ray's object store cap (streaming bound)")
    parser.add_argument("--plain-only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.plain_only:
        seconds, memory = run_plain_loop(Path(args.plain_only), work)
        print(seconds, memory.driver)
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    init_ray(object_store_mb=args.object_store_mb)
    mb = 1024**2
    results = {}
    for rows in (args.small, args.rows):
        path = work / f"helpsteer2_{rows}.jsonl"
        if not path.exists():
            print(f"making {path} ...", file=sys.stderr)
            make_file(path, rows)
        seconds, memory = run_prepare(path, work / f"out_{rows}")
        results[rows] = (seconds, memory)
        print(f"steerray prepare  {rows:>9,d} rows: {rows / seconds:>9,.0f} rows/s  {seconds:7.1f} s  "
              f"peak RSS driver {memory.driver / mb:6.0f} MB, process tree {memory.tree / mb:6.0f} MB")
    big = work / f"helpsteer2_{args.rows}.jsonl"
    seconds, peak = plain_in_subprocess(big, work / "plain")
    print(f"plain python loop {args.rows:>9,d} rows: {args.rows / seconds:>9,.0f} rows/s  {seconds:7.1f} s  "
          f"peak RSS {peak / mb:6.0f} MB (one process, no Ray)")
    steer_seconds, steer_memory = results[args.rows]
    print(f"ratio rows/s steerray / plain loop: {seconds / steer_seconds:.2f}x")
    small_memory = results[args.small][1]
    for name, peak, small_peak in (("driver", steer_memory.driver, small_memory.driver),  # issue 14: <= 1.2x
                                   ("tree", steer_memory.tree, small_memory.tree)):
        print(f"ratio peak {name} RSS {args.rows:,} / {args.small:,} rows: "
              f"{peak / small_peak:.2f}x for {args.rows / args.small:.0f}x the input")


if __name__ == "__main__":
    main()
