"""`steerray chat`: a terminal client for any steerray chat server, streaming, steering set per turn.

    steerray chat --url http://127.0.0.1:8000 --steering helpfulness=4,verbosity=0
    you> Why is the sky blue?
    you> /steer verbosity=4

The token comes from ``$STEERRAY_API_TOKEN`` (or ``--token``), never from a file.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from steerray.attributes import steering_label
from steerray.auth import auth_headers
from steerray.errors import SteerrayError

CHAT_HELP = "Commands: /steer name=value,...  /show  /reset  /quit"


def parse_steering(text: str | None) -> dict[str, int]:
    """``helpfulness=4,verbosity=0`` (``:`` works too) -> a validated dict."""
    values: dict[str, int] = {}
    for pair in (text or "").replace(" ", "").split(","):
        if not pair:
            continue
        name, sep, raw = pair.replace(":", "=").partition("=")
        if not sep or not raw.lstrip("-").isdigit():
            raise SteerrayError(f"steering {pair!r}: expected name=integer, e.g. verbosity=0")
        values[name] = int(raw)
    steering_label(values)  # unknown names and values outside 0-4 fail here, with the reason
    return values


def stream_reply(client: Any, url: str, body: dict, headers: dict[str, str]) -> Iterator[str]:
    """POST a streaming chat completion and yield the text deltas (raises SteerrayError on 4xx/5xx)."""
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            response.read()
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            raise SteerrayError(f"server answered {response.status_code}: {message}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise SteerrayError(f"server error: {chunk['error'].get('message')}")
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    yield choice["delta"]["content"]


def echo(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class ChatSession:
    url: str
    steering: dict[str, int]
    system: str | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    history: list[dict[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def command(self, text: str) -> bool:
        """Handle a ``/command`` line; False when the user asked to quit."""
        command, _, argument = text.partition(" ")
        if command in ("/quit", "/exit"):
            return False
        if command == "/reset":
            self.reset()
            echo("(conversation cleared)")
        elif command == "/steer":
            try:
                self.steering = {**self.steering, **parse_steering(argument)}
                echo(f"(steering {steering_label(self.steering)})")
            except SteerrayError as err:
                echo(f"error: {err}")
        elif command == "/show":
            echo(f"(steering {steering_label(self.steering)})")
        else:
            echo(CHAT_HELP)
        return True

    def ask(self, client: Any, headers: dict[str, str], text: str, *, show_prompt: bool) -> str:
        """One turn: stream the answer to the terminal, keep both turns in the history."""
        self.history.append({"role": "user", "content": text})
        body = {"messages": self.history, "steering": self.steering, "stream": True,
                "max_tokens": self.max_tokens, "temperature": self.temperature}
        parts: list[str] = []
        try:
            if show_prompt:
                print("bot> ", end="", flush=True)
            for delta in stream_reply(client, self.url, body, headers):
                parts.append(delta)
                print(delta, end="", flush=True)
            print(flush=True)
        except BaseException:
            self.history.pop()
            raise
        self.history.append({"role": "assistant", "content": "".join(parts)})
        return "".join(parts)


def run_chat(session: ChatSession, token: str | None, message: str | None = None) -> None:
    """Ask ``message`` once and return, or read turns from the terminal until /quit or end of input."""
    import httpx

    session.reset()
    headers = auth_headers(token)
    with httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0)) as client:
        if message is not None:
            session.ask(client, headers, message, show_prompt=False)
            return
        echo(f"steerray chat with {session.url}; steering {steering_label(session.steering)}\n{CHAT_HELP}")
        while True:
            try:
                text = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                echo("")
                return
            if text.startswith("/"):
                if not session.command(text):
                    return
            elif text:
                try:
                    session.ask(client, headers, text, show_prompt=True)
                except (SteerrayError, httpx.HTTPError) as err:
                    echo(f"error: {err}")
