"""Bearer tokens, client and server side alike: where they come from and how they are compared.

Neutral ground for every layer that speaks HTTP (the annotator's client, the CLI's chat client, the Serve
apps), so none of them imports another's package. A token is read from an environment variable, never from
a config file; a server only ever holds its SHA-256 digest.
"""

from __future__ import annotations

import hashlib
import os

from steerray.errors import SteerrayError

DEFAULT_TOKEN_ENV = "STEERRAY_API_TOKEN"


def token_digest(token: str | None) -> str | None:
    """SHA-256 hex digest of a token (None stays None: no authentication)."""
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def token_from_env(env_var: str | None = DEFAULT_TOKEN_ENV) -> str | None:
    """The bearer token named by ``env_var``, or None when unset or empty."""
    return (os.environ.get(env_var) or None) if env_var else None


def auth_headers(token: str | None) -> dict[str, str]:
    """Client side: the header to send for ``token`` (none without one)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_exposure(host: str, token: str | None, token_env: str) -> None:
    """Refuse to serve beyond this machine without a bearer token: anyone who reaches the port could use it."""
    if host not in LOOPBACK_HOSTS and not token:
        raise SteerrayError(f"refusing to serve on {host} without a bearer token: anyone who can reach this "
                            f"machine could use the server. Set ${token_env} (or bind --host 127.0.0.1)")
