"""The `steerray` command line: one command per stage, each a thin shell around ``steerray.stages``.

Every command loads its config once (defaults < preset or file < flags < ``key=value`` overrides), which
fails on any config problem before Ray starts, then runs the stage in this process on an embedded local
Ray, or, with ``--address`` / ``RAY_ADDRESS``, submits it as a Ray job and follows its logs.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Iterator
from typing import Any

import typer

from steerray.attributes import LabelError, check_label_attributes
from steerray.auth import DEFAULT_TOKEN_ENV
from steerray.chat import ChatSession, parse_steering, run_chat
from steerray.config import ConfigError, load_config
from steerray.data.sft import locate_sft_data, render_trained, tokenized_view
from steerray.errors import SteerrayError
from steerray.models.loading import load_tokenizer
from steerray.runtime import submit_job
from steerray.stages import execute, get_stage
from steerray.stages import pipeline as pipeline_stage
from steerray.stages.planning import load_pipeline_config, stage_name
from steerray.templates import ConversationError

app = typer.Typer(
    name="steerray",
    help="SteerLM alignment on Ray: prepare data, train the attribute reward model, annotate, "
         "attribute-conditioned SFT, bootstrap, evaluate and serve steerable models.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

CONFIG_HELP = "A preset (demo, tiny, demo/reward, ...) or a YAML file."
ADDRESS_HELP = "Ray cluster to submit the job to (else RAY_ADDRESS, else an embedded local Ray)."
OVERRIDES_HELP = "Dotted config overrides, e.g. train.max_steps=50 lora.enabled=true."
TOKEN_HELP = f"Bearer token (default: ${DEFAULT_TOKEN_ENV}). Prefer the variable: options show up in `ps`."
# Seen from a pipeline job on the head node, the cluster's own job server.
HEAD_JOB_SERVER = "http://127.0.0.1:8265"


def fail(message: str, code: int = 2) -> None:
    """Print a user-facing error (no traceback) and exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def launch(stage_name: str, config: str | None, overrides: list[str] | None, address: str | None, *,
           token: str | None = None, **fields: Any) -> dict[str, Any]:
    """Load the stage's config once, then run it here or submit it as a Ray job."""
    stage = get_stage(stage_name)
    try:
        resolved = load_config(stage.config, config, overrides or [], stage_file=stage.name, **fields)
    except ConfigError as err:
        fail(str(err))
    token_env = getattr(resolved, "token_env", None)
    if token and token_env:
        os.environ[token_env] = token  # in-process the stage reads it from the environment
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            secret = os.environ.get(token_env) if token_env else None
            submit_job(stage.module, resolved, address, env_vars={token_env: secret} if token_env and secret else None)
            return {}
        return execute(stage, resolved)
    except SteerrayError as err:  # 2: the input or config is wrong (found before anything ran); 1: a run failed
        fail(str(err), code=2 if getattr(err, "found_before_start", False) else 1)
    raise AssertionError("unreachable")


@app.callback()
def main() -> None:
    """SteerLM alignment on Ray. Each command runs one stage; `steerray COMMAND --help` for its options."""


def _parse_repeats(values: list[str]) -> dict[str, int] | None:
    repeats = {}
    for value in values:
        name, sep, count = value.partition("=")
        if not sep or not count.strip().isdigit():
            fail(f"--repeat {value!r}: expected NAME=COUNT, e.g. --repeat helpsteer2=4")
        repeats[name.strip()] = int(count)
    return repeats or None


@app.command()
def prepare(
    source: list[str] = typer.Option([], "--source", "-s", help="NAME[=LOCATION], repeatable (helpsteer, helpsteer2, "
                                     "helpsteer2-helpfulness, helpsteer2-preference, helpsteer3, oasst1, "
                                     "conversations, demo). "
                                     "LOCATION: hub id, hf:// path, local jsonl/jsonl.gz/parquet file or folder."),
    out: str | None = typer.Option(None, "--out", "-o", help="Output folder."),
    val_fraction: float | None = typer.Option(None, help="Share of groups held out when the source has no split."),
    seed: int | None = typer.Option(None, help="Seed of the hash that assigns splits."),
    repeat: list[str] = typer.Option([], "--repeat", help="NAME=COUNT: copies of that source's train rows."),
    row_filter: str | None = typer.Option(None, "--filter", help="Keep rows matching column=value[,column=value] "
                                          "(HelpSteer3: domain, language), e.g. domain=code,language=english."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Read sources with Ray Data; write conversations/, regression/, preference/, rejects.jsonl, manifest.json."""
    launch("prepare", config, overrides, address, sources=list(source) or None, out=out, val_fraction=val_fraction,
           seed=seed, repeat=_parse_repeats(repeat), row_filter=row_filter)


@app.command("train-reward")
def train_reward(
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    data: str | None = typer.Option(None, "--data", "-d", help="A `prepare` output (reads regression/ or preference/)."),
    out: str | None = typer.Option(None, "--out", "-o", help="Output folder; re-running with the same folder resumes."),
    loss: str | None = typer.Option(None, "--loss", help="regression | scaled_bt | regular_bt | margin_bt."),
    init_from: str | None = typer.Option(None, "--init-from", help="Start from this reward-model folder, head included."),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Train on Ray Train (FSDP2 / DDP / DeepSpeed); writes model/, metrics.jsonl, checkpoints/, manifest.json."""
    # The loss asked for is the loss recorded in out/config.yaml and the one the job runs (unlike the
    # reference, where model.regression.loss_func was silently ignored).
    launch("reward", config, overrides, address, data=data, out=out, loss=loss, init_from=init_from)


@app.command()
def annotate(
    model: str | None = typer.Option(None, "--model", "-m", help="Reward-model folder (from train-reward)."),
    input: str | None = typer.Option(None, "--input", "-i", help="Conversation jsonl file, folder, or prepare output."),
    out: str | None = typer.Option(None, "--out", "-o", help="Output folder (one annotated file per input file)."),
    via: str | None = typer.Option(None, "--via", help="URL of a running serve-reward to score with instead."),
    keep_human_labels: bool | None = typer.Option(
        None, "--keep-human-labels/--overwrite-human-labels",
        help="Keep human label values and fill in only missing attributes (default: overwrite, as the reference)."),
    batch_size: int | None = typer.Option(None, help="Texts per forward pass."),
    num_actors: int | None = typer.Option(None, help="Scoring actors (model copies)."),
    token: str | None = typer.Option(None, "--token", help=TOKEN_HELP, show_default=False),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Label every scored assistant turn with the reward model; resumable, rejects counted."""
    launch("annotate", config, overrides, address, token=token, model=model, input=input, out=out, via=via,
           keep_human_labels=keep_human_labels, batch_size=batch_size, num_actors=num_actors)


@app.command("train-sft")
def train_sft(
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    data: str | None = typer.Option(None, "--data", "-d", help="Conversation jsonl, or a folder with train.jsonl "
                                    "(+ val.jsonl): the annotate or prepare output."),
    out: str | None = typer.Option(None, "--out", "-o", help="Output folder (model/, metrics, samples)."),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Fine-tune a causal LM on labelled conversations (answer-only loss), export it to OUT/model/."""
    launch("sft", config, overrides, address, data=data, out=out)


@app.command()
def bootstrap(
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    data: str | None = typer.Option(None, "--data", help="Training conversations: the annotate output or a jsonl."),
    policy: str | None = typer.Option(None, "--policy", help="The SFT model folder to start from."),
    reward_model: str | None = typer.Option(None, "--reward-model", help="The reward-model folder that scores samples."),
    out: str | None = typer.Option(None, "--out", "-o", help="Output folder (rounds/, model, bootstrap.json)."),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Phase 4: sample K answers per prompt at top quality, score, keep the best, fine-tune again."""
    launch("bootstrap", config, overrides, address, data=data, policy=policy, reward_model=reward_model, out=out)


@app.command()
def steerlm2(
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    data: str | None = typer.Option(None, "--data", help="Training conversations (their contexts are the prompts)."),
    policy: str | None = typer.Option(None, "--policy", help="The SteerLM-1 policy folder: Q' of round 0."),
    reward_model: str | None = typer.Option(None, "--reward-model", help="The reward-model folder."),
    reward_data: str | None = typer.Option(None, "--reward-data", help="A prepare output (fits the sigmas)."),
    rounds: int | None = typer.Option(None, "--rounds", min=1, help="Rounds of steerlm2-data + train-steerlm2."),
    out: str | None = typer.Option(None, "--out", "-o", help="Output folder (rounds/, model, steerlm2.json)."),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """SteerLM 2.0 iteration: rounds of steerlm2-data then train-steerlm2, each round's model the next Q'."""
    launch("steerlm2", config, overrides, address, data=data, policy=policy, reward_model=reward_model,
           reward_data=reward_data, rounds=rounds, out=out)


@app.command("steerlm2-data")
def steerlm2_data(
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    data: str | None = typer.Option(None, "--data", help="Training conversations (their contexts are the prompts)."),
    policy: str | None = typer.Option(None, "--policy", help="Q': the SteerLM-1 policy folder to sample from."),
    reward_model: str | None = typer.Option(None, "--reward-model", help="The reward-model folder (log P(a|x,y))."),
    reward_data: str | None = typer.Option(None, "--reward-data", help="A prepare output: regression/val.jsonl "
                                           "fits the label likelihood's sigmas."),
    out: str | None = typer.Option(None, "--out", "-o", help="Output folder (train.jsonl, val.jsonl, groups.jsonl)."),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """SteerLM 2.0 data: n samples per prompt and label from Q', with log Q', log P(y|x) and log P(a|x,y)."""
    launch("steerlm2_data", config, overrides, address, data=data, policy=policy, reward_model=reward_model,
           reward_data=reward_data, out=out)


@app.command("train-steerlm2")
def train_steerlm2(
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    data: str | None = typer.Option(None, "--data", "-d", help="A steerlm2-data output or a SteerLM 2.0 jsonl."),
    model: str | None = typer.Option(None, "--model", "-m", help="Q': the policy the data was sampled from."),
    out: str | None = typer.Option(None, "--out", "-o", help="Output folder; re-running with the same folder resumes."),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """SteerLM 2.0: train Q_theta from Q' on groups of weighted samples; logs the distance KL(w||b)."""
    extra = [f"model.name={model}"] if model else []
    launch("train_steerlm2", config, [*extra, *(overrides or [])], address, data=data, out=out)


@app.command()
def evaluate(
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    reward_model: str | None = typer.Option(None, "--reward-model", help="The reward-model folder."),
    policy: str | None = typer.Option(None, "--policy", help="The SFT (or bootstrapped) model folder."),
    data: str | None = typer.Option(None, "--data", help="A prepare output: val splits and held-out prompts."),
    bootstrap_dir: str | None = typer.Option(None, "--bootstrap", help="A bootstrap output to include."),
    out: str | None = typer.Option(None, "--out", "-o", help="Output folder (report.html, report.md, eval.json)."),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Reward-model metrics on the val split and the steerability grid, written as a report."""
    launch("evaluate", config, overrides, address, reward_model=reward_model, policy=policy, data=data,
           bootstrap=bootstrap_dir, out=out)


@app.command("evaluate-reward")
def evaluate_reward(
    model: str | None = typer.Option(None, "--model", "-m", help="Reward-model folder (from train-reward)."),
    bench: list[str] = typer.Option([], "--bench", "-b", help="FORMAT[:NAME]=LOCATION, repeatable; formats: "
                                    "rewardbench, bon, pairs. LOCATION: jsonl/jsonl.gz/parquet file, folder, hf:// path."),
    score: str | None = typer.Option(None, "--score", help="The scalar ranked by: NAME, NAME=WEIGHT,... or helpsteer2 "
                                     "(default: helpfulness, else quality)."),
    out: str | None = typer.Option(None, "--out", "-o", help="Output folder (eval.json, report.md, scored rows)."),
    batch_size: int | None = typer.Option(None, help="Texts per forward pass."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Score RewardBench, best-of-N and chosen/rejected pair files with the reward model; a table per benchmark."""
    launch("evaluate_reward", config, overrides, address, model=model, bench=list(bench) or None, score=score,
           out=out, batch_size=batch_size)


@app.command()
def serve(
    model: str | None = typer.Option(None, "--model", "-m", help="SFT model folder, hub id, or alias (smollm2-135m)."),
    host: str | None = typer.Option(None, help="Interface to bind (default 127.0.0.1: this machine only)."),
    port: int | None = typer.Option(None, help="HTTP port (default 8000)."),
    replicas: int | None = typer.Option(None, help="Model replicas."),
    engine: str | None = typer.Option(None, help="auto (vLLM on GPU when installed), transformers, or vllm."),
    max_batch_size: int | None = typer.Option(None, help="Sequences decoded together (transformers engine)."),
    token: str | None = typer.Option(None, "--token", help=TOKEN_HELP, show_default=False),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Serve a steerable chat model: OpenAI-compatible /v1/chat/completions, /generate, playground at /."""
    launch("serve", config, overrides, address, token=token, model=model, host=host, port=port, replicas=replicas,
           engine=engine, max_batch_size=max_batch_size)


@app.command("serve-reward")
def serve_reward(
    model: str | None = typer.Option(None, "--model", "-m", help="Reward-model folder (from train-reward)."),
    host: str | None = typer.Option(None, help="Interface to bind (default 127.0.0.1: this machine only)."),
    port: int | None = typer.Option(None, help="HTTP port (default 8000)."),
    replicas: int | None = typer.Option(None, help="Model replicas."),
    max_batch_size: int | None = typer.Option(None, help="Texts per forward pass (dynamic batching)."),
    token: str | None = typer.Option(None, "--token", help=TOKEN_HELP, show_default=False),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Serve the reward model over HTTP (POST /score, GET /health) until interrupted."""
    launch("serve_reward", config, overrides, address, token=token, model=model, host=host, port=port,
           replicas=replicas, max_batch_size=max_batch_size)


@app.command()
def pipeline(
    config: str = typer.Option("demo", "--config", "-c", help="A pipeline preset (demo, tiny, ...) or YAML file."),
    run: str | None = typer.Option(None, "--run", help="Run name: outputs go to RUNS_DIR/RUN/<stage>/."),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would run or be skipped; run nothing."),
    rerun: str | None = typer.Option(None, "--rerun", help="Re-run this stage and every stage after it."),
    overrides: list[str] | None = typer.Argument(
        None, help="STAGE.key=value (e.g. sft.train.max_steps=20, bootstrap.enabled=true) or a pipeline key "
                   "(runs_dir=/mnt/shared/runs)."),
) -> None:
    """Run prepare, train-reward, evaluate-reward, annotate, train-sft, bootstrap, steerlm2 rounds and evaluate
    (each on or off in the config), skipping finished stages."""
    overrides = list(overrides or [])
    address = address or os.environ.get("RAY_ADDRESS")
    command = shlex.join(["steerray", "pipeline", "--config", config, *(["--run", run] if run else []),
                          *(["--address", address] if address else []), *overrides])
    try:
        cfg = load_pipeline_config(config, overrides, run=run, command=command,
                                   rerun=stage_name(rerun) if rerun else None,
                                   stage_address=HEAD_JOB_SERVER if address else None)
        if not address:
            cfg = cfg.with_absolute_paths()
        pipeline_stage.check(cfg)
        if dry_run:
            pipeline_stage.dry_run(cfg)
            return
    except ConfigError as err:
        fail(str(err))
    launch_resolved_pipeline(cfg, address)


def launch_resolved_pipeline(cfg: Any, address: str | None) -> None:
    try:
        if address:
            submit_job("pipeline", cfg, address)
        else:
            execute("pipeline", cfg)
    except SteerrayError as err:
        fail(str(err), code=1)


# --------------------------------------------------------------------------------------------------
# render-sft: what SFT trains on; chat: a terminal client
# --------------------------------------------------------------------------------------------------

OPEN_MARK, CLOSE_MARK = "⟦", "⟧"  # trained text in pipes and files (a terminal shows it green)


def marked_text(text: str, trained: list[list[int]], colour: bool) -> str:
    """``text`` with trained spans wrapped in brackets, or shown green on a terminal."""
    merged: list[list[int]] = []
    for start, end in trained:  # adjacent spans (a response and its turn-end marker) read as one
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    parts, position = [], 0
    for start, end in merged:
        parts.append(text[position:start])
        piece = text[start:end]
        parts.append(typer.style(piece, fg=typer.colors.GREEN, bold=True, underline=True) if colour
                     else f"{OPEN_MARK}{piece}{CLOSE_MARK}")
        position = end
    parts.append(text[position:])
    return "".join(parts)


def _input_lines(path: str) -> Iterator[tuple[str, int, str]]:
    """(file, line number, text) of every non-blank line: a jsonl file, or a folder's train.jsonl/val.jsonl."""
    files = locate_sft_data(path)
    for file in files.train + files.val:
        with open(file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield file, number, line


def _show_rendered(file: str, number: int, view: dict[str, Any], colour: bool, tokenized: bool,
                   max_length: int | None) -> None:
    chars = sum(end - start for start, end in view["trained"])
    extra = f", {view['tokens']} tokens" + (" (truncated)" if view["truncated"] else "") if tokenized else ""
    print(f"\n# {os.path.basename(file)}:{number}: {chars} trained characters in {len(view['trained'])} spans{extra}")
    print(marked_text(view["text"], view["trained"], colour).rstrip("\n"))
    if tokenized and view["truncated"]:
        print(f"# ... cut here: right truncation to {max_length} tokens")
    if not view["trained"]:
        print("# nothing carries loss: training counts this conversation and skips it")


@app.command("render-sft")
def render_sft(
    input: str = typer.Option(..., "--input", "-i", help="Conversation jsonl file (or a folder with train.jsonl)."),
    limit: int | None = typer.Option(None, "--limit", "-n", min=1, help="Show at most N conversations."),
    as_json: bool = typer.Option(False, "--json", help='One {"text", "trained": [[start, end], ...]} per line.'),
    model: str | None = typer.Option(None, "--model", help="Also apply this model's tokenizer: trained spans snap "
                                     "to token boundaries, as training sees them."),
    max_length: int | None = typer.Option(None, "--max-length", min=2, help="With --model: right-truncate to this "
                                          "many tokens, as training does."),
    label_attributes: str | None = typer.Option(None, "--label-attributes", help="Comma-separated: keep only these "
                                                "attributes in label lines, as train-sft's label_attributes."),
) -> None:
    """Show exactly what SFT trains on: each conversation rendered, the parts that carry loss marked."""
    try:
        keep = check_label_attributes(label_attributes.split(",")) if label_attributes else None
    except LabelError as err:
        fail(f"--label-attributes: {err}")
    if max_length is not None and model is None:
        fail("--max-length needs --model (truncation counts tokens)")
    try:
        tokenizer = load_tokenizer(model) if model is not None else None
        lines = list(_input_lines(input))
    except SteerrayError as err:
        fail(str(err))
    colour = sys.stdout.isatty() and not as_json
    if not as_json:
        print(f"# trained text is marked {'green' if colour else f'{OPEN_MARK}...{CLOSE_MARK}'}; "
              "everything else is context without loss")
    shown = rejected = 0
    for file, number, line in lines:
        if limit is not None and shown >= limit:
            break
        try:
            rendered = render_trained(json.loads(line), keep)
        except (json.JSONDecodeError, ConversationError) as err:
            rejected += 1
            reason = f"malformed JSON: {err.msg} at column {err.colno}" if isinstance(err, json.JSONDecodeError) else err
            print(f"{file}:{number}: rejected: {reason}", file=sys.stderr)
            continue
        view = tokenized_view(rendered, tokenizer, max_length) if tokenizer is not None else rendered
        shown += 1
        if as_json:
            print(json.dumps({"text": view["text"], "trained": view["trained"]}, ensure_ascii=False))
        else:
            _show_rendered(file, number, view, colour, tokenizer is not None, max_length)
    if shown == 0 and rejected:
        fail(f"every conversation in {input} was rejected ({rejected}); see the reasons above", code=1)
    if rejected:
        print(f"# {rejected} conversation(s) rejected (reasons above)", file=sys.stderr)


@app.command()
def chat(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="Server URL (steerray serve)."),
    steering: str | None = typer.Option(None, "--steering", "-s", help="e.g. helpfulness=4,verbosity=0"),
    message: str | None = typer.Option(None, "--message", help="Ask one question, print the answer, exit."),
    max_tokens: int = typer.Option(256, help="Longest answer, in tokens."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    system: str | None = typer.Option(None, help="System prompt (default: the SteerLM one)."),
    token: str | None = typer.Option(None, "--token", envvar=DEFAULT_TOKEN_ENV, help=TOKEN_HELP, show_default=False),
) -> None:
    """Chat with a steerray server in the terminal, streaming, steering changeable between turns."""
    import httpx

    try:
        session = ChatSession(url.rstrip("/"), parse_steering(steering), system, max_tokens, temperature)
    except SteerrayError as err:
        fail(str(err))  # 2: a bad --steering
    try:
        run_chat(session, token, message)
    except (SteerrayError, httpx.HTTPError) as err:
        fail(str(err), code=1)  # the server refused or failed


if __name__ == "__main__":
    app()
