"""Generation for the steerability grid and bootstrapping: steerray's engine vs one generate call per chunk.

    .venv/bin/python bench/steerability.py [--model smollm2-135m] [--rows 24] [--tokens 100] [--batch 24]
    .venv/bin/python bench/steerability.py --grid-only --repeats 3

`evaluate` and `bootstrap` generate in Ray Data actors (steerray.eval.sampling.SampleScorer). In one
process, the same rows, greedy, alternating ``--repeats`` times:

1. baseline: what they ran before: ``--batch`` prompts per ``generate`` call
   (steerray.models.generation.generate_batch), each call decoding until its longest answer ends
2. engine:   what they run now (steerray.eval.sampling.engine_answers): all rows to steerray's engine at
   once, at most ``--batch`` decoding together; a finished answer leaves and the next row takes its place

Rows: the grid's prompts (SteerLM template, verbosity 0/2/4), which the untuned SmolLM2 answers in a few
tokens, interleaved with the same questions in SmolLM2's own ChatML format, where it writes full answers,
so answer lengths vary as a steered model's do across verbosity (``--grid-only``: the grid alone). Prints
the median seconds of each, their ratio, the tokens each decoded, and whether the answers are the same.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from steerray.eval.steerability import build_grid
from steerray.templates import generation_prompt

PROMPTS = ["Why is the sky blue?", "How do I save money each month?", "Explain how photosynthesis works.",
           "Why is sleep important?", "How do volcanoes erupt?", "How can I learn a new language?"]


def bench_rows(count: int, grid_only: bool) -> list[str]:
    grid = [generation_prompt(r["messages"], r["label"]) for r in build_grid(PROMPTS, ["verbosity"], [0, 2, 4])]
    if grid_only:
        return (grid * (count // len(grid) + 1))[:count]
    chatml = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in PROMPTS]
    mixed = [row for pair in zip(grid, chatml * 3, strict=False) for row in pair]
    return (mixed * (count // len(mixed) + 1))[:count]


def chunked_generate(model, tokenizer, prompts: list[str], batch: int, tokens: int) -> tuple[list[str], int]:
    """The previous stage code: prompts sorted by length, ``batch`` per generate call."""
    from steerray.models.generation import generate_batch

    order = sorted(range(len(prompts)), key=lambda i: len(tokenizer(prompts[i])["input_ids"]))
    answers: dict[int, tuple[str, int]] = {}
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        for i, g in zip(chunk, generate_batch(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens=tokens),
                        strict=True):
            answers[i] = (g.text, g.completion_tokens)
    return [answers[i][0] for i in range(len(prompts))], sum(n for _, n in answers.values())


def main() -> None:
    import torch

    from steerray.eval.sampling import engine_answers
    from steerray.models.loading import load_tokenizer, resolve_model
    from steerray.serving.engines import TransformersEngine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grid-only", action="store_true")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    source = resolve_model(args.model)
    engine = TransformersEngine(source, max_batch_size=args.batch, batch_wait_ms=0, precision="auto", threads=threads)
    model, tokenizer = engine.model, load_tokenizer(source, padding_side="left")
    prompts = bench_rows(args.rows, args.grid_only)
    sampling = {"max_new_tokens": args.tokens, "temperature": 0.0, "top_p": 1.0}
    chunked_generate(model, tokenizer, prompts[:2], 2, 4)  # warm-ups: stop-string tables, allocator
    engine_answers(engine, prompts[:2], [0, 0], {**sampling, "max_new_tokens": 4})
    seconds: dict[str, list[float]] = {"generate": [], "engine": []}
    for _ in range(args.repeats):
        started = time.perf_counter()
        base_answers, base_tokens = chunked_generate(model, tokenizer, prompts, args.batch, args.tokens)
        seconds["generate"].append(time.perf_counter() - started)
        started = time.perf_counter()
        results = engine_answers(engine, prompts, [0] * len(prompts), sampling)
        seconds["engine"].append(time.perf_counter() - started)
    engine.shutdown()
    base, ours = statistics.median(seconds["generate"]), statistics.median(seconds["engine"])
    same = sum(a == r[0] for a, r in zip(base_answers, results, strict=True))
    print(f"model {args.model} ({model.dtype}), {len(prompts)} rows{' (grid only)' if args.grid_only else ''}, "
          f"<= {args.tokens} new tokens, {args.batch} decoding together, {threads} threads, "
          f"median of {args.repeats} alternating runs")
    print(f"generate per chunk: {base:6.1f} s ({base_tokens} tokens decoded)   runs: "
          + " ".join(f"{s:.1f}" for s in seconds["generate"]))
    print(f"engine            : {ours:6.1f} s ({sum(r[2] for r in results)} tokens decoded)   runs: "
          + " ".join(f"{s:.1f}" for s in seconds["engine"]))
    print(f"engine {base / ours:.2f}x faster; same answers {same}/{len(prompts)} (the engine ends an answer at any "
          "SteerLM marker, as the server does; generate ran on to the stop marker and the text was cut)")


if __name__ == "__main__":
    main()
