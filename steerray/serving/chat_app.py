"""Steerable chat on Ray Serve: OpenAI-compatible routes, a native route, and a playground page.

Routes (the OpenAPI schema at ``/openapi.json``; no ``/docs`` page: FastAPI's loads Swagger UI from a
CDN, and no third-party script may run on the origin that holds the playground's token):

- ``POST /v1/chat/completions``: the OpenAI chat API (``stream``, ``n``, ``max_tokens``, ``temperature``,
  ``top_p``, ``stop``, ``seed``, ``usage``; vLLM's ``min_tokens``) plus ``steering``:
  ``{"verbosity": 0, ...}``, attributes left out take the reference's defaults (quality 4, toxicity 0,
  humor 0, creativity 0, the rest 4).
- ``GET /v1/models``: the one model served.
- ``POST /generate``: ``prompt`` (one user turn) or ``messages``, plus ``steering``; returns the answer and
  the exact prompt that was rendered (to check what the model saw).
- ``GET /steering``: attribute names, defaults and range (the page builds its sliders from it).
- ``GET /health``: model, engine and batching counters (no token needed).
- ``GET /``: the playground page (plain HTML and JavaScript, no build step), under a Content-Security-
  Policy that lets only its own inline script and style run and talk only to this origin.

The SteerLM template, the label line and the stop marker are applied here, on the server; answers never
contain template markers, and messages may not contain them either (400). Bad input gets a 4xx in the
OpenAI error shape and the replica keeps serving. What a request may cost (body size, n x max_tokens,
stop strings, answers in flight, time) is a :class:`steerray.config.ChatLimits` (``ServeConfig.limits``).
"""

# No `from __future__ import annotations`: FastAPI reads these annotations at run time, also in
# functions that cloudpickle ships to Serve replicas by value (string annotations would not resolve there).
import asyncio
import base64
import functools
import hashlib
import logging
import os
import re
import time
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve

from steerray.attributes import ATTRIBUTES, DEFAULT_STEERING, MAX_VALUE, MIN_VALUE, model_label_attributes
from steerray.auth import token_digest
from steerray.config import ChatLimits, ServeConfig
from steerray.models.loading import ALIASES, resolve_model
from steerray.serving import openai_schema as oa
from steerray.serving.engines import (
    GREEDY_BELOW,
    Engine,
    EngineError,
    SamplingParams,
    choose_engine,
)
from steerray.serving.factory import make_engine
from steerray.serving.http import (
    ApiError,
    GuardMiddleware,
    RequestGuard,
    Slots,
    bearer_guard,
    error_body,
    install_error_handlers,
    internal_error,
)
from steerray.serving.vllm_engine import EngineUnavailable

log = logging.getLogger("steerray.serving.chat")

STATIC_DIR = Path(__file__).resolve().parent / "static"
GENERIC_FOLDER_NAMES = {"model", "final", "hf", "export", "merged"}

# Per replica process: the digest the bearer guard checks and the request guard's limits (both set by
# the replica's constructor).
_AUTH: dict[str, str | None] = {"digest": None}
require_token = bearer_guard(lambda: _AUTH["digest"])
_GUARD = RequestGuard()

app = FastAPI(
    title="steerray chat",
    description="SteerLM attribute-conditioned generation: OpenAI-compatible chat with a `steering` extension.",
    version="1",
    docs_url=None, redoc_url=None,  # both pages load JavaScript from a CDN; /openapi.json stays
)
install_error_handlers(app)
app.add_middleware(GuardMiddleware, guard=_GUARD)


@functools.lru_cache(maxsize=1)
def playground_html() -> str:
    return (STATIC_DIR / "playground.html").read_text(encoding="utf-8")


def content_security_policy(html: str) -> str:
    """The page's CSP: its own inline script and style (by hash) run, it may fetch from this origin only."""

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


PAGE_HEADERS = {"X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def _api_error(err: oa.RequestError) -> ApiError:
    return ApiError(err.status, err.message, code=err.code, param=err.param)


@serve.deployment
@serve.ingress(app)
class ChatDeployment:
    """Holds one engine; every route renders prompts the same way and streams from it."""

    def __init__(self, model: str, served_name: str, *, engine: str = "auto", max_batch_size: int = 16,
                 batch_wait_ms: float = 10.0, max_model_len: int | None = None, default_max_tokens: int = 256,
                 precision: str = "auto", threads: int | None = None, gpu_memory_utilization: float = 0.85,
                 trust_remote_code: bool = False, token_sha256: str | None = None, bind_host: str = "127.0.0.1",
                 limits: ChatLimits | None = None) -> None:
        self.limits = limits or ChatLimits()
        _GUARD.configure(bind_host, self.limits)
        self.engine: Engine = make_engine(
            engine, model, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, max_model_len=max_model_len,
            precision=precision, threads=threads, gpu_memory_utilization=gpu_memory_utilization,
            trust_remote_code=trust_remote_code)
        self.served_name = served_name
        self.label_attributes = model_label_attributes(model)  # a model trained on a label subset
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        self.counters = {"requests": 0, "rejected": 0, "failed": 0, "timed_out": 0}
        self.slots = Slots(self.limits.max_inflight_sequences, self.limits.retry_after_s, "answers")
        _AUTH["digest"] = token_sha256

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    # ---- shared steps -----------------------------------------------------------------------------

    def _check_model(self, name: str | None) -> None:
        if name and name != self.served_name:
            raise oa.RequestError(404, f"model {name[:100]!r} is not served here; this server serves "
                                       f"{self.served_name!r}", param="model", code="model_not_found")

    async def _parse(self, request: Request, model: type) -> Any:
        # Off the loop: the replica's loop also answers /health and streams other answers meanwhile.
        return await asyncio.to_thread(oa.parse_request, model, await request.body(),
                                       max_depth=self.limits.max_json_depth)

    async def _plan(self, prompt: str, request: oa.SamplingFields, n: int = 1) -> tuple[list[int], list[SamplingParams]]:
        """Token ids of the prompt and one SamplingParams per choice (choice i uses seed + i)."""
        stops = oa.stop_strings(request.stop_list(self.limits.max_stop_chars))
        ids = await asyncio.to_thread(self.engine.encode, prompt)  # a long prompt tokenizes off the loop
        max_tokens = oa.answer_budget(len(ids), request.requested_max_tokens(), self.engine.max_model_len,
                                      self.default_max_tokens)
        oa.check_generation_cost(n, max_tokens, self.limits.max_generated_tokens)
        oa.check_min_tokens(request.min_tokens, max_tokens)
        # A temperature too small to scale logits by (1e-300 overflows them) means greedy, on every engine.
        temperature = request.temperature if request.temperature >= GREEDY_BELOW else 0.0
        return ids, [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=request.top_p,
                                    seed=None if request.seed is None else request.seed + i, stop=stops,
                                    min_tokens=request.min_tokens)
                     for i in range(n)]

    def _reject(self, err: oa.RequestError) -> ApiError:
        self.counters["rejected"] += 1
        return _api_error(err)

    def _engine_failed(self, err: BaseException) -> ApiError:
        self.counters["failed"] += 1
        if isinstance(err, EngineUnavailable):  # the engine died: not this request's fault, /health says so
            return ApiError(503, str(err), code="engine_unavailable",
                            headers={"Retry-After": str(self.limits.retry_after_s)})
        return internal_error("generation failed", err)

    def _timed_out(self) -> ApiError:
        self.counters["timed_out"] += 1
        return ApiError(503, f"the answer took longer than this server's limit of {self.limits.request_timeout_s:g} s; "
                             "ask for fewer tokens or retry later", code="request_timeout",
                        headers={"Retry-After": str(self.limits.retry_after_s)})

    async def _complete_all(self, ids: list[int], params: list[SamplingParams]) -> list[Any]:
        release = self.slots.take(len(params))
        try:
            async with asyncio.timeout(self.limits.request_timeout_s):
                return await asyncio.gather(*(self.engine.complete(ids, p) for p in params))
        except TimeoutError:
            raise self._timed_out() from None
        except EngineError as err:
            raise self._engine_failed(err) from None
        finally:
            release()

    # ---- routes -----------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        html = playground_html()
        return HTMLResponse(html, headers={"Content-Security-Policy": content_security_policy(html), **PAGE_HEADERS})

    @app.get("/health")
    async def health(self) -> Any:
        state = getattr(self.engine, "state", "running")  # vLLM's engine process can die under the replica
        body = {"status": "ok" if state == "running" else "unavailable", "engine_state": state,
                "model": self.served_name, "engine": self.engine.kind,
                "max_model_len": self.engine.max_model_len, "auth": _AUTH["digest"] is not None,
                "counters": {**self.counters, "busy": self.slots.refused, "in_flight": self.slots.used},
                "stats": self.engine.stats()}
        return body if state == "running" else JSONResponse(body, status_code=503)

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
            body = await self._parse(request, oa.ChatCompletionRequest)
            self._check_model(body.model)
            label, steering = oa.resolve_steering(body.steering, self.label_attributes)
            prompt = oa.render_messages(body.messages, label)
            ids, params = await self._plan(prompt, body, body.n)
        except oa.RequestError as err:
            raise self._reject(err) from None
        completion_id, created = oa.new_id(), int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            release = self.slots.take(len(params))
            chunks = self._stream_chunks(completion_id, created, ids, params, include_usage, release)
            weakref.finalize(chunks, release)  # a stream that never starts still gives its slots back
            return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await self._complete_all(ids, params)
        return oa.completion_body(completion_id, self.served_name, [(r.text, r.finish_reason) for r in results],
                                  len(ids), sum(r.completion_tokens for r in results), steering, created)

    async def _stream_chunks(self, completion_id: str, created: int, ids: list[int], params: list[SamplingParams],
                             include_usage: bool, release: Callable[[], None]) -> AsyncIterator[str]:
        """SSE chunks for every choice as tokens arrive; choices are generated concurrently.

        A failure or the time limit ends the stream with an error event in the JSON error shape.
        """
        queue: asyncio.Queue = asyncio.Queue()
        deadline = asyncio.get_running_loop().time() + self.limits.request_timeout_s

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
                try:
                    async with asyncio.timeout_at(deadline):
                        index, event = await queue.get()
                except TimeoutError:
                    err = self._timed_out()
                    yield oa.sse(error_body(err.status, err.message, code=err.code))
                    return
                if isinstance(event, EngineError):
                    err = self._engine_failed(event)
                    yield oa.sse(error_body(err.status, err.message, code=err.code))
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
            release()

    @app.post("/generate", dependencies=[Depends(require_token)])
    async def generate(self, request: Request) -> dict[str, Any]:
        self.counters["requests"] += 1
        try:
            body = await self._parse(request, oa.GenerateRequest)
            label, steering = oa.resolve_steering(body.steering, self.label_attributes)
            prompt = oa.render_generate(body, label)
            ids, params = await self._plan(prompt, body)
        except oa.RequestError as err:
            raise self._reject(err) from None
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
    path = Path(model).expanduser()
    if model in ALIASES or not path.exists():
        return model
    path = path.resolve()
    return f"{path.parent.name}/{path.name}" if path.name in GENERIC_FOLDER_NAMES else path.name


def model_source(model: str) -> str:
    """Check the model name now (a clear error before Serve starts); local folders become absolute."""
    resolved = resolve_model(model)
    return model if model in ALIASES else str(Path(resolved).resolve()) if Path(resolved).exists() else resolved


def build_app(config: ServeConfig, token: str | None = None, *, use_gpu: bool = False,
              limits: ChatLimits | None = None) -> Any:
    """The Serve application for ``config``; ``token`` (if any) is kept only as its SHA-256 digest.

    ``limits``: what one request may cost (:class:`ChatLimits`; None: its defaults).
    """
    limits = limits or config.limits  # the config's `limits:` section unless a test passes its own
    if config.engine == "vllm" and not use_gpu:
        choose_engine("vllm")  # no GPU: vLLM's CPU build must be here; say so before Serve starts
    threads = config.threads_per_replica
    if threads is None and not use_gpu:
        threads = cpu_threads(config.replicas)
    deployment = ChatDeployment.options(  # type: ignore[attr-defined]  # @serve.deployment's class
        name="ChatModel",
        num_replicas=config.replicas,
        ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": 1 if use_gpu else 0},
        max_ongoing_requests=max(config.max_ongoing_requests, config.max_batch_size),
        max_queued_requests=limits.max_queued_requests,  # past it Serve's proxy answers 503 + Retry-After
    )
    return deployment.bind(
        model_source(config.model), config.served_name or served_name(config.model), engine=config.engine,
        max_batch_size=config.max_batch_size, batch_wait_ms=config.batch_wait_ms, max_model_len=config.max_model_len,
        default_max_tokens=config.default_max_tokens, precision=config.precision, threads=threads,
        gpu_memory_utilization=config.gpu_memory_utilization, trust_remote_code=config.trust_remote_code,
        token_sha256=token_digest(token), bind_host=config.host, limits=limits)


def server_url(config: ServeConfig) -> str:
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    return f"http://{host}:{config.port}{config.route_prefix.rstrip('/')}"


def start_chat_server(config: ServeConfig, token: str | None = None, *, limits: ChatLimits | None = None) -> str:
    """Start Serve's HTTP proxy on ``config.host:port`` (Ray must be up), deploy, and return the URL.

    Returns once the replicas are healthy. Stop with ``serve.delete(config.app_name)`` or ``serve.shutdown()``.
    """
    import ray

    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    application = build_app(config, token, use_gpu=use_gpu, limits=limits)  # checks the model name first
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(application, name=config.app_name, route_prefix=config.route_prefix)
    return server_url(config)
