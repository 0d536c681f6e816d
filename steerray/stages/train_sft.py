"""Stage `train-sft`: attribute-conditioned SFT (SteerLM step 3) on Ray Train, loss on answers only.

Launch it through the CLI (embedded Ray by default, --address to submit to a cluster):

    steerray train-sft --config demo/sft --data runs/demo/annotate --out runs/demo/sft \
        [train.max_steps=60 lora.enabled=false ...]

or as a Ray job:  ray job submit -- python -m steerray.stages.train_sft --config CONFIG.yaml
See what the model is trained on first:  steerray render-sft --input runs/demo/annotate/train.jsonl -n 3

Data: a SteerLM conversation jsonl, or a folder with train.jsonl (+ val.jsonl), e.g. the annotate output
or prepare's conversations/. Outputs under `out`: model/ (Hugging Face causal LM + tokenizer),
metrics.jsonl, samples.jsonl + samples.md (answers to fixed prompts at each steering setting),
rejects.jsonl, checkpoints/ (re-running the same command resumes from the last one), manifest.json (last).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Any, cast

from steerray.artifacts import atomic_write_text, write_jsonl
from steerray.attributes import LABEL_ATTRIBUTES_KEY, steering_label
from steerray.config import SFTConfig
from steerray.data import readers
from steerray.data.sft import (
    COUNT_COLUMNS,
    IGNORE_INDEX,
    SFTDataError,
    count_rows,
    is_val_row,
    locate_sft_data,
    tokenize_rows,
)
from steerray.eval.report import samples_markdown
from steerray.models.generation import generate_batch
from steerray.models.loading import load_causal_lm, resolve_model
from steerray.runtime import init_ray
from steerray.stages import StageResult, job_main
from steerray.templates import generation_prompt, steerlm_chat_template
from steerray.training.batching import collate_sft
from steerray.training.launcher import Fit, fit
from steerray.training.loop import TrainTask, sharded_eval
from steerray.training.losses import trained_token_nll

COLUMNS = ["file", "line", "length", "input_ids", "labels"]


# 1. The worker side: a causal LM, token cross entropy on the trained spans, validation loss.
class SFTTask(TrainTask):
    name = "sft"
    config_class = SFTConfig
    config: SFTConfig
    eval_at_start = True  # the report shows where validation loss started

    def build_model(self, strategy: Any) -> Any:
        model = load_causal_lm(self.config.model.name, trust_remote_code=self.config.model.trust_remote_code)
        model.config.use_cache = False  # no KV cache while training: memory for nothing
        return model

    def micro_batch(self, rows: Any, indices: Any, pad_id: int, device: Any) -> dict[str, Any]:
        batch = collate_sft([rows["input_ids"][i] for i in indices], [rows["labels"][i] for i in indices], pad_id)
        return {key: value.to(device) for key, value in batch.items()}

    def units(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())  # token-mean over the trained tokens

    def loss_sum(self, prepared: Any, batch: dict[str, Any]) -> Any:
        with prepared.strategy.autocast():  # the lm_head runs on the trained positions only, where it can
            return trained_token_nll(prepared.module, batch["input_ids"], batch["attention_mask"],
                                     batch["labels"])[0].sum()

    def evaluate(self, prepared: Any, rows: Any, pad_id: int) -> dict[str, Any]:
        def score(batch: dict[str, Any]) -> tuple[float, int]:
            return float(self.loss_sum(prepared, batch)), self.units(batch)

        parts = [part for _, part in sharded_eval(self, prepared, rows, pad_id, self.config.train.micro_batch_size,
                                                   score)]
        count = sum(n for _, n in parts)
        return {"loss": sum(s for s, _ in parts) / count if count else None, "tokens": count}

    def before_export(self, prepared: Any, tokenizer: Any) -> None:
        # The exported tokenizer renders the SteerLM template itself: plain transformers or vLLM users steer
        # with apply_chat_template(..., steering={"verbosity": 0}) (chat_template_kwargs in vLLM).
        tokenizer.chat_template = steerlm_chat_template(self.config.label_attributes)
        config = prepared.base_hf_model().config
        config.use_cache = True  # the exported model generates with a KV cache
        if self.config.label_attributes is not None:  # serve/evaluate/bootstrap render the label it learnt
            setattr(config, LABEL_ATTRIBUTES_KEY, list(self.config.label_attributes))

    def after_export(self, out: Path, tokenizer: Any, strategy: Any) -> dict[str, Any]:
        count = write_samples(out, self.config, tokenizer, strategy.device, strategy.compute_dtype)
        return {"samples": str(out / "samples.md") if count else None, "sample_count": count}


# 2. Samples: what the model learned, at each steering setting, for fixed prompts (rank 0, exported model).
def write_samples(out: Path, cfg: SFTConfig, tokenizer: Any, device: Any, dtype: Any) -> int:
    """Greedy answers; ``sample_prompts: []`` skips them (a model too big for one device, e.g. the 70B
    recipe: sample it with the serve or evaluate stage instead)."""
    if not cfg.sample_prompts or not cfg.sample_steering:
        return 0
    model = load_causal_lm(str(out / "model"), dtype=dtype).to(device).eval()
    cases = [(steering, steering_label(steering, attributes=cfg.label_attributes), prompt)
             for steering in cfg.sample_steering for prompt in cfg.sample_prompts]
    # one batch for all settings: a batch decodes until its longest answer ends, so once, not once a setting
    prompts = [generation_prompt([{"role": "user", "content": prompt}], label) for _, label, prompt in cases]
    answers = generate_batch(model, tokenizer, prompts, max_new_tokens=cfg.sample_max_new_tokens)
    rows = [{"prompt": prompt, "steering": steering, "label": label, "answer": answer.text,
             "completion_tokens": answer.completion_tokens, "finish_reason": answer.finish_reason}
            for (steering, label, prompt), answer in zip(cases, answers, strict=True)]
    write_jsonl(out / "samples.jsonl", rows)
    title = f"SFT samples ({cfg.model.name}, greedy, up to {cfg.sample_max_new_tokens} new tokens)"
    atomic_write_text(out / "samples.md", samples_markdown(title, cfg.sample_prompts, rows))
    return len(rows)


# 3. Data, on the driver before any worker starts: read numbered lines with Ray Data, render, tokenize
#    (answer-only labels), count and write every reject, so a file of bad rows fails here, not in a worker.
def check(config: SFTConfig) -> None:
    locate_sft_data(config.data)
    resolve_model(config.model.name)


def inputs(config: SFTConfig) -> list[str]:
    files = locate_sft_data(config.data)
    return files.train + files.val + [config.model.name]


def tokenized_dataset(config: SFTConfig) -> Any:
    import ray.data

    files = locate_sft_data(config.data)
    tasks = [{**dataclasses.asdict(t), "split": "train" if files.val else ""} for t in readers.plan_reads(files.train)]
    tasks += [{**dataclasses.asdict(t), "split": "val"} for t in readers.plan_reads(files.val)]
    fraction, seed = config.val_fraction, config.train.seed

    def read(task: dict[str, Any]) -> Any:
        for row in readers.read_task_rows(task):
            split = task["split"] or ("val" if is_val_row(row["raw"], fraction, seed) else "train")
            yield {**row, "split": split}

    raw = ray.data.from_items(tasks, override_num_blocks=len(tasks)).flat_map(read)
    return raw.map_batches(cast(Any, tokenize_rows), fn_kwargs={
        "tokenizer_source": config.model.name, "max_length": config.model.max_length,
        "trust_remote_code": config.model.trust_remote_code, "label_attributes": config.label_attributes},
        batch_size=256, num_cpus=0.5).materialize()


def count_and_reject(dataset: Any, out: Path, data: str) -> dict[str, Any]:
    """Counts per split and status; rejected and untrained rows go to rejects.jsonl with their reason."""
    batches = dataset.select_columns(list(COUNT_COLUMNS)).iter_batches(batch_size=4096, batch_format="numpy")
    counts, rejects = count_rows(batches)
    write_jsonl(out / "rejects.jsonl", rejects)
    if counts.get("train_ok", 0) == 0:
        reasons = Counter(r["reason"].split(":")[0] for r in rejects).most_common(3)
        raise SFTDataError(f"no trainable conversation in {data}: every row was rejected or had nothing to train "
                           f"on ({counts}; top reasons: {reasons}); see {out / 'rejects.jsonl'}")
    return counts


# 4. The stage: data, the fit (resumable), the summary.
def run(config: SFTConfig) -> StageResult:
    out = Path(config.out)
    init_ray()
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    dataset = tokenized_dataset(config)
    counts = count_and_reject(dataset, out, config.data)
    print(f"[train-sft] rows: {counts}; rejects with reasons: {out / 'rejects.jsonl'}")
    files = locate_sft_data(config.data)

    def split(name: str) -> Any:
        return dataset.filter(expr=f"status == 'ok' and split == '{name}'").select_columns(COLUMNS).materialize()

    datasets = {"train": split("train"), **({"val": split("val")} if counts.get("val_ok") else {})}
    summary = fit(Fit(
        name="sft", task=f"{__name__}:SFTTask", config=config, out=out, datasets=datasets,
        train_rows=counts["train_ok"], tokenizer=config.model.name, data_files=files.train + files.val,
        fingerprint={"label_attributes": config.label_attributes}))
    summary["val_loss_first"] = (summary.pop("val_first") or {}).get("loss")
    summary["val_loss"] = (summary.pop("val") or {}).get("loss")
    summary["train_loss"] = summary.pop("last_loss")
    summary["rows"] = counts
    print(f"[train-sft] val loss {summary['val_loss_first']} -> {summary['val_loss']}; model: {out / 'model'}; "
          f"samples: {out / 'samples.md'}")
    outputs = [name for name in ("model", "metrics.jsonl", "samples.jsonl", "samples.md", "rejects.jsonl")
               if (out / name).exists()]
    return StageResult(summary, {"counts": counts, "outputs": outputs})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return job_main("sft", argv)


if __name__ == "__main__":
    main()
