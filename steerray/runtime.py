"""Starting Ray safely, and running a stage as a Ray job on a cluster.

Embedded Ray (no ``--address``, no ``RAY_ADDRESS``) is started on loopback only: every socket of every
Ray process listens on 127.0.0.1. Ray decides that when ``ray`` is first imported (it reads
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` at import time), so ``steerray/__init__.py`` calls
:func:`prepare_environment` before any steerray module can import Ray, and :func:`init_ray` pins the
node address to 127.0.0.1 as well. Token authentication is switched off only for that loopback-only
Ray; a cluster keeps whatever its operator set.

With ``--address`` the CLI submits ``python -m steerray.stages.<stage> --config-b64 ...``: the job runs
the steerray installed on the cluster (no working tree is uploaded), secrets travel in the job's
environment (never in its command line), and the CLI follows the job's logs until it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import signal
import sys
import time
from typing import Any, TypeVar

from pydantic import BaseModel

from steerray.config import load_config, validate_config
from steerray.errors import SteerrayError

LOOPBACK = "127.0.0.1"
# Before the first `import ray`: no telemetry, quiet tokenizers, Train V2.
IMPORT_TIME_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_V2_ENABLED": "1",
}
# Only for the embedded Ray: every socket on loopback (read at import time), and, since nothing is reachable
# from elsewhere, no token dance on a laptop. A driver connecting to a cluster must not bind to loopback.
EMBEDDED_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}

log = logging.getLogger("steerray")
T = TypeVar("T", bound=BaseModel)


class JobFailed(SteerrayError, RuntimeError):
    """A stage's Ray job ended in failure; the message says where its logs are."""


def connecting_to_cluster() -> bool:
    return bool(os.environ.get("RAY_ADDRESS"))


def prepare_environment() -> None:
    """Set Ray's import-time settings; if Ray was imported first, its bind setting may come too late."""
    for key, value in IMPORT_TIME_ENV.items():
        os.environ.setdefault(key, value)
    if connecting_to_cluster():
        return
    if "ray" in sys.modules and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ:
        log.warning("ray was imported before steerray: the embedded Ray may listen beyond 127.0.0.1")
    for key, value in EMBEDDED_ENV.items():
        os.environ.setdefault(key, value)


def init_ray(num_cpus: int | None = None, object_store_mb: int | None = None) -> None:
    """Connect to the cluster named by RAY_ADDRESS, else start an embedded loopback-only Ray (once)."""
    import ray

    if ray.is_initialized():
        return
    prepare_environment()
    logging_config = ray.LoggingConfig(log_level="ERROR")
    if connecting_to_cluster():
        ray.init(address=os.environ["RAY_ADDRESS"], logging_config=logging_config)
    else:
        _start_embedded(num_cpus, object_store_mb, logging_config)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()


def _start_embedded(num_cpus: int | None, object_store_mb: int | None, logging_config: Any) -> None:
    import ray

    for attempt in range(3):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address=LOOPBACK,
                     object_store_memory=object_store_mb * 1024**2 if object_store_mb else None,
                     logging_config=logging_config,
                     runtime_env={"worker_process_setup_hook": "steerray.runtime.keep_workers_on_loopback"})
            return
        except Exception as err:  # Ray gives its raylet a fixed 30 s to register: too short on a busy box
            if "timed out during startup" not in str(err) or attempt == 2:
                raise
            log.warning("Ray's node start-up timed out (busy machine?); retrying")
            ray.shutdown()


SERVE_REPLICA_MODULE = "ray.serve._private.replica"


def keep_workers_on_loopback() -> None:
    """Runs in every worker process of the embedded Ray (``worker_process_setup_hook``). Ray Serve 2.60
    starts each replica's inter-deployment gRPC server on ``[::]:0``, every interface, whatever the node's
    address: bind it to 127.0.0.1 like the rest of the embedded Ray (measured: tests/ray/test_security.py).
    Patched when Serve's replica module is imported, so workers that never host a replica pay nothing."""
    if SERVE_REPLICA_MODULE in sys.modules:
        _patch_replica(sys.modules[SERVE_REPLICA_MODULE])
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(SERVE_REPLICA_MODULE, _patch_replica))


def _patch_replica(replica: Any) -> None:
    bind = replica.add_port_to_grpc_server
    if getattr(bind, "steerray_loopback", False):
        return

    def on_loopback(server: Any, address: str) -> int:
        host, _, port = address.rpartition(":")
        return bind(server, f"{LOOPBACK}:{port}" if host in ("[::]", "0.0.0.0", "") else address)

    on_loopback.steerray_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = on_loopback


class _AfterImport:
    """A meta-path finder that runs ``then(module)`` right after ``name`` is first imported."""

    def __init__(self, name: str, then: Any) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            execute, then = spec.loader.exec_module, self.then

            def exec_and_patch(module: Any) -> None:
                execute(module)
                then(module)

            spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0))


# --------------------------------------------------------------------------------------------------
# Servers: block until stopped
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# Jobs: one config in, validated once
# --------------------------------------------------------------------------------------------------

def encode_config(config: BaseModel) -> str:
    return base64.urlsafe_b64encode(json.dumps(config.model_dump(mode="json")).encode()).decode()


def config_from_argv(model: type[T], argv: list[str] | None, source: str, stage_file: str | None = None) -> T:
    """A job's ``--config FILE`` (a YAML file, or a shipped preset such as ``cluster/sft``) or ``--config-b64
    BLOB`` (JSON, how the CLI submits a config it has loaded), validated."""
    parser = argparse.ArgumentParser(description=f"{source}: run one steerray stage")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", help="the stage's YAML file (e.g. a run folder's config.yaml) or a preset")
    group.add_argument("--config-b64", help="the config as base64 JSON (how the steerray CLI submits jobs)")
    args = parser.parse_args(argv)
    if args.config:
        return load_config(model, args.config, stage_file=stage_file)
    return validate_config(model, json.loads(base64.urlsafe_b64decode(args.config_b64)), source)


def dashboard_address(address: str) -> str:
    # `ray://host:10001` and bare `host:6379` name the cluster, but jobs go through the dashboard.
    if address.startswith(("http://", "https://")):
        return address
    host = address.removeprefix("ray://").split(":")[0] or LOOPBACK
    return f"http://{host}:8265"


def submit_job(module: str, config: BaseModel, address: str, *, env_vars: dict[str, str] | None = None,
               wait: bool = True) -> str:
    """``ray job submit`` semantics: run ``python -m steerray.stages.<module>`` on the cluster's installed
    steerray, with ``env_vars`` (secrets) in the job's environment, and follow its logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard_address(address))
    entrypoint = f"python -m steerray.stages.{module} --config-b64 {encode_config(config)}"
    runtime_env = {"env_vars": dict(env_vars)} if env_vars else None
    job_id = _submit_with_retries(client, entrypoint, runtime_env, f"steerray-{module}-{int(time.time())}")
    print(f"[steerray] submitted {module} as Ray job {job_id} to {address}", file=sys.stderr, flush=True)
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


def _submit_with_retries(client: Any, entrypoint: str, runtime_env: dict[str, Any] | None, job_id: str) -> str:
    for attempt in range(10):
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id)
        except RuntimeError as err:
            # A freshly started head answers this until its per-node agent is up.
            if "No available agent" not in str(err) or attempt == 9:
                raise
            time.sleep(3)
    raise AssertionError("unreachable")
