"""Stage `serve`: a steerable chat model on Ray Serve, OpenAI-compatible, with a playground page.

Launch it through the CLI (embedded Ray; serves until Ctrl-C):

    steerray serve --model runs/exp/sft/model [--port 8000] [--replicas 1] [--engine auto] [--token T]
    steerray serve --model smollm2-135m          # any causal LM works; SteerLM-trained ones steer

or as a Ray job on a cluster (with `block: false` the job deploys and returns; Serve keeps the app):

    ray job submit --working-dir . -- python jobs/serve.py --config CONFIG.yaml

Then open http://127.0.0.1:8000/ (playground), or:

    curl -s http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \
        -d '{"model": "sft/model", "messages": [{"role": "user", "content": "Why is the sky blue?"}],
             "steering": {"verbosity": 0}, "max_tokens": 64}'

The bearer token is read from the environment variable named by `token_env` (never from config files);
without it the endpoint is open, and binds 127.0.0.1 unless `host` says otherwise.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import yaml

from steerray.auth import token_from_env
from steerray.config import ServeConfig, validate_config
from steerray.runtime import init_ray, job_config_from_argv, serve_until_stopped

log = logging.getLogger("steerray.serve")


# 1. Start Serve's HTTP proxy and deploy the model (returns when the replicas are healthy).
def start(config: ServeConfig) -> str:
    from steerray.serving.chat_app import start_chat_server

    token = token_from_env(config.token_env)
    url = start_chat_server(config, token)
    auth = f"bearer token from ${config.token_env}" if token else f"no authentication (set ${config.token_env})"
    print(f"[steerray] {config.model} serving at {url}/v1/chat/completions ({auth}); playground at {url}/ ; "
          f"docs at {url}/docs", file=sys.stderr, flush=True)
    return url


# 2. Serve until interrupted (Ctrl-C or SIGTERM), then take the application down.
def serve_forever(config: ServeConfig) -> None:
    serve_until_stopped(config.app_name, "chat server")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config = validate_config(ServeConfig, yaml.safe_load(job_config_from_argv(argv)) or {}, "serve config")
    init_ray()
    url = start(config)
    if config.block:
        serve_forever(config)
    return {"url": url, "app": config.app_name, "replicas": config.replicas, "engine": config.engine}


if __name__ == "__main__":
    main(sys.argv[1:])
