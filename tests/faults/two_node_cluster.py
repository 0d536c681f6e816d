"""Hosts a two-node Ray cluster on this machine for tests/faults/test_two_node.py, every socket on 127.0.0.1.

    python tests/faults/two_node_cluster.py INFO_JSON TEMP_DIR HEAD_CPUS SECOND_CPUS

Writes INFO_JSON (the GCS address; per node its id, raylet PID and process PIDs), then keeps the cluster up
until its stdin closes (the test's end, or the test runner's death by any signal), and shuts it down.

Why not ``ray start``: a worker node's ``ray start`` on Linux refuses to run with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, and without it resolves ``127.0.0.1`` (``--address`` and
``--node-ip-address``) to the machine's external address, so its node would listen beyond loopback.
``ray.cluster_utils.Cluster`` (Ray's own multi-node test harness) starts each node's processes directly.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

OBJECT_STORE_BYTES = 96 * 1024**2  # per node: the tiny run's blocks are kilobytes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_info(node: Any) -> dict[str, Any]:
    """A ``ray._private.node.Node``'s id, its raylet's PID (workers and agents are the raylet's children), and
    the PIDs of the processes it started itself."""
    processes = [info.process.pid for infos in node.all_processes.values() for info in infos]
    return {"node_id": node.node_id, "raylet": node.all_processes["raylet"][0].process.pid, "pids": processes}


def main(info_path: Path, temp_dir: str, head_cpus: int, second_cpus: int) -> None:
    # Before `import ray`, which reads the loopback setting once; RAY_TMPDIR keeps Ray's files (sessions, and
    # the "current cluster" address file Cluster writes) in TEMP_DIR/ray, away from any other Ray on the machine.
    # The head's autoscaler and dashboard serve metrics on fixed ports (44217, 44227) another Ray may hold.
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                      RAY_TMPDIR=temp_dir, AUTOSCALER_METRIC_PORT=str(free_port()),
                      DASHBOARD_METRIC_PORT=str(free_port()))
    (Path(temp_dir) / "ray").mkdir(exist_ok=True)
    from ray.cluster_utils import Cluster

    common: dict[str, Any] = {"object_store_memory": OBJECT_STORE_BYTES, "node_ip_address": "127.0.0.1"}
    # The dashboard agent's default port (52365) is fixed: another Ray on the machine may hold it.
    cluster = Cluster(initialize_head=True, head_node_args={
        **common, "num_cpus": head_cpus, "include_dashboard": False,
        "dashboard_agent_listen_port": free_port()})
    try:
        second = cluster.add_node(**common, num_cpus=second_cpus)
        cluster.wait_for_nodes(timeout=60)
        info = {"address": cluster.address, "head": node_info(cluster.head_node), "second": node_info(second)}
        info_path.with_suffix(".tmp").write_text(json.dumps(info))
        info_path.with_suffix(".tmp").replace(info_path)  # whole or not at all: the test polls for it
        sys.stdin.read()  # until the test closes the pipe, or dies
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
