"""Which Host names a server answers to. The limits themselves (sizes, counts, time, queue depth,
origins) are the servers' config sections, :class:`steerray.config.ChatLimits` and ``RewardLimits``."""

from __future__ import annotations

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "", "*"})


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
