"""Safe defaults, measured rather than read from the code: the embedded Ray and Serve listen on loopback only,
a bearer token never reaches a file a run writes, and nothing is served beyond loopback without a token."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from steerray.cli import app
from steerray.templates import make_conversation

pytestmark = pytest.mark.ray

# A fresh interpreter that starts Ray the way every steerray stage does (steerray imported first, then
# init_ray), deploys a Serve app, and lists every listening socket of every process of its Ray.
LISTENERS = r"""
import json, sys
import steerray
from steerray.runtime import init_ray
init_ray(num_cpus=1, object_store_mb=128)
import psutil, ray
from ray import serve

@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Echo:
    def __call__(self, request):
        return "ok"

serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[1])})
serve.run(Echo.bind(), name="echo", route_prefix="/echo")
me = psutil.Process()
found = []
for proc in [me] + me.children(recursive=True):  # the embedded Ray: gcs, raylet, agents, workers, Serve
    try:
        conns, cmd = proc.net_connections(kind="inet"), " ".join(proc.cmdline())
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        continue
    found += [{"pid": proc.pid, "cmd": cmd[:80], "ip": c.laddr.ip, "port": c.laddr.port}
              for c in conns if c.status == psutil.CONN_LISTEN]
serve.shutdown()
print("LISTENERS " + json.dumps(found))
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_embedded_ray_and_serve_listen_only_on_loopback(ray_session, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # steerray's own defaults only
    done = subprocess.run([sys.executable, "-c", LISTENERS, str(free_port())], capture_output=True, text=True,
                          timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    listeners = json.loads(done.stdout.split("LISTENERS ", 1)[1].splitlines()[0])
    processes = {entry["cmd"].split()[0] for entry in listeners}
    assert len(listeners) >= 5 and len(processes) >= 2, listeners  # gcs, raylet, workers, Serve proxy ...
    exposed = [entry for entry in listeners if entry["ip"] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_a_token_given_on_the_command_line_never_reaches_a_file(ray_session, tiny_reward_dir, tmp_path,
                                                                monkeypatch):
    secret, env_secret = "tok-cli-7f3a9c21", "tok-env-58be01d4"
    monkeypatch.setenv("STEERRAY_API_TOKEN", env_secret)
    data = tmp_path / "conversations.jsonl"
    rows = [make_conversation([("User", f"Question {i}?", None), ("Assistant", f"Answer {i}.", "")]) for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "annotated"
    result = CliRunner().invoke(app, ["annotate", "--model", tiny_reward_dir, "--input", str(data), "--out", str(out),
                                      "--token", secret, "batch_size=4"])
    assert result.exit_code == 0, result.output
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"manifest.json", "config.yaml", "conversations.jsonl"}
    for path in written:
        text = path.read_text(encoding="utf-8", errors="replace")
        assert secret not in text and env_secret not in text, f"a token was written into {path}"


@pytest.mark.parametrize("command", ["serve", "serve-reward"])
def test_serving_beyond_loopback_without_a_token_is_refused_before_ray_starts(command, tiny_reward_dir,
                                                                              monkeypatch):
    monkeypatch.delenv("STEERRAY_API_TOKEN", raising=False)
    model = tiny_reward_dir if command == "serve-reward" else "tiny-llama"
    result = CliRunner().invoke(app, [command, "--model", model, "--host", "0.0.0.0"])
    assert result.exit_code == 2  # an input problem, found before anything started
    assert "refusing to serve on 0.0.0.0 without a bearer token" in result.output
