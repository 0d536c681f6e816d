"""train-reward step cost with and without the frozen-prefix cache (training/frozen_prefix.py), one process.

    .venv/bin/python bench/reward_prefix.py                          # smollm2-135m, the demo reward preset
    .venv/bin/python bench/reward_prefix.py --model tiny-llama --micro-batches 8

One thread (a demo worker's share of the box), the demo reward preset's LoRA (top 8 of 30 layers), precision
and micro-batch size, rows of the built-in demo data rendered as the stage renders them. Each micro-batch
runs forward + backward three ways, alternating: the whole model (``RewardTask.predict``, as before the
cache), a first visit (the cache computes the frozen layers under no_grad and keeps them) and a later visit
(the cache hands them back; only the trained layers run). Prints median seconds for each, the ratios, the
largest differences of the predictions and gradients against the whole model, and what the demo's 96 steps
x 16 rows over its ~590 training rows (2.6 epochs) would cost per row-visit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=float, default=2.6, help="passes over each row in the run (demo: 2.6)")
    args = parser.parse_args()

    import numpy as np
    import torch

    from steerray.config import RewardConfig, load_config
    from steerray.data.demo import demo_conversation
    from steerray.data.sources import convert_conversation
    from steerray.models.loading import load_tokenizer
    from steerray.models.precision import resolve_precision
    from steerray.models.reward import build_reward_model, encode_reward_texts
    from steerray.stages.train_reward import RewardTask
    from steerray.training.frozen_prefix import FrozenPrefixCache, reward_predictions
    from steerray.training.losses import masked_mse_sum
    from steerray.training.strategy import Strategy, prepare_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = load_config(RewardConfig, "demo/reward", [f"model.name={args.model}"])
    precision = resolve_precision(config.scaling.precision, torch.device("cpu"))
    tokenizer = load_tokenizer(args.model)
    texts = []
    for i in range(40):  # the prepare stage's regression rows of demo conversations
        for row in convert_conversation("demo", demo_conversation(i), file="demo", line=i, split=""):
            if row["kind"] == "regression":
                texts.append(json.loads(row["payload"])["text"])
    micro = config.train.micro_batch_size
    rows = {"input_ids": [], "label": [], "length": []}
    for text in texts[: args.micro_batches * micro]:
        ids = encode_reward_texts(tokenizer, [text], config.model.max_length).input_ids[0].tolist()
        rows["input_ids"].append(ids)
        rows["label"].append([2.0] * len(config.attributes))
        rows["length"].append(len(ids))
    task = RewardTask(config, {})
    prepared = prepare_model(build_reward_model(args.model, config.attributes), Strategy(
        kind="single", device=torch.device("cpu"), precision=precision), config.lora, trainable_modules=["score"],
        wrap=task.wrap)
    task.cache = FrozenPrefixCache.for_training(prepared, config.train.frozen_prefix_cache_mb)
    trainable = [p for p in prepared.module.parameters() if p.requires_grad]

    def run(batch: dict, how: str) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
        for p in trainable:
            p.grad = None
        if how == "first":  # forget the rows: the cache computes them again
            cache = task.cache
            for key in batch["keys"]:
                if key in cache.rows:
                    cache.bytes -= cache.rows[key].numel() * cache.rows[key].element_size()
                    del cache.rows[key]
        start = time.perf_counter()
        preds = task.predict(prepared, batch) if how == "whole" else reward_predictions(task.cache, prepared, batch)
        masked_mse_sum(preds, batch["labels"])[0].backward()
        return time.perf_counter() - start, preds.detach(), [p.grad.clone() for p in trainable]

    order = np.argsort(rows["length"])[::-1]  # length-grouped micro-batches, as the stage plans them
    batches = [task.micro_batch(rows, order[i: i + micro].tolist(), tokenizer.pad_token_id, torch.device("cpu"))
               for i in range(0, len(order), micro)]
    run(batches[0], "whole"), run(batches[0], "first")  # warm-up and the cache's one agreement check
    if not task.cache.enabled:
        sys.exit("the frozen-prefix cache turned itself off for this model: nothing to compare")
    times: dict[str, list[float]] = {"whole": [], "first": [], "later": []}
    pred_diff = grad_diff = 0.0
    for i, batch in enumerate(batches):
        ways = ["whole", "first", "later"]
        results = {}
        for how in ways[i % 3:] + ways[: i % 3]:
            if how == "later" and any(k not in task.cache.rows for k in batch["keys"]):
                run(batch, "first")  # make sure every row is cached before timing a later visit
            seconds, preds, grads = run(batch, how)
            times[how].append(seconds)
            results[how] = (preds, grads)
        whole_preds, whole_grads = results["whole"]
        for how in ("first", "later"):
            preds, grads = results[how]
            pred_diff = max(pred_diff, float((preds - whole_preds).abs().max()))
            grad_diff = max(grad_diff, max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
                                           for a, b in zip(grads, whole_grads, strict=True)))
    med = {how: float(np.median(values)) for how, values in times.items()}
    cache = task.cache
    print(f"model {args.model}, precision {precision}, {args.threads} thread(s), {len(batches)} micro-batches of "
          f"{micro}, LoRA on layers {cache.layer}.. (top {config.lora.last_layers})")
    print(f"forward+backward, median s/micro-batch: whole model {med['whole']:.3f}, first visit {med['first']:.3f} "
          f"({med['whole'] / med['first']:.2f}x), later visit {med['later']:.3f} ({med['whole'] / med['later']:.2f}x)")
    per_visit = (med["first"] + (args.epochs - 1) * med["later"]) / args.epochs
    print(f"at {args.epochs} epochs: {per_visit:.3f} s per micro-batch visit against {med['whole']:.3f} "
          f"({med['whole'] / per_visit:.2f}x)")
    print(f"largest difference from the whole model: predictions {pred_diff:.2e} (absolute), "
          f"gradients {grad_diff:.2e} (relative)")


if __name__ == "__main__":
    main()
