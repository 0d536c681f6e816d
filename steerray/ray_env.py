"""What Ray is told before it starts, and what every worker of the embedded Ray runs first.

Kept apart from ``steerray.runtime`` and light on purpose (the standard library only): ``steerray/__init__.py``
calls :func:`prepare_environment` before any steerray module can import Ray, and Ray imports
:func:`keep_workers_on_loopback` in every worker process of the embedded Ray, Ray's own actors included (Ray
Train's controller, synchronization and clean-up actors, Ray Data's stats actor, Serve's controller). Through
``steerray.runtime`` each of those processes imported the config layer and pydantic as well: ~0.35 s of CPU per
process on a quiet box, several times that while a fit's processes start together on 2 cores.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger("steerray")

LOOPBACK = "127.0.0.1"
# Before the first `import ray` (some are read then): no telemetry, quiet tokenizers, Train V2, its poll interval.
IMPORT_TIME_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_V2_ENABLED": "1",
    # Train V2's controller polls its workers every 2 s by default, and a fit waits for a poll to see its
    # workers started, each checkpoint reported and the run ended: 0.5 s saves ~3 s of every fit (a tiny
    # train-sft command: 68 -> 65 s at 0.25 s). Passed on to the controller and workers with the driver's env.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
# Only for the embedded Ray: every socket on loopback (read at import time), and, since nothing is reachable
# from elsewhere, no token dance on a laptop. A driver connecting to a cluster must not bind to loopback.
# Ray Train starts a PreemptionWatcher actor with every worker group, a process that watches for nodes being
# drained; one local node is never drained, and on 2 cores that process's start-up delays the workers'
# (a tiny train-sft command: 2.9-6.5 s less in each of 5 alternating pairs). Clusters keep it.
EMBEDDED_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


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
