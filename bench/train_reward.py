"""Benchmark: steerray's reward training step against a plain single-process PyTorch loop, in one run.

    .venv/bin/python bench/train_reward.py [--model smollm2-135m] [--steps 6] [--global-batch 8]
        [--micro-batch 4] [--max-length 256] [--data runs/demo/prepare/regression/train.jsonl]

Both loops train the same reward model (same initial weights) on the same rows with AdamW, gradient
accumulation and clipping, in this process, after warm-up steps. Reported per loop: real (unpadded) tokens/s,
MFU against this machine's measured matmul peak, and the ratio to the plain loop. Three loops:

- ``plain``: transformers' ``AutoModelForSequenceClassification`` forward, masked MSE written inline, rows in
  arrival order (what a hand-written loop does);
- ``steerray (same batches)``: prepare_model + Stepper + the shared losses on the very same micro-batches,
  i.e. the framework's own overhead (ratio ~1.0 is the goal);
- ``steerray (length-grouped)``: the same rows per optimizer step, grouped by length as train-reward does:
  the gain from padding less.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from steerray.config import OptimConfig, ScalingConfig
from steerray.models.loading import load_tokenizer
from steerray.models.reward import build_reward_model, reward_readout
from steerray.training.batching import pad_batch, padding_efficiency, plan_step
from steerray.training.losses import masked_mse_sum, normalize_loss
from steerray.training.metrics import measure_matmul_peak, train_flops_per_token
from steerray.training.strategy import build_optimizer_and_schedule, prepare_model, resolve_strategy


def load_rows(path: str | None, tokenizer, max_length: int, count: int, seed: int) -> tuple[list, np.ndarray]:
    """Token ids (left-truncated) and 9-wide labels: from a regression jsonl, or synthetic texts."""
    rng = random.Random(seed)
    if path:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()][:count]
        texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    else:
        words = "the of a model reward helpful answer question data because however really".split()
        texts = [" ".join(rng.choice(words) for _ in range(rng.randint(10, max_length))) + "\n<extra_id_2>"
                 for _ in range(count)]
        labels = [[float(rng.randint(0, 4)) for _ in range(9)] for _ in range(count)]
    ids = [x[-max_length:] for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return ids, np.asarray(labels, dtype=np.float32)


def micro_batches_for(step: int, lengths: np.ndarray, args, grouped: bool) -> list[np.ndarray]:
    return plan_step(lengths, step, global_batch=args.global_batch, micro_batch=args.micro_batch,
                     seed=args.seed, length_grouping=grouped).micro_batches


def run_plain(args, ids, labels, lengths, pad_id) -> tuple[float, int]:
    torch.manual_seed(args.seed)
    model = build_reward_model(args.model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                  betas=(0.9, 0.98), weight_decay=0.1)
    elapsed, tokens = 0.0, 0
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        step_tokens = 0
        batches = micro_batches_for(step, lengths, args, grouped=False)
        count = sum(int((labels[mb] != -100).sum()) for mb in batches)
        for mb in batches:
            input_ids, mask = pad_batch([ids[i] for i in mb], pad_id)
            target = torch.as_tensor(labels[mb])
            pred = model(input_ids=input_ids, attention_mask=mask).logits
            valid = target != -100
            loss = ((pred - target) ** 2 * valid).sum() / count
            loss.backward()
            step_tokens += int(mask.sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            elapsed += time.perf_counter() - start
            tokens += step_tokens
    return elapsed, tokens


def run_steerray(args, ids, labels, lengths, pad_id, grouped: bool) -> tuple[float, int]:
    torch.manual_seed(args.seed)
    strategy = resolve_strategy(ScalingConfig())
    prepared = prepare_model(build_reward_model(args.model), strategy, None, trainable_modules=["score"],
                             wrap=reward_readout)
    stepper = build_optimizer_and_schedule(prepared, OptimConfig(lr=1e-5, min_lr=1e-5, warmup_steps=0),
                                           args.warmup + args.steps)
    prepared.train()
    elapsed, tokens = 0.0, 0
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        batches = micro_batches_for(step, lengths, args, grouped)
        count = sum(int((labels[mb] != -100).sum()) for mb in batches)
        step_tokens = 0
        for i, mb in enumerate(batches):
            input_ids, mask = pad_batch([ids[j] for j in mb], pad_id)
            with stepper.micro_step(last=i == len(batches) - 1):
                part, _ = masked_mse_sum(prepared.module(input_ids, mask), torch.as_tensor(labels[mb]))
                stepper.backward(normalize_loss(part, count, strategy.world_size))
            step_tokens += int(mask.sum())
        stepper.step()
        if step >= args.warmup:
            elapsed += time.perf_counter() - start
            tokens += step_tokens
    return elapsed, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=None, help="regression jsonl (default: synthetic texts)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(args.model)
    rows = args.global_batch * (args.warmup + args.steps)
    ids, labels = load_rows(args.data, tokenizer, args.max_length, rows, args.seed)
    lengths = np.asarray([len(x) for x in ids])
    pad_id = tokenizer.pad_token_id
    peak = measure_matmul_peak("cpu" if not torch.cuda.is_available() else "cuda")
    probe = build_reward_model(args.model)
    flops_params = sum(p.numel() for p in probe.parameters()) - probe.get_input_embeddings().weight.numel()
    del probe
    print(f"model {args.model}: {flops_params / 1e6:.1f}M matmul params; {len(ids)} rows, max_length "
          f"{args.max_length}, global batch {args.global_batch}, micro batch {args.micro_batch}, "
          f"{args.steps} timed steps after {args.warmup} warm-up; torch threads {torch.get_num_threads()}; "
          f"measured matmul peak {peak / 1e9:.1f} GFLOP/s")

    results = {}
    for name, fn in (("plain", lambda: run_plain(args, ids, labels, lengths, pad_id)),
                     ("steerray (same batches)", lambda: run_steerray(args, ids, labels, lengths, pad_id, False)),
                     ("steerray (length-grouped)", lambda: run_steerray(args, ids, labels, lengths, pad_id, True))):
        elapsed, tokens = fn()
        tps = tokens / elapsed
        results[name] = tps
        mfu = tps * train_flops_per_token(flops_params) / peak
        print(f"{name:28s} {tps:9.1f} tokens/s   MFU {100 * mfu:5.1f}%   ({tokens} real tokens in {elapsed:.1f} s)",
              flush=True)
    base = results["plain"]
    for name in list(results)[1:]:
        print(f"ratio {name} / plain: {results[name] / base:.2f}x")
    eff = {g: np.mean([padding_efficiency(lengths, micro_batches_for(s, lengths, args, g))
                       for s in range(args.warmup + args.steps)]) for g in (False, True)}
    print(f"padding efficiency (real / computed tokens): plain {eff[False]:.2f}, grouped {eff[True]:.2f}")


if __name__ == "__main__":
    main()
