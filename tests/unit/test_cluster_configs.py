"""cluster/: every manifest and YAML parses, names stages and presets that exist, and agrees with the pipeline."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from steerray.artifacts import config_hash
from steerray.config import load_config
from steerray.stages import PIPELINE_STAGES, STAGES
from steerray.stages.planning import load_pipeline_config, resolve_stages

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
YAML_FILES = sorted(CLUSTER.rglob("*.yaml"))
MODULES = {stage.module: stage for stage in STAGES.values()}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kuberay(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p in YAML_FILES for d in _docs(p) if d.get("kind") == kind]


def test_every_yaml_parses():
    assert len(YAML_FILES) >= 10
    for path in YAML_FILES:
        docs = _docs(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), path


def test_repo_paths_named_anywhere_in_cluster_exist():
    """Every cluster/... file, steerray/presets/... file and stage module named in cluster/ exists."""
    named, modules = set(), set()
    for path in list(CLUSTER.rglob("*")):
        if path.is_file():
            text = path.read_text()
            named |= set(re.findall(r"(?<![\w/.])((?:cluster|steerray/presets)/[\w./-]+\.(?:py|yaml))", text))
            modules |= set(re.findall(r"steerray\.stages\.(\w+)", text))
    assert any(n.startswith("cluster/") for n in named) and modules
    missing = sorted(n for n in named if not (REPO / n).is_file()) + sorted(modules - set(MODULES))
    assert not missing, f"named in cluster/ but missing: {missing}"


def test_raycluster_has_gpu_workers_and_shared_storage():
    [(_, cluster)] = _kuberay("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # drivers only on the head
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "no GPU worker group"
    claims = {d["metadata"]["name"] for _, d in _kuberay("PersistentVolumeClaim")}
    for pod in [head["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]:
        mounts = {m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]}
        assert "/mnt/shared" in mounts
        assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v} <= claims
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={spec['rayVersion']}" in dockerfile  # image and operator agree on Ray


def test_a_rayjob_per_stage_each_launching_a_valid_preset():
    [(_, cluster)] = _kuberay("RayCluster")
    jobs = _kuberay("RayJob")
    launched = {}
    for path, job in jobs:
        assert job["apiVersion"] == "ray.io/v1", path
        spec = job["spec"]
        assert spec["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"], path
        match = re.fullmatch(r"python -m steerray\.stages\.(\w+) --config (cluster/\w+)", spec["entrypoint"])
        assert match, f"{path}: entrypoint {spec['entrypoint']!r}"
        module, preset = match.groups()
        stage = MODULES[module]
        if module == "pipeline":
            resolve_stages(load_pipeline_config(preset))  # every stage preset validates
        else:
            load_config(stage.config, preset)
        launched[stage.name] = preset
    for name in PIPELINE_STAGES:
        assert name in launched, f"no RayJob for stage {name}"
    assert {"pipeline", "serve", "serve_reward"} <= set(launched)


def test_rayjob_presets_equal_what_the_pipeline_resolves():
    """A stage run by its RayJob is adopted by the pipeline: same resolved config, same hash."""
    planned = resolve_stages(load_pipeline_config("cluster/pipeline"))
    for item in (item for item in planned if item.enabled):  # a switched-off stage has no config to compare
        preset = load_config(type(item.config), f"cluster/{item.name}").with_absolute_paths()
        assert config_hash(preset) == item.config_hash, item.name


def test_launcher_yaml_matches_rays_schema():
    schema_path = Path(__import__("ray").__file__).parent / "autoscaler" / "ray-schema.json"
    jsonschema = pytest.importorskip("jsonschema")
    launcher = yaml.safe_load((CLUSTER / "launcher" / "aws.yaml").read_text())
    jsonschema.validate(launcher, json.loads(schema_path.read_text()))
    assert launcher["provider"]["type"] == "aws"
    assert launcher["available_node_types"][launcher["head_node_type"]]["resources"] == {"CPU": 0}
    [(_, cluster)] = _kuberay("RayCluster")
    image = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert launcher["docker"]["image"] == image


def test_runtime_env_example():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    known = {"working_dir", "excludes", "pip", "uv", "conda", "env_vars", "py_modules", "container", "image_uri",
             "config", "py_executable", "java_jars", "nsight", "mpi"}
    assert set(env) <= known
    assert "working_dir" not in env  # jobs run the installed package, as the CLI submits them
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray demands string values


def _readme_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (CLUSTER / "README.md").read_text(), flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split(" #")[0].strip().removeprefix("# or: ")
            if line.startswith("steerray "):
                commands.append(line.replace("$A", "--address=http://127.0.0.1:8265"))
    return commands


def test_cluster_readme_commands_parse():
    """Every `steerray` command of the walk-through parses, and every preset it names exists."""
    import shlex

    import typer

    from steerray.cli import app
    from steerray.config import resolve_preset
    from steerray.stages import get_stage

    commands = _readme_commands()
    assert any(c.startswith("steerray pipeline") for c in commands) and any("serve" in c for c in commands)
    group = typer.main.get_command(app)
    for command in commands:
        args = shlex.split(command)[1:]
        ctx = group.make_context("steerray", list(args), resilient_parsing=True)
        name, sub, rest = group.resolve_command(ctx, args)
        assert sub is not None, command
        try:
            sub.make_context(name, rest)
        except Exception as err:  # click's UsageError family (typer vendors its own click)
            pytest.fail(f"{command}: {type(err).__name__}: {err}")
        for preset in re.findall(r"--config (\S+)", command):
            resolve_preset(preset, get_stage(name).name)
