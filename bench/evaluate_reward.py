"""`evaluate-reward` time per 1,000 rows: the demo-sized reward model on benchmark files built from real oasst1.

    .venv/bin/python bench/evaluate_reward.py --model smollm2 --max-length 256 --threads 2
    .venv/bin/python bench/evaluate_reward.py --model runs/demo/reward/model --precision fp32

Rows come from the real oasst1 sample (../shared/data): every prompter message with at least two ranked,
non-deleted replies gives one row per format: RewardBench (prompt = the conversation up to that message as
{role, content} turns, chosen = the rank-0 reply, rejected = the lowest-ranked one, subset "oasst1-ranks":
an unknown subset, scored under "other"), best-of-N (every reply; judgment = rank 0) and pairs (as the
RewardBench row, strength 1). The model is SmolLM2-135M with a seeded random head unless a trained folder is
given: time does not depend on the head's values. The stage runs as users run it (`execute`, a Ray Data
actor pool since the texts exceed in_process_max_texts, model load and actor start included), once per
precision; printed: rows, distinct texts, scoring seconds, seconds per 1,000 RewardBench rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

OASST_SAMPLE = REPO.parent / "shared" / "data" / "oasst1" / "oasst1_en_validation.jsonl"


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
            turns.append({"role": "user" if node["role"] == "prompter" else "assistant", "content": node["text"]})
            node = messages.get(node.get("parent_id"))
        if len(answers) >= 2 and turns and turns[-1]["role"] == "user" and node is None:
            ranked = sorted(answers, key=lambda r: r["rank"])
            out.append((turns[::-1], [r["text"] for r in ranked]))
    return out


def write_benches(work: Path) -> dict[str, Path]:
    rb, bon, pairs = [], [], []
    for i, (turns, answers) in enumerate(ranked_prompts()):
        rb.append({"id": f"oasst-{i}", "prompt": turns, "chosen": answers[0], "rejected": answers[-1],
                   "subset": "oasst1-ranks"})
        bon.append({"id": f"oasst-{i}", "instruction": turns,
                    "responses": [{"text": a, "judgment": rank == 0} for rank, a in enumerate(answers)]})
        pairs.append({"id": f"oasst-{i}", "prompt": turns, "chosen": answers[0], "rejected": answers[-1], "strength": 1})
    files = {}
    for name, rows in (("rewardbench", rb), ("bon", bon), ("pairs", pairs)):
        files[name] = work / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return files


def build_reward_folder(backbone: str, out: Path) -> str:
    import torch

    from steerray.models.loading import load_tokenizer
    from steerray.models.reward import build_reward_model

    torch.manual_seed(1234)
    build_reward_model(backbone).save_pretrained(out, safe_serialization=True)
    load_tokenizer(backbone).save_pretrained(out)
    return str(out)


def run_once(work: Path, model: str, benches: list[str], precision: str, args) -> dict:
    from steerray.artifacts import read_manifest
    from steerray.config import EvaluateRewardConfig
    from steerray.stages import execute

    out = work / f"out-{precision}-{len(benches)}"
    config = EvaluateRewardConfig(model=model, bench=benches, out=str(out), precision=precision,
                                  batch_size=args.batch_size, max_length=args.max_length,
                                  threads_per_actor=args.threads, in_process_max_texts=0)
    execute("evaluate_reward", config)
    return read_manifest(out, "evaluate_reward")["run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 | tiny | a reward-model folder")
    parser.add_argument("--max-length", type=int, default=256, help="tokens (the demo reward model's 256)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the one scoring actor")
    parser.add_argument("--precision", nargs="+", default=["auto", "fp32"])
    parser.add_argument("--all-formats", action="store_true", help="also one run over all three files")
    args = parser.parse_args()

    from steerray.models.precision import inference_dtype
    from steerray.runtime import init_ray

    work = Path(tempfile.mkdtemp(prefix="steerray-bench-evaluate-reward-"))
    backbone = {"tiny": "tiny-llama", "smollm2": "smollm2-135m"}.get(args.model)
    model = build_reward_folder(backbone, work / "reward") if backbone else args.model
    files = write_benches(work)
    init_ray()
    for precision in args.precision:
        specs = [f"rewardbench={files['rewardbench']}"]
        run = run_once(work, model, specs, precision, args)
        print(f"{precision} ({inference_dtype(precision, 'cpu')}): {run['rows']} RewardBench rows, {run['texts']} "
              f"texts, scoring {run['seconds_scoring']:.1f} s (stage {run['seconds']:.1f} s) -> "
              f"{run['seconds_per_1000_rows']:.0f} s per 1,000 rows", flush=True)
    if args.all_formats:
        run = run_once(work, model, [f"{name}={path}" for name, path in files.items()], args.precision[0], args)
        print(f"all formats: {run['rows']} rows, {run['texts']} distinct texts, scoring {run['seconds_scoring']:.1f} s "
              f"-> {run['seconds_per_1000_rows']:.0f} s per 1,000 rows", flush=True)


if __name__ == "__main__":
    main()
