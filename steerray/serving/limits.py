"""What one request may cost the two servers, in one place: sizes, counts, time, queue depth, origins.

Each server's app builder takes one of these dataclasses (defaults suit a single user on a CPU box and a
modest GPU server); the replica hands the HTTP part to :class:`steerray.serving.http.RequestGuard` and
checks the rest in its routes. Every limit answers a 4xx naming it (413 for sizes, 503 with
``Retry-After`` for a full queue or a request over its time), so a client learns which knob to ask for.
"""

from __future__ import annotations

from dataclasses import dataclass

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "", "*"})


@dataclass(frozen=True)
class HttpLimits:
    """Limits every route of a server shares (enforced before a route runs)."""

    max_body_bytes: int = 1 << 20  # checked against Content-Length before reading, and while reading
    body_timeout_s: float = 30.0  # a client that trickles its body gets 408 after this long
    request_timeout_s: float = 300.0  # work beyond this answers 503 (and is cancelled)
    max_json_depth: int = 32  # nesting of arrays/objects; SteerLM requests need about 5
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides the bind address (and loopback)
    allowed_origins: tuple[str, ...] = ()  # browser origins besides the server's own (e.g. a web UI)
    retry_after_s: int = 1  # the Retry-After of a 503

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_json_depth", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("body_timeout_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{type(self).__name__}.{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class ChatLimits(HttpLimits):
    """``steerray serve``: generation cost per request and the replica's queue."""

    max_body_bytes: int = 1 << 20  # a 4096-token context is ~16 KB of text; 1 MiB leaves room for history
    max_generated_tokens: int = 8192  # n * max_tokens (or n * the default budget) per request
    max_stop_chars: int = 256  # per stop string: the stream filter's cost grows with its square
    max_inflight_sequences: int = 256  # answers generating or waiting per replica; more get 503
    max_queued_requests: int = 1024  # Serve's own queue in front of the replica (its 503 + Retry-After)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_generated_tokens", "max_stop_chars", "max_inflight_sequences", "max_queued_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"ChatLimits.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class RewardLimits(HttpLimits):
    """``steerray serve-reward``: scoring cost per request and the replica's queue."""

    max_body_bytes: int = 16 << 20  # annotate --via sends 256 texts per request; long HelpSteer2 rows fit
    max_scored_turns: int = 1024  # texts, or scored Assistant turns over all conversations, per request
    # Characters of the texts the model reads: for `texts` the body cap comes first; a conversation's scored
    # turns each repeat its history, so 200 turns of 100 KB would make 1 GB of prompts without this.
    max_chars_per_request: int = 16_000_000
    max_inflight_texts: int = 8192  # texts scoring or waiting per replica; more get 503
    max_queued_requests: int = 1024  # Serve's own queue in front of the replica (its 503 + Retry-After)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_scored_turns", "max_chars_per_request", "max_inflight_texts", "max_queued_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"RewardLimits.{name} must be >= 1, got {getattr(self, name)}")


def normalize_host(host: str) -> str:
    """``[::1]`` -> ``::1``, ``LocalHost.`` -> ``localhost``: how Host names are compared."""
    return host.strip().strip("[]").rstrip(".").lower()


def allowed_hostnames(bind_host: str, extra: tuple[str, ...] = ()) -> frozenset[str] | None:
    """Host names a request may address: the bind address, loopback names when bound to loopback, ``extra``.

    None (no Host check) when bound to every interface and no ``extra`` names are given: the server then
    cannot know its public names; the Origin check still refuses other sites.
    """
    bind = normalize_host(bind_host)
    names = frozenset(normalize_host(h) for h in extra)
    if bind in WILDCARD_HOSTS:
        return (names | LOOPBACK_HOSTS) if names else None
    if bind in LOOPBACK_HOSTS or bind.startswith("127."):
        return names | LOOPBACK_HOSTS | {bind}
    return names | {bind}
