"""`evaluate-reward` scoring speed: rows/s and seconds per 1,000 rows, against the raw forward pass.

    .venv/bin/python bench/evaluate_reward.py                         # a tiny random reward model (~1 min)
    .venv/bin/python bench/evaluate_reward.py --model runs/demo/reward/model --rows 200
    .venv/bin/python bench/evaluate_reward.py --model smollm2 --rows 100 --max-length 256

Rows come from the real oasst1 sample (../shared/data): every prompter message with at least two ranked,
non-deleted replies gives one RewardBench row (prompt = the conversation up to that message as {role,
content} turns, chosen = the rank-0 reply, rejected = the lowest-ranked one, subset "oasst1-ranks", an
unknown subset scored under "other"); with --all-formats also a best-of-N row (every reply, judgment =
rank 0) and a pairs row. The model is built in this process with a seeded random head (tiny-llama by
default, `smollm2` for the demo's backbone) unless a reward-model folder is given: speed does not depend on
the head's values. Three ways, one process, best of --repeats:

1. ceiling:   the predictor `evaluate-reward` uses (annotate's), called directly on the distinct texts
2. in-process: the stage as users run it (`execute`: read, validate, score, report, manifest) scoring
              in its own process (what it does up to in_process_max_texts texts)
3. ray-pool:  the same stage through a Ray Data actor pool (in_process_max_texts=0; actor start and model
              load included: what a cluster run pays once)

Printed per way: seconds, rows/s, seconds per 1,000 rows, and its time as a multiple of the ceiling's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from steerray.annotation import load_predictor  # noqa: E402
from steerray.artifacts import read_manifest  # noqa: E402
from steerray.config import EvaluateRewardConfig  # noqa: E402
from steerray.eval import reward_bench as rb  # noqa: E402
from steerray.models.loading import SMOLLM2_ALIAS, TINY_ALIAS, load_tokenizer  # noqa: E402
from steerray.models.reward import build_reward_model  # noqa: E402
from steerray.runtime import init_ray  # noqa: E402
from steerray.stages import execute  # noqa: E402

OASST_SAMPLE = REPO.parent / "shared" / "data" / "oasst1" / "oasst1_en_validation.jsonl"
BACKBONES = {"tiny": TINY_ALIAS, "smollm2": SMOLLM2_ALIAS}


def ranked_prompts() -> list[tuple[list[dict], list[str]]]:
    """(conversation up to a prompter message as {role, content} turns, its replies best first)."""
    messages = {}
    replies: dict[str, list[dict]] = defaultdict(list)
    for line in OASST_SAMPLE.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("deleted") or not record["text"].strip():
            continue
        messages[record["message_id"]] = record
        if record["role"] == "assistant" and record.get("rank") is not None and record.get("parent_id"):
            replies[record["parent_id"]].append(record)
    out = []
    for parent_id, answers in replies.items():
        turns, node = [], messages.get(parent_id)
        while node is not None:
            turns.append(
                {"role": "user" if node["role"] == "prompter" else "assistant", "content": node["text"]}
            )
            node = messages.get(node.get("parent_id"))
        if len(answers) >= 2 and turns and turns[-1]["role"] == "user" and node is None:
            ranked = sorted(answers, key=lambda r: r["rank"])
            out.append((turns[::-1], [r["text"] for r in ranked]))
    return out


def write_benches(work: Path, limit: int) -> dict[str, Path]:
    rewardbench, bon, pairs = [], [], []
    for i, (turns, answers) in enumerate(ranked_prompts()[:limit]):
        row = {"id": f"oasst-{i}", "prompt": turns, "chosen": answers[0], "rejected": answers[-1]}
        rewardbench.append({**row, "subset": "oasst1-ranks"})
        pairs.append({**row, "strength": 1})
        bon.append(
            {
                "id": f"oasst-{i}",
                "instruction": turns,
                "responses": [{"text": a, "judgment": rank == 0} for rank, a in enumerate(answers)],
            }
        )
    files = {}
    for name, rows in (("rewardbench", rewardbench), ("bon", bon), ("pairs", pairs)):
        files[name] = work / f"{name}.jsonl"
        files[name].write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
    return files


def reward_folder(model: str, out: Path) -> str:
    """A folder as given, or a backbone with a seeded random 9-attribute head saved under ``out``."""
    if model not in BACKBONES:
        return model
    torch.manual_seed(1234)
    build_reward_model(BACKBONES[model]).save_pretrained(out, safe_serialization=True)
    load_tokenizer(BACKBONES[model]).save_pretrained(out)
    return str(out)


def ceiling(model: str, specs: list[str], args: argparse.Namespace) -> tuple[float, int, int]:
    """Seconds of the bare predictor over the distinct texts (model loaded beforehand), rows, texts."""
    benches = [rb.read_bench(spec) for spec in rb.parse_bench_specs(specs)]
    texts = rb.unique_texts(benches)
    predict = load_predictor(
        model,
        max_length=args.max_length,
        batch_size=args.batch_size,
        precision=args.precision,
        threads=args.threads,
    )
    predict(texts[: args.batch_size])  # warm-up: torch's first passes allocate and pick kernels
    started = time.perf_counter()
    predict(texts)
    return time.perf_counter() - started, sum(len(b.rows) for b in benches), len(texts)


def stage_run(
    work: Path, model: str, specs: list[str], args: argparse.Namespace, pool: bool, tag: str
) -> dict:
    """The stage through ``execute``; its manifest's run section (scoring seconds, rows, where)."""
    out = work / f"out-{tag.replace(' ', '-')}"
    config = EvaluateRewardConfig(
        model=model,
        bench=specs,
        out=str(out),
        precision=args.precision,
        batch_size=args.batch_size,
        max_length=args.max_length,
        threads_per_actor=args.threads,
        in_process_max_texts=0 if pool else 10**9,
    )
    execute("evaluate_reward", config)
    return read_manifest(out, "evaluate_reward")["run"]


def report(way: str, seconds: float, rows: int, texts: int, base: float, note: str = "") -> None:
    print(
        f"{way:<11} {seconds:7.2f} s  {rows / seconds:8.1f} rows/s  {1000 * seconds / rows:7.2f} s/1,000 rows  "
        f"{texts / seconds:8.1f} texts/s  x{seconds / base:5.2f} of ceiling  {note}",
        flush=True,
    )


def measure(work: Path, model: str, specs: list[str], args: argparse.Namespace, label: str) -> None:
    best = {"ceiling": float("inf"), "in-process": float("inf"), "ray-pool": float("inf")}
    for repeat in range(args.repeats):
        seconds, rows, texts = ceiling(model, specs, args)
        best["ceiling"] = min(best["ceiling"], seconds)
        for way, pool in (("in-process", False), ("ray-pool", True)):
            run = stage_run(work, model, specs, args, pool, f"{label}-{way}-{repeat}")
            best[way] = min(best[way], run["seconds_scoring"])
            assert run["rows"] == rows and run["texts"] == texts, (run, rows, texts)
    print(
        f"{label}: {rows} rows, {texts} distinct texts, max_length {args.max_length}, "
        f"batch {args.batch_size}, {args.threads} thread(s), precision {args.precision}",
        flush=True,
    )
    for way, seconds in best.items():
        report(
            way,
            seconds,
            rows,
            texts,
            best["ceiling"],
            "(actor start + model load included)" if way == "ray-pool" else "",
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="tiny", help="tiny | smollm2 (random heads, built here) | a folder"
    )
    parser.add_argument("--rows", type=int, default=416, help="RewardBench rows (the oasst1 sample has 416)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens (the demo reward model's 256)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 wins on a shared box, where 2 wait on each other)",
    )
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--all-formats", action="store_true", help="also one run over rewardbench, bon, pairs"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="steerray-bench-evaluate-reward-"))
    model = reward_folder(args.model, work / "reward")
    files = write_benches(work, args.rows)
    init_ray()
    measure(work, model, [f"rewardbench={files['rewardbench']}"], args, "rewardbench")
    if args.all_formats:
        measure(work, model, [f"{name}={path}" for name, path in files.items()], args, "all formats")
    print(f"(model {args.model}; files and outputs under {work})", flush=True)


if __name__ == "__main__":
    main()
