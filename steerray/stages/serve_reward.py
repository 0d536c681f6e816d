"""Stage `serve-reward`: the attribute reward model as a Ray Serve HTTP endpoint with dynamic batching.

Launch it through the CLI (embedded Ray; serves until Ctrl-C or SIGTERM):

    STEERRAY_API_TOKEN=secret steerray serve-reward --model runs/exp/reward/model [--port 8000] \
        [--replicas 1] [--max-batch-size 32]

or as a Ray job on a cluster (with `block: false` the job deploys and returns; Serve keeps the app):

    ray job submit -- python -m steerray.stages.serve_reward --config CONFIG.yaml

Then:

    curl -s http://127.0.0.1:8000/health
    curl -s -H "Authorization: Bearer secret" -H "Content-Type: application/json" \
        -d '{"conversations": [{"conversations": [{"from": "User", "value": "Hi"},
             {"from": "Assistant", "value": "Hello! How can I help?"}]}]}' http://127.0.0.1:8000/score

The bearer token is read from the environment variable named by `token_env` (never from config files or
the command line). The server binds 127.0.0.1 unless `host` says otherwise, and refuses any other host
without a token.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from steerray.auth import check_exposure, token_from_env
from steerray.config import ServeRewardConfig
from steerray.models.reward import RewardModelError
from steerray.runtime import init_ray, serve_until_stopped
from steerray.serving.reward_app import start_reward_server
from steerray.stages import StageResult, job_main


def check(config: ServeRewardConfig) -> None:
    if not (Path(config.model) / "config.json").is_file():
        raise RewardModelError(f"--model {config.model}: not a reward-model folder (no config.json); pass the "
                               "`model` folder train-reward wrote")
    check_exposure(config.host, token_from_env(config.token_env), config.token_env)


# 1. Start Serve's HTTP proxy and deploy the reward model (returns when the replicas are healthy).
def start(config: ServeRewardConfig) -> str:
    token = token_from_env(config.token_env)
    url = start_reward_server(config, token)
    auth = f"bearer token from ${config.token_env}" if token else f"no authentication (set ${config.token_env})"
    print(f"[steerray] reward model {config.model} serving at {url}/score ({auth})", file=sys.stderr, flush=True)
    return url


# 2. Serve until interrupted (Ctrl-C or SIGTERM), then take the application down.
def run(config: ServeRewardConfig) -> StageResult:
    init_ray()
    url = start(config)
    if config.block:
        serve_until_stopped(config.app_name, "reward server")
    return StageResult({"url": url, "app": config.app_name, "replicas": config.replicas})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return job_main("serve_reward", argv)


if __name__ == "__main__":
    main()
