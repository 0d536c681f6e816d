"""The label probe on its own: has a policy learnt to read its label? Forward passes only, seconds.

    .venv/bin/python bench/steer_probe.py --policy runs/demo/sft/model --data runs/demo/annotate/val.jsonl \
        [--attributes verbosity,humor,creativity] [--values 0,1,2,3,4] [-n 16] [--baseline smollm2-135m]

For each held-out conversation's last labelled answer: log-probability under its true label minus the mean
under the same label with one attribute at each other value (nats), and how often the true value is the
likeliest (chance printed beside it). ``--baseline`` scores the same answers with another model in the same
run (e.g. the base model before SFT: its gain is ~0, since it never learnt the label). `steerray evaluate`
puts the same numbers in its report.
"""

from __future__ import annotations

import argparse
import json
import time

from steerray.attributes import model_label_attributes
from steerray.eval.probe import probe_items, probe_policy
from steerray.models.loading import load_causal_lm, load_tokenizer
from steerray.models.precision import inference_dtype


def probe(model_name: str, items: list, attributes: list[str], values: list[int], precision: str) -> dict:
    model = load_causal_lm(model_name, dtype=inference_dtype(precision, "cpu")).eval()
    started = time.perf_counter()
    result = probe_policy(model, load_tokenizer(model_name), items, attributes, values)
    print(f"{model_name}: {time.perf_counter() - started:.1f} s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--data", required=True, help="conversation jsonl (e.g. the annotate output's val.jsonl)")
    parser.add_argument("--attributes", default=None, help="comma-separated; default: the policy's label attributes")
    parser.add_argument("--values", default="0,1,2,3,4")
    parser.add_argument("-n", type=int, default=16, help="conversations")
    parser.add_argument("--baseline", default=None, help="another model scored on the same answers")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    trained = model_label_attributes(args.policy)
    attributes = args.attributes.split(",") if args.attributes else list(trained or ["verbosity"])
    values = [int(v) for v in args.values.split(",")]
    with open(args.data, encoding="utf-8") as handle:
        items = probe_items([json.loads(line) for line in handle if line.strip()], trained, args.n)
    results = {"policy": probe(args.policy, items, attributes, values, args.precision)}
    if args.baseline:
        results["baseline"] = probe(args.baseline, items, attributes, values, args.precision)
    print(f"{'model':<10} {'attribute':<12} {'n':>4} {'gain (nats)':>12} {'best':>6} {'chance':>7}")
    for name, per_attribute in results.items():
        for attribute, row in per_attribute.items():
            print(f"{name:<10} {attribute:<12} {row['n']:>4} {row['mean_gain_nats'] or 0:>12.3f} "
                  f"{row['true_is_best'] or 0:>6.2f} {row['chance'] or 0:>7.2f}")


if __name__ == "__main__":
    main()
