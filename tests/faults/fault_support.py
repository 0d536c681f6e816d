"""Helpers of the fault suite: process trees, killing by PID or process group, waiting with deadlines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil  # a dependency of Ray

REPO = Path(__file__).resolve().parents[2]


def descendants(pid: int) -> list[psutil.Process]:
    """Every live process below ``pid`` (children, grandchildren, ...)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """The processes still running (a reused PID is a different process: psutil compares start times)."""
    live = []
    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                live.append(proc)
        except psutil.NoSuchProcess:
            pass
    return live


def titled(pid: int, word: str) -> list[psutil.Process]:
    """Descendants of ``pid`` whose command line (Ray sets worker titles, e.g. ``ray::RayTrainWorker``) has ``word``."""
    found = []
    for proc in descendants(pid):
        try:
            if word in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def command_line(proc: psutil.Process) -> str | None:
    """The whole command line (None once the process is gone)."""
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return None


def describe(processes: list[psutil.Process]) -> list[str]:
    """For messages: pid and the start of each command line (which can be long: a venv's full path)."""
    return [f"{proc.pid} {line[:90]}" if (line := command_line(proc)) is not None else f"{proc.pid} (gone)"
            for proc in processes]


def wait_for(condition: Callable[[], object], timeout: float, what: str, every: float = 0.2) -> object:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A child in its own session (process group = its PID), output to ``log``: killable as a group without
    touching the test runner, and never a target of signals meant for the test's own group. It runs in the
    log's folder (the test's own), so what it writes relative to its working folder (`steerray serve`'s
    resolved config under runs/serve) stays out of the checkout."""
    handle = open(log, "wb")  # noqa: SIM115 - the child owns it; closed when the test's process exits
    return subprocess.Popen(
        args,
        stdout=handle,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
        cwd=log.parent,
    )


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the child's whole process group (it leads its own session), ignoring one that is gone."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def spawn_chat_server(model: str, port: int, log: Path, *extra: str) -> subprocess.Popen:
    """``steerray serve`` of ``model`` on ``port`` in its own session, half a CPU per replica."""
    return spawn(python("-m", "steerray.cli", "serve", "--model", model, "--port", str(port), *extra,
                        "cpus_per_replica=0.5"), log)


# Training runs: data, and what a run has logged and registered so far

def write_data(path: Path, count: int) -> Path:
    """``count`` two-turn SteerLM conversations of varied length as jsonl (SFT data)."""
    from steerray.templates import make_conversation

    lines = [
        json.dumps(
            make_conversation(
                [
                    ("User", f"Tell me about topic {k}.", None),
                    ("Assistant", f"Topic {k} is fine. " * (1 + k % 5), f"helpfulness:3,verbosity:{k % 5}"),
                ]
            )
        )
        for k in range(count)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_steps_logged(out: Path) -> list[int]:
    """The train steps rank 0 has written to metrics.jsonl, in order."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if r.get("split") == "train"]


def registered_checkpoint(out: Path) -> int:
    """The step of the latest checkpoint Ray Train's controller has registered for the run (0: none yet)."""
    try:
        snapshot = json.loads((out / "checkpoints" / "sft" / "checkpoint_manager_snapshot.json").read_text())
        return int((snapshot.get("latest_checkpoint_result") or {}).get("metrics", {}).get("step", 0))
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return 0
