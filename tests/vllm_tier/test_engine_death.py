"""A vLLM engine that dies: requests in flight get 503, later ones too, and /health keeps answering with
the engine's state. The engine is killed for real (SIGKILL to vLLM's engine process, found by its pid).
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_support import start_server
from vllm_support import VLLM_TIER, build_babbler

pytestmark = VLLM_TIER
APP = "vllm-death"
LONG = {"messages": [{"role": "user", "content": "Talk."}], "temperature": 0, "max_tokens": 3800}


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from ray import serve

    model = build_babbler(tmp_path_factory.mktemp("babbler") / "model")
    url = start_server(str(model), app_name=APP, engine="vllm", precision="fp32", max_batch_size=4)
    yield url
    serve.delete(APP)


def health(url: str) -> httpx.Response:
    return httpx.get(f"{url}/health", timeout=30)


def first_content_then_kill(url: str, pid: int) -> list[dict]:
    """Stream a long answer; once its first text arrives, kill the engine; return every SSE payload."""
    payloads, killed = [], False
    request = {**LONG, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=request, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payloads.append(json.loads(line[len("data: "):]))
            delta = (payloads[-1].get("choices") or [{}])[0].get("delta", {})
            if delta.get("content") and not killed:
                os.kill(pid, signal.SIGKILL)
                killed = True
    return payloads


def test_engine_death_fails_requests_with_503_and_health_reports_it(server):
    before = health(server).json()
    assert (before["engine"], before["engine_state"], before["stats"]["device"]) == ("vllm", "running", "cpu")
    (pid,) = before["stats"]["engine_pids"]

    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        blocking = pool.submit(httpx.post, f"{server}/v1/chat/completions", json=LONG, timeout=120)
        time.sleep(0.5)  # let it reach the engine
        payloads = first_content_then_kill(server, pid)
        waited = blocking.result()
    elapsed = time.monotonic() - started

    # The plain request was in flight: 503 in OpenAI's error shape, not an answer cut short.
    assert waited.status_code == 503, (waited.status_code, waited.text[:300], f"{elapsed:.1f}s")
    error = waited.json()["error"]
    assert error["code"] == "engine_unavailable" and "GET /health" in error["message"]
    assert waited.headers["Retry-After"] == "1"
    # The stream had sent text already (status 200), so its 503 comes as an error event, then [DONE].
    assert any(p.get("choices", [{}])[0].get("delta", {}).get("content") for p in payloads if "choices" in p)
    (stream_error,) = [p["error"] for p in payloads if "error" in p]
    assert stream_error["code"] == "engine_unavailable"
    assert not any(p.get("choices", [{}])[0].get("finish_reason") for p in payloads if "choices" in p)

    later = httpx.post(f"{server}/v1/chat/completions", json={**LONG, "max_tokens": 4}, timeout=30)
    assert later.status_code == 503 and later.json()["error"]["code"] == "engine_unavailable"
    after = health(server)
    assert after.status_code == 503
    body = after.json()
    assert (body["status"], body["engine_state"], body["engine"]) == ("unavailable", "dead", "vllm")
    assert body["counters"]["failed"] >= 3 and body["stats"]["failed"] >= 3
