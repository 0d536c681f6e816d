"""`annotate` killed with SIGKILL mid-run loses at most the block in progress, and the re-run is exact.

Each block's part is written where the block is scored (in the Ray Data task or actor), not when Ray Data
hands rows back to the driver. The HTTP test scores through a small local scorer that answers like
`serve-reward` and holds the request of the last block, so the kill lands at a known point: every other
block has been scored, so every other block's part must be on disk.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from fault_support import kill_group, python, spawn, wait_for

from steerray.artifacts import read_manifest
from steerray.stages import annotate as annotate_stage
from steerray.templates import make_conversation

pytestmark = [pytest.mark.faults, pytest.mark.ray]
BLOCK_SIZE = 5
ATTRIBUTES = ["quality", "toxicity", "humor"]


def write_input(folder: Path, rows: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps(
            make_conversation(
                [
                    ("User", f"Question {k}: what is {k} + 1?", None),
                    ("Assistant", f"It is {k + 1}. " * (1 + k % 4), "quality:2"),
                ]
            )
        )
        for k in range(rows)
    ]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


class Scorer(ThreadingHTTPServer):
    """Answers `GET /health` and `POST /score` like serve-reward (deterministic predictions from each text);
    a request with a text naming one of ``hold`` waits until :attr:`release` is set, after setting :attr:`held`."""

    daemon_threads = True

    def __init__(self, hold: tuple[str, ...] = ()) -> None:
        super().__init__(("127.0.0.1", 0), ScorerHandler)
        self.hold, self.held, self.release = hold, threading.Event(), threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ScorerHandler(BaseHTTPRequestHandler):
    server: Scorer

    def log_message(self, *args) -> None:  # quiet
        pass

    def answer(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.answer({"attributes": ATTRIBUTES})

    def do_POST(self) -> None:
        texts = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["texts"]
        if (
            any(word in text for text in texts for word in self.server.hold)
            and not self.server.release.is_set()
        ):
            self.server.held.set()
            self.server.release.wait(120)
        results = [
            {
                "predictions": {
                    name: (sum(map(ord, text)) + 7 * i) % 45 / 10 for i, name in enumerate(ATTRIBUTES)
                },
                "truncated": False,
            }
            for text in texts
        ]
        self.answer({"results": results})


def config_file(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump({"block_size": BLOCK_SIZE, **fields}))
    return path


def questions(path: Path) -> list[str]:
    """The user turn of every conversation in a jsonl file, in file order."""
    return [json.loads(line)["conversations"][0]["value"] for line in path.read_text().splitlines() if line]


def finished_parts(out: Path) -> list[str]:
    return sorted(p.name for p in (out / ".parts").rglob("*.part.jsonl"))


def ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def test_kill_during_the_last_http_block_keeps_every_block_scored_before_it(ray_session, tmp_path):
    rows = 40  # 8 blocks; the held block 7 holds Questions 35..39
    data = write_input(tmp_path / "in", rows)
    reference = Scorer()
    # batch_size 64: scoring batches far larger than a block (the case where rows came back late)
    common = {"input": str(data), "batch_size": 64, "model": "unused"}
    annotate_stage.main(
        [
            "--config",
            str(config_file(tmp_path / "ref.yaml", via=reference.url, out=str(tmp_path / "ref"), **common)),
        ]
    )
    scorer = Scorer(hold=tuple(f"Question {k}:" for k in range(35, 40)))
    out = tmp_path / "killed"
    config = config_file(tmp_path / "killed.yaml", via=scorer.url, out=str(out), **common)
    driver = spawn(
        python("-m", "steerray.stages.annotate", "--config", str(config)),
        tmp_path / "driver.log",
        env={"RAY_ADDRESS": ray_address()},
    )
    try:
        assert scorer.held.wait(60), (tmp_path / "driver.log").read_text()[-3000:]
        # The seven blocks before the held one were scored (the scorer answered them): their parts exist.
        wait_for(lambda: len(finished_parts(out)) == 7, 20, f"7 part files (have {finished_parts(out)})")
    finally:
        kill_group(driver)
        driver.wait(30)
    assert driver.returncode == -9
    assert read_manifest(out) is None and not (out / "train.jsonl").exists()
    scorer.release.set()
    summary = annotate_stage.main(["--config", str(config)])
    assert summary["rows"] == rows
    assert questions(out / "train.jsonl") == questions(data / "train.jsonl")  # every input row once, in order
    for name in ("train.jsonl", "rejects.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert read_manifest(out, "annotate")["run"]["blocks_done_before"] == 7
    for server in (reference, scorer):
        server.shutdown()


def test_model_run_killed_mid_stream_resumes_to_the_uninterrupted_output(
    ray_session, tiny_reward_dir, tmp_path
):
    rows = 60  # 12 blocks
    data = write_input(tmp_path / "in", rows)
    common = {"input": str(data), "batch_size": 8, "model": tiny_reward_dir}
    annotate_stage.main(
        ["--config", str(config_file(tmp_path / "ref.yaml", out=str(tmp_path / "ref"), **common))]
    )
    out = tmp_path / "killed"
    config = config_file(tmp_path / "killed.yaml", out=str(out), **common)
    driver = spawn(
        python("-m", "steerray.stages.annotate", "--config", str(config)),
        tmp_path / "driver.log",
        env={"RAY_ADDRESS": ray_address()},
    )
    try:
        wait_for(
            lambda: len(finished_parts(out)) >= 2 or driver.poll() is not None,
            90,
            "two part files",
            every=0.02,
        )
    finally:
        kill_group(driver)
        driver.wait(30)
    done = len(finished_parts(out))
    assert driver.returncode == -9, (tmp_path / "driver.log").read_text()[-3000:]
    assert 2 <= done < 12 and read_manifest(out) is None  # killed mid-stream, finished blocks kept
    # A part caught mid-write is only a temp file beside the finished ones (atomic writes): the re-run
    # ignores and removes it, and scores that block again.
    torn = out / ".parts" / "train.jsonl" / f".{done:06d}.part.jsonl.x1y2.tmp"
    torn.parent.mkdir(parents=True, exist_ok=True)
    torn.write_text('{"half a part"')
    summary = annotate_stage.main(["--config", str(config)])
    assert summary["rows"] == rows
    assert questions(out / "train.jsonl") == questions(data / "train.jsonl")  # every input row once, in order
    assert (out / "train.jsonl").read_bytes() == (tmp_path / "ref" / "train.jsonl").read_bytes()
    assert read_manifest(out, "annotate")["run"]["blocks_done_before"] == done
    assert not (out / ".parts").exists()  # the finished run keeps no parts, torn or whole
