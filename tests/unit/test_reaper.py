"""The embedded Ray's reaper without Ray: marked processes stop when their driver dies, others are untouched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from steerray.runtime import OWNER_ENV, marked_processes, stop_marked

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="the reaper reads /proc")

SLEEPER = (
    "import signal, sys, time\nif sys.argv[1] == 'stubborn': signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('up', flush=True)\ntime.sleep(300)"
)


def sleeper(token: str | None, kind: str = "polite") -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != OWNER_ENV}
    if token:
        env[OWNER_ENV] = token
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER, kind], env=env, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"  # its signal handler is set
    return proc


def test_stop_marked_stops_exactly_the_marked_processes_stubborn_ones_by_sigkill():
    token = f"test-{os.getpid()}-{time.time_ns()}"
    polite, stubborn, other = sleeper(token), sleeper(token, "stubborn"), sleeper(f"{token}-other")
    try:
        assert sorted(marked_processes(token)) == sorted([polite.pid, stubborn.pid])
        started = time.monotonic()
        assert stop_marked(token, grace_s=1.0) == sorted([polite.pid, stubborn.pid])
        assert polite.wait(5) == -signal.SIGTERM and stubborn.wait(5) == -signal.SIGKILL
        assert time.monotonic() - started < 4
        assert other.poll() is None and marked_processes(token) == []
    finally:
        for proc in (polite, stubborn, other):
            proc.kill()
            proc.wait()


DRIVER = f"""
import subprocess, sys, time
from steerray.runtime import start_reaper
token = start_reaper()
child = subprocess.Popen([sys.executable, "-c", {SLEEPER!r}, "stubborn"], stdout=subprocess.PIPE)
child.stdout.readline()
print(token, child.pid, flush=True)
time.sleep(300)
"""


def test_a_driver_killed_with_sigkill_takes_its_marked_children_along():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    assert driver.stdout is not None
    token, child = driver.stdout.readline().split()
    try:
        assert marked_processes(token) == [int(child)]  # inherited the mark; the reaper itself is unmarked
        driver.send_signal(signal.SIGKILL)
        driver.wait(5)
        deadline = time.monotonic() + 10
        while marked_processes(token) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marked_processes(token) == [], "the driver's child outlived it"
    finally:
        for pid in marked_processes(token):
            os.kill(pid, signal.SIGKILL)


# A child that titles itself as Ray's agents look (`ray::DashboardAgent` padded over the whole argv and
# environment area, as ps shows them): Ray's setproctitle writes a title longer than argv into the
# environment's memory, so /proc/PID/environ no longer shows the mark (it may spare the last variables, so
# the mark comes first here). Its own child is orphaned when it exits after a second.
TITLED = """
import subprocess, sys, time
import ray._raylet
area = len(open("/proc/self/cmdline", "rb").read()) + len(open("/proc/self/environ", "rb").read())
ray._raylet.setproctitle("ray::DashboardAgent".ljust(area))
orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print(orphan.pid, flush=True)
time.sleep(float(sys.argv[1]))
"""
DRIVER_OF_TITLED = f"""
import os, subprocess, sys, time
from steerray.runtime import start_reaper
token = start_reaper()
env = {{"STEERRAY_RAY_OWNER": token, **os.environ}}
titled = subprocess.Popen([sys.executable, "-c", {TITLED!r}, "300"], stdout=subprocess.PIPE, text=True, env=env)
parent = subprocess.Popen([sys.executable, "-c", {TITLED!r}, "1"], stdout=subprocess.PIPE, text=True, env=env)
orphan = parent.stdout.readline().strip()
titled.stdout.readline()
parent.wait()
time.sleep(0.5)  # the reaper lists descendants every 0.25 s at first
print(token, titled.pid, orphan, flush=True)
time.sleep(300)
"""


def test_descendants_that_lost_the_mark_to_their_title_or_parent_go_too():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER_OF_TITLED], stdout=subprocess.PIPE, text=True)
    assert driver.stdout is not None
    token, *pids = driver.stdout.readline().split()
    titled, orphan = map(int, pids)
    try:
        assert titled not in marked_processes(token)  # the title overwrote its environment
        assert psutil.Process(orphan).ppid() != driver.pid  # re-parented: no longer below the driver
        driver.send_signal(signal.SIGKILL)
        driver.wait(5)
        gone = psutil.wait_procs([psutil.Process(titled), psutil.Process(orphan)], timeout=10)[0]
        assert sorted(p.pid for p in gone) == sorted([titled, orphan]), "a descendant outlived the driver"
    finally:
        for pid in (titled, orphan):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
