"""Steerable chat on Ray Serve: OpenAI-compatible routes, a native route, and a playground page.

Routes (OpenAPI docs at ``/docs``):

- ``POST /v1/chat/completions``: the OpenAI chat API (``stream``, ``n``, ``max_tokens``, ``temperature``,
  ``top_p``, ``stop``, ``seed``, ``usage``) plus ``steering``: ``{"verbosity": 0, ...}``, attributes left
  out take the reference's defaults (quality 4, toxicity 0, humor 0, creativity 0, the rest 4).
- ``GET /v1/models``: the one model served.
- ``POST /generate``: ``prompt`` (one user turn) or ``messages``, plus ``steering``; returns the answer and
  the exact prompt that was rendered (to check what the model saw).
- ``GET /steering``: attribute names, defaults and range (the page builds its sliders from it).
- ``GET /health``: model, engine and batching counters (no token needed).
- ``GET /``: the playground page (plain HTML and JavaScript, no build step).

The SteerLM template, the label line and the stop marker are applied here, on the server; answers never
contain template markers. Bad input gets a 4xx in the OpenAI error shape and the replica keeps serving.
"""

# No `from __future__ import annotations`: FastAPI reads these annotations at run time, also in
# functions that cloudpickle ships to Serve replicas by value (string annotations would not resolve there).
import asyncio
import functools
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, StreamingResponse
from ray import serve

from steerray.attributes import ATTRIBUTES, DEFAULT_STEERING, MAX_VALUE, MIN_VALUE, model_label_attributes
from steerray.auth import token_digest
from steerray.config import ServeConfig
from steerray.serving import openai_schema as oa
from steerray.serving.engines import Engine, EngineError, SamplingParams, make_engine
from steerray.serving.http import ApiError, bearer_guard, error_body, install_error_handlers

log = logging.getLogger("steerray.serving.chat")

STATIC_DIR = Path(__file__).resolve().parent / "static"
GENERIC_FOLDER_NAMES = {"model", "final", "hf", "export", "merged"}

# Per replica process: the digest the bearer guard checks (set by the replica's constructor).
_AUTH: dict[str, str | None] = {"digest": None}
require_token = bearer_guard(lambda: _AUTH["digest"])

app = FastAPI(
    title="steerray chat",
    description="SteerLM attribute-conditioned generation: OpenAI-compatible chat with a `steering` extension.",
    version="1",
)
install_error_handlers(app)


@functools.lru_cache(maxsize=1)
def playground_html() -> str:
    return (STATIC_DIR / "playground.html").read_text(encoding="utf-8")


def _api_error(err: oa.RequestError) -> ApiError:
    return ApiError(err.status, err.message, code=err.code, param=err.param)


@serve.deployment
@serve.ingress(app)
class ChatDeployment:
    """Holds one engine; every route renders prompts the same way and streams from it."""

    def __init__(self, model: str, served_name: str, *, engine: str = "auto", max_batch_size: int = 16,
                 batch_wait_ms: float = 10.0, max_model_len: int | None = None, default_max_tokens: int = 256,
                 precision: str = "auto", threads: int | None = None, gpu_memory_utilization: float = 0.85,
                 trust_remote_code: bool = False, token_sha256: str | None = None) -> None:
        self.engine: Engine = make_engine(
            engine, model, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, max_model_len=max_model_len,
            precision=precision, threads=threads, gpu_memory_utilization=gpu_memory_utilization,
            trust_remote_code=trust_remote_code)
        self.served_name = served_name
        self.label_attributes = model_label_attributes(model)  # a model trained on a label subset
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        self.counters = {"requests": 0, "rejected": 0, "failed": 0}
        _AUTH["digest"] = token_sha256

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    # ---- shared steps -----------------------------------------------------------------------------

    def _check_model(self, name: str | None) -> None:
        if name and name != self.served_name:
            raise oa.RequestError(404, f"model {name!r} is not served here; this server serves {self.served_name!r}",
                                  param="model", code="model_not_found")

    def _plan(self, prompt: str, request: oa.SamplingFields, n: int = 1) -> tuple[list[int], list[SamplingParams]]:
        """Token ids of the prompt and one SamplingParams per choice (choice i uses seed + i)."""
        ids = self.engine.encode(prompt)
        max_tokens = oa.answer_budget(len(ids), request.requested_max_tokens(), self.engine.max_model_len,
                                      self.default_max_tokens)
        stops = oa.stop_strings(request.stop_list())
        return ids, [SamplingParams(max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                                    seed=None if request.seed is None else request.seed + i, stop=stops)
                     for i in range(n)]

    async def _complete_all(self, ids: list[int], params: list[SamplingParams]) -> list[Any]:
        try:
            return await asyncio.gather(*(self.engine.complete(ids, p) for p in params))
        except EngineError as err:
            self.counters["failed"] += 1
            raise ApiError(500, str(err), code="engine_error") from None

    # ---- routes -----------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        return HTMLResponse(playground_html())

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.served_name, "engine": self.engine.kind,
                "max_model_len": self.engine.max_model_len, "auth": _AUTH["digest"] is not None,
                "counters": self.counters, "stats": self.engine.stats()}

    @app.get("/steering")
    async def steering(self) -> dict[str, Any]:
        attributes = list(self.label_attributes or ATTRIBUTES)
        return {"attributes": attributes, "defaults": {name: DEFAULT_STEERING[name] for name in attributes}, "min": MIN_VALUE,
                "max": MAX_VALUE, "model": self.served_name}

    @app.get("/v1/models", dependencies=[Depends(require_token)])
    async def models(self) -> dict[str, Any]:
        return oa.models_body(self.served_name, self.engine.max_model_len, self.created)

    @app.post("/v1/chat/completions", dependencies=[Depends(require_token)])
    async def chat_completions(self, request: Request) -> Any:
        self.counters["requests"] += 1
        try:
            body = oa.parse_request(oa.ChatCompletionRequest, await request.body())
            self._check_model(body.model)
            label, steering = oa.resolve_steering(body.steering, self.label_attributes)
            prompt = oa.render_messages(body.messages, label)
            ids, params = self._plan(prompt, body, body.n)
        except oa.RequestError as err:
            self.counters["rejected"] += 1
            raise _api_error(err) from None
        completion_id, created = oa.new_id(), int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream_chunks(completion_id, created, ids, params, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await self._complete_all(ids, params)
        return oa.completion_body(completion_id, self.served_name, [(r.text, r.finish_reason) for r in results],
                                  len(ids), sum(r.completion_tokens for r in results), steering, created)

    async def _stream_chunks(self, completion_id: str, created: int, ids: list[int], params: list[SamplingParams],
                             include_usage: bool) -> AsyncIterator[str]:
        """SSE chunks for every choice as tokens arrive; choices are generated concurrently."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, sampling: SamplingParams) -> None:
            stream = self.engine.stream(ids, sampling)
            try:
                async for event in stream:
                    await queue.put((index, event))
            except EngineError as err:
                await queue.put((index, err))
            finally:
                await stream.aclose()

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(params)]
        try:
            for index in range(len(params)):
                yield oa.sse(oa.chunk_body(completion_id, self.served_name, created, index,
                                           {"role": "assistant", "content": ""}))
            open_choices, completion_tokens = len(params), 0
            while open_choices:
                index, event = await queue.get()
                if isinstance(event, EngineError):
                    self.counters["failed"] += 1
                    yield oa.sse(error_body(500, str(event), code="engine_error"))
                    open_choices -= 1
                    continue
                if event.delta:
                    yield oa.sse(oa.chunk_body(completion_id, self.served_name, created, index,
                                               {"content": event.delta}))
                if event.finish_reason is not None:
                    yield oa.sse(oa.chunk_body(completion_id, self.served_name, created, index, {},
                                               event.finish_reason))
                    completion_tokens += event.completion_tokens
                    open_choices -= 1
            if include_usage:
                yield oa.sse(oa.usage_chunk(completion_id, self.served_name, created, len(ids), completion_tokens))
            yield oa.SSE_DONE
        finally:  # the client went away (or we are done): stop generating for it
            for task in tasks:
                task.cancel()

    @app.post("/generate", dependencies=[Depends(require_token)])
    async def generate(self, request: Request) -> dict[str, Any]:
        self.counters["requests"] += 1
        try:
            body = oa.parse_request(oa.GenerateRequest, await request.body())
            label, steering = oa.resolve_steering(body.steering, self.label_attributes)
            prompt = oa.render_generate(body, label)
            ids, params = self._plan(prompt, body)
        except oa.RequestError as err:
            self.counters["rejected"] += 1
            raise _api_error(err) from None
        (result,) = await self._complete_all(ids, params)
        return {"text": result.text, "finish_reason": result.finish_reason, "prompt": prompt, "label": label,
                "steering": steering, "model": self.served_name,
                "usage": oa.usage_body(len(ids), result.completion_tokens)}


# --------------------------------------------------------------------------------------------------
# Building and starting the application
# --------------------------------------------------------------------------------------------------

def cpu_threads(replicas: int) -> int:
    """Torch threads per replica: this machine's CPUs shared by the replicas (Ray would give each 1)."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, available // max(1, replicas))


def served_name(model: str) -> str:
    """The id clients use: an alias or hub id as given; a folder's name (with its parent if generic)."""
    from steerray.models.loading import ALIASES

    path = Path(model).expanduser()
    if model in ALIASES or not path.exists():
        return model
    path = path.resolve()
    return f"{path.parent.name}/{path.name}" if path.name in GENERIC_FOLDER_NAMES else path.name


def model_source(model: str) -> str:
    """Check the model name now (a clear error before Serve starts); local folders become absolute."""
    from steerray.models.loading import ALIASES, resolve_model

    resolved = resolve_model(model)
    return model if model in ALIASES else str(Path(resolved).resolve()) if Path(resolved).exists() else resolved


def build_app(config: ServeConfig, token: str | None = None, *, use_gpu: bool = False) -> Any:
    """The Serve application for ``config``; ``token`` (if any) is kept only as its SHA-256 digest."""
    if config.engine == "vllm" and not use_gpu:
        raise EngineError("engine 'vllm' needs a GPU in the Ray cluster; use --engine transformers or auto")
    threads = config.threads_per_replica
    if threads is None and not use_gpu:
        threads = cpu_threads(config.replicas)
    deployment = ChatDeployment.options(
        name="ChatModel",
        num_replicas=config.replicas,
        ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": 1 if use_gpu else 0},
        max_ongoing_requests=max(config.max_ongoing_requests, config.max_batch_size),
    )
    return deployment.bind(
        model_source(config.model), config.served_name or served_name(config.model), engine=config.engine,
        max_batch_size=config.max_batch_size, batch_wait_ms=config.batch_wait_ms, max_model_len=config.max_model_len,
        default_max_tokens=config.default_max_tokens, precision=config.precision, threads=threads,
        gpu_memory_utilization=config.gpu_memory_utilization, trust_remote_code=config.trust_remote_code,
        token_sha256=token_digest(token))


def server_url(config: ServeConfig) -> str:
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    return f"http://{host}:{config.port}{config.route_prefix.rstrip('/')}"


def start_chat_server(config: ServeConfig, token: str | None = None) -> str:
    """Start Serve's HTTP proxy on ``config.host:port`` (Ray must be up), deploy, and return the URL.

    Returns once the replicas are healthy. Stop with ``serve.delete(config.app_name)`` or ``serve.shutdown()``.
    """
    import ray

    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    application = build_app(config, token, use_gpu=use_gpu)  # checks the model name before anything starts
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(application, name=config.app_name, route_prefix=config.route_prefix)
    return server_url(config)
