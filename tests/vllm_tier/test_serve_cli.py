"""`steerray serve --engine vllm` on this machine, run as a user runs it (the CLI, its own embedded Ray).

The model is the scripted 1-layer Llama of tests/serve_support.py, served by vLLM in fp32: greedy answers
are known exactly and follow the verbosity in the label, so these tests check the same texts and token
counts as the transformers engine's tests (tests/ray/test_serve_chat.py), through the official client.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from serve_support import LONG_ANSWER, QUESTION, SHORT_ANSWER, free_port, steerable_model_dir
from vllm_support import VLLM_TIER

from steerray.attributes import steering_label
from steerray.templates import generation_prompt

pytestmark = VLLM_TIER
TOKEN = "vllm-tier-token"
ASK = [{"role": "user", "content": QUESTION}]
START_TIMEOUT_S = 240


def steerray_command() -> list[str]:
    script = Path(sys.executable).with_name("steerray")  # the console script of this venv
    return [str(script)] if script.exists() else [sys.executable, "-m", "steerray.cli"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The CLI serving the scripted model with vLLM; stopped with SIGTERM, as a service manager would."""
    port, workdir = free_port(), tmp_path_factory.mktemp("serve-cli")
    log = (workdir / "serve.log").open("w")
    command = [*steerray_command(), "serve", "--engine", "vllm", "--model", steerable_model_dir(),
               "--port", str(port), "precision=fp32", "max_batch_size=8"]
    process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "STEERRAY_API_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, workdir / "serve.log")
        yield url, openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=120)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log.close()


def wait_until_healthy(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"steerray serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    pytest.fail(f"steerray serve not healthy after {START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


def test_health_says_vllm_on_the_cpu_in_fp32(server):
    url, _ = server
    body = httpx.get(f"{url}/health", timeout=30).json()
    assert (body["status"], body["engine"], body["engine_state"]) == ("ok", "vllm", "running")
    assert (body["stats"]["device"], body["stats"]["dtype"]) == ("cpu", "float32")
    assert body["auth"] is True and len(body["stats"]["engine_pids"]) == 1


def test_openai_client_chat_stream_and_models(server):
    _, client = server
    (model,) = [m.id for m in client.models.list().data]
    assert model == "tests-steerable-llama-v1"
    short = client.chat.completions.create(model=model, messages=ASK, temperature=0,
                                           extra_body={"steering": {"verbosity": 0}})
    default = client.chat.completions.create(model=model, messages=ASK, temperature=0)
    assert short.choices[0].message.content == SHORT_ANSWER  # verbosity 0 -> the short answer
    assert default.choices[0].message.content == LONG_ANSWER  # defaults: verbosity 4
    assert short.choices[0].finish_reason == "stop" and short.model == model
    # Token counts as the transformers engine counts them: "Paris." + the 8-token stop marker.
    assert short.usage.completion_tokens == 10 and default.usage.completion_tokens == 20
    assert short.usage.prompt_tokens > 100

    stream = client.chat.completions.create(model=model, messages=ASK, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    # Streamed in pieces, not held back to the end. How many pieces depends on load: tokens the engine
    # hands over together go out in one chunk (6 of 20 seen on a busy 2-core box), so no fixed count.
    assert "".join(deltas) == LONG_ANSWER and len(deltas) >= 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 20


def test_generate_shows_the_steering_label_the_model_saw(server):
    url, _ = server
    steering = {"verbosity": 0, "humor": 3}
    response = httpx.post(f"{url}/generate", json={"prompt": QUESTION, "steering": steering},
                          headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["prompt"] == generation_prompt(ASK, steering_label(steering))
    assert body["text"] == SHORT_ANSWER and body["usage"]["completion_tokens"] == 10


def test_sampling_parameters_behave_like_the_openai_api(server):
    _, client = server
    model = "tests-steerable-llama-v1"
    cut = client.chat.completions.create(model=model, messages=ASK, max_tokens=3, temperature=0)
    assert cut.choices[0].message.content == "The capital of" and cut.choices[0].finish_reason == "length"
    assert cut.usage.completion_tokens == 3
    stopped = client.chat.completions.create(model=model, messages=ASK, stop=[" Paris"], temperature=0)
    assert stopped.choices[0].message.content == "The capital of France is"
    several = client.chat.completions.create(model=model, messages=ASK, n=3, temperature=0, seed=5)
    assert [c.message.content for c in several.choices] == [LONG_ANSWER] * 3
    assert several.usage.completion_tokens == 60
    # vLLM's min_tokens holds back EOS only: the stop marker still ends the answer where it did
    held = client.chat.completions.create(model=model, messages=ASK, temperature=0, extra_body={"min_tokens": 30})
    assert held.choices[0].message.content == LONG_ANSWER and held.choices[0].finish_reason == "stop"


def test_bad_requests_and_missing_token_get_4xx(server):
    url, client = server
    with pytest.raises(openai.BadRequestError, match="unknown attribute 'fun'"):
        client.chat.completions.create(model="tests-steerable-llama-v1", messages=ASK,
                                       extra_body={"steering": {"fun": 1}})
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tests-steerable-llama-v1", messages=ASK, max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        client.chat.completions.create(model="tests-steerable-llama-v1", messages=ASK, max_tokens=4,
                                       extra_body={"min_tokens": 5})
    assert httpx.post(f"{url}/v1/chat/completions", json={"messages": ASK}, timeout=30).status_code == 401
