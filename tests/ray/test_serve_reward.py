"""`serve-reward` on the session's Ray: exact scores, dynamic batching, 4xx for bad input, annotate --via."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from steerray.annotation import load_predictor, plan_scoring, score_conversations, turn_label
from steerray.auth import auth_headers
from steerray.config import ServeRewardConfig
from steerray.stages import annotate as annotate_stage
from steerray.templates import make_conversation

pytestmark = pytest.mark.ray
TOKEN = "test-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def conversations() -> list[dict]:
    return [
        make_conversation([("User", "What is the capital of France?", None),
                           ("Assistant", "Paris.", "quality:4"), ("User", "And of Italy?", None),
                           ("Assistant", "Rome, of course.", "")]),
        make_conversation([("User", "Tell me a joke.", None), ("Assistant", "Why did the chicken cross?", None)]),
        make_conversation([("User", "Summarise the water cycle. " * 40, None), ("Assistant", "Rain.", "humor:1")]),
    ]


@pytest.fixture(scope="module")
def server(ray_session, tiny_reward_dir):
    from ray import serve

    from steerray.serving.reward_app import start_reward_server

    # A long batch wait makes concurrent requests meet in one batch reliably on a busy 2-core box.
    config = ServeRewardConfig(model=tiny_reward_dir, port=free_port(), max_batch_size=16, batch_wait_timeout_s=0.3,
                               max_length=128, app_name="test-reward")
    url = start_reward_server(config, token=TOKEN)
    client = httpx.Client(base_url=url, headers=auth_headers(TOKEN), timeout=60)
    yield config, url, client
    client.close()
    serve.shutdown()


@pytest.fixture(scope="module")
def predictor(tiny_reward_dir):
    return load_predictor(tiny_reward_dir, max_length=128)


def test_endpoint_scores_exactly_as_the_in_process_model(server, predictor):
    _, url, client = server
    assert httpx.get(f"{url}/health").json()["attributes"] == predictor.attributes  # no token needed
    records = conversations()
    response = client.post("/score", json={"conversations": records, "truncation": "left"})
    assert response.status_code == 200, response.text
    expected = score_conversations(records, predictor, predictor.attributes, all_assistant_turns=True)
    for got, want in zip(response.json()["results"], expected, strict=True):
        assert got["conversation"] == want.conversation  # labels written into the same turns
        assert [t["turn_index"] for t in got["turns"]] == [t.turn_index for t in want.turns]
        for turn, want_turn in zip(got["turns"], want.turns, strict=True):
            np.testing.assert_allclose([turn["predictions"][a] for a in predictor.attributes], want_turn.predictions,
                                       atol=1e-5)
            assert (turn["label"], turn["truncated"]) == (want_turn.label, want_turn.truncated)
    assert [t["truncated"] for t in response.json()["results"][2]["turns"]] == [True]  # cut from the left

    texts = plan_scoring(records).texts  # the annotator's rule: turns with a label key
    response = client.post("/score", json={"texts": texts, "truncation": "left"})
    predictions, truncated = predictor(texts)
    results = response.json()["results"]
    np.testing.assert_allclose([[r["predictions"][a] for a in predictor.attributes] for r in results], predictions,
                               atol=1e-5)
    assert [r["label"] for r in results] == [turn_label(p, predictor.attributes) for p in predictions]
    assert [r["truncated"] for r in results] == truncated


def test_concurrent_requests_share_batches(server, predictor):
    _, _, client = server
    before = client.get("/stats").json()
    text = plan_scoring(conversations()[:1]).texts[0]
    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(lambda _: client.post("/score", json={"texts": [text]}), range(12)))
    assert all(r.status_code == 200 for r in responses)
    assert len({r.json()["results"][0]["label"] for r in responses}) == 1
    after = client.get("/stats").json()
    sizes = after["recent_batch_sizes"][len(before["recent_batch_sizes"]):]
    assert sum(sizes) == 12 and after["texts"] - before["texts"] == 12
    assert max(sizes) > 1 and len(sizes) < 12  # one-row requests were scored together


def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(server):
    _, url, client = server
    long_text = "word " * 400 + "<extra_id_2>"
    cases = [
        (client.post("/score", content=b'{"texts": [', headers={"Content-Type": "application/json"}), 400, "invalid_json"),
        (client.post("/score", json={}), 400, "invalid_request"),
        (client.post("/score", json={"texts": ["a<extra_id_2>"], "conversations": []}), 400, "invalid_request"),
        (client.post("/score", json={"textz": ["a"]}), 400, "invalid_request"),
        (client.post("/score", json={"texts": [""]}), 400, "empty_text"),
        (client.post("/score", json={"texts": ["no read-out marker"]}), 400, "not_templated"),
        (client.post("/score", json={"texts": [long_text]}), 400, "too_long"),
        (client.post("/score", json={"conversations": [{"conversations": [{"from": "User", "value": "hi"}]}]}),
         400, "invalid_conversation"),
        (client.post("/score", json={"conversations": [{"conversations": "nope"}]}), 400, "invalid_conversation"),
        (httpx.post(f"{url}/score", json={"texts": ["a<extra_id_2>"]}), 401, "missing_token"),
        (httpx.post(f"{url}/score", json={"texts": ["a<extra_id_2>"]}, headers=auth_headers("wrong")), 401,
         "invalid_token"),
        (client.post("/score", json={"texts": ["a<extra_id_2>"] * 1025}), 413, "too_many_items"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code and response.json()["error"]["message"]
    assert "over max_length 128" in cases[6][0].json()["error"]["message"]
    ok = client.post("/score", json={"texts": [long_text], "truncation": "left"})
    assert ok.status_code == 200 and ok.json()["results"][0]["truncated"] is True
    assert client.get("/health").status_code == 200


def test_annotate_via_server_equals_in_process_and_user_config_retunes(server, predictor, tmp_path):
    from ray import serve

    from steerray.serving.reward_app import build_app

    config, url, client = server
    records = conversations()
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")
    cfg = tmp_path / "via.yaml"
    cfg.write_text(yaml.safe_dump({"model": "unused-with-via", "input": str(tmp_path / "in.jsonl"),
                                   "out": str(tmp_path / "via"), "via": url}))
    summary = _with_token(annotate_stage, cfg)
    assert (summary["rows"], summary["rejects"], summary["truncated"]) == (3, 1, 1)
    # The offline path equals the in-process model (test_annotate.py), so equal to it here means equal to both.
    expected = score_conversations(records, predictor, predictor.attributes)
    got = [json.loads(line) for line in (tmp_path / "via" / "in.jsonl").read_text().splitlines()]
    assert got == [r.conversation for r in expected]

    # Retune the running app through user_config: no reload, new batch limit in force.
    serve.run(build_app(config.model_copy(update={"max_batch_size": 2}), TOKEN), name=config.app_name,
              route_prefix=config.route_prefix)
    assert client.get("/stats").json()["user_config"]["max_batch_size"] == 2
    before = len(client.get("/stats").json()["recent_batch_sizes"])
    response = client.post("/score", json={"texts": plan_scoring(records).texts, "truncation": "left"})
    assert response.status_code == 200, response.text
    assert max(client.get("/stats").json()["recent_batch_sizes"][before:]) == 2


def _with_token(job, cfg: Path) -> dict:
    import os

    os.environ["STEERRAY_API_TOKEN"] = TOKEN
    try:
        return job.main(["--config", str(cfg)])
    finally:
        del os.environ["STEERRAY_API_TOKEN"]
