"""steerray's generation engine (what `steerray serve` runs on CPU) against plain transformers `generate`.

    .venv/bin/python bench/engine.py                         # smollm2-135m, 16 prompts x <= 64 tokens
    .venv/bin/python bench/engine.py --prompts 8 --max-tokens 32 --repeats 3

In one process, same model and dtype (``--precision``, default auto), same threads, greedy, the prompts
in SmolLM2's own ChatML format (where the untuned model writes full answers), each run after a warm-up:

1. batched:   16 concurrent requests to the engine (one batch, finished rows leave it)
   vs one ``model.generate`` call over the same 16 prompts, left-padded (a finished row keeps computing
   padding until the longest ends): tokens/s, and whether the answers are the same tokens
2. alone:     one request to an idle engine vs one ``model.generate`` call for that prompt: latency

Runs alternate between the two sides ``--repeats`` times; the ratios are of the medians (the issue's
targets: batched >= 1.0x, alone <= 1.2x the plain call's latency).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def plain_generate(model, tokenizer, prompts: list[str], max_tokens: int) -> tuple[float, list[list[int]]]:
    """One left-padded ``model.generate`` call, greedy, stopping at the model's EOS: (seconds, new ids per row)."""
    import torch

    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - started
    answers = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        ids = []
        for token in row:
            ids.append(token)
            if token in eos:
                break
        answers.append(ids)
    return seconds, answers


def engine_generate(engine, loop, prompts: list[str], max_tokens: int) -> tuple[float, list]:
    """All prompts as concurrent requests to the engine: (seconds, completions)."""
    from steerray.serving.engines import SamplingParams

    params = SamplingParams(max_tokens=max_tokens)

    async def all_at_once() -> list:
        return await asyncio.gather(*(engine.complete(engine.encode(p), params) for p in prompts))

    started = time.perf_counter()
    results = loop.run_until_complete(all_at_once())
    return time.perf_counter() - started, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    import torch
    from vllm_cpu import prompts_for

    from steerray.models.loading import load_causal_lm, load_tokenizer, resolve_model
    from steerray.models.precision import inference_dtype
    from steerray.serving.engines import TransformersEngine

    threads = len(os.sched_getaffinity(0))
    source, prompts = resolve_model(args.model), prompts_for(args.prompts, "chatml")
    engine = TransformersEngine(source, max_batch_size=args.prompts, precision=args.precision, threads=threads)
    torch.set_num_threads(threads)
    dtype = inference_dtype(args.precision, torch.device("cpu"))
    model, tokenizer = load_causal_lm(source, dtype=dtype).eval(), load_tokenizer(source)
    loop = asyncio.new_event_loop()
    plain_generate(model, tokenizer, prompts[:2], 4)  # warm-ups: kernel selection, allocator
    engine_generate(engine, loop, prompts[:2], 4)

    timings: dict[str, list[float]] = {"plain": [], "engine": [], "plain alone": [], "engine alone": []}
    for _ in range(args.repeats):
        seconds, plain_ids = plain_generate(model, tokenizer, prompts, args.max_tokens)
        timings["plain"].append(seconds)
        seconds, completions = engine_generate(engine, loop, prompts, args.max_tokens)
        timings["engine"].append(seconds)
        timings["plain alone"].append(plain_generate(model, tokenizer, prompts[:1], args.max_tokens)[0])
        timings["engine alone"].append(engine_generate(engine, loop, prompts[:1], args.max_tokens)[0])
    engine.shutdown()
    loop.close()

    plain_tokens = sum(len(ids) for ids in plain_ids)
    engine_tokens = sum(c.completion_tokens for c in completions)
    same = sum(tokenizer.decode(ids, skip_special_tokens=True).strip() == c.text.strip()
               for ids, c in zip(plain_ids, completions, strict=True))
    median = {name: statistics.median(values) for name, values in timings.items()}
    plain_rate, engine_rate = plain_tokens / median["plain"], engine_tokens / median["engine"]
    print(f"\nmodel {args.model} ({dtype}), {args.prompts} ChatML prompts x <= {args.max_tokens} tokens, greedy, "
          f"{threads} threads, median of {args.repeats} alternating runs")
    print(f"batched: model.generate {plain_tokens} tokens in {median['plain']:.2f} s = {plain_rate:.1f} tok/s; "
          f"engine {engine_tokens} tokens in {median['engine']:.2f} s = {engine_rate:.1f} tok/s: "
          f"{engine_rate / plain_rate:.2f}x; same answer {same}/{len(prompts)}")
    print(f"alone:   model.generate {median['plain alone']:.2f} s, engine {median['engine alone']:.2f} s: "
          f"{median['engine alone'] / median['plain alone']:.2f}x the plain call's latency")
    for name, values in timings.items():
        print(f"  {name:<13} " + " ".join(f"{v:.2f}" for v in values))


if __name__ == "__main__":
    main()
