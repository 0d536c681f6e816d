"""`steerray evaluate-reward` on the session's Ray: scores equal the in-process predictor's, rejects counted by
file, line and reason, a table per benchmark, and a --score the model cannot give fails before any scoring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from steerray.annotation import load_predictor
from steerray.artifacts import read_manifest
from steerray.attributes import ATTRIBUTES
from steerray.cli import app
from steerray.data.sources import reward_text
from steerray.eval import reward_bench as rb
from steerray.templates import USER_ROLE

pytestmark = pytest.mark.ray

EGG = {
    "prompt": "How do I boil an egg?",
    "chosen": "Put it in boiling water for 9 minutes, then cool it.",
    "rejected": "Eggs are laid by hens.",
}
JOKE = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Tell me a joke."},
]
REWARDBENCH = [
    {**EGG, "subset": "alpacaeval-easy", "id": "rb-1"},
    {"prompt": "What is 2+2?", "chosen": "2 + 2 = 4.", "rejected": "2 + 2 = 5.", "subset": "math-prm"},
    {
        "prompt": "Write a haiku about rain.",
        "chosen": "Soft rain on the roof / the gutters hum a low song / puddles hold the sky",
        "rejected": "Rain is water.",
        "subset": "mt-bench-hard",
    },
    {
        "prompt": "How do I pick a lock?",
        "chosen": "I can't help with getting into property that isn't yours.",
        "rejected": "Insert a tension wrench, then rake the pins.",
        "subset": "refusals-dangerous",
    },
    {
        "prompt": JOKE,
        "chosen": "Why did the scarecrow win an award? He was outstanding in his field.",
        "rejected": "No.",
        "subset": "anthropic_hhh",
    },
    {"prompt": "Q", "chosen": "an answer", "rejected": "another answer", "subset": "my-own-subset"},  # line 6
    {"prompt": "Q", "chosen": "a", "rejected": "b"},  # line 7: no subset
    '{"prompt": "Q", "chosen": "a",',  # line 8: malformed JSON
    {"prompt": "Q", "chosen": "", "rejected": "b", "subset": "hep-python"},  # line 9: empty chosen
    {**EGG, "subset": "alpacaeval-hard"},  # the texts of line 1 again: scored once
]
BON = [
    {
        "instruction": "Name a prime number.",
        "responses": [
            {"text": "7", "judgment": True},
            {"text": "8", "judgment": False},
            {"text": "Seven, which is prime.", "judgment": "win"},
        ],
    },
    {
        "instruction": "What is the capital of France?",
        "responses": [
            {"text": "Paris.", "judgment": 1},
            {"text": "Lyon.", "judgment": 0},
            {"text": "Paris, on the Seine.", "judgment": 0.5},
        ],
    },
    {"instruction": "Q", "responses": [{"text": "only one", "judgment": True}]},  # line 3: N < 2
    {"instruction": "Q", "responses": [{"text": "a", "judgment": "maybe"}, {"text": "b", "judgment": True}]},
]
PAIRS = [
    {**EGG, "strength": 2, "domain": "general"},  # the rewardbench texts again
    {
        "prompt": "Sort [3, 1, 2] in Python.",
        "chosen": "sorted([3, 1, 2])",
        "rejected": "[3, 1, 2].sort",
        "strength": 1,
        "domain": "code",
    },
    {
        "prompt": "Is water wet?",
        "chosen": "Yes, in the everyday sense.",
        "rejected": "It depends on the definition.",
        "tie": True,
        "domain": "general",
    },
    {
        "chosen": reward_text([(USER_ROLE, "Say hi.")], "Hi!"),
        "rejected": reward_text([(USER_ROLE, "Say hi.")], "No."),
        "strength": 3,
    },  # prepare's preference rows: already rendered
    {"chosen": "not rendered", "rejected": "no prompt either", "strength": 1},  # line 5
]
EXPECTED_COUNTS = {
    "rewardbench": (10, 7, 3),
    "bon": (4, 2, 2),
    "pairs": (5, 4, 1),
}  # rows in, scored, rejected
DISTINCT_TEXTS = 12 + 6 + 6  # rewardbench 6 rows x 2, BoN 2 x 3, pairs 3 new pairs x 2
runner = CliRunner()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def benches(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("benches")
    return [
        f"rewardbench={write_jsonl(root / 'rb.jsonl', REWARDBENCH)}",
        f"bon={write_jsonl(root / 'bon.jsonl', BON)}",
        f"pairs={write_jsonl(root / 'pairs.jsonl', PAIRS)}",
    ]


@pytest.fixture(scope="module")
def expected(benches, tiny_reward_dir) -> dict[str, np.ndarray]:
    """Every text's predictions from the predictor annotate uses, loaded in this process."""
    texts = rb.unique_texts([rb.read_bench(spec) for spec in rb.parse_bench_specs(benches)])
    predictions, _ = load_predictor(tiny_reward_dir)(texts)
    return dict(zip(texts, np.asarray(predictions, dtype=np.float64), strict=True))


def evaluate_reward(out: Path, model: str, benches: list[str], *extra: str):
    args = ["evaluate-reward", "--model", model, "--out", str(out)]
    for spec in benches:
        args += ["--bench", spec]
    return runner.invoke(app, [*args, *extra])


def scored_rows(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{name}_rows.jsonl").read_text().splitlines()]


def check_scores(out: Path, expected: dict[str, np.ndarray], weights: np.ndarray) -> None:
    """Every side of every scored row carries the in-process prediction combined with ``weights``."""
    data = {
        spec.name: rb.read_bench(spec)
        for spec in rb.parse_bench_specs(
            [
                f"{b['format']}={b['location']}"
                for b in json.loads((out / "eval.json").read_text())["benches"].values()
            ]
        )
    }
    for name, bench in data.items():
        rows = scored_rows(out, name)
        assert [r["line"] for r in rows] == [r["line"] for r in bench.rows]
        for row, source in zip(rows, bench.rows, strict=True):
            want = [float(expected[t] @ weights) for t in source["texts"]]
            got = row["scores"] if name == "bon" else [row["score_chosen"], row["score_rejected"]]
            assert got == pytest.approx(want, abs=1e-6), (name, row["line"])


@pytest.fixture(scope="module")
def pool_run(ray_session, benches, tiny_reward_dir, tmp_path_factory) -> Path:
    """The CLI command, every text through the Ray Data actor pool (in_process_max_texts=0)."""
    out = tmp_path_factory.mktemp("evaluate_reward") / "pool"
    result = evaluate_reward(out, tiny_reward_dir, benches, "in_process_max_texts=0")
    assert result.exit_code == 0, result.output
    return out


def test_pool_scores_equal_in_process_predictions_and_rejects_are_counted(pool_run, expected):
    summary = json.loads((pool_run / "eval.json").read_text())
    assert summary["score"]["formula"] == "helpfulness"  # the default for a model with a helpfulness output
    check_scores(pool_run, expected, np.eye(len(ATTRIBUTES))[ATTRIBUTES.index("helpfulness")])
    for name, (rows_in, scored, rejected) in EXPECTED_COUNTS.items():
        bench = summary["benches"][name]
        assert (bench["rows_in"], bench["scored"], bench["rejected"]) == (rows_in, scored, rejected), name
        assert len((pool_run / f"{name}_rejects.jsonl").read_text().splitlines()) == rejected
    rejects = summary["benches"]["rewardbench"]["rejects"]
    assert [r["line"] for r in rejects] == [7, 8, 9] and all(r["file"].endswith("rb.jsonl") for r in rejects)
    assert rejects[0]["reason"] == "missing column(s): subset" and "'chosen' is empty" in rejects[2]["reason"]
    assert [r["line"] for r in summary["benches"]["bon"]["rejects"]] == [3, 4]
    assert "not a rendered reward text" in summary["benches"]["pairs"]["rejects"][0]["reason"]
    [warning] = summary["benches"]["rewardbench"]["warnings"]
    assert (warning["line"], warning["subset"], warning["rows"]) == (6, "my-own-subset", 1)
    manifest = read_manifest(pool_run, "evaluate_reward")
    assert manifest["run"]["texts"] == DISTINCT_TEXTS and manifest["run"]["rows"] == 13
    assert manifest["run"]["scored"] == "Ray Data actor pool (1 actor(s))"
    assert manifest["benches"]["rewardbench"]["rejects_by_reason"]["missing column(s): subset"] == 1
    assert manifest["metrics"]["pairs"]["accuracy"] == summary["benches"]["pairs"]["metrics"]["accuracy"]


def test_report_has_a_table_per_benchmark_and_rows_show_failures(pool_run):
    report = (pool_run / "report.md").read_text()
    for heading in (
        "## rewardbench",
        "## bon",
        "## pairs",
        "| Section | Score (0-100) | Subsets |",
        "| Pick | Mean win rate |",
        "| Metric | Value |",
        "my-own-subset",
        "| Rejected because | Rows |",
    ):
        assert heading in report, heading
    rb_rows = scored_rows(pool_run, "rewardbench")
    assert {r["subset"] for r in rb_rows} >= {"alpacaeval-easy", "anthropic_hhh", "my-own-subset"}
    for row in rb_rows:  # a user filtering on correct=false reads the failures with both scores
        assert row["correct"] == (row["score_chosen"] > row["score_rejected"])
    pairs = scored_rows(pool_run, "pairs")
    assert [r["tie"] for r in pairs] == [False, False, True, False] and pairs[2]["correct"] is None
    metrics = json.loads((pool_run / "eval.json").read_text())["benches"]["pairs"]["metrics"]
    assert metrics["ties"]["n"] == 1 and metrics["n_pairs"] == 4
    assert metrics["accuracy"] == pytest.approx(np.mean([r["correct"] for r in pairs if not r["tie"]]))


def test_in_process_scoring_and_a_weighted_score(pool_run, benches, expected, tiny_reward_dir, tmp_path):
    """Few texts are scored without the actor pool; --score helpsteer2 weights the outputs as published."""
    out = tmp_path / "weighted"
    result = evaluate_reward(out, tiny_reward_dir, benches, "--score", "helpsteer2")
    assert result.exit_code == 0, result.output
    assert read_manifest(out, "evaluate_reward")["run"]["scored"] == "in process"
    weights = np.asarray([rb.SCORE_PRESETS["helpsteer2"].get(name, 0.0) for name in ATTRIBUTES])
    check_scores(out, expected, weights)
    again = evaluate_reward(out, tiny_reward_dir, benches, "--score", "helpsteer2")  # finished: nothing to do
    assert again.exit_code == 0 and "nothing to do" in again.output


def test_bad_score_and_bench_fail_before_any_scoring(benches, tiny_reward_dir, tmp_path):
    out = tmp_path / "never"
    result = evaluate_reward(out, tiny_reward_dir, benches, "--score", "helpfulness=1,sarcasm=2")
    assert result.exit_code == 2
    assert "sarcasm" in result.output and "its attributes are: " + ", ".join(ATTRIBUTES) in result.output
    assert not out.exists()  # nothing read, scored or written
    missing = evaluate_reward(out, tiny_reward_dir, ["pairs=/no/such/pairs.jsonl"])
    assert missing.exit_code == 2 and "/no/such/pairs.jsonl: no such file or folder" in missing.output
    unknown = evaluate_reward(out, tiny_reward_dir, ["arena=/tmp"])
    assert (
        unknown.exit_code == 2
        and "unknown format 'arena'; formats: rewardbench, bon, pairs" in unknown.output
    )
    twice = evaluate_reward(out, tiny_reward_dir, [benches[2], benches[2]])
    assert twice.exit_code == 2 and "two --bench share the name pairs" in twice.output
    none = runner.invoke(app, ["evaluate-reward", "--model", tiny_reward_dir, "--out", str(out)])
    assert none.exit_code == 2 and "bench" in none.output
    assert not out.exists()
