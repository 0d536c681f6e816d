"""steerray as users install it: a wheel in a fresh virtualenv, no checkout, run from an empty folder.

1. `pip install dist/steerray-*.whl` into a new venv, then `steerray pipeline --config tiny --run t` in an
   empty folder, interrupted with Ctrl-C in SFT: the same command resumes it to the end (report, bootstrap
   model), and once more skips every stage without starting Ray.
2. A local `ray start --head` (loopback, dashboard on): `steerray prepare --address ...` and `ray job submit
   ... -- python -m steerray.stages.prepare --config FILE` both finish, and the job ran the installed package
   (the manifest records where steerray was imported from), not an uploaded working tree.

The new venv gets steerray from the wheel only; its dependencies come from the test venv's site-packages
through a path file (no .pth processing there, so the test venv's editable steerray stays invisible).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """A fresh venv holding the steerray wheel built from this checkout."""
    root = tmp_path_factory.mktemp("installed")
    wheels = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
                   check=True, timeout=300, capture_output=True)
    wheel = next(wheels.glob("steerray-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python*/site-packages"))
    # The wheel's files, unpacked as pip would (a wheel is a zip of the installed tree).
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    scripts = venv / "bin"
    (scripts / "steerray").write_text(f"#!{scripts / 'python'}\nfrom steerray.cli import app\napp()\n")
    (scripts / "steerray").chmod(0o755)
    return {"venv": venv, "python": scripts / "python", "steerray": scripts / "steerray", "site": site,
            "wheel": wheel}


def clean_env(installed: dict[str, Path]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST", "VIRTUAL_ENV"))}
    env.update(PATH=f"{installed['venv'] / 'bin'}:{Path(sys.executable).parent}:{env.get('PATH', '')}",
               HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONNOUSERSITE="1")
    return env


def test_the_wheel_holds_the_presets_and_no_checkout_is_used(installed, tmp_path):
    import zipfile

    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert "steerray/presets/tiny/pipeline.yaml" in names and "steerray/presets/demo/sft.yaml" in names
    where = subprocess.run([str(installed["python"]), "-c", "import steerray; print(steerray.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=clean_env(installed), check=True)
    assert where.stdout.strip().startswith(str(installed["site"]))


# The tiny preset runs every stage but the optional ones it leaves off (bootstrap is on there).
TINY_ENABLED = ["prepare", "reward", "annotate", "sft", "bootstrap", "evaluate"]
TINY_DISABLED = ["evaluate_reward", "steerlm2"]


def summary_actions(run: Path) -> dict[str, str]:
    summary = json.loads((run / "summary.json").read_text())
    # the box's matmul speed, at the start and the end, stands beside the run's times
    assert all(summary["box"][when][f"matmul_gflops_{p}"] > 0 for when in ("at_start", "at_end") for p in ("fp32", "bf16"))
    return {s["name"]: s["action"] for s in summary["stages"]}


def start_and_interrupt_in_sft(command: list[str], cwd: Path, env: dict[str, str], run: Path) -> str:
    """Run the pipeline and press Ctrl-C once the SFT stage has started training; its output."""
    log = cwd.parent / f"{cwd.name}-first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        marker = run / "sft" / "checkpoints"
        deadline = time.time() + 600
        while proc.poll() is None and not marker.exists() and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(timeout=120) != 0, log.read_text()[-3000:]
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("the pipeline did not stop on Ctrl-C within 2 minutes")
    return log.read_text()


def test_pipeline_from_an_empty_folder_interrupted_resumed_and_skipped(installed, tmp_path):
    """As a new user runs it: the installed `steerray pipeline --config tiny --run t` in an empty folder, Ctrl-C
    in SFT, the same command resumes it to the end, and once more skips everything."""
    env = clean_env(installed)
    command = [str(installed["steerray"]), "pipeline", "--config", "tiny", "--run", "t"]
    run = tmp_path / "runs" / "t"
    first = start_and_interrupt_in_sft(command, tmp_path, env, run)
    assert "resume with:" in first, first[-3000:]
    for stage in ("prepare", "reward", "annotate"):
        assert (run / stage / "manifest.json").is_file(), stage
    assert not (run / "sft" / "manifest.json").exists()
    assert summary_actions(run)["sft"] == "interrupted"

    second = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert second.returncode == 0, second.stderr[-4000:]
    disabled = {name: "disabled" for name in TINY_DISABLED}
    assert summary_actions(run) == {"prepare": "skipped", "reward": "skipped", "annotate": "skipped",
                                    "sft": "resumed", "bootstrap": "ran", "evaluate": "ran"} | disabled
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing written outside the run folder
    for stage in TINY_ENABLED:
        assert json.loads((run / stage / "manifest.json").read_text())["stage"] == stage, stage
    assert json.loads((run / "sft" / "manifest.json").read_text())["versions"]["steerray_at"].startswith(
        str(installed["site"]))
    # the report: self-contained, with the steerability numbers and plots
    page = (run / "evaluate" / "report.html").read_text()
    assert len(re.findall(r'src="data:image/png;base64,', page)) >= 4
    results = json.loads((run / "evaluate" / "eval.json").read_text())
    assert set(results["steerability"]["per_attribute"]) == {"verbosity", "humor"}
    assert results["steerability"]["rows"] == 2 * 2 * 3
    assert results["reward"]["regression"]["n_rows"] > 0
    assert results["bootstrap"]["rounds"][0]["samples"] == 12
    # bootstrap fine-tuned again and evaluate used that model. The relative run name was resolved against the
    # user's folder on the driver, before any job started (a Ray Train worker would resolve it in its own
    # working folder), so the recorded config works from anywhere.
    assert (run / "bootstrap" / "model" / "config.json").is_file()
    assert json.loads((run / "evaluate" / "manifest.json").read_text())["config"]["policy"] == str(
        run / "bootstrap" / "model")
    assert f"steerray serve --model {run / 'bootstrap' / 'model'}" in second.stderr

    # again: every stage is skipped and Ray does not even start (an embedded Ray makes its session folder
    # under RAY_TMPDIR)
    ray_tmp = tmp_path.parent / f"{tmp_path.name}-ray"
    third = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path,
                           env={**env, "RAY_TMPDIR": str(ray_tmp)}, timeout=300)
    assert third.returncode == 0, third.stderr[-4000:]
    assert summary_actions(run) == {name: "skipped" for name in TINY_ENABLED} | disabled
    assert not ray_tmp.exists(), sorted(ray_tmp.rglob("*"))[:5]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head(installed, tmp_path):
    """`ray start --head` on loopback with the job server, from the installed venv; stopped afterwards."""
    env = clean_env(installed) | {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    gcs, dashboard = free_port(), free_port()
    temp = Path("/tmp") / f"rayhead{gcs}"  # Ray's socket paths must stay short
    ray_cli = [str(installed["python"]), "-m", "ray.scripts.scripts"]  # the head runs the installed venv
    # Every port Ray would otherwise take at a fixed default (dashboard 8265, agent 52365, client 10001) is
    # a free one: another Ray on the machine (a test session's embedded one) may hold the defaults, and an
    # agent that cannot bind its port never registers, so the job server answers "No available agent".
    start = [*ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
             f"--temp-dir={temp}", "--disable-usage-stats"]
    # From an empty folder: `python -m` puts the working folder first on sys.path, and a head started in a
    # checkout would hand its jobs the checkout's steerray.
    subprocess.run(start, check=True, capture_output=True, env=env, timeout=180, cwd=tmp_path)
    try:
        yield f"http://127.0.0.1:{dashboard}", env, temp
    finally:
        stop_cluster(gcs, temp)


def stop_cluster(gcs_port: int, temp: Path) -> None:
    """Stop this head's processes only: `ray stop` would kill every Ray of the user on the machine."""
    import psutil

    marks = (f"127.0.0.1:{gcs_port}", f"--gcs_server_port={gcs_port}", str(temp))
    ours = [p for p in psutil.process_iter(["cmdline"]) if any(m in " ".join(p.info["cmdline"] or []) for m in marks)]
    for proc in ours:
        proc.terminate()
    _, alive = psutil.wait_procs(ours, timeout=15)
    for proc in alive:
        proc.kill()


def wait_for_job_server(address: str, temp: Path, timeout_s: float = 120.0) -> None:
    """Until the dashboard answers and the head's job agent has registered its HTTP port (Ray writes it to
    the session folder; -1 means it could not bind one, and no job can ever be submitted)."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            ports = [p.read_text().strip() for p in temp.glob("session_latest/dashboard_agent_listen_port_*")]
        except OSError:
            ports = []
        assert "-1" not in ports, f"the head's dashboard agent could not bind its port: see {temp}/session_latest/logs"
        if any(port.isdigit() for port in ports):
            return
        time.sleep(0.5)
    raise AssertionError(f"no job server with a registered agent at {address} after {timeout_s:.0f} s")


def test_prepare_on_a_ray_cluster_through_the_cli_and_through_ray_job_submit(installed, ray_head, tmp_path):
    address, env, temp = ray_head
    wait_for_job_server(address, temp)
    out_cli, out_job = tmp_path / "via-cli", tmp_path / "via-job"
    cli = subprocess.run([str(installed["steerray"]), "prepare", "--source", "demo", "--out", str(out_cli),
                          "demo_conversations=40", "--address", address],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
    config = tmp_path / "prepare.yaml"
    config.write_text(f"sources: [demo]\nout: {out_job}\ndemo_conversations: 40\n")
    job = subprocess.run([str(installed["python"]), "-m", "ray.scripts.scripts", "job", "submit", "--address", address, "--", "python",
                          "-m", "steerray.stages.prepare", "--config", str(config)],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    for out in (out_cli, out_job):
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["summary"]["conversations_train"] + manifest["summary"]["conversations_val"] == 40
        assert manifest["versions"]["steerray_at"].startswith(str(installed["site"])), manifest["versions"]
