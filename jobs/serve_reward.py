"""Stage `serve-reward`: the attribute reward model as a Ray Serve HTTP endpoint with dynamic batching.

Launch it through the CLI (embedded Ray; serves until Ctrl-C):

    STEERRAY_API_TOKEN=secret steerray serve-reward --model runs/exp/reward/model [--port 8000] \
        [--replicas 1] [--max-batch-size 32]

or as a Ray job on a cluster (with `block: false` the job deploys and returns; Serve keeps the app):

    ray job submit --working-dir . -- python jobs/serve_reward.py --config CONFIG.yaml

Then:

    curl -s http://127.0.0.1:8000/health
    curl -s -H "Authorization: Bearer secret" -H "Content-Type: application/json" \
        -d '{"conversations": [{"conversations": [{"from": "User", "value": "Hi"},
             {"from": "Assistant", "value": "Hello! How can I help?"}]}]}' http://127.0.0.1:8000/score

The bearer token is read from the environment variable named by `token_env` (never from config files);
without it the endpoint is open, and binds 127.0.0.1 unless `host` says otherwise.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import yaml

from steerray.auth import token_from_env
from steerray.config import ServeRewardConfig, validate_config
from steerray.runtime import init_ray, job_config_from_argv, serve_until_stopped

log = logging.getLogger("steerray.serve_reward")


# 1. Start Serve's HTTP proxy and deploy the reward model (returns when the replicas are healthy).
def start(config: ServeRewardConfig) -> str:
    from steerray.serving.reward_app import start_reward_server

    token = token_from_env(config.token_env)
    url = start_reward_server(config, token)
    auth = f"bearer token from ${config.token_env}" if token else f"no authentication (set ${config.token_env})"
    print(f"[steerray] reward model {config.model} serving at {url}/score ({auth}); docs at {url}/docs",
          file=sys.stderr, flush=True)
    return url


# 2. Serve until interrupted (Ctrl-C or SIGTERM), then take the application down.
def serve_forever(config: ServeRewardConfig) -> None:
    serve_until_stopped(config.app_name, "reward server")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config = validate_config(ServeRewardConfig, yaml.safe_load(job_config_from_argv(argv)) or {}, "serve-reward config")
    init_ray()
    url = start(config)
    if config.block:
        serve_forever(config)
    return {"url": url, "app": config.app_name, "replicas": config.replicas}


if __name__ == "__main__":
    main(sys.argv[1:])
