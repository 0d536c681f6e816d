"""The reward model behind Ray Serve: one deployment, a FastAPI ingress, dynamic batching per text.

Routes (the OpenAPI schema at ``/openapi.json``; no ``/docs`` page, which would load Swagger UI from a CDN):

- ``POST /score`` with ``{"texts": [...]}`` (templated prompts ending in ``<extra_id_2>``) or
  ``{"conversations": [...]}`` (SteerLM conversations); answers per item the raw predictions and the label
  string (clipped to 0-4, rounded half to even). Conversations go through the same
  :mod:`steerray.annotation` functions as the offline annotator, template-marker check included; texts
  must be well-formed SteerLM prompts (markers only where the template puts them).
- ``GET /health``: model attributes and max length (no token needed).
- ``GET /stats``: batches this replica ran and their sizes (token needed when one is set).

Every text of every request is one item for ``@serve.batch``: concurrent requests, one-row requests
included, share forward passes. ``max_batch_size`` and ``batch_wait_timeout_s`` come from the
deployment's ``user_config``, so ``serve.run`` with a new config retunes a running app without
reloading the model. Bad input is answered 4xx with the JSON error shape of :mod:`steerray.serving.http`.
What a request may cost (body size, scored turns and their characters, texts in flight, time) is a
:class:`steerray.config.RewardLimits` (``ServeRewardConfig.limits``); the cost of a conversation is counted per scored turn,
history included, before any prompt is built.
"""

# No `from __future__ import annotations`: FastAPI reads these annotations at run time, also in
# functions that cloudpickle ships to Serve replicas by value (string annotations would not resolve there).
import asyncio
import collections
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from ray import serve

from steerray.annotation import load_predictor, plan_scoring, threads_for, turn_label
from steerray.auth import token_digest
from steerray.config import RewardLimits, ServeRewardConfig
from steerray.errors import SteerrayError
from steerray.models.reward import RewardModelError
from steerray.serving import openai_schema as oa
from steerray.serving.http import (
    ApiError,
    GuardMiddleware,
    RequestGuard,
    Slots,
    bearer_guard,
    install_error_handlers,
    internal_error,
)
from steerray.templates import (
    ASSISTANT_ROLE,
    LABEL_START,
    SYSTEM_PROMPT,
    ConversationError,
    check_reward_text,
    system_block,
    turn_header,
    validate_conversation,
)

log = logging.getLogger("steerray.serving.reward")

class ServeStartError(SteerrayError, RuntimeError):
    """The app was deployed but cannot be reached where the config says."""


# Per replica process: the digest the bearer guard checks and the request guard's limits (both set by
# the replica's constructor).
_AUTH: dict[str, str | None] = {"digest": None}
require_token = bearer_guard(lambda: _AUTH["digest"])
_GUARD = RequestGuard()

app = FastAPI(
    title="steerray reward model",
    description="SteerLM attribute reward model: score templated texts or conversations, get label strings.",
    version="1",
    docs_url=None, redoc_url=None,  # both pages load JavaScript from a CDN; /openapi.json stays
)
install_error_handlers(app)
app.add_middleware(GuardMiddleware, guard=_GUARD)


class ScoreRequest(BaseModel):
    """Give exactly one of ``texts`` or ``conversations``."""

    model_config = ConfigDict(extra="forbid")
    texts: list[str] | None = Field(None, description="SteerLM-templated prompts, each ending in <extra_id_2>")
    conversations: list[dict[str, Any]] | None = Field(None, description="SteerLM conversation records")
    truncation: Literal["error", "left"] = Field(
        "error", description="over-long inputs: 'error' (400) or 'left' (keep the last max_length tokens)")
    keep_human_labels: StrictBool = Field(False, description="conversations: keep human label values, fill the rest")
    all_assistant_turns: StrictBool = Field(
        True, description="conversations: score every Assistant turn (False: only turns with a label key, "
                          "as the offline annotator does)")


# The route reads its body itself (strict JSON, off the event loop); the schema still documents it.
SCORE_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": ScoreRequest.model_json_schema()}}}}


def scoring_cost(conversations: Sequence[Mapping[str, Any]], all_assistant_turns: bool) -> tuple[int, int]:
    """``(scored turns, characters the model reads)`` of validated conversations, before building prompts.

    Each scored turn's prompt repeats the whole history before it (the rule of
    :func:`steerray.templates.reward_prompts`), so characters grow with the square of the turns.
    """
    turns = chars = 0
    for conversation in conversations:
        prefix = len(system_block(SYSTEM_PROMPT))
        for turn in conversation["conversations"]:
            prefix += len(turn_header(turn["from"])) + len(turn["value"]) + 1
            labelled = "label" in turn and turn["label"] is not None
            if turn["from"] == ASSISTANT_ROLE and (all_assistant_turns or labelled):
                turns += 1
                chars += prefix + len(LABEL_START)
    return turns, chars


class TextResult(BaseModel):
    predictions: dict[str, float]
    label: str
    truncated: bool


class TurnResult(TextResult):
    turn_index: int


class ConversationResult(BaseModel):
    turns: list[TurnResult]
    conversation: dict[str, Any]


class ScoreResponse(BaseModel):
    attributes: list[str]
    results: list[TextResult] | list[ConversationResult]


@serve.deployment
@serve.ingress(app)
class RewardDeployment:
    """Holds one reward model; scores texts in dynamic batches."""

    def __init__(self, model_dir: str, *, max_length: int | None = None, token_sha256: str | None = None,
                 precision: str = "auto", threads: int | None = None, max_items_per_request: int = 1024,
                 trust_remote_code: bool = False, bind_host: str = "127.0.0.1",
                 limits: RewardLimits | None = None) -> None:
        self.limits = limits or RewardLimits()
        _GUARD.configure(bind_host, self.limits)
        self.slots = Slots(self.limits.max_inflight_texts, self.limits.retry_after_s, "texts")
        self.predictor = load_predictor(model_dir, max_length=max_length, precision=precision, threads=threads,
                                        trust_remote_code=trust_remote_code)
        self.attributes = self.predictor.attributes
        self.model_name = Path(model_dir).name
        self.max_items = max_items_per_request
        _AUTH["digest"] = token_sha256
        self.stats: dict[str, Any] = {"batches": 0, "texts": 0, "truncated": 0, "requests": 0,
                                      "max_batch_size_seen": 0, "forward_seconds": 0.0}
        self.recent_batch_sizes: collections.deque[int] = collections.deque(maxlen=256)
        self.user_config: dict[str, Any] = {}

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply ``user_config`` (``max_batch_size``, ``batch_wait_timeout_s``) without reloading."""
        unknown = set(user_config) - {"max_batch_size", "batch_wait_timeout_s"}
        if unknown:
            raise ValueError(f"unknown user_config keys {sorted(unknown)}")
        self.user_config = {**self.user_config, **user_config}
        if "max_batch_size" in user_config:
            size = int(user_config["max_batch_size"])
            self.score_text.set_max_batch_size(size)  # type: ignore[attr-defined]  # added by @serve.batch
            self.predictor.batch_size = size  # one forward pass per Serve batch
        if "batch_wait_timeout_s" in user_config:
            self.score_text.set_batch_wait_timeout_s(  # type: ignore[attr-defined]  # added by @serve.batch
                float(user_config["batch_wait_timeout_s"]))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def score_text(self, texts: list[str]) -> list[tuple[list[float], bool]]:
        """One forward pass over texts from any number of concurrent requests."""
        started = time.perf_counter()
        # In a thread: torch releases the GIL, so the replica keeps accepting requests meanwhile.
        predictions, truncated = await asyncio.to_thread(self.predictor, texts)
        self.stats["forward_seconds"] += time.perf_counter() - started
        self.stats["batches"] += 1
        self.stats["texts"] += len(texts)
        self.stats["truncated"] += sum(truncated)
        self.stats["max_batch_size_seen"] = max(self.stats["max_batch_size_seen"], len(texts))
        self.recent_batch_sizes.append(len(texts))
        return [(row.tolist(), bool(flag)) for row, flag in zip(predictions, truncated, strict=True)]

    async def _predict(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        release = self.slots.take(len(texts))
        try:
            async with asyncio.timeout(self.limits.request_timeout_s):
                results = await asyncio.gather(*(self.score_text(text) for text in texts))
        except TimeoutError:
            raise ApiError(503, f"scoring took longer than this server's limit of {self.limits.request_timeout_s:g} "
                                "s; send fewer texts per request or retry later", code="request_timeout",
                           headers={"Retry-After": str(self.limits.retry_after_s)}) from None
        except Exception as err:  # the model failed: a request id for the client, the details for the log
            raise internal_error("scoring failed", err) from None
        finally:
            release()
        predictions = np.asarray([r[0] for r in results], dtype=np.float32).reshape(len(texts), len(self.attributes))
        return predictions, [r[1] for r in results]

    async def _check_lengths(self, texts: list[str], names: list[str]) -> None:
        limit = self.predictor.max_length
        counts = await asyncio.to_thread(self.predictor.token_counts, texts)  # tokenizing is slow: off the loop
        for name, count in zip(names, counts, strict=True):
            if count > limit:
                raise ApiError(400, f"{name} has {count} tokens, over max_length {limit}; send "
                                    f"\"truncation\": \"left\" to score its last {limit} tokens",
                               code="too_long", param=name)

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_name, "attributes": self.attributes,
                "max_length": self.predictor.max_length}

    @app.get("/stats", dependencies=[Depends(require_token)])
    async def get_stats(self) -> dict[str, Any]:
        return {**self.stats, "recent_batch_sizes": list(self.recent_batch_sizes), "user_config": self.user_config,
                "busy": self.slots.refused, "in_flight": self.slots.used}

    @app.post("/score", response_model=ScoreResponse, dependencies=[Depends(require_token)], openapi_extra=SCORE_BODY)
    async def score(self, request: Request) -> dict[str, Any]:
        self.stats["requests"] += 1
        body = await self._parse(await request.body())
        if (body.texts is None) == (body.conversations is None):
            raise ApiError(400, "give exactly one of 'texts' or 'conversations'", code="invalid_request")
        items = body.texts if body.texts is not None else body.conversations
        field = "texts" if body.texts is not None else "conversations"
        if not items:
            raise ApiError(400, f"'{field}' is empty", code="invalid_request", param=field)
        if len(items) > self.max_items:
            raise ApiError(413, f"{len(items)} {field} in one request; the limit is {self.max_items}",
                           code="too_many_items", param=field)
        if body.texts is not None:
            return await self._score_texts(body.texts, body.truncation)
        return await self._score_conversations(body)

    async def _parse(self, raw: bytes) -> ScoreRequest:
        def parse() -> ScoreRequest:
            return oa.validate_model(ScoreRequest, oa.decode_json(raw, max_depth=self.limits.max_json_depth))

        try:  # off the loop: a body may be megabytes of texts
            return await asyncio.to_thread(parse)
        except oa.RequestError as err:
            raise ApiError(err.status, err.message, code=err.code, param=err.param) from None

    def _check_cost(self, field: str, turns: int, chars: int) -> None:
        """413 when one request asks the model to read too much (checked before any prompt is built)."""
        if turns > self.limits.max_scored_turns:
            what = "texts" if field == "texts" else "scored turns"
            raise ApiError(413, f"{field} has {turns} {what}; the limit is {self.limits.max_scored_turns} per request",
                           code="too_many_turns", param=field)
        if chars > self.limits.max_chars_per_request:
            raise ApiError(413, f"{field} makes {chars} characters for the model to read (every scored turn repeats "
                                f"its history); the limit is {self.limits.max_chars_per_request} per request",
                           code="too_many_characters", param=field)

    async def _score_texts(self, texts: list[str], truncation: str) -> dict[str, Any]:
        self._check_cost("texts", len(texts), sum(len(t) for t in texts))
        for i, text in enumerate(texts):
            if not text.strip():
                raise ApiError(400, f"texts.{i} is empty", code="empty_text", param=f"texts.{i}")
            if not text.endswith(LABEL_START):
                raise ApiError(400, f"texts.{i} does not end with {LABEL_START!r}: the model reads its score "
                                    "there; render it with the SteerLM template or send 'conversations'",
                               code="not_templated", param=f"texts.{i}")
            try:
                check_reward_text(text, f"texts.{i}")
            except ConversationError as err:
                raise ApiError(400, str(err), code="template_markers", param=f"texts.{i}") from None
        if truncation == "error":
            await self._check_lengths(texts, [f"texts.{i}" for i in range(len(texts))])
        predictions, truncated = await self._predict(texts)
        results = [{"predictions": dict(zip(self.attributes, map(float, row), strict=True)),
                    "label": turn_label(row, self.attributes), "truncated": flag}
                   for row, flag in zip(predictions, truncated, strict=True)]
        return {"attributes": self.attributes, "results": results}

    async def _score_conversations(self, body: ScoreRequest) -> dict[str, Any]:
        conversations = body.conversations or []
        for i, record in enumerate(conversations):
            try:
                validate_conversation(record, require_assistant=True)
            except ConversationError as err:
                raise ApiError(400, f"conversations.{i}: {err}", code="invalid_conversation",
                               param=f"conversations.{i}") from None
        self._check_cost("conversations", *scoring_cost(conversations, body.all_assistant_turns))
        plan = plan_scoring(conversations, all_assistant_turns=body.all_assistant_turns)
        texts = plan.texts
        if body.truncation == "error" and texts:
            names = [f"conversations.{i} turn {p.turn_index}" for i, ps in enumerate(plan.prompts) for p in ps]
            await self._check_lengths(texts, names)
        if texts:
            predictions, truncated = await self._predict(texts)
        else:
            predictions, truncated = np.zeros((0, len(self.attributes)), dtype=np.float32), []
        annotated = plan.finish(predictions, truncated, self.attributes, keep_human_labels=body.keep_human_labels)
        return {"attributes": self.attributes,
                "results": [{"turns": [t.to_json(self.attributes) for t in a.turns], "conversation": a.conversation}
                            for a in annotated]}


def build_app(config: ServeRewardConfig, token: str | None = None, *, use_gpu: bool = False,
              limits: RewardLimits | None = None) -> Any:
    """The Serve application for ``config``; ``token`` (if any) is kept only as its SHA-256 digest.

    ``limits``: what one request may cost (:class:`RewardLimits`; None: its defaults).
    """
    limits = limits or config.limits  # the config's `limits:` section unless a test passes its own
    threads = config.threads_per_replica or threads_for(config.cpus_per_replica)
    deployment = RewardDeployment.options(  # type: ignore[attr-defined]  # @serve.deployment's class
        name="RewardModel",
        num_replicas=config.replicas,
        ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": 1 if use_gpu else 0},
        max_ongoing_requests=max(config.max_ongoing_requests, config.max_batch_size),
        max_queued_requests=limits.max_queued_requests,  # past it Serve's proxy answers 503 + Retry-After
        user_config={"max_batch_size": config.max_batch_size, "batch_wait_timeout_s": config.batch_wait_timeout_s},
    )
    return deployment.bind(
        str(Path(config.model).resolve()), max_length=config.max_length, token_sha256=token_digest(token),
        precision=config.precision, threads=threads, max_items_per_request=config.max_items_per_request,
        trust_remote_code=config.trust_remote_code, bind_host=config.host, limits=limits)


def server_url(config: ServeRewardConfig) -> str:
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    return f"http://{host}:{config.port}{config.route_prefix.rstrip('/')}"


def start_reward_server(config: ServeRewardConfig, token: str | None = None, *,
                        limits: RewardLimits | None = None) -> str:
    """Start Serve's HTTP proxy on ``config.host:port`` (Ray must be up), deploy, and return the URL.

    Returns once the replicas are healthy. Stop with ``serve.delete(config.app_name)`` or ``serve.shutdown()``.
    """
    import ray

    if not (Path(config.model) / "config.json").is_file():
        raise RewardModelError(f"{config.model} is not a reward-model folder (no config.json); "
                               "pass the `model` folder that train-reward wrote")
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config, token, use_gpu=use_gpu, limits=limits), name=config.app_name,
              route_prefix=config.route_prefix)
    url = server_url(config)
    wait_until_reachable(url)
    return url


def wait_until_reachable(url: str, timeout_s: float = 30.0) -> None:
    """Check ``/health`` answers at ``url``: Serve keeps the HTTP options it was first started with, so an
    already-running Serve on another port would otherwise leave callers with a dead URL."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise ServeStartError(f"the reward app was deployed but {url}/health does not answer; if Serve was "
                               "already running on this Ray cluster with other HTTP options, its proxy kept "
                               "them: use that port, or serve.shutdown() first")
        time.sleep(0.5)
