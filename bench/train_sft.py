"""SFT training throughput: `train-sft` on Ray Train against a plain single-process PyTorch loop, one run.

    .venv/bin/python bench/train_sft.py                         # smollm2-135m, LoRA, 256 tokens, 8 steps
    .venv/bin/python bench/train_sft.py --full --steps 6        # full fine-tuning
    .venv/bin/python bench/train_sft.py --strategy fsdp         # FSDP2 instead of DDP
    .venv/bin/python bench/train_sft.py --model tiny-llama --steps 20

Both sides train the same model on the same rows in the same global batches (steerray's step plan with
one worker gives the baseline its batches), same micro-batch size, same tokenization and masks, fp32:

1. baseline:  one process, all CPU threads, HF model + peft (if LoRA) + torch AdamW, ``loss.backward()``
              per micro-batch, the textbook loop;
2. steerray:  the ``train-sft`` stage as users run it (``steerray.stages.execute``): Ray Data
              tokenization, a TorchTrainer with ``--workers`` workers (``--strategy``: DDP, as the demo
              preset, or FSDP2), token-mean loss normalised across workers.

Throughput = real (unpadded) tokens per second of the training loop (start-up, evaluation, export and
samples excluded on both sides); MFU = model FLOPs (6N, or 4N + 2 x trainable for LoRA) x tokens/s over the
measured matmul peak of the same CPU threads. Rows are the built-in demo conversations (steerray.data.demo).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def write_demo_conversations(path: Path, count: int) -> Path:
    from steerray.data.demo import demo_conversation

    path.write_text("".join(json.dumps(demo_conversation(i)) + "\n" for i in range(count)), encoding="utf-8")
    return path


def baseline(args: argparse.Namespace, data: Path) -> dict[str, float]:
    """The plain loop: same rows and batches, no Ray, no sharding, all threads in one process."""
    import numpy as np
    import torch

    from steerray.config import LoraConfig
    from steerray.data.sft import STATUS_OK, example_from_json
    from steerray.models.loading import load_causal_lm, load_tokenizer
    from steerray.training.batching import collate_sft, plan_step
    from steerray.training.metrics import measure_matmul_peak, train_flops_per_token_partial

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = load_tokenizer(args.model)
    rows = []
    for line in data.read_text(encoding="utf-8").splitlines():
        status, _, example = example_from_json(line, tokenizer, args.max_length)
        if status == STATUS_OK:
            rows.append(example)
    model = load_causal_lm(args.model)
    model.config.use_cache = False
    if not args.full:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        from steerray.training.strategy import lora_target_modules

        lora = LoraConfig(enabled=True, r=args.lora_r, alpha=2 * args.lora_r)
        model = get_peft_model(model, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha,
                                                     target_modules=lora_target_modules(model, lora)))
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    lengths = np.array([len(r.input_ids) for r in rows])
    tokens, start = 0, time.perf_counter()
    for step in range(args.steps):
        plan = plan_step(lengths, step, global_batch=args.global_batch, micro_batch=args.micro_batch, seed=1234)
        batches = [collate_sft([rows[i].input_ids for i in mb], [rows[i].labels for i in mb], tokenizer.pad_token_id)
                   for mb in plan.micro_batches]
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(),
                                                     ignore_index=-100)
            (loss / len(batches)).backward()
            tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"[baseline] step {step + 1}/{args.steps} loss {float(loss):.3f}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    peak = measure_matmul_peak("cpu", torch.float32)
    rate = tokens / seconds
    flops_per_token = train_flops_per_token_partial(params, trainable)  # 6N for full fine-tuning
    return {"tokens_per_s": rate, "mfu": flops_per_token * rate / peak, "seconds": seconds, "peak_gflops": peak / 1e9,
            "flops_per_token": flops_per_token, "peak": peak}


def steerray_run(args: argparse.Namespace, data: Path, out: Path) -> dict[str, float]:
    from steerray.config import SFTConfig, load_config
    from steerray.runtime import init_ray
    from steerray.stages import execute

    overrides = [f"data={data}", f"out={out}", f"model.name={args.model}", f"model.max_length={args.max_length}",
                 f"lora.enabled={not args.full}", f"lora.r={args.lora_r}", f"lora.alpha={2 * args.lora_r}",
                 f"train.max_steps={args.steps}", f"train.global_batch_size={args.global_batch}",
                 f"train.micro_batch_size={args.micro_batch}", "train.checkpoint_every=100000",
                 f"scaling.num_workers={args.workers}", f"scaling.strategy={args.strategy}",
                 "scaling.max_failures=0", "val_fraction=0.0",
                 "scaling.precision=fp32",  # like the baseline (precision auto is bf16 on CPUs with AMX)
                 "sample_prompts=[]", "optim.warmup_steps=0", "logging.progress_bar=false"]
    config = load_config(SFTConfig, "tiny/sft", overrides)
    init_ray()
    started = time.perf_counter()
    summary = execute("sft", config)
    return {"tokens_per_s": summary["tokens_per_s"], "wall_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"],
                        help="steerray's side; the demo preset trains LoRA with DDP (FSDP2 re-gathers frozen weights)")
    parser.add_argument("--rows", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
        data = write_demo_conversations(Path(tmp) / "conv.jsonl", args.rows)
        base = baseline(args, data)
        ours = steerray_run(args, data, Path(tmp) / "run")
    # One FLOPs count and one peak (all CPU threads) for both sides, so the MFUs compare like the tokens/s do.
    ours["mfu"] = ours["tokens_per_s"] * base["flops_per_token"] / base["peak"]
    mode = "full" if args.full else f"LoRA r={args.lora_r}"
    print(f"\nmodel {args.model} ({mode}), {args.steps} steps x {args.global_batch} sequences <= {args.max_length} "
          f"tokens, micro-batch {args.micro_batch}, CPU threads {os.cpu_count()}")
    print(f"baseline  (1 process, plain loop):     {base['tokens_per_s']:8.1f} tokens/s  MFU {base['mfu']:.1%}  "
          f"(peak {base['peak_gflops']:.0f} GFLOP/s)")
    print(f"steerray  (Ray Train, {args.workers} workers, {args.strategy}): {ours['tokens_per_s']:8.1f} tokens/s  "
          f"MFU {ours['mfu']:.1%}  (stage wall {ours['wall_s']:.0f} s incl. start-up)")
    print(f"ratio steerray / baseline: {ours['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
