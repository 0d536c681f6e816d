"""Small HTTP helpers shared by steerray's FastAPI services: bearer tokens and JSON errors.

Every error a steerray service returns has one shape, the OpenAI one, so OpenAI clients and curl users
read the same thing::

    {"error": {"message": "turn 1: empty or missing 'value'", "type": "invalid_request_error",
               "param": "conversations.0", "code": "invalid_conversation"}}

``install_error_handlers(app)`` turns FastAPI's own errors (unparseable JSON, schema violations, unknown
routes) and :class:`ApiError` into that shape; ``bearer_guard(token_hash)`` builds a dependency that
checks ``Authorization: Bearer <token>``. Tokens are compared by SHA-256 digest in constant time, so a
deployment only ever holds the digest (Serve stores init args in its controller's state).
"""

# No `from __future__ import annotations`: FastAPI reads these annotations at run time, also in
# functions that cloudpickle ships to Serve replicas by value (string annotations would not resolve there).
import hmac
import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from steerray.auth import token_digest

log = logging.getLogger("steerray.serving")


# HTTP status -> OpenAI error type.
_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
    422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
}


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
        # A bug on our side, not the client's: log it, answer JSON with the reason, keep serving.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


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
