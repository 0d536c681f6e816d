"""Stage `train-steerlm2` (SteerLM 2.0, spec 7.2): train Q_theta, from the SteerLM-1 policy Q', towards
P(y|a,x) ~ P(a|x,y) P(y|x) on steerlm2-data groups, on Ray Train through the shared loop.

Launch it through the CLI (embedded Ray by default, --address to submit to a cluster), or as a Ray job:

    steerray train-steerlm2 --config demo/train_steerlm2 --data runs/demo/steerlm2_data \
        --model runs/demo/sft/model --out runs/demo/train_steerlm2 [train.max_steps=20 ...]
    ray job submit -- python -m steerray.stages.train_steerlm2 --config runs/demo/train_steerlm2/config.yaml

A row is a GROUP (one prompt and label, n responses): batches plan over groups and keep each group whole.
Per micro-batch one forward pass with gradients gives each response's summed token NLL; its detached value
is the no-grad pass of the reference (theta does not change inside an optimizer step), which gives the
baseline b = softmax(-NLL - log Q'); with w = softmax(log P(a|x,y) + log P(y|x) - log Q') the loss is
sum (w - b) NLL / mean tokens, averaged over the step's groups. Logged per step: ``distance`` = mean
KL(w || b) over the groups, ``groups_skipped`` (NaN/inf logs or NLL: never trained on). Validation
(val.jsonl, before and after) reports the distance on held-out groups.

Data: a steerlm2-data output (train.jsonl, val.jsonl) or one jsonl file. Bad lines (mixed n, a missing or
string log field, a label attribute the policy was not trained on, a response longer than model.max_length)
are rejected before training with file, line and reason (rejects.jsonl), counted in the manifest.
Outputs: model/, metrics.jsonl, rejects.jsonl, checkpoints/ (re-running resumes), manifest.json (last).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, cast

from steerray.artifacts import read_jsonl, read_manifest, write_jsonl
from steerray.attributes import LABEL_ATTRIBUTES_KEY, model_label_attributes
from steerray.config import SteerLM2TrainConfig
from steerray.data import readers
from steerray.data.sft import STATUS_OK
from steerray.data.steerlm2 import GROUP_COLUMNS, unpack_group
from steerray.data.steerlm2_inputs import COUNT_COLUMNS, count_groups, data_files, group_size, tokenize_groups
from steerray.errors import SteerrayError
from steerray.models.loading import load_causal_lm, resolve_model
from steerray.runtime import init_ray
from steerray.stages import StageResult, job_main
from steerray.templates import steerlm_chat_template
from steerray.training.batching import collate_sft
from steerray.training.launcher import Fit, fit
from steerray.training.loop import TrainTask, sharded_eval
from steerray.training.steerlm2 import distance, group_weights, row_nll, steerlm2_loss_sum

COLUMNS = ["file", "line", "length", *GROUP_COLUMNS]


class SteerLM2TrainError(SteerrayError, ValueError):
    """Data or config that cannot train SteerLM 2.0; the message names the file or key."""


# 1. The worker side: groups in, the SteerLM 2.0 loss out, the distance gathered per step.
class SteerLM2Task(TrainTask):
    name = "steerlm2"
    config_class = SteerLM2TrainConfig
    config: SteerLM2TrainConfig
    eval_at_start = True  # the distance before training, on the held-out groups

    def __init__(self, config: SteerLM2TrainConfig, options: dict[str, Any]) -> None:
        super().__init__(config, options)
        self.gathered = [0.0, 0.0, 0.0]  # this step's KL sum, kept groups, skipped groups

    def build_model(self, strategy: Any) -> Any:
        model = load_causal_lm(self.config.model.name, trust_remote_code=self.config.model.trust_remote_code)
        model.config.use_cache = False
        return model

    def micro_batch(self, rows: Any, indices: Any, pad_id: int, device: Any) -> dict[str, Any]:
        import torch

        groups = [unpack_group({key: rows[key][i] for key in GROUP_COLUMNS}) for i in indices]
        batch = collate_sft(
            [ids for g in groups for ids in g.input_ids], [lab for g in groups for lab in g.labels], pad_id
        )
        batch = {key: value.to(device) for key, value in batch.items()}
        batch["logs"] = torch.tensor([[g.log_pa, g.log_py, g.log_q] for g in groups], dtype=torch.float64)
        batch["trained_tokens"] = torch.tensor([g.trained_tokens for g in groups], dtype=torch.float64)
        return batch

    def units(self, batch: dict[str, Any]) -> int:
        return int(batch["logs"].isfinite().all(dim=-1).all(dim=-1).sum())  # groups with finite logs

    def group_nll(self, prepared: Any, batch: dict[str, Any]) -> Any:
        """``[G, n]`` summed token NLL of every response under the current theta (with grad if enabled)."""
        with prepared.strategy.autocast():
            nll = row_nll(prepared.module, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return nll.view(batch["logs"].shape[0], -1)

    def objective(self, nll: Any, batch: dict[str, Any]) -> tuple[Any, float, int, int]:
        """(loss summed over groups, KL sum over kept groups, kept, skipped) for one micro-batch."""
        import torch

        logs = batch["logs"]
        weights = group_weights(logs[:, 0], logs[:, 1], logs[:, 2], nll.detach().cpu())
        kept = ~weights.skip
        safe = torch.where(weights.skip.to(nll.device)[:, None], torch.zeros_like(nll), nll)  # no NaN * 0
        loss, _ = steerlm2_loss_sum(safe, weights.weights, weights.baseline, batch["trained_tokens"])
        kl = float(distance(weights.weights[kept], weights.baseline[kept]).sum()) if bool(kept.any()) else 0.0
        return loss, kl, int(kept.sum()), int(weights.skip.sum())

    def loss_sum(self, prepared: Any, batch: dict[str, Any]) -> Any:
        loss, kl, kept, skipped = self.objective(self.group_nll(prepared, batch), batch)
        self.gathered = [self.gathered[0] + kl, self.gathered[1] + kept, self.gathered[2] + skipped]
        return loss

    def step_metrics(self, strategy: Any) -> dict[str, Any]:
        kl, kept, skipped = strategy.all_reduce_sum(self.gathered)
        self.gathered = [0.0, 0.0, 0.0]
        return {
            "distance": kl / kept if kept else None,
            "groups_kept": int(kept),
            "groups_skipped": int(skipped),
        }

    def evaluate(self, prepared: Any, rows: Any, pad_id: int) -> dict[str, Any]:
        def score(batch: dict[str, Any]) -> tuple[float, int, int]:
            return self.objective(self.group_nll(prepared, batch), batch)[1:]

        parts = [
            part
            for _, part in sharded_eval(
                self, prepared, rows, pad_id, self.config.train.micro_batch_size, score
            )
        ]
        kept = sum(p[1] for p in parts)
        return {
            "distance": sum(p[0] for p in parts) / kept if kept else None,
            "groups": kept,
            "groups_skipped": sum(p[2] for p in parts),
        }

    def before_export(self, prepared: Any, tokenizer: Any) -> None:
        attributes = self.options.get("label_attributes")
        tokenizer.chat_template = steerlm_chat_template(attributes)
        config = prepared.base_hf_model().config
        config.use_cache = True
        if attributes is not None:  # Q' was trained on these: the new policy reads the same label
            setattr(config, LABEL_ATTRIBUTES_KEY, list(attributes))


# 2. Data, on the driver: numbered lines through Ray Data, validated and tokenized; rejects written and counted.
def tokenized_dataset(cfg: SteerLM2TrainConfig, n: int, attributes: tuple[str, ...] | None) -> Any:
    import ray.data

    train, val = data_files(cfg.data)
    tasks = [
        {**dataclasses.asdict(t), "split": split}
        for split, files in (("train", train), ("val", val))
        for t in readers.plan_reads(files)
    ]

    def read(task: dict[str, Any]) -> Any:
        for row in readers.read_task_rows(task):
            yield {**row, "split": task["split"]}

    raw = ray.data.from_items(tasks, override_num_blocks=len(tasks)).flat_map(read)
    return raw.map_batches(
        cast(Any, tokenize_groups),
        fn_kwargs={
            "tokenizer_source": cfg.model.name,
            "trust_remote_code": cfg.model.trust_remote_code,
            "max_length": cfg.model.max_length,
            "expected_n": n,
            "label_attributes": list(attributes) if attributes is not None else None,
        },
        batch_size=64,
        num_cpus=0.5,
    ).materialize()


def count_and_reject(dataset: Any, out: Path, data: str) -> dict[str, Any]:
    batches = dataset.select_columns(list(COUNT_COLUMNS)).iter_batches(batch_size=1024, batch_format="numpy")
    counts, rejects = count_groups(batches)
    write_jsonl(out / "rejects.jsonl", rejects)
    if not counts.get(f"train_{STATUS_OK}"):
        raise SteerLM2TrainError(
            f"no usable group in {data}: {counts['rejects_by_reason']}; see {out / 'rejects.jsonl'}"
        )
    return counts


# 3. The stage: checks before Ray starts, the fit (resumable), the distance before and after.
def label_attributes(cfg: SteerLM2TrainConfig) -> tuple[str, ...] | None:
    """What labels may name: the config's list, else the label attributes Q' was trained on (None: any)."""
    return tuple(cfg.label_attributes) if cfg.label_attributes else model_label_attributes(cfg.model.name)


def check(cfg: SteerLM2TrainConfig) -> None:
    train, _ = data_files(cfg.data)
    resolve_model(cfg.model.name)
    if cfg.samples_per_prompt is None:
        group_size(train[0], label_attributes(cfg))  # a file without one valid group fails here, before Ray
    made = read_manifest(Path(cfg.data)) if Path(cfg.data).is_dir() else None
    length = ((made or {}).get("config") or {}).get("max_length")
    if length is not None and length != cfg.model.max_length:
        raise SteerLM2TrainError(
            f"model.max_length={cfg.model.max_length}, but {cfg.data} was scored with "
            f"max_length={length}: log Q' must cover the tokens training trains"
        )


def inputs(cfg: SteerLM2TrainConfig) -> list[str]:
    train, val = data_files(cfg.data)
    return train + val + [cfg.model.name]


def distance_summary(
    summary: dict[str, Any], out: Path, n: int, counts: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The distance before and after training (held-out groups if any, else the first and last step)."""
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("split") == "train" and "distance" in r]
    val_first, val = summary.pop("val_first") or {}, summary.pop("val") or {}
    summary.update(
        n=n,
        rows=counts,
        train_loss=summary.pop("last_loss"),
        distance_first_step=steps[0]["distance"] if steps else None,
        distance_last_step=steps[-1]["distance"] if steps else None,
        val_distance_before=val_first.get("distance"),
        val_distance_after=val.get("distance"),
        groups_skipped=sum(int(r.get("groups_skipped") or 0) for r in steps),
    )
    before = summary["val_distance_before"] if val_first else summary["distance_first_step"]
    after = summary["val_distance_after"] if val else summary["distance_last_step"]
    summary.update(distance_before=before, distance_after=after)
    print(f"[train-steerlm2] distance KL(w||b) {before} -> {after}; model: {out / 'model'}")
    metrics = {
        "distance_before": before,
        "distance_after": after,
        "groups_skipped": summary["groups_skipped"],
    }
    return summary, {
        "counts": counts,
        "metrics": metrics,
        "outputs": ["model", "metrics.jsonl", "rejects.jsonl"],
    }


def run(cfg: SteerLM2TrainConfig) -> StageResult:
    out = Path(cfg.out)
    attributes = label_attributes(cfg)
    n = cfg.samples_per_prompt or group_size(data_files(cfg.data)[0][0], attributes)
    init_ray()
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    dataset = tokenized_dataset(cfg, n, attributes)
    counts = count_and_reject(dataset, out, cfg.data)
    print(f"[train-steerlm2] groups of {n}: {counts}; rejects with reasons: {out / 'rejects.jsonl'}")

    def split(name: str) -> Any:
        return (
            dataset.filter(expr=f"status == 'ok' and split == '{name}'").select_columns(COLUMNS).materialize()
        )

    datasets = {"train": split("train"), **({"val": split("val")} if counts.get("val_ok") else {})}
    summary = fit(
        Fit(
            name="train-steerlm2",
            task=f"{__name__}:SteerLM2Task",
            config=cfg,
            out=out,
            datasets=datasets,
            train_rows=counts["train_ok"],
            tokenizer=cfg.model.name,
            data_files=sum(data_files(cfg.data), []),
            options={"label_attributes": list(attributes) if attributes is not None else None},
            fingerprint={"n": n, "label_attributes": list(attributes) if attributes is not None else None},
        )
    )
    return StageResult(*distance_summary(summary, out, n, counts))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return job_main("train_steerlm2", argv)


if __name__ == "__main__":
    main()
