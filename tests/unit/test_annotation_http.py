"""The shared HTTP helpers without Ray: bearer tokens and the JSON error shape, through a real FastAPI app."""

from __future__ import annotations

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict

from steerray.auth import auth_headers, token_digest
from steerray.serving.http import ApiError, bearer_guard, check_bearer, install_error_handlers


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str]


def make_client(token: str | None) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/echo", dependencies=[Depends(bearer_guard(token_digest(token)))])
    def echo(body: Body) -> dict:
        if not body.texts:
            raise ApiError(400, "'texts' is empty", code="invalid_request", param="texts")
        return {"n": len(body.texts)}

    @app.get("/boom")
    def boom() -> dict:
        raise RuntimeError("bug")

    return TestClient(app, raise_server_exceptions=False)


def test_bearer_token_is_required_and_checked():
    client = make_client("s3cret")
    ok = client.post("/echo", json={"texts": ["a"]}, headers=auth_headers("s3cret"))
    assert ok.status_code == 200 and ok.json() == {"n": 1}
    for headers, code in [({}, "missing_token"), (auth_headers("wrong"), "invalid_token"),
                          ({"Authorization": "Basic s3cret"}, "invalid_token"), ({"Authorization": "Bearer "}, "invalid_token")]:
        response = client.post("/echo", json={"texts": ["a"]}, headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == code
        assert response.json()["error"]["type"] == "authentication_error"
    # Without a configured token the route is open.
    assert make_client(None).post("/echo", json={"texts": ["a"]}).status_code == 200
    check_bearer(None, None)
    with pytest.raises(ApiError):
        check_bearer("Bearer x", token_digest("y"))


def test_errors_are_json_with_a_reason_and_4xx_for_bad_input():
    client = make_client(None)
    cases = [
        (client.post("/echo", content=b"{not json", headers={"Content-Type": "application/json"}), 400, "invalid_json"),
        (client.post("/echo", json={"txts": ["a"]}), 400, "invalid_request"),
        (client.post("/echo", json={"texts": "a"}), 400, "invalid_request"),
        (client.post("/echo", json=[1, 2]), 400, "invalid_request"),
        (client.post("/echo", json={"texts": []}), 400, "invalid_request"),
        (client.get("/nowhere"), 404, None),
        (client.get("/echo"), 405, None),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"] and error["code"] == code and set(error) == {"message", "type", "param", "code"}
    assert cases[1][0].json()["error"]["param"] == "texts"  # names the missing field
    assert "txts" in cases[1][0].json()["error"]["message"]
    # A bug on the server side is still JSON (500, with the reason), never an HTML traceback.
    crash = client.get("/boom")
    assert crash.status_code == 500 and crash.json()["error"]["code"] == "internal_error"
