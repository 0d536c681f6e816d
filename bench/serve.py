"""Chat-server throughput: generated tokens/s at 1, 4 and 16 concurrent clients vs a plain sequential loop.

    .venv/bin/python bench/serve.py                                  # smollm2-135m, 16 requests, 64 tokens each
    .venv/bin/python bench/serve.py --weights real --min-tokens 0    # SmolLM2's own weights and answers
    .venv/bin/python bench/serve.py --model tiny-llama --requests 32 --max-tokens 64

In one process, same model, same requests, greedy decoding, same stop marker:

1. baseline:  the model generating the requests one after the other in a plain loop (transformers
              ``generate`` through steerray.models.generation.generate_batch, one prompt per call, no server,
              stopping at the same strings as the server)
2. server:    `steerray serve` on an embedded Ray (transformers engine), the same requests sent by C
              concurrent HTTP clients (C = 1, 4, 16), non-streaming, tokens counted from ``usage``

By default both sides run the model's architecture with random weights (``--weights dummy``, as vLLM's
``load_format="dummy"`` does for its benchmarks: the same layers, sizes and dtype, so the same work per token)
and answers are ``--max-tokens`` long (``min_tokens`` = ``max_tokens``: EOS cannot end them sooner, as vLLM's
serving benchmarks do with ``ignore_eos``). Why: the untuned SmolLM2 ends a SteerLM-template answer after ~10
tokens by writing the template's own turn marker, so with its real weights (``--weights real``) the run measures
mostly prompt processing and per-request overhead, not the decoding that batching speeds up, while a SteerLM-tuned
model's answers are tens to hundreds of tokens (``--model runs/demo/bootstrap/model --weights real``).

Prints tokens/s, p50/p95 request latency per setting, the ratio of each to the baseline, and whether
the server's greedy answers equal the baseline's. The baseline runs before Ray starts, so the two never
share the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUESTIONS = [
    "Why is the sky blue?", "Give me three tips for learning a new language.", "What is a prime number?",
    "How do vaccines work?", "Write a haiku about autumn.", "Explain recursion to a child.",
    "What causes the seasons on Earth?", "How should I store fresh basil?", "What is the difference between "
    "weather and climate?", "Summarise the plot of Romeo and Juliet.", "How does a bicycle stay upright?",
    "Why do cats purr?", "What is inflation?", "How do I boil an egg?", "What does a compiler do?",
    "Name some good habits for sleeping well.",
]


def requests_for(count: int) -> list[tuple[str, dict[str, int]]]:
    """``count`` (question, steering) pairs: the questions cycled, verbosity alternating 0 and 4."""
    return [(QUESTIONS[i % len(QUESTIONS)], {"verbosity": 0 if i % 2 else 4}) for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def dummy_weights_copy(model: str, out: Path) -> str:
    """``model``'s architecture and tokenizer with random weights (seeded), written to ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from steerray.models.loading import load_tokenizer, resolve_model

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(resolve_model(model))
    AutoModelForCausalLM.from_config(config).save_pretrained(out, safe_serialization=True)
    load_tokenizer(model).save_pretrained(out)
    return str(out)


def run_baseline(model: str, requests: list[tuple[str, dict[str, int]]], max_tokens: int, min_tokens: int,
                 threads: int) -> dict:
    """The plain loop: one generate call per request, one after the other."""
    import torch

    from steerray.attributes import steering_label
    from steerray.models.generation import generate_batch
    from steerray.models.loading import load_causal_lm, load_tokenizer
    from steerray.serving.openai_schema import stop_strings
    from steerray.templates import generation_prompt

    torch.set_num_threads(threads)
    tokenizer, lm = load_tokenizer(model), load_causal_lm(model).eval()
    prompts = [generation_prompt([{"role": "user", "content": q}], steering_label(s)) for q, s in requests]
    stops = stop_strings()  # what the server stops at: the stop marker and the other template markers
    generate_batch(lm, tokenizer, prompts[:1], max_new_tokens=4)  # warm-up
    latencies, tokens, texts = [], 0, []
    started = time.perf_counter()
    for prompt in prompts:
        t0 = time.perf_counter()
        (result,) = generate_batch(lm, tokenizer, [prompt], max_new_tokens=max_tokens, stop=stops,
                                   min_new_tokens=min_tokens)
        latencies.append(time.perf_counter() - t0)
        tokens += result.completion_tokens
        texts.append(result.text)
    elapsed = time.perf_counter() - started
    return {"name": "baseline loop", "seconds": elapsed, "tokens": tokens, "latencies": latencies, "texts": texts}


async def run_clients(url: str, model: str, requests: list[tuple[str, dict[str, int]]], max_tokens: int,
                      min_tokens: int, concurrency: int) -> dict:
    """``concurrency`` clients share the request list; each sends its next request when the last returns."""
    import httpx

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(requests)):
        queue.put_nowait(i)
    latencies, texts = [0.0] * len(requests), [""] * len(requests)
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            i = queue.get_nowait()
            question, steering = requests[i]
            t0 = time.perf_counter()
            response = await http.post(f"{url}/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": question}], "steering": steering,
                "max_tokens": max_tokens, "min_tokens": min_tokens, "temperature": 0})
            response.raise_for_status()
            body = response.json()
            latencies[i] = time.perf_counter() - t0
            tokens += body["usage"]["completion_tokens"]
            texts[i] = body["choices"][0]["message"]["content"]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"name": f"server, {concurrency} clients", "seconds": elapsed, "tokens": tokens, "latencies": latencies,
            "texts": texts}


def report(rows: list[dict], baseline: dict) -> None:
    base_rate = baseline["tokens"] / baseline["seconds"]
    print(f"\n{'setting':<22}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}{'x baseline':>12}{'p50 s':>8}{'p95 s':>8}"
          f"{'same text':>11}")
    for row in rows:
        rate = row["tokens"] / row["seconds"]
        same = sum(a == b for a, b in zip(row["texts"], baseline["texts"], strict=True))
        print(f"{row['name']:<22}{row['tokens']:>8}{row['seconds']:>9.1f}{rate:>10.2f}{rate / base_rate:>12.2f}"
              f"{statistics.median(row['latencies']):>8.2f}{percentile(row['latencies'], 0.95):>8.2f}"
              f"{same:>6}/{len(row['texts'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="alias, folder or hub id")
    parser.add_argument("--weights", choices=["dummy", "real"], default="dummy",
                        help="dummy: the model's architecture with random weights (see above); real: its own")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--min-tokens", type=int, default=None, help="EOS held back until then (default: "
                        "--max-tokens, answers of a fixed length; 0: where the model ends them)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads, both sides")
    args = parser.parse_args()
    min_tokens = args.max_tokens if args.min_tokens is None else args.min_tokens

    from steerray.config import ServeConfig
    from steerray.models.loading import resolve_model
    from steerray.runtime import init_ray
    from steerray.serving.chat_app import served_name, start_chat_server

    resolve_model(args.model)  # build an alias's cache before timing anything
    scratch = tempfile.TemporaryDirectory(prefix="bench-serve-")
    model = args.model if args.weights == "real" else dummy_weights_copy(args.model, Path(scratch.name) / "model")
    requests = requests_for(args.requests)
    print(f"[bench] model {args.model} ({args.weights} weights), {args.requests} requests, max_tokens "
          f"{args.max_tokens}, min_tokens {min_tokens}, {args.threads} torch threads", flush=True)
    baseline = run_baseline(model, requests, args.max_tokens, min_tokens, args.threads)
    print(f"[bench] baseline loop: {baseline['tokens']} tokens in {baseline['seconds']:.1f} s", flush=True)

    init_ray(num_cpus=max(2, args.threads), object_store_mb=256)
    from ray import serve

    with socket.socket() as sock:  # a free loopback port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = ServeConfig(model=model, port=port, app_name="bench-chat", max_batch_size=args.max_batch_size,
                         threads_per_replica=args.threads, cpus_per_replica=1, batch_wait_ms=10)
    url = start_chat_server(config)
    rows = []
    try:
        name = served_name(model)
        asyncio.run(run_clients(url, name, requests[:2], 4, 0, 2))  # warm-up
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            row = asyncio.run(run_clients(url, name, requests, args.max_tokens, min_tokens, concurrency))
            print(f"[bench] {row['name']}: {row['tokens']} tokens in {row['seconds']:.1f} s", flush=True)
            rows.append(row)
    finally:
        serve.shutdown()
        scratch.cleanup()
    report([baseline, *rows], baseline)


if __name__ == "__main__":
    main()
