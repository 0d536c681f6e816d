"""The whole SteerLM loop: prepare -> train-reward -> annotate -> train-sft -> [bootstrap] -> evaluate.

    steerray pipeline --config demo [--run NAME] [--address ADDR] [--dry-run] [STAGE.key=value ...]
    ray job submit -- python -m steerray.stages.pipeline --config runs/demo/pipeline.yaml

1. Resolve every stage's config (its preset + overrides + the run's folders, runs/NAME/<stage>/) and
   validate them all before anything starts: a typo, an unknown preset or a missing file fails here.
2. For each stage decide skip / resume / run from its manifest and runs/NAME/pipeline_state.json (see
   steerray/stages/planning.py), then run it as its own job: in this process on the embedded Ray, or, when
   the pipeline itself runs as a Ray job on a cluster, submitted to the head's job server
   (``stage_address``) so each stage has its own job id and logs.
3. A failing stage stops the pipeline with the stage's error and the one command that resumes it.
4. The summary: what ran, how long each stage took, key metrics, the report, the serve command;
   also written to runs/NAME/summary.json.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from steerray import runtime
from steerray.artifacts import RunLock, atomic_write_json, atomic_write_text
from steerray.config import ConfigError, PipelineConfig, dump_yaml
from steerray.errors import SteerrayError
from steerray.models.loading import ModelNotFound, resolve_model
from steerray.stages import StageResult, execute, job_main
from steerray.stages.planning import (
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
from steerray.training.metrics import box_matmul_speed


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
    """The stage itself: in this process, or as its own Ray job on the cluster's job server."""
    assert item.config is not None
    if cfg.stage_address:
        runtime.submit_job(item.stage.module, item.config, cfg.stage_address)
    else:
        execute(item.stage, item.config)  # type: ignore[arg-type]  # stage configs are StrictModels


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
    last = "steerlm2" if cfg.steerlm2.enabled else "bootstrap" if cfg.bootstrap.enabled else "sft"
    return run_dir(cfg) / last / "model"


def summarize(cfg: PipelineConfig, outcomes: list[StageOutcome], started: float,
              box_at_start: dict[str, float]) -> dict[str, Any]:
    root = run_dir(cfg)
    box = {"at_start": box_at_start, "at_end": box_matmul_speed()}
    report = root / "evaluate" / "report.html"
    summary = {
        "run": str(root), "seconds": round(time.time() - started, 1),
        "stages": [o.__dict__ for o in outcomes], "box": box,
        "report": str(report) if report.exists() else None,
        "model": str(final_model(cfg)),
        "serve": f"steerray serve --model {final_model(cfg)}",
    }
    atomic_write_json(root / SUMMARY_FILE, summary)
    lines = [summary_table(outcomes), "",
             f"run folder: {root}   total: {summary['seconds']:.0f} s",
             "box:        matmul GFLOP/s fp32 / bf16 at start {} / {}, at end {} / {}".format(
                 *box["at_start"].values(), *box["at_end"].values())]
    if summary["report"]:
        lines.append(f"report:     {report}  (also report.md, eval.json)")
    lines.append(f"serve it:   {summary['serve']}")
    print("\n".join(lines), file=sys.stderr, flush=True)
    return summary


# --------------------------------------------------------------------------------------------------
# 3. The loop
# --------------------------------------------------------------------------------------------------

def _local_location(location: str) -> bool:
    return location.startswith((".", "/", "~")) or location.endswith((".jsonl", ".gz", ".parquet", ".json"))


def check(cfg: PipelineConfig) -> None:
    """Fail before anything starts: every stage config validates; running here, files and models exist.

    Submitting to a cluster, paths name the cluster's filesystem, which this machine may not see: only
    the configs are checked (the pipeline job checks the rest on the cluster before its first stage).
    """
    planned = {item.name: item for item in resolve_stages(cfg)}
    if cfg.stage_address and not os.environ.get("RAY_ADDRESS"):
        return
    problems = []
    for source in getattr(planned["prepare"].config, "sources", []):
        _, sep, location = source.partition("=")
        if sep and _local_location(location) and not Path(location).expanduser().exists():
            problems.append(f"prepare: source {source!r} names a file that does not exist")
    for name in ("reward", "sft"):
        model = getattr(planned[name].config, "model", None)
        try:
            resolve_model(model.name) if model is not None else None
        except ModelNotFound as err:
            problems.append(f"{name}: {err}")
    if problems:
        raise ConfigError("the pipeline config has problems, nothing was started:\n" + "\n".join(problems))


def dry_run(cfg: PipelineConfig) -> dict[str, str]:
    """What would run, resume or be skipped, and why; runs nothing."""
    planned = resolve_stages(cfg)
    decisions = plan(planned, load_state(run_dir(cfg)), cfg.rerun)
    say(f"run {run_dir(cfg)}:")
    for item, decision in zip(planned, decisions, strict=True):
        say(f"  {item.name:<10} {decision.action:<8} {decision.reason}  ({item.source or '-'})")
    return {p.name: d.action for p, d in zip(planned, decisions, strict=True)}


def run(cfg: PipelineConfig) -> StageResult:
    root = run_dir(cfg)
    with RunLock(root):
        return StageResult(run_locked(cfg, root))


def run_one(item: PlannedStage, decision: Any, cfg: PipelineConfig, state: dict[str, Any],
            planned: list[PlannedStage]) -> float:
    """Clear what must go, record the start, run the stage, check its manifest; the seconds it took."""
    say(f"{item.name}: {decision.action} ({decision.reason}) -> {item.folder}")
    if decision.drop_manifest:
        say(f"{item.name}: corrupted manifest kept as {corrupt_manifest_aside(item.folder)}")
    if decision.clear and item.folder.exists():
        say(f"{item.name}: clearing {item.folder} (outputs of another config or other inputs)")
        shutil.rmtree(item.folder)
    record_start(state, item, current_fingerprints(planned))
    save_state(run_dir(cfg), state)
    started = time.time()
    run_stage(item, cfg)
    manifest, problem = stage_manifest(item.folder)
    if manifest is None:
        raise SteerrayError(problem or f"the stage ended without writing {item.folder}/manifest.json")
    record_finish(state, item, manifest, time.time() - started)
    save_state(run_dir(cfg), state)
    return time.time() - started


def run_locked(cfg: PipelineConfig, root: Path) -> dict[str, Any]:
    started, box_at_start = time.time(), box_matmul_speed()
    planned = resolve_stages(cfg)  # every config validated before anything runs
    state = load_state(root)
    decisions = plan(planned, state, cfg.rerun)
    say(f"run {root}: " + ", ".join(f"{p.name} {d.action}" for p, d in zip(planned, decisions, strict=True)))
    root.mkdir(parents=True, exist_ok=True)
    # The resolved pipeline config: `steerray pipeline --config runs/NAME/pipeline.yaml` resumes the run.
    atomic_write_text(root / "pipeline.yaml", dump_yaml(cfg.model_copy(update={"rerun": None})))
    forced, outcomes, ran = forced_stages(planned, cfg.rerun), [], set[str]()
    for index, item in enumerate(planned):
        decision = settle(item, state, current_fingerprints(planned), forced, ran)
        if not decision.runs:
            manifest, _ = stage_manifest(item.folder)
            outcomes.append(StageOutcome(item.name, "skipped" if decision.action == "skip" else decision.action,
                                         decision.reason, state.get("stages", {}).get(item.name, {}).get("seconds"),
                                         key_metrics(item.name, manifest)))
            say(f"{item.name}: {decision.action} ({decision.reason})")
            continue
        try:
            seconds = run_one(item, decision, cfg, state, planned)
        except BaseException as err:  # noqa: B036 - Ctrl-C too: say how to resume, then stop
            stop(cfg, item, err, outcomes + [StageOutcome(p.name, "not reached") for p in planned[index + 1:]],
                 started, box_at_start)
        ran.add(item.name)
        manifest, _ = stage_manifest(item.folder)
        outcomes.append(StageOutcome(item.name, "ran" if decision.action == "run" else "resumed", decision.reason,
                                     round(seconds, 1), key_metrics(item.name, manifest)))
        say(f"{item.name}: finished in {seconds:.0f} s")
    return summarize(cfg, outcomes, started, box_at_start)


def stop(cfg: PipelineConfig, item: PlannedStage, err: BaseException, outcomes: list[StageOutcome],
         started: float, box_at_start: dict[str, float]) -> None:
    """The summary so far, then the error with the command that resumes (Ctrl-C re-raised as it came)."""
    status = "interrupted" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "failed"
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    not_reached = [o for o in outcomes if o.action == "not reached"]
    done = [o for o in outcomes if o.action != "not reached"]
    summarize(cfg, done + [StageOutcome(item.name, status, reason)] + not_reached, started, box_at_start)
    if isinstance(err, (KeyboardInterrupt, SystemExit)):  # Ray turns Ctrl-C in ray.get into SystemExit
        say(f"interrupted in {item.name}: it has no manifest, so a re-run resumes it; "
            f"resume with: {resume_command(cfg)}")
        raise err
    raise fail_stage(item, cfg, err) from None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return job_main("pipeline", argv)


if __name__ == "__main__":
    main()
