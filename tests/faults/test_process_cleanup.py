"""The embedded Ray goes with its driver: kill -9 of a stage, and one SIGTERM to `steerray serve` (to the
process, or to its process group as `kill -- -PGID`, `timeout` and systemd send it), leave no Ray process.

Each driver runs in its own session (its PID is its process-group id), so the group signals reach only it,
its Ray and nothing else on the machine (never `ray stop`, which stops every Ray of the user).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from fault_support import (
    alive,
    command_line,
    descendants,
    describe,
    python,
    spawn,
    spawn_chat_server,
    titled,
    wait_for,
)
from serve_support import free_port, steerable_model_dir

pytestmark = pytest.mark.faults

DRIVER = """
import time
import ray
from steerray.runtime import init_ray
init_ray(num_cpus=1, object_store_mb=128)
assert ray.get(ray.remote(lambda: 1).remote()) == 1  # a worker process too
print("ready", flush=True)
time.sleep(300)
"""


def started(log: Path, word: str) -> bool:
    return log.exists() and word in log.read_text(errors="replace")


def test_kill9_of_an_embedded_driver_leaves_no_ray_process(tmp_path):
    log = tmp_path / "driver.log"
    driver = spawn(python("-c", DRIVER), log)
    try:
        wait_for(lambda: started(log, "ready") or driver.poll() is not None, 60, "the driver's Ray")
        assert driver.poll() is None, log.read_text()[-3000:]
        ray_processes = descendants(driver.pid)
        # whole command lines: cut to 90 characters, a long checkout path hid gcs_server's name (a clone
        # under /tmp/tmp.XXXXXXXXXX/ read ".../ray/gcs/gcs_serve")
        names = " ".join(line for p in ray_processes if (line := command_line(p)) is not None)
        assert "raylet" in names and "gcs_server" in names and "DashboardAgent" in names, describe(ray_processes)
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone, as the OOM killer or `kill -9 PID` would
        driver.wait(10)
        # Ray's agents waited a minute and more for the dead GCS before; now they go within seconds.
        deadline = time.monotonic() + 15
        while alive(ray_processes) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(ray_processes), (
            f"alive 15 s after kill -9 of the driver: {describe(alive(ray_processes))}"
        )
    finally:
        _kill_leftovers(driver.pid, ray_processes if "ray_processes" in locals() else [])


@pytest.mark.parametrize("target", ["process", "group"])
def test_one_sigterm_stops_serve_and_its_ray_within_seconds(tmp_path, target):
    port, log = free_port(), tmp_path / "serve.log"
    server = spawn_chat_server(steerable_model_dir(), port, log)
    ray_processes = []
    try:
        # "serving at" is printed once the replicas are healthy and the server waits for its signal.
        wait_for(lambda: started(log, "serving at") or server.poll() is not None, 80, "the chat server")
        assert server.poll() is None and _healthy(port), log.read_text()[-3000:]
        ray_processes = descendants(server.pid)
        assert titled(server.pid, "ServeReplica"), describe(ray_processes)
        started_at = time.monotonic()
        if target == "group":
            os.killpg(server.pid, signal.SIGTERM)
        else:
            os.kill(server.pid, signal.SIGTERM)
        try:
            server.wait(20)
        except Exception:
            pytest.fail(
                f"steerray serve still running 20 s after one SIGTERM to its {target}:\n"
                f"{log.read_text()[-2000:]}"
            )
        wait_for(
            lambda: not alive(ray_processes), 10, f"Ray's processes to go: {describe(alive(ray_processes))}"
        )
        took = time.monotonic() - started_at
        assert server.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM), log.read_text()[-2000:]
        assert took < 20, took
    finally:
        _kill_leftovers(server.pid, ray_processes)


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _kill_leftovers(pid: int, processes: list) -> None:
    """Whatever a failed test left behind: this driver's group and the processes it had started, by PID."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in alive(processes):
        try:
            proc.kill()
        except Exception:
            pass
