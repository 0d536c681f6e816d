"""Where and how a model trains: device, precision, backend, FSDP2 / DDP / DeepSpeed, LoRA, export.

Driver side, before any worker starts::

    plan = plan_ray_scaling(cfg.scaling)            # num_workers, use_gpu from the cluster, never hard-coded
    TorchTrainer(..., scaling_config=plan.scaling_config, torch_config=plan.torch_config)

Worker side (or a plain single process: everything degrades to world size 1)::

    strategy = resolve_strategy(cfg.scaling)
    prepared = prepare_model(model, strategy, cfg.lora, trainable_modules=["score"], wrap=reward_readout)
    stepper = build_optimizer_and_schedule(prepared, cfg.optim, max_steps, accumulation_steps)
    ...
    export_model(prepared, out / "model", tokenizer)  # collective: every rank calls it, rank 0 writes

The module you call is ``prepared.module`` (sharded/wrapped); the Hugging Face (or peft) model inside it is
``prepared.model``. FSDP2 shards each decoder layer, then the root, so always call the root module: calling a
submodule directly would skip the root's all-gather of embeddings, final norm and head.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerray.config import ConfigError, LoraConfig, OptimConfig, ScalingConfig
from steerray.errors import SteerrayError
from steerray.models.precision import cpu_has_amx, resolve_precision
from steerray.runtime import cluster_gpus
from steerray.training.schedule import build_optimizer, build_scheduler, check_schedule

log = logging.getLogger("steerray")

KINDS = ("fsdp", "ddp", "deepspeed", "single")
# Output layers that LoRA must never adapt: they are trained in full (modules_to_save) or not at all.
OUTPUT_LAYER_NAMES = ("lm_head", "score", "classifier", "embed_out", "output")


class StrategyError(SteerrayError, RuntimeError):
    """A requested strategy that cannot run here (e.g. DeepSpeed not installed)."""


# --------------------------------------------------------------------------------------------------
# Driver side: how many workers, GPUs or not
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RayScalingPlan:
    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    backend: str  # "nccl" on GPU, "gloo" on CPU
    placement_strategy: str  # of the workers' placement group: scaling.placement_strategy

    @property
    def scaling_config(self) -> Any:
        import ray.train

        return ray.train.ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu,
                                       resources_per_worker=self.resources_per_worker,
                                       placement_strategy=self.placement_strategy)

    @property
    def torch_config(self) -> Any:
        from ray.train.torch import TorchConfig

        return TorchConfig(backend=self.backend)


def plan_ray_scaling(cfg: ScalingConfig, gpus_in_cluster: int | None = None) -> RayScalingPlan:
    """Workers and devices from the config and the cluster (``use_gpu=True`` without GPUs would hang Ray)."""
    if gpus_in_cluster is None:
        gpus_in_cluster = cluster_gpus()
    use_gpu = gpus_in_cluster > 0 if cfg.use_gpu == "auto" else bool(cfg.use_gpu)
    if use_gpu and gpus_in_cluster == 0:
        raise ConfigError("scaling.use_gpu=true but the Ray cluster has no GPU (Ray would wait forever); "
                          "use scaling.use_gpu=auto")
    if cfg.num_workers == "auto":
        num_workers = gpus_in_cluster if use_gpu else 2
    else:
        num_workers = int(cfg.num_workers)
    if num_workers < 1:
        raise ConfigError("scaling.num_workers must be >= 1")
    if use_gpu and num_workers > gpus_in_cluster:
        raise ConfigError(f"scaling.num_workers={num_workers} but the cluster has {gpus_in_cluster} GPU(s)")
    # CPUs per worker stay fractional on CPU boxes so Ray Data keeps a core to feed the workers.
    return RayScalingPlan(num_workers, use_gpu, {"CPU": cfg.cpus_per_worker}, "nccl" if use_gpu else "gloo",
                          cfg.placement_strategy)


# --------------------------------------------------------------------------------------------------
# Worker side: the strategy of this process
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Strategy:
    kind: str  # one of KINDS
    device: Any  # torch.device
    precision: str  # "bf16" or "fp32"
    world_size: int = 1
    rank: int = 0
    deepspeed_stage: int = 2

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def compute_dtype(self) -> Any:
        import torch

        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast where the wrapper does not cast itself (DDP / single); FSDP2 casts via its policy."""
        import torch

        if self.precision == "bf16" and self.kind in ("ddp", "single"):
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Sum floats over all ranks (one collective); identity on a single process."""
        if not self.distributed:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(tensor)
        return tensor.cpu().tolist()

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def _comm_device(self) -> Any:
        import torch

        return self.device if self.device.type == "cuda" else torch.device("cpu")


def _fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def deepspeed_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def resolve_strategy(cfg: ScalingConfig | None = None) -> Strategy:
    """The strategy of the calling process: inside a Ray Train worker, or a plain single process."""
    import torch.distributed as dist

    cfg = cfg or ScalingConfig()
    distributed = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    device = _worker_device()
    precision = resolve_precision(cfg.precision, device)
    kind: str = cfg.strategy
    if kind == "deepspeed" and not deepspeed_available():
        raise StrategyError("scaling.strategy=deepspeed but DeepSpeed is not installed: "
                            "`pip install 'steerray[deepspeed]'`, or use fsdp / ddp")
    if kind == "auto":
        kind = "fsdp" if _fsdp2_available() else "ddp"
    if kind == "fsdp" and not _fsdp2_available():
        log.warning("FSDP2 (torch.distributed.fsdp.fully_shard) is not available in this torch; using DDP")
        kind = "ddp"
    if world_size == 1 and kind in ("fsdp", "ddp"):
        kind = "single"  # nothing to shard or synchronise
    return Strategy(kind=kind, device=device, precision=precision, world_size=world_size, rank=rank,
                    deepspeed_stage=cfg.deepspeed_stage)


def _worker_device() -> Any:
    import sys

    import torch

    # A Ray Train worker has imported ray.train already; elsewhere don't pay for importing it.
    if "ray.train" in sys.modules:
        try:
            import ray.train
            import ray.train.torch

            if ray.train.get_context() is not None:
                return ray.train.torch.get_device()
        except Exception:  # noqa: BLE001 - not inside a Ray Train worker
            pass
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Model preparation: LoRA, gradient checkpointing, sharding
# --------------------------------------------------------------------------------------------------

@dataclass
class PreparedModel:
    module: Any  # what to call: FSDP2 root / DDP wrapper / DeepSpeed engine / plain module
    model: Any  # the Hugging Face (or peft) model inside, unsharded view for export
    strategy: Strategy
    lora: LoraConfig | None = None
    trainable_modules: tuple[str, ...] = ()
    peft_config: Any = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def is_peft(self) -> bool:
        return self.peft_config is not None

    def base_hf_model(self) -> Any:
        """The transformers model (peft unwrapped; LoRA layers stay injected in place)."""
        return self.model.get_base_model() if self.is_peft else self.model

    def trainable_parameters(self) -> list[Any]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count of the full (unsharded) model."""
        return sum(_full_numel(p) for p in self.model.parameters() if p.requires_grad or not trainable_only)

    def flops_parameters(self) -> int:
        """Parameters that cost matmul FLOPs per token: all but the input embedding lookup table.

        An output projection (lm_head) is counted even when tied to the embeddings: it is a real matmul.
        """
        base = self.base_hf_model()
        total = self.num_parameters()
        embed = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
        output = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if embed is not None:
            total -= _full_numel(embed.weight)
        if output is not None and embed is not None and output.weight is embed.weight:
            total += _full_numel(output.weight)  # tied: removed with the embeddings, but still a matmul
        return total

    def train_flops_per_token(self) -> float:
        """Training FLOPs per token: forward ``2N``, input gradients ``2N'`` through the layers above the lowest
        trainable one (the backward pass stops there), weight gradients ``2T`` for trainable matmul weights.

        ``N`` is :meth:`flops_parameters`; full fine-tuning gives the usual ``6N``. Attention is ignored.
        """
        base = self.base_hf_model()
        n = self.flops_parameters()
        layers = decoder_layers(base)
        first = next((i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())),
                     len(layers))
        below = sum(_full_numel(p) for layer in layers[:first] for p in layer.parameters())
        embed = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
        embed_ids = {id(embed.weight)} if embed is not None else set()
        trainable = sum(_full_numel(p) for p in base.parameters() if p.requires_grad and id(p) not in embed_ids)
        return 2.0 * n + 2.0 * (n - below) + 2.0 * min(trainable, n)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()


def _full_numel(param: Any) -> int:
    # A DTensor shard reports its local numel; the global shape is what FLOP counts need.
    shape = getattr(param, "shape", None)
    return int(math.prod(shape)) if shape is not None else int(param.numel())


def decoder_layers(model: Any) -> list[Any]:
    """The repeated transformer blocks (HF ``_no_split_modules`` classes), in order."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:  # fall back to the common `model.layers` / `transformer.h` lists
        import torch.nn as nn

        for candidate in ("model.layers", "transformer.h", "gpt_neox.layers", "layers"):
            node = base
            for part in candidate.split("."):
                node = getattr(node, part, None)
            if isinstance(node, nn.ModuleList) and len(node):
                return list(node)
    return layers


def lora_target_modules(model: Any, lora: LoraConfig, trainable_modules: Sequence[str] = ()) -> list[str]:
    """Leaf names of the Linear layers to adapt; "all-linear" excludes output heads and full-trained modules."""
    if lora.target_modules != "all-linear":
        return list(lora.target_modules)
    import torch.nn as nn

    excluded = set(OUTPUT_LAYER_NAMES) | set(trainable_modules)
    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            parts = full_name.split(".")
            if not any(part in excluded for part in parts):
                names.add(parts[-1])
    if not names:
        raise ConfigError("lora.target_modules=all-linear found no Linear layers to adapt in this model")
    return sorted(names)


def apply_lora(model: Any, lora: LoraConfig, trainable_modules: Sequence[str] = ()) -> tuple[Any, Any]:
    """Wrap ``model`` with peft LoRA; ``trainable_modules`` (e.g. the reward head) stay fully trainable.

    They go to peft's ``modules_to_save``, so the adapter save and the merged export both carry them (the
    classic pitfall is a LoRA reward model whose freshly initialised head is lost at save time).
    """
    from peft import LoraConfig as PeftLoraConfig

    layer_kwargs: dict[str, Any] = {}
    if lora.last_layers is not None:
        count = len(decoder_layers(model))
        if count == 0:
            raise ConfigError("lora.last_layers: no decoder layers found in this model")
        layer_kwargs["layers_to_transform"] = list(range(max(0, count - lora.last_layers), count))
    peft_config = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora_target_modules(model, lora, trainable_modules),
        modules_to_save=list(trainable_modules) or None, bias="none", **layer_kwargs,
    )
    return _wrap_peft(model, peft_config), peft_config


def _wrap_peft(model: Any, peft_config: Any) -> Any:
    """``get_peft_model`` for training and for export alike."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        # peft (0.21) reads transformers' deprecated `is_gradient_checkpointing`: noise in every LoRA run's log.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_config)


def training_attention(requested: str, strategy: Strategy) -> str | None:
    """The attention kernel to train with, None for the model's own default (SDPA in transformers).

    ``auto`` picks eager attention (plain matmuls and softmax) on a CPU training in bf16 without AMX, where
    torch's CPU flash attention is the slower of the two, its backward pass above all (profiled on a 2-core
    Zen 4 with AVX512-BF16, the demo's SFT micro-batch of 2 x 320 tokens, one thread: forward and backward
    2.44 s eager against 2.75 s SDPA, 1.13x; in fp32 SDPA was 5% faster). fp32, GPUs and AMX CPUs (not
    measured against eager) keep the model's default.
    """
    if requested != "auto":
        return requested
    if strategy.device.type == "cpu" and strategy.precision == "bf16" and not cpu_has_amx():
        return "eager"
    return None


def use_attention(model: Any, attention: str | None, strategy: Strategy) -> None:
    if attention is None:
        return
    if not hasattr(model, "set_attn_implementation"):
        log.warning("attention=%s asked for, but %s cannot switch its attention kernel", attention,
                    type(model).__name__)
        return
    model.set_attn_implementation(attention)
    if strategy.is_rank0:
        log.info("attention kernel: %s", attention)


def prepare_model(model: Any, strategy: Strategy, lora: LoraConfig | None = None, *,
                  trainable_modules: Sequence[str] = (), gradient_checkpointing: bool = False,
                  wrap: Callable[[Any], Any] | None = None, attention: str = "auto") -> PreparedModel:
    """Attention kernel, LoRA (optional), gradient checkpointing, then shard/wrap for the strategy.

    ``wrap`` turns the HF/peft model into the module whose forward you call (e.g. a reward read-out); it
    becomes the FSDP2 root, so everything outside the decoder layers is gathered by one root hook.
    Deepspeed wraps later, in :func:`build_optimizer_and_schedule` (it owns the optimizer).
    """
    use_attention(model, training_attention(attention, strategy), strategy)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
    peft_config = None
    if lora is not None and lora.enabled:
        model, peft_config = apply_lora(model, lora, trainable_modules)
    if strategy.precision == "bf16" and strategy.kind in ("ddp", "single"):
        frozen_matmuls_to_bf16(model)
    root = wrap(model) if wrap is not None else model
    prepared = PreparedModel(module=root, model=model, strategy=strategy,
                             lora=lora if peft_config is not None else None,
                             trainable_modules=tuple(trainable_modules), peft_config=peft_config)
    if strategy.kind == "fsdp":
        _shard_fsdp2(root, model, strategy)
    elif strategy.kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        root.to(strategy.device)
        device_ids = [strategy.device.index] if strategy.device.type == "cuda" else None
        prepared.module = DistributedDataParallel(root, device_ids=device_ids)
    else:  # single process, or DeepSpeed (wrapped with its optimizer)
        root.to(strategy.device)
    trainable = sum(_full_numel(p) for p in model.parameters() if p.requires_grad)
    if strategy.is_rank0:
        log.info("model prepared: strategy=%s precision=%s world=%d trainable=%s / %s params%s",
                 strategy.kind, strategy.precision, strategy.world_size, f"{trainable:,}",
                 f"{prepared.num_parameters():,}", " (LoRA)" if peft_config is not None else "")
    return prepared


def frozen_matmuls_to_bf16(model: Any) -> int:
    """Store the weights of frozen Linear layers (LoRA's base layers, frozen lower layers) in bf16.

    Under autocast a matmul computes in bf16 anyway; an fp32 weight is re-cast on every call, a bf16 one is
    used as it is. Trainable weights stay fp32 (the update of one step is often below half a bf16 ulp), and so
    do embeddings, norms and every weight shared with the input embedding (a tied lm_head): the residual
    stream keeps fp32. Returns how many weights were cast. DDP and single process only: FSDP2 casts per unit.
    """
    import torch

    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = {id(embed.weight)} if embed is not None else set()
    cast = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        for param in (module.weight, module.bias):
            if param is not None and not param.requires_grad and id(param) not in tied and param.dtype != torch.bfloat16:
                param.data = param.data.to(torch.bfloat16)
                cast += 1
    return cast


def _shard_fsdp2(root: Any, model: Any, strategy: Strategy) -> None:
    """``fully_shard`` each decoder layer, then the root (the layout FSDP2's docs recommend)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(strategy.device.type, (strategy.world_size,))
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if strategy.precision == "bf16" else MixedPrecisionPolicy()
    layers = decoder_layers(model)
    if not layers:
        log.warning("no decoder layers found to shard; FSDP2 shards the whole model as one unit")
    # Ranks that built the model on the meta device (load_on_rank0) get rank 0's weights after sharding.
    empty = any(p.is_meta for p in root.parameters())
    from_rank0 = strategy.all_reduce_sum([float(empty)])[0] > 0
    if from_rank0 and (empty == strategy.is_rank0):
        raise StrategyError("load_on_rank0: rank 0 must hold the real weights and every other rank a meta model")
    full_state = root.state_dict() if from_rank0 and strategy.is_rank0 else {}
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    fully_shard(root, mesh=mesh, mp_policy=mp_policy)
    if from_rank0:
        _receive_from_rank0(root, full_state, strategy)


def _receive_from_rank0(root: Any, full_state: dict[str, Any], strategy: Strategy) -> None:
    """Fill the shards of every rank from rank 0's full state dict; copy buffers (rotary tables) too."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    device = strategy.device
    if not strategy.is_rank0:
        root.to_empty(device=device)
    set_model_state_dict(root, full_state, options=StateDictOptions(full_state_dict=True,
                                                                    broadcast_from_rank0=True))
    # Buffers are not sharded, and non-persistent ones (rotary inv_freq) are in no state dict.
    comm = device if device.type == "cuda" else torch.device("cpu")
    for _name, buffer in root.named_buffers():
        data = buffer.data.to(comm)
        dist.broadcast(data, src=0)
        buffer.data.copy_(data)


# --------------------------------------------------------------------------------------------------
# Optimisation: backward / step with gradient accumulation, for every strategy
# --------------------------------------------------------------------------------------------------

@dataclass
class StepResult:
    grad_norm: float
    lr: float


class Stepper:
    """One optimizer step over ``accumulation_steps`` micro-batches; hides FSDP2/DDP/DeepSpeed differences.

    Usage per step::

        for i, micro in enumerate(micro_batches):
            with stepper.micro_step(last=i == len(micro_batches) - 1):
                loss = ...                  # already normalised for the whole global batch
                stepper.backward(loss)
        result = stepper.step()             # clip, optimizer step, schedule step, zero grads
    """

    def __init__(self, prepared: PreparedModel, optimizer: Any, scheduler: Any, grad_clip: float,
                 accumulation_steps: int = 1):
        self.prepared = prepared
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.grad_clip = grad_clip
        self.accumulation_steps = accumulation_steps

    @property
    def engine(self) -> Any:
        return self.prepared.module

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        """Synchronise gradients across workers only on the last micro-batch of a step (saves traffic)."""
        kind = self.prepared.strategy.kind
        if kind == "ddp" and not last:
            with self.prepared.module.no_sync():
                yield
        elif kind == "fsdp":
            self.prepared.module.set_requires_gradient_sync(last)
            yield
        else:
            yield

    def backward(self, loss: Any) -> None:
        if self.prepared.strategy.kind == "deepspeed":
            # DeepSpeed divides by its gradient_accumulation_steps (our losses are already global means),
            # and wants step() after every micro-batch: it only updates at the accumulation boundary.
            self.engine.backward(loss * self.accumulation_steps)
            self.engine.step()
        else:
            loss.backward()

    def step(self) -> StepResult:
        import torch

        if self.prepared.strategy.kind == "deepspeed":  # already stepped in backward() at the boundary
            norm = self.engine.get_global_grad_norm()
            lr = float(self.engine.get_lr()[0])
            return StepResult(float(norm) if norm is not None else float("nan"), lr)
        params = self.prepared.trainable_parameters()
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor norm
            norm = norm.full_tensor()
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(float(norm), lr)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def build_optimizer_and_schedule(prepared: PreparedModel, optim: OptimConfig, max_steps: int,
                                 accumulation_steps: int = 1) -> Stepper:
    """AdamW (no decay on biases/norms) + NeMo CosineAnnealing, wrapped in a :class:`Stepper`."""
    check_schedule(optim, max_steps)
    if prepared.strategy.kind == "deepspeed":
        return _deepspeed_stepper(prepared, optim, max_steps, accumulation_steps)
    optimizer = build_optimizer(prepared.module, optim)
    scheduler = build_scheduler(optimizer, optim, max_steps)
    return Stepper(prepared, optimizer, scheduler, optim.grad_clip, accumulation_steps)


def _deepspeed_stepper(prepared: PreparedModel, optim: OptimConfig, max_steps: int,
                       accumulation_steps: int) -> Stepper:
    """ZeRO stage 1-3 through ``deepspeed.initialize``; our AdamW and schedule, its engine."""
    import deepspeed

    strategy = prepared.strategy
    optimizer = build_optimizer(prepared.module, optim)
    scheduler = build_scheduler(optimizer, optim, max_steps)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,  # batches are built by us; only the accumulation count matters
        "gradient_accumulation_steps": accumulation_steps,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": strategy.deepspeed_stage},
        "bf16": {"enabled": strategy.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=prepared.module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        dist_init_required=False)
    prepared.module = engine
    return Stepper(prepared, optimizer, scheduler, optim.grad_clip, accumulation_steps)


# --------------------------------------------------------------------------------------------------
# Export: full state dict on every rank, a Hugging Face folder from rank 0
# --------------------------------------------------------------------------------------------------

def gather_full_state_dict(prepared: PreparedModel) -> dict[str, Any]:
    """The full (unsharded) CPU state dict of ``prepared.model``; a collective: call it on every rank.

    Rank 0 gets the tensors; other ranks may get an empty dict (FSDP2 with CPU offload).
    """
    strategy = prepared.strategy
    root = prepared.module
    if strategy.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif strategy.kind == "deepspeed":
        full = _deepspeed_full_state_dict(prepared)
        root = root.module
    else:
        if strategy.kind == "ddp":
            root = root.module
        # A copy, not a view: on CPU `.cpu()` shares storage, and merging LoRA into the export copy
        # would then add the adapter delta into the live model's base weights too.
        full = {k: v.detach().to("cpu", copy=True) for k, v in root.state_dict().items()}
    prefix = _child_prefix(root if strategy.kind != "fsdp" else prepared.module, prepared.model)
    return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}


def _child_prefix(root: Any, child: Any) -> str:
    if root is child:
        return ""
    for name, module in root.named_modules():
        if module is child:
            return name + "."
    raise StrategyError("the prepared model is not inside its wrapper module")


def _deepspeed_full_state_dict(prepared: PreparedModel) -> dict[str, Any]:
    engine = prepared.module
    if prepared.strategy.deepspeed_stage == 3:
        import deepspeed

        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
    return {k: v.detach().to("cpu", copy=True) for k, v in engine.module.state_dict().items()}  # no shared storage


def _plain_class(model: Any) -> type:
    """The model's own class (FSDP2 swaps in a dynamic ``FSDP<Class>`` subclass)."""
    from torch.distributed.fsdp import FSDPModule

    for cls in type(model).__mro__:
        if not issubclass(cls, FSDPModule):
            return cls
    return type(model)


def build_plain_copy(prepared: PreparedModel, state_dict: dict[str, Any]) -> Any:
    """An unsharded CPU copy of ``prepared.model`` holding ``state_dict`` (built on meta, no double memory)."""
    import torch

    base = prepared.base_hf_model()
    cls = _plain_class(base)
    with torch.device("meta"):
        fresh = cls(base.config)
    if prepared.is_peft:
        fresh = _wrap_peft(fresh, prepared.peft_config)
    missing, unexpected = fresh.load_state_dict(state_dict, strict=False, assign=True)
    # Tied weights (embeddings/lm_head) appear once in the state dict; retie instead of failing.
    hf = fresh.get_base_model() if prepared.is_peft else fresh
    if missing and getattr(hf.config, "tie_word_embeddings", False):
        hf.tie_weights()
        missing = [k for k in missing if "lm_head" not in k]
    if missing or unexpected:
        raise StrategyError(f"export: state dict does not fit the model (missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]})")
    _materialise_meta_buffers(fresh, base)
    return fresh


def _materialise_meta_buffers(fresh: Any, base: Any) -> None:
    """Non-persistent buffers (rotary ``inv_freq``) are not in state dicts: copy them from the live model."""
    import torch

    live = dict(base.named_buffers())
    hf = fresh.get_base_model() if hasattr(fresh, "get_base_model") else fresh
    for name, buf in list(hf.named_buffers()):
        if buf.is_meta:
            module_name, _, attr = name.rpartition(".")
            module = hf.get_submodule(module_name) if module_name else hf
            source = live.get(name)
            value = source.detach().to("cpu", copy=True) if source is not None and not source.is_meta \
                else torch.zeros(buf.shape, dtype=buf.dtype)
            module.register_buffer(attr, value, persistent=False)


def export_model(prepared: PreparedModel, out_dir: str | Path, tokenizer: Any = None, *,
                 merge_lora: bool | None = None, dtype: Any = None) -> Path | None:
    """Write a Hugging Face folder (safetensors) of the trained model; collective, rank 0 writes.

    LoRA runs are merged into plain weights (``merge_lora`` defaults to ``lora.merge_on_export``) or saved as
    a peft adapter whose ``modules_to_save`` (the reward head) travel with it. ``dtype`` defaults to
    :func:`export_dtype` (bf16 after bf16 training on a GPU, else fp32). Returns the folder on rank 0, None elsewhere.
    """
    state = gather_full_state_dict(prepared)
    strategy = prepared.strategy
    out = Path(out_dir)
    if strategy.is_rank0:
        merge = prepared.lora.merge_on_export if merge_lora is None and prepared.lora else bool(merge_lora)
        model = build_plain_copy(prepared, state)
        model = model.float()  # merge in fp32: a LoRA delta added to a bf16 weight would mostly round away
        if prepared.is_peft and merge:
            model = model.merge_and_unload()
        model = model.to(dtype or export_dtype(strategy))

        def write(folder: Path) -> None:
            model.save_pretrained(folder, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)

        write_folder_atomically(out, write)
        del model
    strategy.barrier()
    return out if strategy.is_rank0 else None


def export_dtype(strategy: Strategy) -> Any:
    """bf16 where it trained on a GPU in bf16 (the usual checkpoint format there); fp32 on a CPU, where the
    consumers (serve, evaluate) pick their own compute precision when they load it."""
    import torch

    return strategy.compute_dtype if strategy.device.type == "cuda" else torch.float32


def write_folder_atomically(out: Path, write: Callable[[Path], None]) -> Path:
    """Fill a sibling temp folder with ``write`` then swap it in: a reader never sees half a model."""
    import os
    import shutil

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
