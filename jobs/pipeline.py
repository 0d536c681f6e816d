"""The whole SteerLM loop: prepare -> train-reward -> annotate -> train-sft -> [bootstrap] -> evaluate.

    steerray pipeline --config jobs/configs/demo/pipeline.yaml [--run NAME] [--address ADDR] [STAGE.key=value ...]
    python jobs/pipeline.py --config runs/demo/pipeline.yaml [--dry-run]

1. Resolve every stage's config (its preset + overrides + the run's folders, runs/NAME/<stage>/) and
   validate them all before anything starts: a typo, an unknown preset or a missing file fails here.
2. For each stage decide skip / resume / run from its manifest and runs/NAME/pipeline_state.json (see
   steerray/pipeline.py), then run it as its own job: in this process on the embedded local Ray, or, when
   the pipeline itself runs as a Ray job on a cluster, submitted to the head's job server
   (``stage_address``) so each stage has its own job id and logs.
3. A failing stage stops the pipeline with the stage's error and the one command that resumes it.
4. The summary: what ran, how long each stage took, key metrics, the report, the serve command;
   also written to runs/NAME/summary.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

from steerray import runtime
from steerray.artifacts import CONFIG_FILE, atomic_write_json, atomic_write_text
from steerray.config import PipelineConfig, dump_yaml, validate_config
from steerray.errors import SteerrayError
from steerray.pipeline import (
    SUMMARY_FILE,
    PlannedStage,
    StageOutcome,
    corrupt_manifest_aside,
    current_fingerprints,
    forced_stages,
    key_metrics,
    load_state,
    plan,
    record_finish,
    record_start,
    resolve_stages,
    run_dir,
    save_state,
    settle,
    stage_manifest,
    summary_table,
)


class PipelineFailed(SteerrayError, RuntimeError):
    """A stage failed; the message carries its error and the command that resumes the run."""


def say(message: str) -> None:
    print(f"[pipeline] {message}", file=sys.stderr, flush=True)


def resume_command(cfg: PipelineConfig) -> str:
    return cfg.command or f"steerray pipeline --config {run_dir(cfg) / 'pipeline.yaml'}"


# --------------------------------------------------------------------------------------------------
# 1. One stage
# --------------------------------------------------------------------------------------------------

def run_stage(item: PlannedStage, cfg: PipelineConfig) -> None:
    """Write the stage's resolved config into its folder, then run its job script."""
    text = dump_yaml(item.config)
    atomic_write_text(item.folder / CONFIG_FILE, text)
    if cfg.stage_address:
        runtime.submit_job(item.stage.job, text, cfg.stage_address)
    else:
        runtime.load_job_module(item.stage.job).main(["--config-b64", runtime.encode_config(text)])


def fail_stage(item: PlannedStage, cfg: PipelineConfig, err: BaseException) -> PipelineFailed:
    root = run_dir(cfg)
    log_path = root / "pipeline_error.log"
    atomic_write_text(log_path, "".join(traceback.format_exception(type(err), err, err.__traceback__)))
    message = str(err) if isinstance(err, SteerrayError) else f"{type(err).__name__}: {err}"
    return PipelineFailed(
        f"stage {item.name!r} ({item.stage.command}) failed: {message}\n"
        f"  its folder {item.folder} has no manifest: a re-run keeps the finished stages and resumes here\n"
        f"  traceback: {log_path}\n"
        f"  resume with: {resume_command(cfg)}")


# --------------------------------------------------------------------------------------------------
# 2. Summary
# --------------------------------------------------------------------------------------------------

def final_model(cfg: PipelineConfig) -> Path:
    return run_dir(cfg) / ("bootstrap" if cfg.bootstrap.enabled else "sft") / "model"


def summarize(cfg: PipelineConfig, outcomes: list[StageOutcome], started: float) -> dict[str, Any]:
    root = run_dir(cfg)
    report = root / "evaluate" / "report.html"
    summary = {
        "run": str(root), "seconds": round(time.time() - started, 1),
        "stages": [o.__dict__ for o in outcomes],
        "report": str(report) if report.exists() else None,
        "model": str(final_model(cfg)),
        "serve": f"steerray serve --model {final_model(cfg)}",
    }
    atomic_write_json(root / SUMMARY_FILE, summary)
    lines = [summary_table(outcomes), "",
             f"run folder: {root}   total: {summary['seconds']:.0f} s"]
    if summary["report"]:
        lines.append(f"report:     {report}  (also report.md, eval.json)")
    lines.append(f"serve it:   {summary['serve']}")
    print("\n".join(lines), file=sys.stderr, flush=True)
    return summary


# --------------------------------------------------------------------------------------------------
# 3. The loop
# --------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> tuple[PipelineConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    options, rest = parser.parse_known_args(argv)
    text = runtime.job_config_from_argv(rest)
    return validate_config(PipelineConfig, yaml.safe_load(text) or {}, "pipeline config"), options


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg, options = parse_args(argv)
    started = time.time()
    planned = resolve_stages(cfg)  # every config validated before anything runs
    root = run_dir(cfg)
    state = load_state(root)
    decisions = plan(planned, state, cfg.rerun)
    say(f"run {root}: " + ", ".join(f"{p.name} {d.action}" for p, d in zip(planned, decisions, strict=True)))
    if options.dry_run:
        for item, decision in zip(planned, decisions, strict=True):
            say(f"  {item.name:<10} {decision.action:<8} {decision.reason}  ({item.source or '-'})")
        return {"plan": {p.name: d.action for p, d in zip(planned, decisions, strict=True)}}
    root.mkdir(parents=True, exist_ok=True)
    # The resolved pipeline config: `steerray pipeline --config runs/NAME/pipeline.yaml` resumes the run.
    atomic_write_text(root / "pipeline.yaml", dump_yaml(cfg.model_copy(update={"rerun": None})))

    forced = forced_stages(planned, cfg.rerun)
    outcomes: list[StageOutcome] = []
    ran: set[str] = set()
    for index, item in enumerate(planned):
        decision = settle(item, state, current_fingerprints(planned), forced, ran)
        recorded = state.get("stages", {}).get(item.name, {})
        if not decision.runs:
            manifest, _ = stage_manifest(item.folder)
            outcomes.append(StageOutcome(item.name, "skipped" if decision.action == "skip" else decision.action,
                                         decision.reason, recorded.get("seconds"), key_metrics(item.name, manifest)))
            say(f"{item.name}: {decision.action} ({decision.reason})")
            continue
        say(f"{item.name}: {decision.action} ({decision.reason}) -> {item.folder}")
        if decision.drop_manifest:
            say(f"{item.name}: corrupted manifest kept as {corrupt_manifest_aside(item.folder)}")
        if decision.clear and item.folder.exists():
            say(f"{item.name}: clearing {item.folder} (outputs of another config or other inputs)")
            shutil.rmtree(item.folder)
        record_start(state, item, current_fingerprints(planned))
        save_state(root, state)
        stage_start = time.time()
        try:
            run_stage(item, cfg)
            manifest, problem = stage_manifest(item.folder)
            if manifest is None:
                raise SteerrayError(problem or f"the stage ended without writing {item.folder}/manifest.json")
        except BaseException as err:  # noqa: B036 - Ctrl-C too: say how to resume, then stop
            status = "interrupted" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "failed"
            outcomes.append(StageOutcome(item.name, status, str(err).splitlines()[0] if str(err) else type(err).__name__,
                                         round(time.time() - stage_start, 1)))
            outcomes += [StageOutcome(p.name, "not reached") for p in planned[index + 1:]]
            summarize(cfg, outcomes, started)
            if isinstance(err, (KeyboardInterrupt, SystemExit)):  # Ray turns Ctrl-C in ray.get into SystemExit
                say(f"interrupted in {item.name}: it has no manifest, so a re-run resumes it; "
                    f"resume with: {resume_command(cfg)}")
                raise
            raise fail_stage(item, cfg, err) from None
        seconds = time.time() - stage_start
        record_finish(state, item, manifest, seconds)
        save_state(root, state)
        ran.add(item.name)
        outcomes.append(StageOutcome(item.name, "ran" if decision.action == "run" else "resumed", decision.reason,
                                     round(seconds, 1), key_metrics(item.name, manifest)))
        say(f"{item.name}: finished in {seconds:.0f} s")
    return summarize(cfg, outcomes, started)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except SteerrayError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
