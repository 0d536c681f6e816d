"""Two nodes: a train-sft run loses a whole node mid-run and finishes on the node that is left.

A two-node Ray cluster on this machine (``two_node_cluster.py``: every socket on 127.0.0.1); the stage's job
driver, ``python -m steerray.stages.train_sft --config-b64 ...`` (what ``steerray train-sft --address``
submits), connects to it through RAY_ADDRESS, so it lands on the head like a job's driver. ``scaling.
placement_strategy=SPREAD`` puts one worker on each node. Once Ray Train's controller has registered a
checkpoint, every process of the second node is SIGKILLed at once (the machine is lost, not one worker);
FailureConfig restarts both workers on the head, which has the CPUs for both, from that checkpoint.

Which node a worker runs on is read from the process tree: Ray's workers are children of their node's raylet.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import psutil
import pytest
from fault_support import (
    REPO,
    alive,
    descendants,
    describe,
    kill_group,
    python,
    registered_checkpoint,
    spawn,
    titled,
    train_steps_logged,
    wait_for,
    write_data,
)

from steerray.config import SFTConfig, load_config
from steerray.runtime import encode_config

pytestmark = [pytest.mark.faults]
STEPS, EVERY = 24, 4  # the kill comes up to a controller poll (0.5 s; 2 s under Ray's default) after step 4: the run must outlast that
# After the loss the head alone runs both workers (0.5 CPU each) and the restarted run's Ray Data reads.
HEAD_CPUS, SECOND_CPUS = 2, 1
HOST = Path(__file__).with_name("two_node_cluster.py")


@dataclass
class TwoNodes:
    address: str  # the GCS, 127.0.0.1:PORT
    head: dict  # node_id, raylet (PID), pids (the node's own processes; workers are the raylet's children)
    second: dict
    temp: Path  # Ray's files (RAY_TMPDIR) for this cluster and its drivers
    host: subprocess.Popen  # two_node_cluster.py: every process of the cluster is below it or in its group


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} missing)"


def cluster_processes(host: subprocess.Popen) -> list[psutil.Process]:
    """The host's descendants, and its process group's members (a killed raylet's orphans are re-parented)."""
    found = {p.pid: p for p in descendants(host.pid)}
    for proc in psutil.process_iter():
        try:
            if proc.pid not in found and os.getpgid(proc.pid) == host.pid:
                found[proc.pid] = proc
        except (psutil.Error, ProcessLookupError):
            pass
    return list(found.values())


def stop_cluster(host: subprocess.Popen) -> None:
    """Close the host's stdin (it shuts the cluster down), then SIGKILL whatever of it is left."""
    ours = cluster_processes(host)
    if host.stdin:
        host.stdin.close()
    try:
        host.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    kill_group(host)
    for proc in alive(ours + cluster_processes(host)):
        proc.kill()
    host.wait(timeout=10)
    left = alive(ours)
    _, still = psutil.wait_procs(left, timeout=10)
    assert not still, f"cluster processes left running: {describe(still)}"


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[TwoNodes]:
    """A head (HEAD_CPUS) and a second node (SECOND_CPUS), stopped with every process they started."""
    temp = Path(tempfile.mkdtemp(prefix="sr2n", dir="/tmp"))  # Ray's socket paths must stay short
    info, log = temp / "cluster.json", tmp_path / "cluster.log"
    with open(log, "wb") as handle:
        # stdin is the host's lifeline: it shuts the cluster down when the pipe closes, also if pytest dies.
        host = subprocess.Popen(python(str(HOST), str(info), str(temp), str(HEAD_CPUS), str(SECOND_CPUS)),
                                stdin=subprocess.PIPE, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=REPO)
    try:
        wait_for(lambda: info.exists() or host.poll() is not None, 120, "the two-node cluster")
        assert info.exists(), tail(log)
        nodes = json.loads(info.read_text())
        yield TwoNodes(nodes["address"], nodes["head"], nodes["second"], temp, host)
    finally:
        stop_cluster(host)
        shutil.rmtree(temp, ignore_errors=True)


def sft_config(data: Path, out: Path) -> SFTConfig:
    return load_config(SFTConfig, "tiny/sft", [
        f"data={data}", f"out={out}", f"train.max_steps={STEPS}", f"train.checkpoint_every={EVERY}",
        "scaling.strategy=ddp", "scaling.max_failures=1", "scaling.placement_strategy=SPREAD",
        "sample_prompts=[]"])


def workers_on(node: dict) -> list[int]:
    """PIDs of the Ray Train workers running on ``node`` (children of its raylet; Ray titles them)."""
    return [proc.pid for proc in titled(node["raylet"], "RayTrainWorker")]


LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def listening_beyond_loopback(processes: list[psutil.Process]) -> list[str]:
    """``ip:port process`` of every listening socket of ``processes`` that is not on loopback."""
    exposed = []
    for proc in processes:
        try:
            exposed += [f"{c.laddr.ip}:{c.laddr.port} {' '.join(proc.cmdline())[:60]}"
                        for c in proc.net_connections(kind="inet")
                        if c.status == psutil.CONN_LISTEN and c.laddr.ip not in LOOPBACK]
        except psutil.Error:  # gone meanwhile
            pass
    return exposed


def lose_node(node: dict) -> list[psutil.Process]:
    """SIGKILL every process of ``node`` at once: its raylet, what the raylet started, and its own others."""
    victims = {p.pid: p for p in descendants(node["raylet"])}
    for pid in node["pids"]:
        try:
            victims.setdefault(pid, psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    for proc in victims.values():
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    return list(victims.values())


def test_losing_a_node_mid_run_resumes_on_the_other_from_the_checkpoint(two_nodes: TwoNodes, tmp_path: Path):
    data = write_data(tmp_path / "conv.jsonl", 40)
    out, log = tmp_path / "sft", tmp_path / "driver.log"
    driver = spawn(python("-m", "steerray.stages.train_sft", "--config-b64", encode_config(sft_config(data, out))),
                   log, env={"RAY_ADDRESS": two_nodes.address, "RAY_TMPDIR": str(two_nodes.temp)})
    try:
        def placed() -> tuple[list[int], list[int]] | None:
            assert driver.poll() is None, tail(log)
            first, second = workers_on(two_nodes.head), workers_on(two_nodes.second)
            return (first, second) if first and second else None

        head_workers, second_workers = cast(tuple[list[int], list[int]],
                                            wait_for(placed, 180, "a Ray Train worker on each node"))
        assert len(head_workers) == len(second_workers) == 1, (head_workers, second_workers)
        # Both nodes, their agents, the workers and the driver (measured now that they all run).
        everything = [*cluster_processes(two_nodes.host), psutil.Process(driver.pid), *descendants(driver.pid)]
        assert not listening_beyond_loopback(everything), listening_beyond_loopback(everything)

        def checkpointed() -> int:
            assert driver.poll() is None, tail(log)
            return registered_checkpoint(out)

        checkpoint = cast(int, wait_for(checkpointed, 120, "a registered checkpoint", every=0.05))
        at_step = max(train_steps_logged(out))
        victims = lose_node(two_nodes.second)
        assert at_step < STEPS, "the node was lost after training had finished"
        wait_for(lambda: not alive(victims), 10, "the second node's processes to die")

        def restarted() -> list[int] | None:
            assert driver.poll() is None, f"the run ended before restarting on the head:\n{tail(log)}"
            pids = workers_on(two_nodes.head)
            return pids if len(pids) == 2 and head_workers[0] not in pids else None

        wait_for(restarted, 180, "both workers restarted on the head", every=0.1)
        assert driver.wait(timeout=240) == 0, tail(log)
    finally:
        kill_group(driver)

    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["steps"] == STEPS and summary["world_size"] == 2, summary
    # Restarted from the checkpoint registered when the node was lost (or one registered just after it).
    assert EVERY <= checkpoint <= summary["resumed_from"] <= at_step, (summary["resumed_from"], checkpoint, at_step)
    assert train_steps_logged(out) == list(range(1, STEPS + 1))  # every step logged once across the restart
    assert (out / "model" / "model.safetensors").stat().st_size > 0
