"""Serve: kill -9 one replica of `steerray serve --replicas 2` under load. Requests on the other replica
succeed, Serve starts a replacement, and no more requests fail than were in flight when the replica died.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
from fault_support import describe, kill_group, spawn_chat_server, titled, wait_for
from serve_support import QUESTION, free_port, steerable_model_dir

pytestmark = pytest.mark.faults
CLIENTS = 4


@dataclass
class Outcome:
    started: float
    ended: float
    status: int  # HTTP status, 0 for a transport error
    answer: str = ""
    body: str = ""  # of a failed request


def client_loop(url: str, stop: threading.Event, outcomes: list[Outcome]) -> None:
    body = {
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0,
        "steering": {"verbosity": 0},
    }
    with httpx.Client(timeout=60) as http:
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = http.post(f"{url}/v1/chat/completions", json=body)
                ok = response.status_code == 200
                answer = response.json()["choices"][0]["message"]["content"] if ok else ""
                outcomes.append(
                    Outcome(
                        started,
                        time.monotonic(),
                        response.status_code,
                        answer,
                        "" if ok else response.text[:500],
                    )
                )
            except (httpx.HTTPError, ValueError, KeyError) as err:
                outcomes.append(Outcome(started, time.monotonic(), 0, body=repr(err)))


def test_killed_replica_fails_at_most_its_in_flight_requests_and_is_replaced(tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    server = spawn_chat_server(steerable_model_dir(), port, log, "--replicas", "2")
    try:
        wait_for(
            lambda: "serving at" in log.read_text(errors="replace") or server.poll() is not None,
            85,
            "the chat server",
        )
        assert server.poll() is None, log.read_text()[-3000:]
        replicas = titled(server.pid, "ServeReplica")
        assert len(replicas) == 2, describe(replicas)
        url, stop, outcomes = f"http://127.0.0.1:{port}", threading.Event(), []
        clients = [
            threading.Thread(target=client_loop, args=(url, stop, outcomes), daemon=True)
            for _ in range(CLIENTS)
        ]
        for client in clients:
            client.start()
        wait_for(lambda: len(outcomes) >= 20, 30, "answers under load")
        victim, killed_at = replicas[0], time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        wait_for(
            lambda: len([o for o in outcomes if o.started > killed_at + 1]) >= 20,
            40,
            "answers after the kill",
        )
        # Serve replaces the dead replica (a new process): two live replicas again.
        wait_for(
            lambda: len([p for p in titled(server.pid, "ServeReplica") if p.pid != victim.pid]) == 2,
            45,
            "a replacement replica",
        )
        replaced_at = time.monotonic()
        wait_for(lambda: len([o for o in outcomes if o.started > replaced_at]) >= 10, 30, "answers after it")
        stop.set()
        for client in clients:
            client.join(70)
        in_flight = [o for o in outcomes if o.started < killed_at < o.ended]
        failed = [o for o in outcomes if o.status != 200]
        print(
            f"{len(outcomes)} requests, {len(in_flight)} in flight at the kill, {len(failed)} failed "
            f"(statuses {sorted({o.status for o in failed})})",
            [o.body for o in failed],
        )
        assert len(failed) <= len(in_flight), [(round(o.started - killed_at, 2), o.status) for o in failed]
        assert all(o.started < killed_at for o in failed)  # nothing sent after the kill failed
        # A failed request still got an HTTP answer, a clean one: Serve's "Internal Server Error" or the
        # server's own error with a request id, never a dropped connection or the exception's text.
        unclean = [
            o
            for o in failed
            if o.status not in (500, 502, 503)
            or any(word in o.body for word in ("Traceback", "Actor", "ray.", 'File "'))
        ]
        assert not unclean, [(o.status, o.body) for o in unclean]
        assert {o.answer for o in outcomes if o.status == 200} == {"Paris."}
    finally:
        kill_group(
            server, signal.SIGTERM
        )  # one SIGTERM to the group stops it all (tests/faults/test_process_cleanup.py)
        try:
            server.wait(30)
        finally:
            kill_group(server)
