"""Peers: steerray's training stages against the libraries a user would otherwise pick, one command.

    .venv/bin/pip install -e '.[bench]'            # the peers: TRL 1.x (brings `datasets`); transformers is there
    .venv/bin/python bench/peers.py                # smollm2-135m, both stages, fp32 and bf16, 8 steps each
    .venv/bin/python bench/peers.py --only sft --precision bf16 --steps 20
    .venv/bin/python bench/peers.py --data runs/demo/prepare     # a prepare output folder of your own
    OMP_NUM_THREADS=1 .venv/bin/python bench/peers.py --model tiny-llama --steps 3 --workers 1 --threads 1 \
        --ray-cpus 1 --only sft                  # a quick check of the wiring on one core

Two comparisons, each in fp32 and in bf16, steerray and its peer one after the other in this process:

1. SFT: the ``train-sft`` stage as users run it (``steerray.stages.execute`` on the ``demo/sft`` preset:
   LoRA r=16 on all linear layers, label over four attributes, DDP) against TRL's ``SFTTrainer`` with
   ``completion_only_loss=True`` and the same LoRA through ``peft_config``. TRL is given steerray's own
   tokenization (pre-tokenized ``input_ids`` + ``completion_mask`` rows, a format TRL 1.x documents), so both
   train on exactly the same tokens with exactly the same loss mask: the answers, not the prompts or labels.
2. Reward model: the ``train-reward`` stage (``demo/reward``: regression over the nine attributes, LoRA on the
   top 8 layers, the head in full) against a transformers ``Trainer`` on
   ``AutoModelForSequenceClassification(num_labels=9, problem_type="regression")`` with the same peft LoRA
   (``task_type="SEQ_CLS"``, same layers), on the same left-truncated token ids.

Held equal: model, rows, the rows of every optimizer step (the peer reads steerray's step plan in order with
``train_sampling_strategy="sequential"``), micro-batch, global batch (the peer accumulates gradients in one
process), steps, max_length, AdamW betas/eps/weight decay, clipping, lr (constant on both sides: the warm-up and
cosine of the presets are switched off, since NeMo's and HF's schedules differ), no gradient checkpointing (TRL
turns it on by default), seed. The first step's loss is printed for both: same rows and same starting weights,
so it should agree to a few digits, which checks that both sides average the loss the same way.

Not equal, on purpose, because it is what each library does: steerray groups the rows of a step by length
(less padding) and runs ``scaling.num_workers`` Ray Train workers (2 DDP workers of one thread each on a CPU,
one per GPU); the peer is one process with torch's threads (``--threads``) or the one GPU; in bf16 steerray
stores frozen weights in bf16, HF autocasts fp32 weights; both SFT sides project only the loss-bearing positions
through the LM head (TRL 1.x's ``fused_lm_head``, steerray's boolean ``logits_to_keep``), and TRL also computes
entropy and token accuracy each step; steerray's reward stage reuses the frozen lower layers' output of a row it
has seen (``train.frozen_prefix_cache_mb``), which only pays once a run comes back to its rows; the peers' default
optimizer is fused AdamW, steerray's the plain one.

One peer setting is not a default: transformers 5.x's Trainer hands ``num_items_in_batch`` to a classification
model (its forward takes ``**kwargs``) and then skips dividing by the accumulation steps, but the regression loss
ignores it, so loss and gradient come out ``gradient_accumulation_steps`` times too large (Adam hides most of it,
the logged loss does not). The reward peer sets ``model.accepts_loss_kwargs = False``, which restores Trainer's own
averaging and makes its first loss equal steerray's.

Figures, per side: useful tokens/s (SFT: the loss-bearing answer tokens; reward: the unpadded input tokens, all
of which the score reads) over three windows: end to end (steerray: the whole stage: Ray Data tokenization, Ray
Train worker start, model load, training, final checkpoint, merged export; the peer: tokenization, model load,
trainer set-up, training, ``save_model``; Ray's own start, once per command, is printed apart), the training
loop (every step), and steady state (after ``--warmup`` steps). steerray's step times come from its
metrics.jsonl, the peer's from a callback (step end to step end, so its data loading and logging count).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

PRESETS = {"sft": "demo/sft", "reward": "demo/reward"}
PEERS = {"sft": "TRL SFTTrainer", "reward": "HF Trainer"}


# --------------------------------------------------------------------------------------------------
# What a run measured
# --------------------------------------------------------------------------------------------------

@dataclass
class Run:
    side: str
    precision: str
    wall_s: float = 0.0
    seconds: list[float] = field(default_factory=list)  # per optimizer step
    useful: list[int] = field(default_factory=list)  # loss-bearing (SFT) or unpadded (reward) tokens per step
    real: list[int] = field(default_factory=list)  # unpadded tokens per step
    computed: list[int] = field(default_factory=list)  # tokens the model computed, padding included
    losses: list[float] = field(default_factory=list)
    trainable: int | None = None
    workers: int = 1

    def rate(self, skip: int = 0) -> float:
        seconds = sum(self.seconds[skip:])
        return sum(self.useful[skip:]) / seconds if seconds else float("nan")

    def e2e(self) -> float:
        return sum(self.useful) / self.wall_s if self.wall_s else float("nan")

    def padding(self) -> float:
        return 1 - sum(self.real) / sum(self.computed) if sum(self.computed) else float("nan")


class StepMeter:
    """A transformers callback plus a counter the trainer's ``compute_loss`` feeds: per optimizer step, the
    time from the previous step's end (data loading and logging included) and the tokens of its micro-batches."""

    def __init__(self, run: Run, useful: Any) -> None:
        import torch

        self.run, self.useful = run, useful
        self.sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        self.pending: list[tuple[Any, Any, int]] = []
        self.last = 0.0

    def add(self, inputs: dict[str, Any]) -> None:
        # Tensors, not .item(): no device sync per micro-batch; they are summed once at the step's end.
        mask = inputs["attention_mask"]
        self.pending.append((self.useful(inputs), mask.sum(), mask.numel()))

    def callback(self) -> Any:
        from transformers import TrainerCallback

        meter = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                meter.last = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                meter.sync()
                now = time.perf_counter()
                meter.run.seconds.append(now - meter.last)
                meter.last = now
                meter.run.useful.append(sum(int(u) for u, _, _ in meter.pending))
                meter.run.real.append(sum(int(r) for _, r, _ in meter.pending))
                meter.run.computed.append(sum(c for _, _, c in meter.pending))
                meter.pending.clear()

        return Callback()

    def metered(self, trainer_class: Any) -> Any:
        """``trainer_class`` with its training micro-batches counted here (evaluation batches are not)."""
        meter = self

        class MeteredTrainer(trainer_class):
            def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                             num_items_in_batch: Any = None) -> Any:
                if model.training:
                    meter.add(inputs)
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)

        return MeteredTrainer


# --------------------------------------------------------------------------------------------------
# Data and configs
# --------------------------------------------------------------------------------------------------

def demo_data(rows: int, out: Path) -> Path:
    """The built-in demo conversations through steerray's prepare stage: conversations/ and regression/."""
    from steerray.config import PrepareConfig
    from steerray.stages import execute

    execute("prepare", PrepareConfig(sources=["demo"], out=str(out), demo_conversations=rows, val_fraction=0.0))
    return out


def stage_config(args: argparse.Namespace, stage: str, data: str, out: Path, precision: str) -> Any:
    """The demo preset of ``stage`` sized by the flags; constant lr (the presets' warm-up + cosine is NeMo's
    schedule, which HF's schedulers do not reproduce), no validation, no samples, no restarts."""
    from steerray.config import RewardConfig, SFTConfig, load_config

    cls = SFTConfig if stage == "sft" else RewardConfig
    overrides = [f"data={data}", f"out={out}", f"model.name={args.model}", f"train.max_steps={args.steps}",
                 "train.checkpoint_every=100000", "optim.warmup_steps=0", "optim.constant_steps=0",
                 f"scaling.num_workers={args.workers}", f"scaling.precision={precision}", "scaling.max_failures=0",
                 "logging.progress_bar=false"]
    overrides += [f"{key}={value}" for key, value in (
        ("model.max_length", args.max_length), ("train.global_batch_size", args.global_batch),
        ("train.micro_batch_size", args.micro_batch), ("optim.lr", args.lr)) if value is not None]
    if args.full:
        overrides.append("lora.enabled=false")
    if stage == "sft":
        overrides += ["val_fraction=0.0", "sample_prompts=[]"]
    config = load_config(cls, PRESETS[stage], overrides)
    return load_config(cls, PRESETS[stage], overrides + [f"optim.min_lr={config.optim.lr}"])


def stage_micro_batches(lengths: Any, cfg: Any, step: int) -> list[Any]:
    """Every worker's micro-batches of optimizer step ``step``, as the stage plans them. Only train-reward's row
    affinity (with its frozen-prefix cache) makes which rows form a step depend on the number of workers."""
    import torch

    from steerray.config import RewardConfig
    from steerray.training.batching import plan_step
    from steerray.training.frozen_prefix import keeps_frozen_prefixes
    from steerray.training.strategy import plan_ray_scaling

    affinity = isinstance(cfg, RewardConfig) and keeps_frozen_prefixes(cfg)
    world = plan_ray_scaling(cfg.scaling, torch.cuda.device_count()).num_workers
    return [mb for rank in range(world) for mb in plan_step(
        lengths, step, global_batch=cfg.train.global_batch_size, micro_batch=cfg.train.micro_batch_size,
        world_size=world, rank=rank, seed=cfg.train.seed, length_grouping=cfg.train.length_grouping,
        row_affinity=affinity).micro_batches]


def step_rows(lengths: Any, cfg: Any) -> list[Any]:
    """Row indices of each optimizer step of steerray's plan (the peer accumulates a step's rows in one process,
    so their order within the step does not matter)."""
    import numpy as np

    return [np.concatenate(stage_micro_batches(np.asarray(lengths), cfg, s)) for s in range(cfg.train.max_steps)]


def steerray_computed(lengths: Any, cfg: Any, multiple_of: int) -> list[int]:
    """Tokens steerray's micro-batches compute per step, padding included (grouped as the stage groups them)."""
    import numpy as np

    lengths = np.asarray(lengths)
    return [sum(-(-int(lengths[mb].max()) // multiple_of) * multiple_of * len(mb)
                for mb in stage_micro_batches(lengths, cfg, s)) for s in range(cfg.train.max_steps)]


@dataclass
class Rows:
    """The stage's training rows, tokenized on the driver by steerray's own functions (what the peer trains on)."""

    peer: list[dict[str, Any]]  # one dataset row per training row
    lengths: list[int]  # steerray's sequence lengths (its plan's input)
    useful: list[int]  # useful tokens per row
    seconds: float  # tokenization time: counted in the peer's end-to-end figure


def sft_rows(cfg: Any, train_file: str) -> Rows:
    from steerray.data.sft import IGNORE_INDEX, STATUS_OK, example_from_json
    from steerray.models.loading import load_tokenizer

    started = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model.name)
    peer, lengths, useful = [], [], []
    for line in Path(train_file).read_text(encoding="utf-8").splitlines():
        status, _, example = example_from_json(line, tokenizer, cfg.model.max_length, cfg.label_attributes)
        if status != STATUS_OK or example is None:
            continue
        # steerray stores the shifted pair (ids[:-1], ids[1:] masked); TRL wants the ids and a per-token mask
        # (token t carries loss iff it is a trained target). A last target without loss is dropped, as it adds
        # nothing to the loss either way.
        ids, labels = list(example.input_ids), list(example.labels)
        mask = [0] + [int(label != IGNORE_INDEX) for label in labels]
        if labels[-1] != IGNORE_INDEX:
            ids.append(labels[-1])
        else:
            mask.pop()
        peer.append({"input_ids": ids, "completion_mask": mask})
        lengths.append(len(example.input_ids))
        useful.append(example.trained_tokens)
    return Rows(peer, lengths, useful, time.perf_counter() - started)


def reward_rows(cfg: Any, train_file: Path) -> Rows:
    from steerray.models.loading import load_tokenizer
    from steerray.training import reward_data as rd

    started = time.perf_counter()
    split = rd.read_split(train_file, rd.REGRESSION, cfg.attributes, loss=cfg.loss)
    tokenizer = load_tokenizer(cfg.model.name)
    raw = tokenizer([r["text"] for r in split.rows], add_special_tokens=False)["input_ids"]
    ids, _ = rd.left_truncate(raw, cfg.model.max_length)  # the stage's truncation: the read-out token survives
    missing = sum(v == -100 for r in split.rows for v in r["label"])
    if missing:
        # HF's regression loss is a plain MSE: it would train these cells towards -100.
        print(f"warning: {missing} label cells are missing (-100); the HF Trainer peer trains on them as targets")
    peer = [{"input_ids": x.tolist(), "labels": r["label"]} for x, r in zip(ids, split.rows, strict=True)]
    return Rows(peer, [len(x) for x in ids], [len(x) for x in ids], time.perf_counter() - started)


# --------------------------------------------------------------------------------------------------
# The two sides
# --------------------------------------------------------------------------------------------------

def run_steerray(stage: str, cfg: Any, computed: list[int]) -> Run:
    from steerray.stages import execute

    started = time.perf_counter()
    summary = execute(stage, cfg)
    run = Run("steerray", str(summary.get("precision")), wall_s=time.perf_counter() - started,
              trainable=summary.get("trainable_params"), computed=computed, workers=summary.get("world_size") or 1)
    for line in (Path(cfg.out) / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("split") != "train":
            continue
        run.seconds.append(row["tokens"] / row["tokens_per_s"])  # the loop's own per-step window
        run.useful.append(row["units"] if stage == "sft" else row["tokens"])  # SFT units: trained tokens
        run.real.append(row["tokens"])
        run.losses.append(row["loss"])
    return run


def peer_arguments(cfg: Any, precision: str, out: Path) -> dict[str, Any]:
    """TrainingArguments shared by both peers: steerray's optimizer, batch, steps and seed, nothing saved on the way."""
    import dataclasses

    import torch
    from transformers import TrainingArguments

    train, optim = cfg.train, cfg.optim
    # transformers 5.x renamed gradient_checkpointing (TRL defaults it to True) to activation_checkpointing.
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return dict(
        output_dir=str(out), max_steps=train.max_steps, per_device_train_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.global_batch_size // train.micro_batch_size,
        learning_rate=optim.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0], adam_beta2=optim.betas[1], adam_epsilon=1e-8, max_grad_norm=optim.grad_clip,
        bf16=precision == "bf16", fp16=False, use_cpu=not torch.cuda.is_available(),
        **{checkpointing: cfg.model.gradient_checkpointing},
        train_sampling_strategy="sequential",  # the rows come in steerray's step order
        seed=train.seed, logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0)


def peft_lora(cfg: Any, task_type: str, model: Any, trainable: tuple[str, ...] = ()) -> Any:
    """The peer's peft LoRA, as steerray's: same rank, alpha, dropout, modules and layers."""
    from peft import LoraConfig as PeftLoraConfig

    from steerray.training.strategy import lora_target_modules

    lora = cfg.lora
    targets: Any = lora.target_modules  # peft's own "all-linear" leaves out the output layer, as steerray's does
    layers = None
    if lora.last_layers:
        # peft takes layers_to_transform only with module names, not with "all-linear": spell them out.
        targets = lora_target_modules(model, lora, trainable)
        count = model.config.num_hidden_layers
        layers = list(range(max(0, count - lora.last_layers), count))
    return PeftLoraConfig(task_type=task_type, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=targets, layers_to_transform=layers, bias="none")


def trainable_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_quietly(trainer: Any) -> None:
    """``trainer.train()`` without the per-step log lines (the losses stay in ``state.log_history``)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.train()


def run_trl_sft(cfg: Any, rows: Rows, order: list[Any], precision: str, out: Path) -> Run:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    from steerray.models.loading import resolve_model

    run = Run("TRL", precision)
    meter = StepMeter(run, lambda inputs: (inputs["labels"][:, 1:] != -100).sum())  # the model shifts labels

    started = time.perf_counter()
    path = resolve_model(cfg.model.name)
    set_seed(cfg.train.seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # fp32 master weights, as steerray
    dataset = Dataset.from_list([rows.peer[i] for step in order for i in step])
    trainer = meter.metered(SFTTrainer)(
        model=model,
        args=SFTConfig(**peer_arguments(cfg, precision, out), max_length=cfg.model.max_length,
                       completion_only_loss=True, packing=False, padding_free=False),
        train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=peft_lora(cfg, "CAUSAL_LM", model) if cfg.lora.enabled else None, callbacks=[meter.callback()])
    run.trainable = trainable_params(trainer.model)
    train_quietly(trainer)
    trainer.save_model(str(out / "model"))
    run.wall_s = time.perf_counter() - started + rows.seconds
    run.losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return run


def run_hf_reward(cfg: Any, rows: Rows, order: list[Any], precision: str, out: Path) -> Run:
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from steerray.models.loading import expected_new_head, resolve_model

    run = Run("HF", precision)
    meter = StepMeter(run, lambda inputs: inputs["attention_mask"].sum())

    started = time.perf_counter()
    path = resolve_model(cfg.model.name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(cfg.train.seed)  # as steerray's workers do before building the model: the same fresh head
    with expected_new_head():  # the fresh head is reported as missing weights: it is meant to be
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(cfg.attributes), problem_type="regression", dtype=torch.float32,
            pad_token_id=tokenizer.pad_token_id)
    # The model's forward takes **kwargs, so Trainer passes num_items_in_batch and skips its division by the
    # accumulation steps, but the regression loss ignores it and returns a per-micro-batch mean: loss and gradient
    # would be gradient_accumulation_steps times too large (transformers 5.x; Adam hides most of it, the logged
    # loss does not). Saying the model takes no loss kwargs restores Trainer's own averaging.
    model.accepts_loss_kwargs = False
    if cfg.lora.enabled:
        from peft import get_peft_model

        # task_type SEQ_CLS keeps the head out of LoRA and trains it in full (peft's modules_to_save).
        model = get_peft_model(model, peft_lora(cfg, "SEQ_CLS", model, ("score",)))
    run.trainable = trainable_params(model)
    dataset = Dataset.from_list([rows.peer[i] for step in order for i in step])
    trainer = meter.metered(Trainer)(model=model, args=TrainingArguments(**peer_arguments(cfg, precision, out)),
                                     train_dataset=dataset, data_collator=DataCollatorWithPadding(tokenizer),
                                     callbacks=[meter.callback()])
    train_quietly(trainer)
    trainer.save_model(str(out / "model"))
    run.wall_s = time.perf_counter() - started + rows.seconds
    run.losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return run


# --------------------------------------------------------------------------------------------------
# One stage, both precisions
# --------------------------------------------------------------------------------------------------

def compare(args: argparse.Namespace, stage: str, data: Path, work: Path) -> list[tuple[Run, Run]]:
    from steerray.data.sft import locate_sft_data
    from steerray.training import reward_data as rd

    if stage == "sft":
        train_file = locate_sft_data(data).train[0]
        stage_data = train_file  # a file: no val split, so no validation passes inside the timed stage
    else:
        source, _ = rd.locate_split_files(data, rd.REGRESSION)
        train_file = str(work / "reward-data" / rd.REGRESSION / "train.jsonl")  # train only: no validation pass
        Path(train_file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, train_file)
        stage_data = str(work / "reward-data")
    cfg = stage_config(args, stage, stage_data, work / "probe", "fp32")
    rows = sft_rows(cfg, train_file) if stage == "sft" else reward_rows(cfg, Path(train_file))
    order = step_rows(rows.lengths, cfg)
    planned = [sum(rows.useful[i] for i in step) for step in order]
    computed = steerray_computed(rows.lengths, cfg, multiple_of=8 if stage == "sft" else 1)
    header(args, stage, cfg, len(rows.lengths))
    pairs = []
    for index, precision in enumerate(args.precision):
        cfg = stage_config(args, stage, stage_data, work / f"{stage}-steerray-{precision}", precision)
        # Alternate which side goes first, so neither always gets the colder (or the warmer) machine.
        runs: dict[str, Run] = {}
        for side in ("steerray", "peer") if index % 2 == 0 else ("peer", "steerray"):
            if side == "steerray":
                runs[side] = run_steerray(stage, cfg, computed)
            else:
                peer = run_trl_sft if stage == "sft" else run_hf_reward
                runs[side] = peer(cfg, rows, order, precision, work / f"{stage}-peer-{precision}")
                release_device_memory()  # steerray's workers share the GPU with this process
            if runs[side].useful != planned:  # the same rows at every step, or the ratio compares other work
                print(f"warning: {side} {precision} trained other tokens than planned: {runs[side].useful} vs {planned}")
        pairs.append((runs["steerray"], runs["peer"]))
        report(args, stage, runs["steerray"], runs["peer"])
    return pairs


def release_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def header(args: argparse.Namespace, stage: str, cfg: Any, rows: int) -> None:
    import torch

    lora = cfg.lora
    mode = (f"LoRA r={lora.r} alpha={lora.alpha} on {lora.target_modules}"
            + (f", top {lora.last_layers} layers" if lora.last_layers else "")) if lora.enabled else "full fine-tuning"
    if stage == "sft":
        import trl  # only the SFT peer needs it

        peer = f"TRL {trl.__version__} SFTTrainer (completion_only_loss)"
    else:
        peer = "transformers Trainer + AutoModelForSequenceClassification(problem_type=regression)"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"\n== {'SFT: train-sft' if stage == 'sft' else 'reward: train-reward'} vs {peer}")
    print(f"model {cfg.model.name} ({mode}); {rows} training rows; {cfg.train.max_steps} steps x "
          f"{cfg.train.global_batch_size} sequences <= {cfg.model.max_length} tokens, micro-batch "
          f"{cfg.train.micro_batch_size}; lr {cfg.optim.lr:g} constant; {device}; steerray: "
          f"scaling.num_workers={args.workers}; peer: 1 process, torch threads {torch.get_num_threads()}", flush=True)


def report(args: argparse.Namespace, stage: str, ours: Run, peer: Run) -> None:
    warm = min(args.warmup, len(ours.seconds) - 1)
    unit = "loss-bearing" if stage == "sft" else "unpadded"
    print(f"-- {ours.precision}: useful ({unit}) tokens/s; steady = after {warm} warm-up step(s); steerray xN = N "
          f"Ray Train workers; its end-to-end includes Ray Data and Ray Train start-up")
    print(f"   {'side':10s} {'end-to-end':>11s} {'loop':>9s} {'steady':>9s}  {'wall s':>7s} {'padding':>8s} "
          f"{'trainable':>10s}  loss: first -> final")
    for run in (ours, peer):
        side = f"{run.side} x{run.workers}" if run.side == "steerray" else run.side
        print(f"   {side:10s} {run.e2e():11.1f} {run.rate():9.1f} {run.rate(warm):9.1f}  {run.wall_s:7.1f} "
              f"{run.padding():8.1%} {run.trainable or 0:10,d}  {run.losses[0]:.4f} -> {run.losses[-1]:.4f}")
    print(f"   ratio steerray / {peer.side}: end-to-end {ours.e2e() / peer.e2e():.2f}x, loop "
          f"{ours.rate() / peer.rate():.2f}x, steady {ours.rate(warm) / peer.rate(warm):.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (the demo's), tiny-llama, a folder")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the steady-state figure")
    parser.add_argument("--data", default=None, help="a prepare output folder (conversations/, regression/); with "
                                                      "--only sft also an annotate folder; default: the demo data")
    parser.add_argument("--rows", type=int, default=400, help="demo conversations to prepare (without --data)")
    parser.add_argument("--only", choices=["sft", "reward"], default=None)
    parser.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--workers", default="auto", help="steerray's scaling.num_workers (auto: the preset's "
                                                          "2 on a CPU, one per GPU)")
    parser.add_argument("--threads", type=int, default=None, help="the peer's torch threads (default: torch's)")
    parser.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the embedded Ray (default: all)")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of the presets' LoRA")
    parser.add_argument("--max-length", type=int, default=None, help="default: the preset's")
    parser.add_argument("--global-batch", type=int, default=None, help="default: the preset's")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: the preset's")
    parser.add_argument("--lr", type=float, default=None, help="default: the preset's peak lr")
    args = parser.parse_args()
    args.precision = [p.strip() for p in args.precision.split(",") if p.strip()]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from steerray.runtime import init_ray

    started = time.perf_counter()
    init_ray(num_cpus=args.ray_cpus)
    print(f"Ray start: {time.perf_counter() - started:.1f} s (once per command; in none of the figures below)")
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        work = Path(tmp)
        data = Path(args.data) if args.data else demo_data(args.rows, work / "prepare")
        results = {stage: compare(args, stage, data, work) for stage in ([args.only] if args.only else ["sft", "reward"])}
    # The stages log a lot in between: the ratios once more, together.
    print("\n== summary: steerray / peer, useful tokens/s (end-to-end includes steerray's Ray Data and Ray Train "
          "start-up, not Ray's own start)")
    for stage, pairs in results.items():
        for ours, peer in pairs:
            warm = min(args.warmup, len(ours.seconds) - 1)
            print(f"   {stage:6s} {ours.precision:4s} vs {PEERS[stage]:14s}  end-to-end {ours.e2e() / peer.e2e():5.2f}x  "
                  f"loop {ours.rate() / peer.rate():5.2f}x  steady {ours.rate(warm) / peer.rate(warm):5.2f}x  "
                  f"final loss {ours.losses[-1]:.4f} vs {peer.losses[-1]:.4f}")


if __name__ == "__main__":
    main()
