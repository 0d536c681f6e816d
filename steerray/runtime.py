"""Starting Ray safely, and running a stage as a Ray job on a cluster.

Embedded Ray (no ``--address``, no ``RAY_ADDRESS``) is started on loopback only: every socket of every
Ray process listens on 127.0.0.1. Ray decides that when ``ray`` is first imported (it reads
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` at import time), so ``steerray/__init__.py`` calls
:func:`prepare_environment` (``steerray/ray_env.py``, with the settings themselves and the hook every worker
runs) before any steerray module can import Ray, and :func:`init_ray` pins the
node address to 127.0.0.1 as well. Token authentication is switched off only for that loopback-only
Ray; a cluster keeps whatever its operator set.

The embedded Ray goes with its driver however the driver ends: a small reaper process (its own session, so
signals to the driver's group do not reach it) lists the driver's descendants while it waits for the
driver's end of a pipe to close, then stops those and every process marked with the driver's
``STEERRAY_RAY_OWNER`` value (inherited through the environment), so it finds Ray's agents and workers
after they were re-parented, even those whose process title overwrote their environment. After :func:`init_ray` a SIGTERM is a
Ctrl-C for the driver (the stage unwinds, Ray shuts down at exit), and :func:`serve_until_stopped` takes a
Serve app down within seconds even when the same signal also reached Ray's own processes.

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
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any, TypeVar

from pydantic import BaseModel

from steerray.config import load_config, validate_config
from steerray.errors import SteerrayError
from steerray.ray_env import LOOPBACK, connecting_to_cluster, prepare_environment

log = logging.getLogger("steerray")
T = TypeVar("T", bound=BaseModel)


class JobFailed(SteerrayError, RuntimeError):
    """A stage's Ray job ended in failure; the message says where its logs are."""


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
        start_reaper()  # first: a driver killed while Ray starts leaves nothing behind either
        _start_embedded(num_cpus, object_store_mb, logging_config)
    if threading.current_thread() is threading.main_thread():
        # Ray's core worker leaves SIGTERM to a C++ handler that aborts the driver (exit -6, no cleanup at
        # all); make it a Ctrl-C instead, so the stage unwinds (locks, temp files) and Ray stops at exit.
        signal.signal(signal.SIGTERM, _interrupt)
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
                     runtime_env={"worker_process_setup_hook": "steerray.ray_env.keep_workers_on_loopback"})
            return
        except Exception as err:  # Ray gives its raylet a fixed 30 s to register: too short on a busy box
            if "timed out during startup" not in str(err) or attempt == 2:
                raise
            log.warning("Ray's node start-up timed out (busy machine?); retrying")
            ray.shutdown()


# --------------------------------------------------------------------------------------------------
# The reaper: the embedded Ray dies with its driver
# --------------------------------------------------------------------------------------------------

# Every process of an embedded Ray inherits this variable from the driver. After a kill -9 of the driver,
# Ray's dashboard and runtime-env agents otherwise wait a minute or more for the dead GCS before they exit
# (measured: tests/faults/test_process_cleanup.py); the reaper finds them by it, whoever their parent is now.
# But a process that sets its title (Ray's agents and workers: `ray::DashboardAgent`) may overwrite the memory
# /proc/PID/environ reads (setproctitle reuses the environment's space; seen in about half the runs), so the
# reaper also keeps a list of the driver's descendants while the driver lives, and stops those too.
OWNER_ENV = "STEERRAY_RAY_OWNER"
REAPER_GRACE_S = 2.0  # SIGTERM first; SIGKILL what is still there after this long
REAPER_POLL_S = (0.25, 2.0)  # the descendants are listed this often: at first (Ray starting), then
REAPER_FAST_S = 60.0  # ... for this long after the driver's start
_reaper: subprocess.Popen[bytes] | None = None


def start_reaper() -> str | None:
    """Start this driver's reaper (once per process) and mark the environment Ray's processes will inherit;
    returns the mark's value (None where there is no ``/proc`` to find marked processes in)."""
    global _reaper
    if not os.path.isdir("/proc/self"):
        return None
    if _reaper is not None and _reaper.poll() is None:
        return os.environ[OWNER_ENV]
    token = f"{os.getpid()}-{secrets.token_hex(8)}"
    code = "import sys; from steerray.runtime import reap_when_orphaned; reap_when_orphaned(sys.argv[1], int(sys.argv[2]))"
    # stdin is the pipe: the driver holds its write end (not inherited by the driver's other children), so
    # it closes when the driver ends, by exit, exception or SIGKILL.
    _reaper = subprocess.Popen([sys.executable, "-c", code, token, str(os.getpid())], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                               env={k: v for k, v in os.environ.items() if k != OWNER_ENV})
    os.environ[OWNER_ENV] = token
    return token


def reap_when_orphaned(token: str, driver: int | None = None, grace_s: float = REAPER_GRACE_S) -> None:
    """The reaper's body: list the driver's descendants until the driver is gone (EOF on stdin), then stop
    them and every process marked with ``token``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    driver, started, known = driver or os.getppid(), time.monotonic(), dict[int, int]()
    stdin = sys.stdin.fileno()
    while True:
        known = descendants_of({driver}, known)
        wait = REAPER_POLL_S[0] if time.monotonic() - started < REAPER_FAST_S else REAPER_POLL_S[1]
        if select.select([stdin], [], [], wait)[0] and not os.read(stdin, 4096):
            break
    stop_marked(token, grace_s, tracked=known)  # the driver's PID is not a root now: it may be re-used


def process_table() -> dict[int, tuple[int, int]]:
    """``pid -> (parent pid, start time in clock ticks)`` of every live process (zombies are dead: left out),
    from /proc/PID/stat."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()  # after "pid (comm)": comm may hold spaces
            if fields[0] != b"Z":
                table[int(name)] = (int(fields[1]), int(fields[19]))
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return table


def descendants_of(roots: set[int], known: dict[int, int] | None = None) -> dict[int, int]:
    """``known`` (``pid -> start time``) still alive, plus every live descendant of ``roots`` and of those.
    A start time tells a re-used PID from the process that had it."""
    table = process_table()
    found = {pid: start for pid, start in (known or {}).items() if table.get(pid, (0, -1))[1] == start}
    frontier = set(roots) | set(found)
    while frontier:
        children = {pid for pid, (parent, _) in table.items() if parent in frontier and pid not in found}
        found.update({pid: table[pid][1] for pid in children})
        frontier = children
    found.pop(os.getpid(), None)
    return found


def marked_processes(token: str) -> list[int]:
    """PIDs of the live processes whose environment holds ``STEERRAY_RAY_OWNER=token`` (this one excluded;
    other users' processes cannot be read, and a zombie's environment reads empty)."""
    mark = f"{OWNER_ENV}={token}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                if mark in handle.read().split(b"\0"):
                    found.append(int(name))
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


def stop_marked(token: str, grace_s: float = REAPER_GRACE_S, tracked: dict[int, int] | None = None) -> list[int]:
    """SIGTERM every process marked with ``token`` and every ``tracked`` one (``pid -> start time``) still
    alive, SIGKILL those left after ``grace_s``; returns the PIDs."""

    def targets() -> list[int]:
        live = descendants_of(set(), tracked) if tracked else {}
        return sorted(set(marked_processes(token)) | set(live))

    first = targets()
    _signal_all(first, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (left := targets()) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_all(left, signal.SIGKILL)
    return sorted(set(first) | set(left))


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


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


SERVE_DELETE_TIMEOUT_S = 10.0  # a cluster's Serve that does not answer this long is not waited for


def serve_until_stopped(app_name: str, what: str) -> None:
    """Block while a Serve application runs; on Ctrl-C or SIGTERM (``kill``, Kubernetes, a shell's
    background job, where SIGINT is ignored) take the application down and return normally."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print(f"[steerray] stopping the {what}", file=sys.stderr, flush=True)
    finally:
        delete_app(app_name)


def delete_app(app_name: str, timeout_s: float = SERVE_DELETE_TIMEOUT_S) -> bool:
    """``serve.delete`` that cannot hang; True when the app was deleted.

    A SIGTERM to the process group (``kill -- -PGID``, ``timeout``, systemd) also reaches the embedded Ray's
    own processes, and ``serve.delete`` then waits for a controller that is gone ("Deleting app" for minutes).
    So the delete runs in a thread, and the wait ends when it finishes, when the embedded Ray's processes
    are found dead (nothing is left to delete), or after ``timeout_s``.
    """
    from ray import serve

    done = threading.Event()

    def delete() -> None:
        try:
            serve.delete(app_name)
        except Exception as err:  # Ray is going down: the process exits next anyway
            log.warning("serve.delete(%r) failed: %s", app_name, err)
        finally:
            done.set()

    threading.Thread(target=delete, name="serve-delete", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not done.wait(0.2):
        if not _embedded_ray_alive() or time.monotonic() > deadline:
            print(f"[steerray] not waiting for Serve to delete {app_name}: Ray's processes are stopping",
                  file=sys.stderr, flush=True)
            return False
    return True


def _embedded_ray_alive() -> bool:
    """False once a process this driver started for its embedded Ray (GCS, raylet, ...) has exited."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return node is None or not node.head or node.remaining_processes_alive()


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


# A freshly started head answers this until its dashboard agent has registered its HTTP address (seconds
# after `ray start --head`); an agent whose port was taken never registers (see `dashboard_agent.log`).
RETRYABLE_SUBMIT_ERRORS = ("No available agent to submit job",)
SUBMIT_RETRY_S = 60.0


def retryable_submit_error(err: BaseException) -> bool:
    """True for the job server's "try again later" answers, which a retry can outlive; anything else (a
    bad request, auth, a refused connection) is reported at once."""
    return isinstance(err, RuntimeError) and any(text in str(err) for text in RETRYABLE_SUBMIT_ERRORS)


def retry_delays(budget_s: float, first_s: float = 1.0, cap_s: float = 5.0) -> list[float]:
    """The waits between submission attempts: doubling from ``first_s`` up to ``cap_s``, ``budget_s`` in all."""
    delays: list[float] = []
    while sum(delays) < budget_s:
        delays.append(min(first_s * 2 ** len(delays), cap_s, budget_s - sum(delays)))
    return delays


def _submit_with_retries(client: Any, entrypoint: str, runtime_env: dict[str, Any] | None, job_id: str,
                         budget_s: float = SUBMIT_RETRY_S) -> str:
    deadline = time.monotonic() + budget_s
    for delay in [*retry_delays(budget_s), None]:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id)
        except RuntimeError as err:
            if not retryable_submit_error(err):
                raise
            if delay is None or time.monotonic() + delay > deadline:
                raise JobFailed(
                    f"the cluster's job server had no agent to run the job after {budget_s:.0f} s ({err}); "
                    "see dashboard_agent.log on the head node: on one machine another Ray may hold the agent's "
                    "port (`ray start --head --dashboard-agent-listen-port=...` picks another)") from err
            print(f"[steerray] the job server is not ready yet (no agent); retrying in {delay:.0f} s",
                  file=sys.stderr, flush=True)
            time.sleep(delay)
    raise AssertionError("unreachable")
