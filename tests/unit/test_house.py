"""The shape of the house, checked: layers without loops, small functions, thin job scripts, one registry.

A sub-package (``steerray/training/``) or a top-level module (``steerray/config.py``) is one node; an import
of one node by another is an edge. A loop between nodes means two layers know each other, and the
restructure of the "one house" issue removed them all: this keeps them out.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from steerray.stages import PIPELINE_STAGES, STAGES

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "steerray"
SOURCES = sorted(PACKAGE.rglob("*.py"))
MAX_FUNCTION_LINES = 60


def node_of(module: str) -> str:
    """``steerray.training.loop`` -> ``training``; ``steerray.config`` -> ``config``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "steerray"


def module_name(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("")
    return ".".join(relative.parts[:-1] if relative.name == "__init__" else relative.parts)


def steerray_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("steerray") and not node.level:
            found.add(node.module)
            for alias in node.names:  # `from steerray import runtime` imports the module steerray.runtime
                if node.module == "steerray":
                    found.add(f"steerray.{alias.name}")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("steerray")}
    return found


def layer_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in SOURCES:
        source = node_of(module_name(path))
        for target in map(node_of, steerray_imports(path)):
            if target not in (source, "steerray"):
                graph[source].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_no_import_loop_between_layers():
    graph = layer_graph()
    assert graph["stages"] and graph["training"], "the walk found no imports: the test is broken"
    assert find_cycle(graph) is None, f"import loop between steerray layers: {' -> '.join(find_cycle(graph))}"


def test_the_loop_finder_finds_loops():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_data_transforms_know_no_trainer_and_nothing_knows_the_cli():
    graph = layer_graph()
    assert "training" not in graph["data"]
    assert not any("cli" in targets for targets in graph.values())


def test_steerray_modules_are_imported_at_module_top():
    """Lazy imports are for heavy optional packages (torch, ray, vllm), never for steerray's own modules."""
    lazy = []
    for path in SOURCES:
        for func in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lazy += [f"{path.relative_to(REPO)}:{sub.lineno}" for sub in ast.walk(func)
                         if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("steerray")]
    assert not lazy, f"steerray imported inside functions: {lazy}"


def test_functions_are_small():
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_job_scripts_are_entry_points_and_training_stages_are_short():
    job_lines = sum(len(p.read_text().splitlines()) for p in (REPO / "jobs").glob("*.py"))
    assert job_lines < 120, f"jobs/ has {job_lines} lines: stage code belongs in steerray/stages/"
    for stage in ("train_reward", "train_sft"):
        lines = len((PACKAGE / "stages" / f"{stage}.py").read_text().splitlines())
        assert lines < 200, f"steerray/stages/{stage}.py has {lines} lines"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_registered_stage_has_its_module_job_script_and_preset_names(name):
    stage = STAGES[name]
    module = importlib.import_module(f"steerray.stages.{stage.module}")
    assert callable(module.run) and callable(module.main)
    assert (REPO / "jobs" / f"{stage.module}.py").is_file()
    assert "from steerray.stages." + stage.module + " import main" in (REPO / "jobs" / f"{stage.module}.py").read_text()
    assert name in PIPELINE_STAGES or stage.kind != "job" or name == "pipeline"


def test_a_stage_runs_as_a_module_entry_point_and_names_a_config_error():
    """`python -m steerray.stages.X --config FILE`: a bad key fails naming the key and the nearest one."""
    done = subprocess.run([sys.executable, "-m", "steerray.stages.train_sft", "--config", "tiny/sft"],
                          capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 1 and "runs/tiny/prepare: no such file or folder" in done.stderr  # no data there
    bad = REPO / "steerray" / "presets" / "tiny" / "sft.yaml"
    override = subprocess.run([sys.executable, "-m", "steerray.cli", "train-sft", "--config", str(bad),
                               "train.lr=1e-4"], capture_output=True, text=True, timeout=120)
    assert override.returncode == 2
    assert "train.lr: unknown key (did you mean optim.lr?)" in override.stderr
