"""Starting Ray safely and running a stage's job: embedded locally, or submitted to a cluster.

Embedded Ray is started loopback-only and quiet (see docs on Ray's traps on small CPU machines). With
``--address`` or ``RAY_ADDRESS`` the CLI submits ``python jobs/<stage>.py --config-b64 ...`` as a Ray
job, the working tree as its ``working_dir``, and follows the job's logs until it ends.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from steerray.config import REPO_ROOT
from steerray.errors import SteerrayError

JOBS_DIR = REPO_ROOT / "jobs"
# Set before Ray starts: bind every Ray socket to loopback, no token dance on a laptop, no telemetry.
SAFE_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_V2_ENABLED": "1",
}
# Never shipped to a cluster with the working tree.
SUBMIT_EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", ".pytest_cache", "wandb", "*.egg-info"]

log = logging.getLogger("steerray")


class JobFailed(SteerrayError, RuntimeError):
    """A stage's Ray job ended in failure; the message carries its last log lines."""


def apply_safe_env() -> None:
    for key, value in SAFE_RAY_ENV.items():
        os.environ.setdefault(key, value)


def init_ray(num_cpus: int | None = None, object_store_mb: int | None = None) -> None:
    """Connect to the cluster named by RAY_ADDRESS, else start an embedded local Ray (once)."""
    import ray

    if ray.is_initialized():
        return
    apply_safe_env()
    logging_config = ray.LoggingConfig(log_level="ERROR")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_config=logging_config)
    else:
        for attempt in range(3):
            try:
                ray.init(
                    num_cpus=num_cpus,
                    include_dashboard=False,
                    object_store_memory=object_store_mb * 1024**2 if object_store_mb else None,
                    logging_config=logging_config,
                )
                break
            except Exception as err:  # Ray gives its raylet a fixed 30 s to register: too short on a busy box
                if "timed out during startup" not in str(err) or attempt == 2:
                    raise
                log.warning("Ray's node start-up timed out (busy machine?); retrying")
                ray.shutdown()
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve_until_stopped(app_name: str, what: str) -> None:
    """Block while a Serve application runs; on Ctrl-C or SIGTERM (``kill``, Kubernetes, a shell's
    background job, where SIGINT is ignored) take the application down and return normally."""
    from ray import serve

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print(f"[steerray] stopping the {what}", file=sys.stderr, flush=True)
    finally:
        serve.delete(app_name)


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0))


def load_job_module(stage_file: str) -> ModuleType:
    """Import ``jobs/<stage_file>.py`` by path (jobs are scripts, not package modules)."""
    path = JOBS_DIR / f"{stage_file}.py"
    if not path.is_file():
        raise FileNotFoundError(f"job script {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"steerray_job_{stage_file}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def encode_config(yaml_text: str) -> str:
    return base64.urlsafe_b64encode(yaml_text.encode()).decode()


def decode_config(blob: str) -> str:
    return base64.urlsafe_b64decode(blob.encode()).decode()


def run_job(stage_file: str, config_yaml: str, address: str | None = None, wait: bool = True) -> Any:
    """Run a stage: in this process on embedded Ray, or as a Ray job on the cluster at ``address``."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        module = load_job_module(stage_file)
        return module.main(["--config-b64", encode_config(config_yaml)])
    return submit_job(stage_file, config_yaml, address, wait=wait)


def submit_job(stage_file: str, config_yaml: str, address: str, wait: bool = True) -> str:
    """``ray job submit`` semantics: ship the working tree, run the job script, follow its logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    apply_safe_env()
    client = JobSubmissionClient(_dashboard_address(address))
    entrypoint = f"python jobs/{stage_file}.py --config-b64 {encode_config(config_yaml)}"
    for attempt in range(10):
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint,
                runtime_env={"working_dir": str(REPO_ROOT), "excludes": SUBMIT_EXCLUDES},
                submission_id=f"steerray-{stage_file}-{int(time.time())}",
            )
            break
        except RuntimeError as err:
            # A freshly started head answers this until its per-node agent is up.
            if "No available agent" not in str(err) or attempt == 9:
                raise
            time.sleep(3)
    print(f"[steerray] submitted {stage_file} as Ray job {job_id} to {address}", file=sys.stderr)
    if not wait:
        return job_id

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(follow())
    status = client.get_job_status(job_id)
    if status != JobStatus.SUCCEEDED:
        raise JobFailed(f"Ray job {job_id} ended {status}; logs: `ray job logs {job_id} --address {address}`")
    return job_id


def _dashboard_address(address: str) -> str:
    # `ray://host:10001` and bare `host:6379` name the cluster, but jobs go through the dashboard.
    if address.startswith("http://") or address.startswith("https://"):
        return address
    host = address.removeprefix("ray://").split(":")[0] or "127.0.0.1"
    return f"http://{host}:8265"


def job_config_from_argv(argv: list[str] | None) -> str:
    """Parse a job script's ``--config PATH`` or ``--config-b64 BLOB`` into the config's YAML text."""
    import argparse

    parser = argparse.ArgumentParser()
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", help="resolved config YAML written by the steerray CLI")
    group.add_argument("--config-b64", help="the same, base64-encoded (how the CLI submits jobs)")
    args = parser.parse_args(argv)
    return Path(args.config).read_text(encoding="utf-8") if args.config else decode_config(args.config_b64)
