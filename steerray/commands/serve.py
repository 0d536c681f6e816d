"""`steerray serve` and `steerray chat`: steerable generation over HTTP, and a terminal client for it.

``serve`` runs ``jobs/serve.py``: the model on Ray Serve behind OpenAI-compatible routes and a playground
page. ``chat`` talks to any such server, streaming answers, with steering set on the command line and
changed between turns (``/steer verbosity=0``). The bearer token travels in an environment variable
(``STEERRAY_API_TOKEN`` unless the config's ``token_env`` names another), so it never lands in config.yaml.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import typer

from steerray.commands.common import ADDRESS_HELP, OVERRIDES_HELP, echo, fail, resolve_stage_config, run_stage
from steerray.config import ServeConfig
from steerray.errors import SteerrayError

TOKEN_HELP = "Bearer token (default: $STEERRAY_API_TOKEN). Prefer the variable: options show up in `ps`."
CHAT_HELP = "Commands: /steer name=value,...  /show  /reset  /quit"


def serve(
    model: str | None = typer.Option(None, "--model", "-m", help="SFT model folder, hub id, or alias (smollm2-135m)."),
    host: str | None = typer.Option(None, help="Interface to bind (default 127.0.0.1: this machine only)."),
    port: int | None = typer.Option(None, help="HTTP port (default 8000)."),
    replicas: int | None = typer.Option(None, help="Model replicas."),
    engine: str | None = typer.Option(None, help="auto (vLLM on GPU when installed), transformers, or vllm."),
    max_batch_size: int | None = typer.Option(None, help="Sequences decoded together (transformers engine)."),
    token: str | None = typer.Option(None, "--token", envvar="STEERRAY_API_TOKEN", help=TOKEN_HELP, show_default=False),
    config: str | None = typer.Option(None, "--config", "-c", help="YAML preset."),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Serve a steerable chat model: OpenAI-compatible /v1/chat/completions, /generate, playground at /."""
    from steerray.models.loading import resolve_model

    fields = {"model": model, "host": host, "port": port, "replicas": replicas, "engine": engine,
              "max_batch_size": max_batch_size}
    resolved: ServeConfig = resolve_stage_config(ServeConfig, config, overrides, **fields)
    try:
        resolve_model(resolved.model)  # a typo in --model fails here, before Ray starts
    except SteerrayError as err:
        fail(str(err))
    if resolved.host not in ("127.0.0.1", "localhost", "::1") and not (token or os.environ.get(resolved.token_env)):
        echo(f"warning: serving on {resolved.host} without a bearer token; set ${resolved.token_env}")
    if token:  # the job reads it from the environment: in-process (embedded Ray) this reaches it directly
        os.environ[resolved.token_env] = token
    run_stage("serve", resolved, resolved.out, address)


# --------------------------------------------------------------------------------------------------
# chat: a small terminal client
# --------------------------------------------------------------------------------------------------

def parse_steering(text: str | None) -> dict[str, int]:
    """``helpfulness=4,verbosity=0`` (``:`` works too) -> a validated dict."""
    from steerray.attributes import steering_label

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


def stream_reply(client: object, url: str, body: dict, headers: dict[str, str]) -> Iterator[str]:
    """POST a streaming chat completion and yield the text deltas (raises SteerrayError on 4xx/5xx)."""
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:  # type: ignore[attr-defined]
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


def chat(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="Server URL (steerray serve)."),
    steering: str | None = typer.Option(None, "--steering", "-s", help="e.g. helpfulness=4,verbosity=0"),
    message: str | None = typer.Option(None, "--message", help="Ask one question, print the answer, exit."),
    max_tokens: int = typer.Option(256, help="Longest answer, in tokens."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    system: str | None = typer.Option(None, help="System prompt (default: the SteerLM one)."),
    token: str | None = typer.Option(None, "--token", envvar="STEERRAY_API_TOKEN", help=TOKEN_HELP, show_default=False),
) -> None:
    """Chat with a steerray server in the terminal, streaming, steering changeable between turns."""
    import httpx

    from steerray.attributes import steering_label
    from steerray.auth import auth_headers

    try:
        values = parse_steering(steering)
    except SteerrayError as err:
        fail(str(err))
    url = url.rstrip("/")
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    headers = auth_headers(token)
    with httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0)) as client:
        if message is None:
            echo(f"steerray chat with {url}; steering {steering_label(values)}\n{CHAT_HELP}")
        while True:
            if message is not None:
                text = message
            else:
                try:
                    text = input("you> ").strip()
                except (EOFError, KeyboardInterrupt):
                    echo("")
                    return
            if not text:
                continue
            if text.startswith("/") and message is None:
                command, _, argument = text.partition(" ")
                if command in ("/quit", "/exit"):
                    return
                if command == "/reset":
                    history = history[:1] if system else []
                    echo("(conversation cleared)")
                elif command == "/steer":
                    try:
                        values = {**values, **parse_steering(argument)}
                        echo(f"(steering {steering_label(values)})")
                    except SteerrayError as err:
                        echo(f"error: {err}")
                elif command == "/show":
                    echo(f"(steering {steering_label(values)})")
                else:
                    echo(CHAT_HELP)
                continue
            history.append({"role": "user", "content": text})
            body = {"messages": history, "steering": values, "stream": True, "max_tokens": max_tokens,
                    "temperature": temperature}
            parts: list[str] = []
            try:
                if message is None:
                    print("bot> ", end="", flush=True)
                for delta in stream_reply(client, url, body, headers):
                    parts.append(delta)
                    print(delta, end="", flush=True)
                print(flush=True)
            except (SteerrayError, httpx.HTTPError) as err:
                history.pop()
                if message is not None:
                    fail(str(err), code=1)
                echo(f"error: {err}")
                continue
            history.append({"role": "assistant", "content": "".join(parts)})
            if message is not None:
                return


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("chat")(chat)
