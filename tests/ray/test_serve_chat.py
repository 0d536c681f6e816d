"""`serve` on the session's Ray: the official openai client, streaming, steering, 4xx, batching, `chat` CLI.

The model is the scripted 1-layer Llama of tests/serve_support.py: greedy answers are known exactly and
depend on the verbosity value, so the tests check text, not just status codes.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from serve_support import LONG_ANSWER, QUESTION, SHORT_ANSWER, start_server, steerable_model_dir
from typer.testing import CliRunner

from steerray.attributes import steering_label
from steerray.auth import auth_headers
from steerray.cli import app as cli_app
from steerray.templates import MARKERS, generation_prompt

pytestmark = pytest.mark.ray
TOKEN = "chat-test-token"
ASK = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def server(ray_session):
    from ray import serve

    url = start_server(steerable_model_dir(), token=TOKEN, app_name="test-chat", max_batch_size=64)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=120)
    yield url, client
    serve.shutdown()


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=30).json()


def test_openai_client_chat_stream_and_models(server):
    url, client = server
    (model,) = [m.id for m in client.models.list().data]
    assert model == health(url)["model"]

    short = client.chat.completions.create(model=model, messages=ASK, temperature=0,
                                           extra_body={"steering": {"verbosity": 0}})
    default = client.chat.completions.create(model=model, messages=ASK, temperature=0)
    assert short.choices[0].message.content == SHORT_ANSWER  # verbosity 0 -> the short answer
    assert default.choices[0].message.content == LONG_ANSWER  # defaults: verbosity 4
    assert short.choices[0].finish_reason == "stop" and short.model == model
    prompt_tokens = short.usage.prompt_tokens
    assert prompt_tokens > 100 and short.usage.completion_tokens == 10  # "Paris." + the 8-token marker
    assert short.usage.total_tokens == prompt_tokens + 10

    stream = client.chat.completions.create(model=model, messages=ASK, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == LONG_ANSWER and len(deltas) >= 10  # token by token
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.prompt_tokens == prompt_tokens


def test_generate_shows_the_rendered_prompt_with_the_steering(server):
    url, _ = server
    steering = {"verbosity": 0, "humor": 3, "toxicity": 1}
    response = httpx.post(f"{url}/generate", json={"prompt": QUESTION, "steering": steering},
                          headers=auth_headers(TOKEN), timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    label = steering_label(steering)
    assert body["label"] == label == ("quality:4,toxicity:1,humor:3,creativity:0,helpfulness:4,correctness:4,"
                                      "coherence:4,complexity:4,verbosity:0")
    assert body["prompt"] == generation_prompt(ASK, label)
    assert body["prompt"].endswith(f"<extra_id_1>Assistant\n<extra_id_2>{label}\n")
    assert body["text"] == SHORT_ANSWER and not any(m in body["text"] for m in MARKERS)  # marker cut off
    assert body["steering"]["humor"] == 3 and body["usage"]["completion_tokens"] == 10


def test_sampling_parameters_behave_like_the_openai_api(server):
    _, client = server
    cut = client.chat.completions.create(model=health(server[0])["model"], messages=ASK, max_tokens=3,
                                         temperature=0)
    assert cut.choices[0].message.content == "The capital of" and cut.choices[0].finish_reason == "length"
    assert cut.usage.completion_tokens == 3
    model = cut.model
    stopped = client.chat.completions.create(model=model, messages=ASK, stop=[" Paris"], temperature=0)
    assert stopped.choices[0].message.content == "The capital of France is"
    several = client.chat.completions.create(model=model, messages=ASK, n=3, temperature=0, seed=5)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert {c.message.content for c in several.choices} == {LONG_ANSWER}
    assert several.usage.completion_tokens == 60 and several.usage.prompt_tokens == cut.usage.prompt_tokens


@pytest.mark.parametrize(("body", "status", "param"), [
    ("{oops", 400, None),
    ({"messages": []}, 400, "messages"),
    ({"messages": ASK, "steering": {"verbosty": 4}}, 400, "steering"),
    ({"messages": ASK, "steering": {"verbosity": 9}}, 400, "steering"),
    ({"messages": ASK, "steering": {"verbosity": 1.5}}, 400, "steering"),
    ({"messages": [{"role": "user", "content": "word " * 5000}]}, 400, "messages"),
    ({"messages": ASK, "max_tokens": 5000}, 400, "max_tokens"),
    ({"messages": ASK, "model": "gpt-4"}, 404, "model"),
])
def test_bad_requests_get_openai_shaped_4xx(server, body, status, param):
    url, _ = server
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{url}/v1/chat/completions", content=content, timeout=60,
                          headers={**auth_headers(TOKEN), "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]


def test_token_is_required_and_the_client_sees_the_errors(server):
    url, client = server
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        response = httpx.post(f"{url}/v1/chat/completions", json={"messages": ASK}, headers=headers, timeout=30)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200  # no token needed
    assert "steerray playground" in httpx.get(f"{url}/", timeout=30).text
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=health(url)["model"], messages=ASK, extra_body={"steering": {"fun": 1}})
    assert "unknown attribute 'fun'" in str(info.value)


def test_mixed_flood_every_good_request_answered_and_batched(server):
    """200 concurrent requests, half of them bad: all good ones answered exactly, in shared batches."""
    url, _ = server
    model = health(url)["model"]
    before = health(url)["stats"]
    bad_bodies = ['{"messages": [', {"messages": []}, {"messages": ASK, "steering": {"verbosity": -1}},
                  {"messages": ASK, "steering": {"nope": 1}}, {"messages": ASK, "n": 0}]

    async def flood() -> list[tuple[int, str | None, int]]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(timeout=300, limits=limits, headers=auth_headers(TOKEN)) as http:
            async def one(i: int) -> tuple[int, str | None, int]:
                if i % 2:
                    body = bad_bodies[i % len(bad_bodies)]
                    content = body if isinstance(body, str) else json.dumps(body)
                    r = await http.post(f"{url}/v1/chat/completions", content=content,
                                        headers={"Content-Type": "application/json"})
                    return i, None, r.status_code
                r = await http.post(f"{url}/v1/chat/completions", json={
                    "model": model, "messages": ASK, "temperature": 0, "steering": {"verbosity": 0 if i % 4 else 4}})
                return i, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text, r.status_code

            return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(flood())
    for i, text, status in results:
        if i % 2:
            assert 400 <= status < 500, (i, status)
        else:
            assert status == 200 and text == (SHORT_ANSWER if i % 4 else LONG_ANSWER), (i, status, text)
    after = health(url)
    assert after["status"] == "ok"
    assert after["stats"]["max_rows_in_step"] >= 4  # concurrent requests decoded together
    steps = after["stats"]["steps"] - before["steps"]
    rows = after["stats"]["rows_decoded"] - before["rows_decoded"]
    assert rows / steps > 2, (rows, steps)


def test_a_stalled_stream_does_not_block_others(server):
    url, client = server
    model = health(url)["model"]
    with httpx.Client(timeout=120, headers=auth_headers(TOKEN)) as http:
        body = {"model": model, "messages": ASK, "stream": True}
        with http.stream("POST", f"{url}/v1/chat/completions", json=body) as stalled:
            first = next(stalled.iter_lines())
            assert first.startswith("data: ")
            # The stalled client reads nothing more; another request still gets its answer.
            answer = client.chat.completions.create(model=model, messages=ASK, temperature=0)
            assert answer.choices[0].message.content == LONG_ANSWER


def test_chat_command_streams_an_answer_with_steering(server):
    url, _ = server
    runner = CliRunner()
    result = runner.invoke(cli_app, ["chat", "--url", url, "--steering", "verbosity=0", "--message", QUESTION,
                                     "--token", TOKEN])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == SHORT_ANSWER
    bad = runner.invoke(cli_app, ["chat", "--url", url, "--steering", "verbosity=7", "--message", "x"])
    assert bad.exit_code == 2 and "outside 0..4" in bad.output
    refused = runner.invoke(cli_app, ["chat", "--url", url, "--message", QUESTION])  # no token
    assert refused.exit_code == 1 and "401" in refused.output


def test_serve_command_rejects_a_bad_model_before_starting():
    result = CliRunner().invoke(cli_app, ["serve", "--model", "./no/such/model", "--port", "8123"])
    assert result.exit_code == 2 and "not an alias" in result.output
