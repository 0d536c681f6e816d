"""SFT step cost: logits for every position against logits for the trained (answer) positions only.

    .venv/bin/python bench/sft_logits.py                          # smollm2-135m, the demo SFT preset's shapes
    .venv/bin/python bench/sft_logits.py --model tiny-llama --micro-batches 8

One process, one thread (a demo worker's share of the box), the demo SFT preset's LoRA, precision and
max_length, micro-batches of built-in demo conversations planned as the stage plans them. Each
micro-batch runs forward + backward through ``losses.trained_token_nll`` (train-sft's loss) twice, alternating which way
goes first: ``trained_only=False`` (the lm_head over every prompt, answer and padding position, as the
peers compute it) and ``trained_only=True`` (what the stage runs where transformers takes a boolean
``logits_to_keep``). Prints seconds per micro-batch for each, the ratio, the largest difference in the
loss and in the LoRA gradients between the two (they compute the same sum), and the share of positions
trained.
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
    parser.add_argument("--micro-batches", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import numpy as np
    import torch

    from steerray.config import SFTConfig, load_config
    from steerray.data.demo import demo_conversation
    from steerray.data.sft import IGNORE_INDEX, STATUS_OK, example_from_json
    from steerray.models.loading import load_causal_lm, load_tokenizer
    from steerray.models.precision import resolve_precision
    from steerray.training.batching import collate_sft, plan_step
    from steerray.training.losses import projects_chosen_positions, trained_token_nll
    from steerray.training.strategy import Strategy, prepare_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    preset = load_config(SFTConfig, "demo/sft", [f"model.name={args.model}"])
    device = torch.device("cpu")
    precision = resolve_precision(preset.scaling.precision, device)
    tokenizer = load_tokenizer(args.model)
    label_attributes = preset.label_attributes
    rows = []
    for i in range(400):
        status, _, example = example_from_json(json.dumps(demo_conversation(i)), tokenizer, preset.model.max_length,
                                               label_attributes=label_attributes)
        if status == STATUS_OK:
            rows.append(example)
    model = load_causal_lm(args.model)
    model.config.use_cache = False
    prepared = prepare_model(model, Strategy(kind="single", device=device, precision=precision), preset.lora)
    if not projects_chosen_positions(prepared.module):
        sys.exit("this transformers/model takes no boolean logits_to_keep: nothing to compare")
    lengths = np.array([len(r.input_ids) for r in rows])
    batches = []
    for step in range(args.micro_batches):
        plan = plan_step(lengths, step, global_batch=preset.train.global_batch_size,
                         micro_batch=preset.train.micro_batch_size, seed=preset.train.seed)
        mb = plan.micro_batches[0]
        batches.append(collate_sft([rows[i].input_ids for i in mb], [rows[i].labels for i in mb],
                                   tokenizer.pad_token_id))
    trainable = [p for p in prepared.module.parameters() if p.requires_grad]

    def run(batch: dict, trained_only: bool) -> tuple[float, float, list]:
        for p in trainable:
            p.grad = None
        start = time.perf_counter()
        with prepared.strategy.autocast():
            loss = trained_token_nll(prepared.module, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                     trained_only)[0].sum()
        loss.backward()
        seconds = time.perf_counter() - start
        return seconds, float(loss.detach()), [p.grad.detach().clone() for p in trainable]

    run(batches[0], True), run(batches[0], False)  # warm-up: first calls allocate and pick kernels
    times: dict[bool, list[float]] = {False: [], True: []}
    loss_diff = grad_diff = 0.0
    for i, batch in enumerate(batches):
        order = (False, True) if i % 2 == 0 else (True, False)
        results = {}
        for trained_only in order:
            seconds, loss, grads = run(batch, trained_only)
            times[trained_only].append(seconds)
            results[trained_only] = (loss, grads)
        (loss_all, grads_all), (loss_kept, grads_kept) = results[False], results[True]
        loss_diff = max(loss_diff, abs(loss_all - loss_kept) / max(abs(loss_all), 1e-9))
        grad_diff = max(grad_diff, max(float((a - b).abs().max() / a.abs().max().clamp(min=1e-12))
                                       for a, b in zip(grads_all, grads_kept, strict=True)))
    positions = sum(int(b["attention_mask"].numel()) for b in batches)
    trained = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    all_s, kept_s = float(np.median(times[False])), float(np.median(times[True]))
    print(f"model {args.model}, precision {precision}, {args.threads} thread(s), {len(batches)} micro-batches of "
          f"{preset.train.micro_batch_size}, LoRA r{preset.lora.r} {preset.lora.target_modules}")
    print(f"positions trained: {trained} of {positions} ({trained / positions:.0%})")
    print(f"forward+backward, median s/micro-batch: all positions {all_s:.3f}, trained only {kept_s:.3f}, "
          f"ratio {all_s / kept_s:.2f}x")
    print(f"largest relative difference: loss {loss_diff:.2e}, LoRA gradients {grad_diff:.2e}")


if __name__ == "__main__":
    main()
