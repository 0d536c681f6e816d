"""Small HTTP helpers shared by steerray's FastAPI services: bearer tokens, JSON errors, a request guard.

Every error a steerray service returns has one shape, the OpenAI one, so OpenAI clients and curl users
read the same thing::

    {"error": {"message": "turn 1: empty or missing 'value'", "type": "invalid_request_error",
               "param": "conversations.0", "code": "invalid_conversation"}}

``install_error_handlers(app)`` turns FastAPI's own errors (unparseable JSON, schema violations, unknown
routes) and :class:`ApiError` into that shape; ``bearer_guard(token_hash)`` builds a dependency that
checks ``Authorization: Bearer <token>``. Tokens are compared by SHA-256 digest in constant time, so a
deployment only ever holds the digest (Serve stores init args in its controller's state).

:class:`GuardMiddleware` runs before any route: it refuses a Host that is not this server (DNS
rebinding), an Origin of another site, a POST that is not ``application/json`` (a web page can send
``text/plain`` without a CORS preflight), and a body over the size limit (by Content-Length before
reading, and while reading a chunked one). A 500 names only a request id; the details go to the log.
"""

# No `from __future__ import annotations`: FastAPI reads these annotations at run time, also in
# functions that cloudpickle ships to Serve replicas by value (string annotations would not resolve there).
import asyncio
import hmac
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from steerray.auth import token_digest
from steerray.config import HttpLimits
from steerray.serving.limits import allowed_hostnames, normalize_host

log = logging.getLogger("steerray.serving")


# HTTP status -> OpenAI error type.
_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 413: "request_too_large",
    415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
    503: "service_unavailable",
}
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class ApiError(Exception):
    """Raise inside a route to answer ``status`` with the steerray JSON error shape."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None) -> dict:
    """The JSON body of an error response (OpenAI's shape)."""
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "api_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, *, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code=code, param=param), status_code=status, headers=headers)


def _location(loc: Sequence[Any]) -> str:
    # ("body", "conversations", 0, "value") -> "conversations.0.value"
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def validation_message(err: RequestValidationError) -> tuple[str, str | None, str]:
    """``(message, param, code)`` for a FastAPI validation error: unparseable JSON vs a schema problem."""
    problems = err.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        problem = next(p for p in problems if p.get("type") == "json_invalid")
        detail = (problem.get("ctx") or {}).get("error", "")
        return f"request body is not valid JSON: {detail}".rstrip(": "), None, "invalid_json"
    parts = []
    for problem in problems[:5]:
        where = _location(problem.get("loc", ()))
        parts.append(f"{where}: {problem.get('msg', 'invalid')}")
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    param = _location(problems[0].get("loc", ())) if problems else None
    return "; ".join(parts) + more, param, "invalid_request"


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error with the JSON shape above; bad input is 400 (401 token, 404/405 route, 413 size),
    never a 500 with a traceback."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, code=exc.code, param=exc.param, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = validation_message(exc)
        # 400 like OpenAI (FastAPI's default is 422): one status for every malformed request.
        return error_response(400, message, code=code, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(exc.status_code, message, code=None, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug on our side, not the client's: the log gets the traceback, the client only a request id
        # (exception text can hold paths, model internals or the request's own bytes).
        err = internal_error(f"unhandled error on {request.method} {request.url.path}", exc)
        return error_response(err.status, err.message, code=err.code, headers=err.headers)


def internal_error(what: str, exc: BaseException | None = None) -> ApiError:
    """Log ``what`` (with ``exc``'s traceback) under a new request id; the 500 a client may see."""
    request_id = uuid.uuid4().hex[:16]
    log.error("request %s: %s", request_id, what, exc_info=exc)
    return ApiError(500, f"internal error (request id {request_id}); the server log has the details",
                    code="internal_error", headers={"X-Request-Id": request_id})


def check_bearer(authorization: str | None, expected_digest: str | None) -> None:
    """Raise 401 unless ``authorization`` is ``Bearer <token>`` whose digest matches (no-op without one)."""
    if expected_digest is None:
        return
    challenge = {"WWW-Authenticate": "Bearer"}
    if not authorization:
        raise ApiError(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                       code="missing_token", headers=challenge)
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "malformed Authorization header: expected 'Bearer <token>'",
                       code="invalid_token", headers=challenge)
    if not hmac.compare_digest(token_digest(token.strip()) or "", expected_digest):
        raise ApiError(401, "invalid bearer token", code="invalid_token", headers=challenge)


def bearer_guard(expected_digest: Callable[[], str | None] | str | None) -> Callable[[Request], None]:
    """A FastAPI dependency checking the bearer token; ``expected_digest`` may be a getter (set later)."""

    def guard(request: Request) -> None:
        digest = expected_digest() if callable(expected_digest) else expected_digest
        check_bearer(request.headers.get("authorization"), digest)

    return guard


# --------------------------------------------------------------------------------------------------
# Request guard: Host, Origin, content type, body size (an ASGI middleware, before any route)
# --------------------------------------------------------------------------------------------------

class RequestGuard:
    """What :class:`GuardMiddleware` enforces; one per replica process, set by the deployment's constructor."""

    def __init__(self) -> None:
        self.configure("127.0.0.1", HttpLimits())

    def configure(self, bind_host: str, limits: HttpLimits) -> None:
        self.limits = limits
        self.hosts = allowed_hostnames(bind_host, limits.allowed_hosts)
        self.origins = frozenset(o.rstrip("/").lower() for o in limits.allowed_origins)

    def refusal(self, method: str, headers: dict[str, str]) -> tuple[int, str, str] | None:
        """``(status, message, code)`` for a request refused on its headers alone, else None."""
        host = headers.get("host", "")
        if self.hosts is not None and normalize_host(_strip_port(host)) not in self.hosts:
            return 403, (f"Host {host[:100]!r} is not this server, which answers to {', '.join(sorted(self.hosts))} "
                         "(add a name to allowed_hosts)"), "host_not_allowed"
        origin = headers.get("origin")
        if origin is not None and not self._same_origin(origin, host):
            return 403, f"cross-origin request from {origin[:100]!r} refused", "origin_not_allowed"
        if method in BODY_METHODS:
            media_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "application/json":
                return 415, (f"Content-Type must be application/json, got {media_type[:100]!r}" if media_type
                             else "Content-Type must be application/json"), "unsupported_media_type"
            length = headers.get("content-length")
            if length is not None:
                if not length.strip().isdigit():
                    return 400, "Content-Length is not a number", "invalid_content_length"
                if int(length) > self.limits.max_body_bytes:
                    return 413, self._too_large(int(length)), "body_too_large"
        return None

    def _same_origin(self, origin: str, host: str) -> bool:
        if origin.rstrip("/").lower() in self.origins:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and bool(host) and parts.netloc.lower() == host.lower()

    def _too_large(self, size: int) -> str:
        return f"request body of {size} bytes is over this server's limit of {self.limits.max_body_bytes} bytes"


def _strip_port(host: str) -> str:
    if host.startswith("["):  # [::1]:8000
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class GuardMiddleware:
    """ASGI middleware applying a :class:`RequestGuard`; bodies are read here (capped) and replayed."""

    def __init__(self, app: Any, guard: RequestGuard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = _with_security_headers(send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self.guard.refusal(scope["method"], headers)
        if refusal is not None:
            status, message, code = refusal
            return await error_response(status, message, code=code)(scope, receive, send)
        if scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.guard.limits.body_timeout_s)
        except ApiError as err:
            return await error_response(err.status, err.message, code=err.code)(scope, receive, send)
        except TimeoutError:
            message = f"the request body did not arrive within {self.guard.limits.body_timeout_s:g} s"
            return await error_response(408, message, code="body_timeout")(scope, receive, send)
        if body is None:  # the client left before sending its body
            return None
        return await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Callable) -> bytes | None:
        chunks, size, limit = [], 0, self.guard.limits.max_body_bytes
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is over this server's limit of {limit} bytes",
                               code="body_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Callable) -> Callable:
    """A ``receive`` that hands the app the body once, then the real channel (disconnects)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _with_security_headers(send: Callable) -> Callable:
    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start":
            message.setdefault("headers", [])
            message["headers"] = [*message["headers"], (b"x-content-type-options", b"nosniff")]
        await send(message)

    return wrapped


class Slots:
    """Work in progress on one replica, bounded: past ``limit`` a request gets 503 with ``Retry-After``.

    The replica's own queue (engine rows, Serve batches) is then never longer than ``limit`` items.
    """

    def __init__(self, limit: int, retry_after_s: int, what: str) -> None:
        self.limit, self.retry_after_s, self.what = limit, retry_after_s, what
        self.used = 0
        self.refused = 0

    def take(self, count: int) -> Callable[[], None]:
        """Reserve ``count`` items (or raise the 503); returns an idempotent release."""
        if self.used + count > self.limit:
            self.refused += 1
            raise ApiError(503, f"server busy: {self.used} {self.what} in progress, the limit is {self.limit}; "
                                f"retry in {self.retry_after_s} s", code="server_busy",
                           headers={"Retry-After": str(self.retry_after_s)})
        self.used += count
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.used -= count

        return release
