"""Stage `train-reward`: the attribute-prediction reward model on Ray Train, regression or Bradley-Terry.

Launch it through the CLI (embedded Ray by default, --address to submit to a cluster):
    steerray train-reward --config demo/reward --data runs/exp/prepare --out runs/exp/reward \
        [train.max_steps=50 lora.enabled=true loss=scaled_bt ...]
or as a Ray job:  ray job submit -- python -m steerray.stages.train_reward --config CONFIG.yaml

Reads `data/regression/` (loss=regression: masked MSE over labelled cells) or `data/preference/` (loss=scaled_bt,
regular_bt or margin_bt on explicit pairs, reward = the helpfulness output). Writes under `out`: model/ (a Hugging
Face sequence-classification folder + tokenizer), metrics.jsonl, checkpoints/ (the same command again resumes),
rejects.jsonl, manifest.json (last). On a multi-node cluster `out` and `data` must be on storage every node sees.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from steerray.artifacts import write_jsonl
from steerray.config import ConfigError, RewardConfig
from steerray.eval.metrics import label_means, pairwise_metrics, regression_metrics
from steerray.models.loading import resolve_model
from steerray.models.reward import RewardModelError, build_reward_model, reward_attributes, reward_readout
from steerray.runtime import init_ray
from steerray.stages import StageResult, job_main
from steerray.training import reward_data as rd
from steerray.training.frozen_prefix import FrozenPrefixCache, keeps_frozen_prefixes, reward_predictions
from steerray.training.launcher import Fit, fit
from steerray.training.loop import TrainTask, sharded_eval
from steerray.training.losses import bradley_terry_loss, bradley_terry_sum, masked_mse_sum
from steerray.training.strategy import deepspeed_available

log = logging.getLogger("steerray")
TRAINING_FIGURES = ("steps", "strategy", "precision", "attention", "world_size", "params", "trainable_params", "mfu",
                    "first_loss", "last_loss", "tokens_per_s", "matmul_peak_flops_per_worker", "frozen_prefix_cache")


# 1. The worker side: the model, its micro-batches, the loss and the validation metrics.
class RewardTask(TrainTask):
    name = "train-reward"
    config_class = RewardConfig
    config: RewardConfig
    trainable_modules = ("score",)
    cache: FrozenPrefixCache | None = None  # built on the first training micro-batch (training/frozen_prefix.py)

    @property
    def kind(self) -> str:
        return rd.data_kind(self.config.loss)

    def build_model(self, strategy: Any) -> Any:
        cfg = self.config
        # load_on_rank0 (big models): only rank 0 reads weights; FSDP2 broadcasts the other ranks' shards.
        empty = cfg.scaling.load_on_rank0 and strategy.kind == "fsdp" and not strategy.is_rank0
        return build_reward_model(cfg.model.name, cfg.attributes, init_from=cfg.init_from,
                                  trust_remote_code=cfg.model.trust_remote_code, empty=empty)

    def wrap(self, model: Any) -> Any:
        return reward_readout(model)

    def micro_batch(self, rows: Any, indices: Any, pad_id: int, device: Any) -> dict[str, Any]:
        collate = rd.collate_regression if self.kind == rd.REGRESSION else rd.collate_pairs
        return collate(rows, indices, pad_id)

    def units(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"] != -100).sum()) if self.kind == rd.REGRESSION else int(batch["pairs"])

    def tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["tokens"])

    def predict(self, prepared: Any, batch: dict[str, Any]) -> Any:
        strategy = prepared.strategy
        with strategy.autocast():
            return prepared.module(batch["input_ids"].to(strategy.device), batch["attention_mask"].to(strategy.device))

    def loss_sum(self, prepared: Any, batch: dict[str, Any]) -> Any:
        if self.cache is None:
            self.cache = FrozenPrefixCache.for_training(prepared, self.config.train.frozen_prefix_cache_mb)
        preds = reward_predictions(self.cache, prepared, batch)
        if self.kind == rd.REGRESSION:
            return masked_mse_sum(preds, batch["labels"])[0]
        rewards, pairs = preds[:, self.helpfulness].float(), batch["pairs"]
        return bradley_terry_sum(rewards[:pairs], rewards[pairs:], batch["strength"].to(preds.device),
                                 self.config.loss)[0]

    def row_affinity(self) -> bool:  # a row's cached frozen layers stay on the worker that computed them
        return keeps_frozen_prefixes(self.config)

    def after_export(self, out: Path, tokenizer: Any, strategy: Any) -> dict[str, Any]:
        return {"frozen_prefix_cache": self.cache.stats() if self.cache and self.cache.enabled else None}

    @property
    def helpfulness(self) -> int:
        return self.config.attributes.index("helpfulness")

    def evaluate(self, prepared: Any, rows: Any, pad_id: int) -> dict[str, Any]:
        gathered = sharded_eval(self, prepared, rows, pad_id, self.config.train.micro_batch_size * 2,
                                lambda batch: self.predict(prepared, batch).float().cpu().numpy())
        index = np.concatenate([np.asarray(i) for i, _ in gathered])
        preds = [p for _, p in gathered]
        if self.kind == rd.REGRESSION:
            labels = np.stack([rows["label"][i] for i in index])
            return regression_metrics(np.concatenate(preds), labels, self.config.attributes,
                                      baseline=self.options.get("baseline"))
        return self.pair_metrics(gathered, rows, index)

    def pair_metrics(self, gathered: list, rows: Any, index: np.ndarray) -> dict[str, Any]:
        import torch

        h = self.helpfulness
        chosen = np.concatenate([p[: len(i), h] for i, p in gathered])
        rejected = np.concatenate([p[len(i):, h] for i, p in gathered])
        strength = np.asarray([rows["strength"][i] for i in index])
        metrics = pairwise_metrics(chosen, rejected, strength)
        metrics["loss"] = float(bradley_terry_loss(torch.as_tensor(chosen), torch.as_tensor(rejected),
                                                   torch.as_tensor(strength), self.config.loss))
        return metrics


# 2. Check the request before anything starts: loss vs attributes, data files, model name, init_from.
def check(cfg: RewardConfig) -> None:
    kind = rd.data_kind(cfg.loss)
    if kind == rd.PREFERENCE and "helpfulness" not in cfg.attributes:
        raise ConfigError(f"loss={cfg.loss} reads the reward from the helpfulness output, but attributes="
                          f"{cfg.attributes} has none")
    if cfg.scaling.strategy == "deepspeed" and not deepspeed_available():
        raise ConfigError("scaling.strategy=deepspeed but DeepSpeed is not installed: "
                          "`pip install 'steerray[deepspeed]'`, or use fsdp / ddp")
    rd.locate_split_files(cfg.data, kind)
    rd.check_prepare_manifest(cfg.data)
    if cfg.init_from:
        config_file = Path(cfg.init_from) / "config.json"
        if not config_file.is_file():
            raise RewardModelError(f"init_from={cfg.init_from} is not a reward-model folder (no config.json)")
        found = reward_attributes(SimpleNamespace(**json.loads(config_file.read_text(encoding="utf-8"))))
        if found != list(cfg.attributes):
            raise RewardModelError(f"init_from={cfg.init_from} predicts {found}, but attributes={cfg.attributes}; "
                                   "set attributes to match the model you start from")
    else:
        resolve_model(cfg.model.name)  # unknown names fail here, before Ray starts


def inputs(cfg: RewardConfig) -> list[str]:
    return [str(f) for f in rd.locate_split_files(cfg.data, rd.data_kind(cfg.loss)) if f] + [
        cfg.init_from or cfg.model.name]


# 3. The stage: read and check the data, tokenize (Ray Data), fit (resuming if checkpoints exist).
def run(cfg: RewardConfig) -> StageResult:
    out, kind = Path(cfg.out), rd.data_kind(cfg.loss)
    train_file, val_file = rd.locate_split_files(cfg.data, kind)
    train = rd.read_split(train_file, kind, cfg.attributes, loss=cfg.loss)
    val = rd.read_split(val_file, kind, cfg.attributes, allow_empty=True, loss=cfg.loss) if val_file else None
    rejects = train.rejects + (val.rejects if val else [])
    skipped = train.skipped + (val.skipped if val else [])  # e.g. ties, for a loss without a tie term
    write_jsonl(out / "rejects.jsonl", [{"kind": "reject", **r} for r in rejects] +
                [{"kind": "skip", **r} for r in skipped])
    if rejects or skipped:
        log.warning("%d rows rejected, %d skipped (reasons in %s)", len(rejects), len(skipped), out / "rejects.jsonl")
    tokenizer = cfg.init_from or resolve_model(cfg.model.name)
    init_ray()
    datasets = {"train": rd.tokenize_dataset(train.rows, kind, tokenizer, cfg.model.max_length)}
    if val and val.rows:
        datasets["val"] = rd.tokenize_dataset(val.rows, kind, tokenizer, cfg.model.max_length)
    truncated = {split: rd.count_truncated(ds) for split, ds in datasets.items()}
    if any(truncated.values()):
        log.warning("%s texts were longer than model.max_length=%d tokens and lost tokens from the left "
                    "(the read-out token at the end is kept)", truncated, cfg.model.max_length)
    baseline = label_means([r["label"] for r in train.rows]) if kind == rd.REGRESSION else None
    summary = fit(Fit(
        name="train-reward", task=f"{__name__}:RewardTask", config=cfg, out=out, datasets=datasets,
        train_rows=len(train.rows), tokenizer=tokenizer, options={"baseline": baseline}, data_files=[str(train_file)],
        fingerprint={"init_from": cfg.init_from, "attributes": cfg.attributes, "loss": cfg.loss}))
    counts = {"train_rows": len(train.rows), "val_rows": len(val.rows) if val else 0, "rejected": len(rejects),
              "skipped": len(skipped), "skipped_by_reason": rd.count_reasons(skipped),
              "truncated": truncated, "train_total": train.total, "val_total": val.total if val else 0}
    print(f"[train-reward] wrote {out}/model; loss {summary.get('first_loss')} -> {summary.get('last_loss')}")
    training = {k: summary.get(k) for k in TRAINING_FIGURES}
    return StageResult(
        {"out": str(out), "loss": cfg.loss, "counts": counts, **training, "val": summary.get("val")},
        {"loss": cfg.loss, "attributes": cfg.attributes, "counts": counts,
         "inputs": {"data": cfg.data, "files": [str(f) for f in (train_file, val_file) if f], "kind": kind,
                    "init_from": cfg.init_from},
         "outputs": {"model": "model", "metrics": "metrics.jsonl", "checkpoints": "checkpoints",
                     "rejects": "rejects.jsonl"},
         "training": {**training, "resumed_from_step": summary.get("resumed_from")},
         "metrics": {"val": summary.get("val"), "baseline_means": baseline}})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return job_main("reward", argv)


if __name__ == "__main__":
    main()
