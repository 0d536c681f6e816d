"""The evaluation report: eval.json (every number), PNG plots, report.md and a self-contained report.html.

The report is built once as a list of blocks (headings, paragraphs, tables, images, code) and rendered
twice, so the Markdown and the HTML always say the same thing. The HTML inlines its PNGs as base64:
one file to mail or attach to a CI run.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerray.artifacts import atomic_path, atomic_write_json, atomic_write_text

PLOTS_DIR = "plots"


@dataclass
class Block:
    kind: str  # h1 | h2 | p | table | img | pre
    text: str = ""
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers for tables: fixed digits, '-' for missing or undefined."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------

def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_steering_curves(steer: Mapping[str, Any], path: Path) -> Path | None:
    """Measured mean (+- std) against requested value, one panel per steered attribute, y=x for reference."""
    curves = {a: c for a, c in steer["per_attribute"].items() if c.get("mean_by_value")}
    if not curves:
        return None
    plt = _pyplot()
    cols = min(3, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False)
    for ax, (attribute, curve) in zip(axes.flat, curves.items(), strict=False):
        xs = [int(v) for v in curve["mean_by_value"]]
        ys = list(curve["mean_by_value"].values())
        errs = [curve["std_by_value"][str(v)] for v in xs]
        ax.plot([0, 4], [0, 4], ls="--", color="grey", lw=1, label="ideal")
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label="measured")
        ax.set_title(f"{attribute}: rho={fmt(curve['spearman'], 2)}")
        ax.set_xlabel("requested")
        ax.set_ylabel("reward model")
        ax.set_xticks(range(5))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Steering: requested vs measured attribute value")
    fig.tight_layout()  # keeps the panel titles clear of the suptitle
    return _save(fig, path)


def plot_verbosity_length(steer: Mapping[str, Any], path: Path) -> Path | None:
    curve = steer.get("verbosity_length")
    if not curve:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [int(v) for v in curve["mean_by_value"]]
    ax.bar(xs, list(curve["mean_by_value"].values()),
           yerr=[curve["std_by_value"][str(v)] for v in xs], capsize=3, color="#4c72b0")
    ax.set_xlabel("requested verbosity")
    ax.set_ylabel(f"answer length ({curve.get('unit', 'tokens')})")
    ax.set_title(f"Verbosity vs length: rho={fmt(curve['spearman'], 2)}")
    ax.set_xticks(range(5))
    return _save(fig, path)


def plot_cross_matrix(steer: Mapping[str, Any], path: Path) -> Path | None:
    """Spearman of each steered attribute's requested value with each measured output (off-diagonal = leakage)."""
    cross = steer.get("cross") or {}
    if not cross:
        return None
    steered = list(cross)
    measured = list(next(iter(cross.values())))
    if not measured:
        return None
    plt = _pyplot()
    import numpy as np

    grid = np.array([[np.nan if cross[s][m] is None else cross[s][m] for m in measured] for s in steered])
    fig, ax = plt.subplots(figsize=(0.7 * len(measured) + 2.5, 0.5 * len(steered) + 1.8))
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(measured)), measured, rotation=45, ha="right")
    ax.set_yticks(range(len(steered)), steered)
    for i in range(len(steered)):
        for j in range(len(measured)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("measured by the reward model")
    ax.set_ylabel("steered")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title("Spearman: requested value vs every output")
    return _save(fig, path)


def plot_reward_metrics(reward: Mapping[str, Any], path: Path) -> Path | None:
    per_attribute = (reward.get("regression") or {}).get("per_attribute") or {}
    names = [a for a, m in per_attribute.items() if m.get("n")]
    if not names:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(names) + 2), 3.5))
    width = 0.38
    xs = range(len(names))
    for offset, key in ((-width / 2, "pearson"), (width / 2, "spearman")):
        ax.bar([x + offset for x in xs], [per_attribute[a].get(key) or 0 for a in names], width, label=key)
    ax.set_xticks(list(xs), names, rotation=30, ha="right")
    ax.set_ylim(-1, 1)
    ax.axhline(0, color="black", lw=0.8)
    ax.legend(fontsize=8)
    ax.set_title("Reward model on the validation split")
    return _save(fig, path)


def plot_bootstrap(boot: Mapping[str, Any], path: Path) -> Path | None:
    rounds = boot.get("rounds") or []
    if not rounds:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = [f"round {r['round']}" for r in rounds]
    for key, name in (("mean_score", "all samples"), ("mean_best", "best of K"), ("mean_kept", "kept")):
        ys = [r.get(key) for r in rounds]
        if any(y is not None for y in ys):
            ax.plot(labels, [math.nan if y is None else y for y in ys], marker="o", label=name)
    final = boot.get("final")
    if final and final.get("mean_score") is not None:
        ax.plot([labels[-1], "final model"], [rounds[-1].get("mean_score"), final["mean_score"]],
                ls="--", marker="s", color="black", label="final model, same prompts")
    ax.set_ylabel("reward-model score")
    ax.legend(fontsize=8)
    ax.set_title("Bootstrapping: sample scores by round")
    return _save(fig, path)


def make_plots(results: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write every plot the results support; returns name -> PNG path."""
    plots_dir = out_dir / PLOTS_DIR
    plots_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path | None] = {}
    steer = results.get("steerability")
    if steer:
        made["steering_curves"] = plot_steering_curves(steer, plots_dir / "steering_curves.png")
        made["verbosity_length"] = plot_verbosity_length(steer, plots_dir / "verbosity_length.png")
        made["cross_matrix"] = plot_cross_matrix(steer, plots_dir / "cross_matrix.png")
    if results.get("reward"):
        made["reward_metrics"] = plot_reward_metrics(results["reward"], plots_dir / "reward_metrics.png")
    if results.get("bootstrap"):
        made["bootstrap"] = plot_bootstrap(results["bootstrap"], plots_dir / "bootstrap.png")
    return {name: path for name, path in made.items() if path is not None}


# --------------------------------------------------------------------------------------------------
# Content
# --------------------------------------------------------------------------------------------------

def _reward_blocks(reward: Mapping[str, Any], plots: Mapping[str, Path]) -> list[Block]:
    blocks = [Block("h2", "Reward model")]
    regression = reward.get("regression") or {}
    per_attribute = regression.get("per_attribute") or {}
    if per_attribute:
        blocks.append(Block("p", f"Validation rows: {fmt(regression.get('n_rows'))}, overall MSE {fmt(regression.get('mse'))}. Attributes without labels "
                                 "in the validation split are left out."))
        rows = [[a, fmt(m.get("n")), fmt(m.get("mse")), fmt(m.get("baseline_mse")), fmt(m.get("pearson")),
                 fmt(m.get("spearman"))] for a, m in per_attribute.items() if m.get("n")]
        blocks.append(Block("table", headers=["attribute", "rows", "MSE", "MSE of the mean", "Pearson", "Spearman"],
                            rows=rows))
    preference = reward.get("preference")
    if preference:
        blocks.append(Block("p", f"Preference pairs: {fmt(preference.get('n_pairs'))} ({fmt(preference.get('n_ties'))} ties); pairwise accuracy "
                                 f"(helpfulness output, chosen > rejected): {fmt(preference.get('accuracy'))}."))
    if "reward_metrics" in plots:
        blocks.append(Block("img", "reward_metrics"))
    return blocks


# The numbers of each benchmark format shown here: (metric, label, digits); evaluate-reward's report.md has all.
BENCH_ROWS = {
    "rewardbench": (("overall", "RewardBench overall (0-100)", 1), ("accuracy", "accuracy over all rows", 3)),
    "bon": (("win_rate", "win rate of the reward model's pick", 3), ("random", "win rate of a random pick", 3),
            ("oracle", "win rate of the best-judged pick", 3)),
    "pairs": (("accuracy", "accuracy (decided pairs)", 3), ("weighted_accuracy", "strength-weighted accuracy", 3)),
}


def _reward_bench_blocks(bench: Mapping[str, Any]) -> list[Block]:
    """One table over every benchmark of an evaluate-reward run (its report.md has the full tables)."""
    score = (bench.get("score") or {}).get("formula", "-")
    blocks = [Block("h2", "Reward benchmarks"), Block("p", (
        f"The reward model on benchmark files, ranked by {score}; every table and every scored row: "
        f"{bench.get('folder', '-')}/report.md and <benchmark>_rows.jsonl."))]
    rows = []
    for name, entry in (bench.get("benches") or {}).items():
        metrics = entry["metrics"]
        shown = [(label, fmt(metrics.get(key), digits)) for key, label, digits in BENCH_ROWS[entry["format"]]]
        shown += [(f"{section} (0-100)", fmt(value, 1)) for section, value in (metrics.get("sections") or {}).items()]
        for label, value in shown:
            rows.append([name, entry["format"], f"{entry['scored']} / {entry['rejected']}", label, value])
    blocks.append(Block("table", headers=["benchmark", "format", "rows scored / rejected", "metric", "value"],
                        rows=rows))
    partial = [n for n, e in (bench.get("benches") or {}).items() if e["metrics"].get("complete") is False]
    if partial:
        blocks.append(Block("p", f"{', '.join(partial)}: some RewardBench subsets have no rows, so the overall "
                                 "score is not comparable with published ones."))
    return blocks


def _steer_blocks(steer: Mapping[str, Any], plots: Mapping[str, Path]) -> list[Block]:
    blocks = [Block("h2", "Steerability"), Block("p", (
        f"{len(steer.get('prompts', []))} held-out prompts x {len(steer.get('attributes', []))} attributes x "
        f"values {steer.get('values')}: {steer.get('rows')} answers, each generated with one attribute at the "
        "requested value and the others at their defaults, then scored by the reward model. "
        "rho = Spearman correlation between requested and measured value (1 = steering fully orders the "
        "answers); shift = mean measured at the highest requested value minus at the lowest."))]
    rows = []
    for attribute, curve in steer["per_attribute"].items():
        means = curve.get("mean_by_value") or {}
        at_cap = " / ".join(f"{v}:{n}" for v, n in (curve.get("at_cap_by_value") or {}).items()) or "0"
        rows.append([attribute, fmt(curve.get("spearman")), fmt(curve.get("per_prompt_spearman")),
                     fmt(curve.get("slope")), fmt(curve.get("shift")),
                     " / ".join(f"{v}:{fmt(m, 2)}" for v, m in means.items()) or curve.get("note", "-"), at_cap])
    blocks.append(Block("table", headers=["attribute", "rho", "rho per prompt", "slope", "shift",
                                          "mean measured by requested value", "answers at the cap"], rows=rows))
    blocks.append(Block("p", f"Mean rho over attributes: {fmt(steer.get('mean_spearman'))}."))
    if "steering_curves" in plots:
        blocks.append(Block("img", "steering_curves"))
    length = steer.get("verbosity_length")
    if length:
        means = " / ".join(f"{v}:{fmt(m, 1)}" for v, m in length["mean_by_value"].items())
        blocks.append(Block("p", f"Verbosity vs answer length ({length.get('unit', 'tokens')}): rho = "
                                 f"{fmt(length.get('spearman'))}, mean length by requested value {means}."))
        if "verbosity_length" in plots:
            blocks.append(Block("img", "verbosity_length"))
    if "cross_matrix" in plots:
        blocks.append(Block("p", "Each row steers one attribute; each column is one reward-model output. "
                                 "The diagonal is steering working; large off-diagonal values are attributes "
                                 "that move together."))
        blocks.append(Block("img", "cross_matrix"))
    for attribute, answers in (steer.get("examples") or {}).items():
        if not answers:
            continue
        blocks.append(Block("h2", f"Example: one prompt at {attribute} {answers[0]['value']}..{answers[-1]['value']}"))
        blocks.append(Block("p", f"Prompt: {steer['prompts'][0] if steer.get('prompts') else ''}"))
        blocks.append(Block("table", headers=[attribute, "tokens", "measured", "answer"],
                            rows=[[str(a["value"]), str(a["tokens"]), fmt(a.get("measured"), 2),
                                   a["answer"].replace("\n", " ")] for a in answers]))
    return blocks


def _sets_blocks(sets: Mapping[str, Any]) -> list[Block]:
    blocks = [Block("h2", "Steerability on other prompts"), Block("p", (
        "The same grid on prompt sets unlike the training data (e.g. real user instructions): does steering "
        "carry over beyond the data's own topics?"))]
    rows = []
    for name, steer in sets.items():
        length = (steer.get("verbosity_length") or {}).get("spearman")
        for attribute, curve in steer["per_attribute"].items():
            rows.append([name, attribute, fmt(curve.get("spearman")), fmt(curve.get("shift")),
                         fmt(length) if attribute == "verbosity" else "-", str(steer.get("at_cap", 0))])
    blocks.append(Block("table", headers=["prompts", "attribute", "rho", "shift", "verbosity vs length rho",
                                          "answers at the cap (set)"], rows=rows))
    return blocks


def _probe_blocks(probe: Mapping[str, Any]) -> list[Block]:
    blocks = [Block("h2", "Label probe"), Block("p", (
        "Held-out answers scored by the policy under their true label and under the same label with one "
        "attribute at each other value: gain = log-probability under the true value minus the mean under the "
        "others (nats); best = how often the true value is the likeliest (chance given beside it)."))]
    rows = [[a, fmt(r.get("n")), fmt(r.get("mean_gain_nats")), fmt(r.get("true_is_best")), fmt(r.get("chance"))]
            for a, r in probe.items()]
    blocks.append(Block("table", headers=["attribute", "answers", "gain (nats)", "best", "chance"], rows=rows))
    return blocks


def _bootstrap_blocks(boot: Mapping[str, Any], plots: Mapping[str, Path]) -> list[Block]:
    blocks = [Block("h2", "Bootstrapping"), Block("p", (
        f"Samples per prompt: {boot.get('samples_per_prompt', '-')}, selection: {boot.get('selection', '-')}, "
        f"score: {boot.get('score', '-')}."))]
    # "cut": samples stopped by the token cap; they are kept only for prompts without a complete one.
    rows = [[str(r["round"]), fmt(r.get("prompts")), fmt(r.get("samples")), fmt(r.get("cut_at_cap")),
             fmt(r.get("mean_score")), fmt(r.get("mean_best")), fmt(r.get("kept")), fmt(r.get("kept_cut_at_cap")),
             fmt(r.get("mean_kept"))] for r in boot.get("rounds", [])]
    final = boot.get("final")
    if final:
        rows.append(["final model", fmt(final.get("prompts")), fmt(final.get("samples")), fmt(final.get("cut_at_cap")),
                     fmt(final.get("mean_score")), fmt(final.get("mean_best")), "-", "-", "-"])
    blocks.append(Block("table", headers=["round", "prompts", "samples", "cut at the cap", "mean score",
                                          "mean best of K", "kept", "kept cut", "mean kept"], rows=rows))
    if "bootstrap" in plots:
        blocks.append(Block("img", "bootstrap"))
    return blocks


def _steerlm2_blocks(section: Mapping[str, Any]) -> list[Block]:
    blocks = [Block("h2", "SteerLM 2.0"), Block("p", (
        "Each round samples n answers per prompt and label from the policy Q', weighs them by "
        "P(a|x,y) P(y|x) / Q'(y|a,x) and trains Q towards the weighted samples; distance = KL(w || b), w the "
        "weights, b the trained policy's own weights: 0 when it matches the target on those samples. Before/after: "
        "held-out groups (or the first and last step)."))]
    rows = [[str(r["round"]), fmt(r.get("groups")), fmt(r.get("dropped")), fmt(r.get("mean_effective_samples"), 2),
             fmt(r.get("steps")), fmt(r.get("distance_before"), 4), fmt(r.get("distance_after"), 4),
             fmt(r.get("groups_skipped"))] for r in section.get("rounds", [])]
    blocks.append(Block("table", headers=["round", "groups", "dropped", "effective samples", "steps",
                                          "distance before", "distance after", "skipped (NaN)"], rows=rows))
    comparison = section.get("comparison") or []
    if comparison:
        blocks.append(Block("p", f"Steering of the final SteerLM 2.0 model ({section.get('final_model')}) on the "
                                 "same grid as the policy above (held-out prompts)."))
        blocks.append(Block("table", headers=["attribute", "rho SteerLM 1", "rho SteerLM 2", "change",
                                              "shift SteerLM 1", "shift SteerLM 2"],
                            rows=[[c["attribute"], fmt(c["steerlm1_spearman"]), fmt(c["steerlm2_spearman"]),
                                   fmt(c["change"]), fmt(c["steerlm1_shift"]), fmt(c["steerlm2_shift"])]
                                  for c in comparison]))
    return blocks


def build_blocks(results: Mapping[str, Any], plots: Mapping[str, Path]) -> list[Block]:
    title = results.get("title", "steerray evaluation")
    blocks = [Block("h1", title)]
    info = results.get("models") or {}
    if info:
        blocks.append(Block("table", headers=["what", "where"], rows=[[k, str(v)] for k, v in info.items()]))
    if results.get("reward"):
        blocks += _reward_blocks(results["reward"], plots)
    if results.get("reward_bench"):
        blocks += _reward_bench_blocks(results["reward_bench"])
    if results.get("steerability"):
        blocks += _steer_blocks(results["steerability"], plots)
    if results.get("steerability_sets"):
        blocks += _sets_blocks(results["steerability_sets"])
    if results.get("probe"):
        blocks += _probe_blocks(results["probe"])
    if results.get("bootstrap"):
        blocks += _bootstrap_blocks(results["bootstrap"], plots)
    if results.get("steerlm2"):
        blocks += _steerlm2_blocks(results["steerlm2"])
    timings = results.get("timings") or {}
    if timings:
        blocks.append(Block("p", "Time: " + ", ".join(f"{k} {fmt(v, 1)} s" for k, v in timings.items()) + "."))
    blocks.append(Block("p", "Every number is in eval.json."))
    return blocks


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------

def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[Block], plots: Mapping[str, Path], base: Path) -> str:
    out: list[str] = []
    for block in blocks:
        if block.kind == "h1":
            out.append(f"# {block.text}\n")
        elif block.kind == "h2":
            out.append(f"## {block.text}\n")
        elif block.kind == "p":
            out.append(block.text + "\n")
        elif block.kind == "pre":
            out.append("```\n" + block.text + "\n```\n")
        elif block.kind == "table":
            out.append("| " + " | ".join(_md_cell(h) for h in block.headers) + " |")
            out.append("|" + "---|" * len(block.headers))
            out.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows)
            out.append("")
        elif block.kind == "img":
            out.append(f"![{block.text}]({plots[block.text].relative_to(base).as_posix()})\n")
    return "\n".join(out)


HTML_STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:0.5rem 0 1rem}td,th{border:1px solid #ccc;padding:0.25rem 0.5rem;
text-align:left;vertical-align:top;font-size:0.9rem}th{background:#f3f3f3}img{max-width:100%}
pre{background:#f6f6f6;padding:0.5rem;overflow-x:auto}"""


def render_html(blocks: Sequence[Block], plots: Mapping[str, Path]) -> str:
    """One self-contained page: styles inline, PNGs as base64 data URIs, no external requests."""
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(blocks[0].text if blocks else 'report')}</title>",
           f"<style>{HTML_STYLE}</style></head><body>"]
    for block in blocks:
        if block.kind in ("h1", "h2", "p"):
            out.append(f"<{block.kind}>{html.escape(block.text)}</{block.kind}>")
        elif block.kind == "pre":
            out.append(f"<pre>{html.escape(block.text)}</pre>")
        elif block.kind == "table":
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block.headers) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            out.append("</table>")
        elif block.kind == "img":
            data = base64.b64encode(plots[block.text].read_bytes()).decode()
            out.append(f'<p><img alt="{html.escape(block.text)}" src="data:image/png;base64,{data}"></p>')
    out.append("</body></html>")
    return "\n".join(out)


def write_report(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write eval.json, plots/*.png, report.md and report.html under ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = atomic_write_json(out_dir / "eval.json", json.loads(json.dumps(results, default=str)))
    plots = make_plots(results, out_dir)
    blocks = build_blocks(results, plots)
    md_path = atomic_write_text(out_dir / "report.md", render_markdown(blocks, plots, out_dir))
    html_path = atomic_write_text(out_dir / "report.html", render_html(blocks, plots))
    return {"eval": json_path, "markdown": md_path, "html": html_path, **{f"plot_{k}": v for k, v in plots.items()}}


def samples_markdown(title: str, prompts: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """Answers to fixed prompts, grouped by prompt, one quoted block per steering setting."""
    lines = [f"# {title}\n"]
    for prompt in prompts:
        lines.append(f"## {prompt}\n")
        for r in (r for r in rows if r["prompt"] == prompt):
            setting = ", ".join(f"{k}={v}" for k, v in r["steering"].items()) or "defaults"
            quoted = "\n".join(f"> {line}" for line in (str(r["answer"]).strip() or "(empty)").splitlines())
            lines.append(f"**{setting}** ({r['completion_tokens']} tokens, {r['finish_reason']}):\n\n{quoted}\n")
    return "\n".join(lines)
