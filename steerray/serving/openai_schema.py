"""The OpenAI chat-completions contract, SteerLM style: request models, prompt rendering, response shapes.

Pure functions and pydantic models, no Ray and no torch, so the whole contract is unit-tested alone:

- :class:`ChatCompletionRequest` accepts what the official ``openai`` client sends, plus one extension,
  ``steering`` (``{"verbosity": 0, ...}``, passed with ``extra_body``); attributes left out take the
  reference's defaults (:data:`steerray.attributes.DEFAULT_STEERING`).
- :func:`decode_json` is the one strict JSON reader of both servers (depth, integer size, NaN, lone
  surrogates: all 400s, never a 500).
- :func:`render_messages` turns a request into the exact SteerLM prompt (system block, turns, label
  line); template markers inside messages are refused.
- :class:`StopTextFilter` cuts generated text at the stop marker and the user's ``stop`` strings and, while
  streaming, holds back any tail that could still become one, so no marker ever reaches a client.
- :func:`completion_body`, :func:`chunk_body` and :func:`sse` build the response objects.

Bad input raises :class:`RequestError` (status, message, param, code), which the app answers in the
OpenAI error shape ``{"error": {"message", "type", "param", "code"}}``.
"""

# No `from __future__ import annotations`: pydantic resolves these annotations in Serve replicas too.
import json
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

from steerray.attributes import DEFAULT_STEERING, LabelError, parse_label, steering_label
from steerray.templates import (
    MARKERS,
    STOP_STRING,
    SYSTEM_PROMPT,
    ConversationError,
    check_text_markers,
    generation_prompt,
)

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # per stop string (ChatLimits.max_stop_chars)
MAX_CHOICES = 8
MAX_JSON_DEPTH = 32
MAX_INT_DIGITS = 32  # more digits than any field's range needs; Python refuses > 4300 with a ValueError
# Request fields of the OpenAI API that steerray does not implement: refused when set, never ignored.
UNSUPPORTED = {"tools": None, "tool_choice": None, "functions": None, "function_call": None,
               "logit_bias": None, "logprobs": False, "top_logprobs": None, "audio": None,
               "presence_penalty": 0, "frequency_penalty": 0}


class RequestError(Exception):
    """A request the server refuses; ``status`` is 4xx and the message names the field."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------

class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """Generation knobs shared by the OpenAI route and the native ``/generate``."""

    model_config = ConfigDict(extra="ignore")
    # Strict numbers and bools: "2", "yes" or true is a 400 (pydantic's lax mode would take them).
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)  # the newer OpenAI name for max_tokens
    temperature: StrictFloat = Field(1.0, ge=0, le=2)  # OpenAI's default; 0 = greedy
    top_p: StrictFloat = Field(1.0, gt=0, le=1)
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**63 - 1 - MAX_CHOICES)  # choice i: seed + i
    stop: str | list[str] | None = None
    # vLLM's extension of the OpenAI API: EOS cannot end the answer before this many tokens (stop strings
    # still do). Serving benchmarks use it to measure answers of a known length.
    min_tokens: StrictInt = Field(0, ge=0)
    steering: dict[str, Any] | None = None  # steerray's extension: attribute -> 0..4

    def stop_list(self, max_chars: int = MAX_STOP_CHARS) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise RequestError(400, f"'stop' has {len(stops)} strings; at most {MAX_STOP_STRINGS}", param="stop")
        if any(not s for s in stops):
            raise RequestError(400, "'stop' strings must not be empty", param="stop")
        longest = max((len(s) for s in stops), default=0)
        if longest > max_chars:
            raise RequestError(400, f"a 'stop' string has {longest} characters; at most {max_chars}", param="stop",
                               code="stop_too_long")
        return stops

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatCompletionRequest(SamplingFields):
    model: str | None = None
    messages: list[ChatMessage]
    n: StrictInt = Field(1, ge=1, le=MAX_CHOICES)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class GenerateRequest(SamplingFields):
    """Native route: a plain ``prompt`` (one user turn) or OpenAI-style ``messages``, plus ``steering``."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    system: str | None = None
    temperature: StrictFloat = Field(0.0, ge=0, le=2)  # greedy by default: the native route is for inspection


def _param(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc) or "body"


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise RequestError(400, f"request body has an integer of {len(digits)} digits; at most {MAX_INT_DIGITS}",
                           code="invalid_json")
    return int(digits)


def _finite_float(digits: str) -> float:
    value = float(digits)
    if not math.isfinite(value):  # 1e999: it could not be written back as JSON either
        raise RequestError(400, f"request body has a number out of range: {digits[:40]}", code="invalid_json")
    return value


def _no_constant(name: str) -> float:
    raise RequestError(400, f"request body is not valid JSON: {name} is not a JSON number", code="invalid_json")


def decode_json(raw: bytes | str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON (RFC 8259) -> Python, or a 400 :class:`RequestError` saying why.

    UTF-8 only; no NaN/Infinity nor numbers that overflow to them; integers of at most :data:`MAX_INT_DIGITS` digits; nesting at most
    ``max_depth``; strings (keys too) must be valid Unicode: a lone surrogate such as ``"\ud800"`` is
    legal JSON syntax but cannot be encoded again, and would fail later inside the tokenizer.
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        data = json.loads(text or "null", parse_int=_bounded_int, parse_float=_finite_float,
                          parse_constant=_no_constant)
    except UnicodeDecodeError as err:
        raise RequestError(400, f"request body is not UTF-8: byte {err.start} is invalid", code="invalid_json") from None
    except RecursionError:
        raise RequestError(400, f"request body is nested too deeply (at most {max_depth} levels)",
                           code="invalid_json") from None
    except json.JSONDecodeError as err:
        raise RequestError(400, f"request body is not valid JSON: {err}", code="invalid_json") from None
    _check_tree(data, max_depth)
    return data


def _check_tree(data: Any, max_depth: int) -> None:
    """Depth and valid strings over the decoded tree, iteratively (a deep tree must not recurse here)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _check_string(node)
        elif isinstance(node, (dict, list)):
            if depth > max_depth:
                raise RequestError(400, f"request body is nested too deeply (at most {max_depth} levels)",
                                   code="invalid_json")
            if isinstance(node, dict):
                for key in node:
                    _check_string(key)
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))


def _check_string(text: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(400, f"request body has a string with a lone surrogate (\\u{ord(text[err.start]):04x}); "
                                "JSON strings must be valid Unicode", code="invalid_json") from None


def validate_model(model: type[BaseModel], data: Any) -> Any:
    """A decoded JSON object -> a validated ``model``, or :class:`RequestError` naming the first bad field."""
    if not isinstance(data, dict):
        raise RequestError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problem = err.errors()[0]
        where = _param(problem.get("loc", ()))
        more = f" (and {len(err.errors()) - 1} more problems)" if len(err.errors()) > 1 else ""
        raise RequestError(400, f"{where}: {problem.get('msg', 'invalid')}{more}", param=where,
                           code="invalid_request") from None


def parse_request(model: type[BaseModel], raw: bytes | str | Mapping[str, Any], *,
                  max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Bytes (or a decoded object) -> a validated OpenAI-style request, or :class:`RequestError` naming the field."""
    data = decode_json(raw, max_depth=max_depth) if isinstance(raw, (bytes, str)) else raw
    if isinstance(data, dict):
        for name, default in UNSUPPORTED.items():
            if data.get(name, default) not in (default, None):
                raise RequestError(400, f"'{name}' is not supported by this server", param=name, code="unsupported")
    return validate_model(model, data)


# --------------------------------------------------------------------------------------------------
# Prompt rendering
# --------------------------------------------------------------------------------------------------

def resolve_steering(steering: Mapping[str, Any] | None,
                     attributes: Sequence[str] | None = None) -> tuple[str, dict[str, int]]:
    """``(label string, its values)`` for a request's ``steering``; LabelError -> 400 on ``steering``.

    ``attributes``: the model's label attributes (None: all nine), so the label matches its training.
    """
    if steering is not None and not isinstance(steering, Mapping):
        raise RequestError(400, "'steering' must be an object of attribute: value", param="steering")
    try:
        label = steering_label(steering or {}, DEFAULT_STEERING, attributes)
    except LabelError as err:
        raise RequestError(400, f"steering: {err}", param="steering", code="invalid_steering") from None
    return label, {name: int(value) for name, value in parse_label(label).items()}


def split_system(messages: Sequence[ChatMessage]) -> tuple[str, list[dict[str, str]]]:
    """A leading system/developer message becomes the SteerLM system block; the rest are turns."""
    if not messages:
        raise RequestError(400, "'messages' is empty: send at least one user message", param="messages",
                           code="empty_messages")
    system, rest = SYSTEM_PROMPT, list(messages)
    if rest[0].role in ("system", "developer"):
        system = rest.pop(0).text()
    for i, message in enumerate(rest):
        if message.role in ("system", "developer"):
            raise RequestError(400, f"messages.{i + len(messages) - len(rest)}: a system message may only come "
                                    "first", param="messages")
    return system, [{"role": m.role, "content": m.text()} for m in rest]


def check_message_markers(messages: Sequence[ChatMessage]) -> None:
    """400 naming ``messages.i`` when a message holds a SteerLM marker (it could add a label line or turns)."""
    for i, message in enumerate(messages):
        try:
            check_text_markers(message.text(), f"messages.{i}")
        except ConversationError as err:
            raise RequestError(400, str(err), param=f"messages.{i}", code="template_markers") from None


def render_messages(messages: Sequence[ChatMessage], label: str) -> str:
    check_message_markers(messages)
    system, turns = split_system(messages)
    if not turns:
        raise RequestError(400, "'messages' holds no user message", param="messages", code="empty_messages")
    try:
        return generation_prompt(turns, label, system=system, allow_flattened_turns=False)
    except ConversationError as err:
        raise RequestError(400, f"messages: {err}", param="messages", code="invalid_messages") from None


def render_generate(request: GenerateRequest, label: str) -> str:
    if (request.prompt is None) == (request.messages is None):
        raise RequestError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
    if request.prompt is not None:
        if not request.prompt.strip():
            raise RequestError(400, "'prompt' is empty", param="prompt", code="empty_messages")
        messages = [ChatMessage(role="user", content=request.prompt)]
    else:
        messages = list(request.messages or [])
    if request.system is not None:
        if messages and messages[0].role in ("system", "developer"):
            raise RequestError(400, "give the system prompt once: 'system' or a system message", param="system")
        messages = [ChatMessage(role="system", content=request.system), *messages]
    return render_messages(messages, label)


def answer_budget(prompt_tokens: int, requested: int | None, max_model_len: int, default: int) -> int:
    """Tokens the answer may use: refuses prompts (or prompt + max_tokens) over the context window."""
    room = max_model_len - prompt_tokens
    if room < 1:
        raise RequestError(400, f"the prompt has {prompt_tokens} tokens; this model's context window is "
                                f"{max_model_len} tokens", param="messages", code="context_length_exceeded")
    if requested is not None and requested > room:
        raise RequestError(400, f"prompt ({prompt_tokens} tokens) + max_tokens ({requested}) exceeds the "
                                f"context window of {max_model_len} tokens", param="max_tokens",
                           code="context_length_exceeded")
    return requested if requested is not None else min(default, room)


def check_generation_cost(n: int, max_tokens: int, limit: int) -> None:
    """400 when ``n`` answers of ``max_tokens`` each exceed the server's ``limit`` of generated tokens."""
    if n * max_tokens > limit:
        raise RequestError(400, f"n ({n}) x max_tokens ({max_tokens}) = {n * max_tokens} tokens is over this "
                                f"server's limit of {limit} generated tokens per request; lower n or max_tokens",
                           param="max_tokens", code="too_many_tokens")


def check_min_tokens(min_tokens: int, max_tokens: int) -> None:
    """400 when the answer must be longer than it may be."""
    if min_tokens > max_tokens:
        raise RequestError(400, f"min_tokens ({min_tokens}) is over max_tokens ({max_tokens})", param="min_tokens")


# --------------------------------------------------------------------------------------------------
# Stop strings and the streaming hold-back
# --------------------------------------------------------------------------------------------------

def stop_strings(user_stops: Sequence[str] = ()) -> tuple[str, ...]:
    """Everything that ends an answer: the SteerLM stop marker, the other markers, the user's strings."""
    ordered = [STOP_STRING, *MARKERS, *user_stops]
    return tuple(dict.fromkeys(ordered))


def _first_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    positions = [p for p in (text.find(s, start) for s in stops) if p != -1]
    return min(positions) if positions else -1


def _held_tail(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is the beginning of some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def final_text(raw: str, stops: Sequence[str]) -> str:
    """The answer a client gets: cut at the first stop string, trailing newlines dropped."""
    cut = _first_stop(raw, stops)
    return (raw if cut == -1 else raw[:cut]).rstrip("\n")


class StopTextFilter:
    """Turns the growing raw text of one answer into clean deltas.

    ``update(raw)`` returns ``(delta, stopped)``: ``delta`` only ever extends what was sent before, never
    contains a stop string or a piece of one, nor trailing newlines (they may precede the marker), nor a
    half-decoded character. Once ``stopped``, the answer is complete. ``finish(raw)`` flushes the rest.
    The concatenated deltas always equal :func:`final_text` of the raw text.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.sent = ""
        self.stopped = False
        self._searched = 0  # raw text before this index holds no stop string
        self._longest = max((len(s) for s in self.stops), default=1)

    def update(self, raw: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        cut = _first_stop(raw, self.stops, max(0, self._searched - self._longest))
        if cut != -1:
            self.stopped = True
            return self._advance(raw[:cut].rstrip("\n")), True
        self._searched = len(raw)
        safe = raw[: len(raw) - _held_tail(raw, self.stops)].rstrip("\n\ufffd")
        return self._advance(safe), False

    def finish(self, raw: str) -> str:
        if self.stopped:
            return ""
        self.stopped = True
        return self._advance(final_text(raw, self.stops))

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


# --------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------

def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(completion_id: str, model: str, choices: Sequence[tuple[str, str]], prompt_tokens: int,
                    completion_tokens: int, steering: Mapping[str, int], created: int | None = None) -> dict:
    """A ``chat.completion`` object; ``choices`` are ``(text, finish_reason)``; ``steering`` is echoed."""
    return {
        "id": completion_id, "object": "chat.completion", "created": created or int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": reason} for i, (text, reason) in enumerate(choices)],
        "usage": usage_body(prompt_tokens, completion_tokens),
        "steering": dict(steering),
    }


def chunk_body(completion_id: str, model: str, created: int, index: int, delta: Mapping[str, Any],
               finish_reason: str | None = None) -> dict:
    """One ``chat.completion.chunk`` for choice ``index``."""
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": dict(delta), "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(completion_id: str, model: str, created: int, prompt_tokens: int, completion_tokens: int) -> dict:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, only usage."""
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage_body(prompt_tokens, completion_tokens)}


def sse(payload: Mapping[str, Any] | str) -> str:
    """One server-sent event (``data: ...`` and a blank line), as OpenAI streams them."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


SSE_DONE = sse("[DONE]")


def models_body(model: str, max_model_len: int, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "steerray", "max_model_len": max_model_len}]}
