"""Batched vs one-at-a-time generation for the steerability grid and bootstrapping, in one process.

    .venv/bin/python bench/steerability.py [--model smollm2-135m] [--rows 12] [--tokens 32] [--batch 12]

Generates the same grid rows (prompts x verbosity 0/2/4, greedy) twice with the code `evaluate` and
`bootstrap` run in their actors (steerray.models.generation.generate_batch): once one prompt per
``generate`` call (the baseline), once ``--batch`` prompts per call. Prints tokens/s of both and the ratio.
Greedy decoding makes both produce the same answers, which the script checks.
"""

from __future__ import annotations

import argparse
import os
import time

from steerray.eval.steerability import build_grid
from steerray.templates import generation_prompt

PROMPTS = ["Why is the sky blue?", "How do I save money each month?", "Explain how photosynthesis works.",
           "Why is sleep important?", "How do volcanoes erupt?", "How can I learn a new language?"]


def timed(model, tokenizer, prompts: list[str], batch: int, tokens: int) -> tuple[float, int, list[str]]:
    from steerray.models.generation import generate_batch

    start, answers, produced = time.perf_counter(), [], 0
    for i in range(0, len(prompts), batch):
        for g in generate_batch(model, tokenizer, prompts[i:i + batch], max_new_tokens=tokens):
            answers.append(g.text)
            produced += g.completion_tokens
    return time.perf_counter() - start, produced, answers


def main() -> None:
    import torch

    from steerray.models.loading import load_causal_lm, load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model, tokenizer = load_causal_lm(args.model).eval(), load_tokenizer(args.model)
    grid = build_grid(PROMPTS, ["verbosity"], [0, 2, 4])[: args.rows]
    prompts = [generation_prompt(r["messages"], r["label"]) for r in grid]
    timed(model, tokenizer, prompts[:2], 2, 4)  # warm-up: stop-string tables, allocator
    base_s, base_tokens, base_answers = timed(model, tokenizer, prompts, 1, args.tokens)
    batch_s, batch_tokens, batch_answers = timed(model, tokenizer, prompts, args.batch, args.tokens)
    same = sum(a == b for a, b in zip(base_answers, batch_answers, strict=True))
    print(f"model {args.model}, {len(prompts)} grid rows, <= {args.tokens} new tokens, {torch.get_num_threads()} threads")
    print(f"one prompt per call : {base_tokens} tokens in {base_s:6.1f} s = {base_tokens / base_s:7.1f} tokens/s")
    print(f"{args.batch:>3} prompts per call: {batch_tokens} tokens in {batch_s:6.1f} s = {batch_tokens / batch_s:7.1f} tokens/s")
    print(f"ratio batched / one-at-a-time: {(batch_tokens / batch_s) / (base_tokens / base_s):.2f}x; "
          f"identical answers: {same}/{len(prompts)} (padding can flip a greedy tie)")


if __name__ == "__main__":
    main()
