"""Stage `serve`: a steerable chat model on Ray Serve, OpenAI-compatible, with a playground page.

Launch it through the CLI (embedded Ray; serves until Ctrl-C or SIGTERM):

    steerray serve --model runs/exp/sft/model [--port 8000] [--replicas 1] [--engine auto]
    steerray serve --model smollm2-135m          # any causal LM works; SteerLM-trained ones steer

or as a Ray job on a cluster (with `block: false` the job deploys and returns; Serve keeps the app):

    ray job submit -- python -m steerray.stages.serve --config CONFIG.yaml

Then open http://127.0.0.1:8000/ (playground), or:

    curl -s http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \
        -d '{"messages": [{"role": "user", "content": "Why is the sky blue?"}], "steering": {"verbosity": 0}}'

The bearer token is read from the environment variable named by `token_env` (never from config files or
the command line). The server binds 127.0.0.1 unless `host` says otherwise, and refuses any other host
without a token.
"""

from __future__ import annotations

import sys
from typing import Any

from steerray.auth import check_exposure, token_from_env
from steerray.config import ServeConfig
from steerray.models.loading import resolve_model
from steerray.runtime import init_ray, serve_until_stopped
from steerray.serving.chat_app import start_chat_server
from steerray.stages import StageResult, job_main


def check(config: ServeConfig) -> None:
    resolve_model(config.model)  # a typo in --model fails here, before Ray starts
    check_exposure(config.host, token_from_env(config.token_env), config.token_env)


# 1. Start Serve's HTTP proxy and deploy the model (returns when the replicas are healthy).
def start(config: ServeConfig) -> str:
    token = token_from_env(config.token_env)
    url = start_chat_server(config, token)
    auth = f"bearer token from ${config.token_env}" if token else f"no authentication (set ${config.token_env})"
    print(f"[steerray] {config.model} serving at {url}/v1/chat/completions ({auth}); playground at {url}/",
          file=sys.stderr, flush=True)
    return url


# 2. Serve until interrupted (Ctrl-C or SIGTERM), then take the application down.
def run(config: ServeConfig) -> StageResult:
    init_ray()
    url = start(config)
    if config.block:
        serve_until_stopped(config.app_name, "chat server")
    return StageResult({"url": url, "app": config.app_name, "replicas": config.replicas, "engine": config.engine})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return job_main("serve", argv)


if __name__ == "__main__":
    main()
