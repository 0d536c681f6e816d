"""SteerLM 2.0 data generation (issue 16): sample groups from Q' and give every response its three log values.

A group is one prompt x and one target label a with ``n`` responses sampled from the SteerLM-1 policy Q' on
exactly the prompt the trainer renders (:func:`steerray.data.steerlm2.steerlm2_prompt`). Per response:

- ``log Q'(y|a,x)`` = minus the policy's summed token NLL over the trained tokens of ``y + "\\n<extra_id_1>"``
  (:func:`steerray.training.steerlm2.response_nll` on :func:`steerray.data.steerlm2.tokenize_group`, the same
  template, masks and ``max_length`` as the trainer), so at theta = Q' the trainer's baseline is uniform;
- ``log P(y|x)`` = the same for the reference model on the prompt without the label line;
- ``log P(a|x,y)`` = the discretised-Gaussian likelihood of the label given the reward model's predictions
  (:mod:`steerray.eval.attribute_likelihood`), sigmas fitted on the reward model's validation residuals.

A sample is finished when the policy wrote ``"\\n<extra_id_1>"`` (the next turn's header): ``y`` is the text
before it (:func:`finished_answer`). Anything else (the token budget ran out, EOS, a marker inside the answer)
is drawn again, up to ``max_attempts`` times: the finished samples are then draws from Q' conditioned on
finishing, whose density differs from Q' by a constant per prompt that the self-normalised weights cancel.
Groups still unfinished are dropped and counted. :class:`SteerLM2Sampler` is the Ray Data actor.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from steerray.annotation import load_predictor
from steerray.attributes import ATTRIBUTE_INDEX, IGNORE_VALUE, steering_label
from steerray.data.steerlm2 import (
    SteerLM2Record,
    SteerLM2Response,
    dumps_record,
    make_record,
    steerlm2_prompt,
    tokenize_group,
)
from steerray.eval.attribute_likelihood import fit_residual_sigma, label_log_likelihoods
from steerray.eval.sampling import pick_device
from steerray.models.loading import load_causal_lm, load_tokenizer
from steerray.models.precision import inference_dtype
from steerray.templates import ASSISTANT_ROLE, MARKERS, TURN_START, make_conversation, reward_prompts
from steerray.training.steerlm2 import response_nll

END = "\n" + TURN_START  # what ends a finished answer: the newline, then the next turn's header
OK, DROPPED = "ok", "dropped"


# --------------------------------------------------------------------------------------------------
# 1. Pure parts: labels, prompts, finished samples
# --------------------------------------------------------------------------------------------------


def draw_labels(
    prompt_id: int,
    count: int,
    attributes: Sequence[str],
    values: Sequence[int],
    steering: Mapping[str, int],
    policy_attributes: Sequence[str] | None,
    seed: int,
) -> list[str]:
    """``count`` target labels for one prompt: each of ``attributes`` uniform over ``values``, the policy's
    other label attributes at ``steering`` over the defaults. Seeded by (seed, prompt): reproducible."""
    rng = np.random.default_rng([seed, prompt_id])
    labels = []
    for _ in range(count):
        drawn = {name: int(rng.choice(values)) for name in attributes}
        labels.append(steering_label({**steering, **drawn}, attributes=policy_attributes))
    return labels


def group_rows(
    prompts: Sequence[Mapping[str, Any]],
    labels_per_prompt: int,
    attributes: Sequence[str],
    values: Sequence[int],
    steering: Mapping[str, int],
    policy_attributes: Sequence[str] | None,
    seed: int,
) -> list[dict[str, Any]]:
    """One row per (prompt, label) for the actor pool; ``id`` = prompt_id * labels_per_prompt + j (stable)."""
    rows = []
    for prompt in prompts:
        turns = [
            {"from": t["from"], "value": t["value"]} for t in prompt["context"]
        ]  # no label lines (reference)
        labels = draw_labels(
            int(prompt["prompt_id"]), labels_per_prompt, attributes, values, steering, policy_attributes, seed
        )
        for j, label in enumerate(labels):
            rows.append(
                {
                    "id": int(prompt["prompt_id"]) * labels_per_prompt + j,
                    "prompt_id": int(prompt["prompt_id"]),
                    "system": prompt["system"],
                    "turns": json.dumps(turns, ensure_ascii=False),
                    "label": label,
                }
            )
    return rows


def finished_answer(raw: str) -> tuple[str | None, str]:
    """``(y, "")`` when ``raw`` (the decoded continuation) reached ``"\\n<extra_id_1>"``, else ``(None, why)``.

    ``y`` is everything before exactly one newline and the marker (earlier newlines are kept: they are part
    of the sample and of what the trainer trains). A marker anywhere before that is not an answer.
    """
    end = raw.find(TURN_START)
    first_marker = min((p for p in (raw.find(m) for m in MARKERS) if p != -1), default=-1)
    if end == -1:
        return None, "no end" if first_marker == -1 else "marker in answer"
    if first_marker < end:
        return None, "marker in answer"
    if not raw[:end].endswith("\n"):
        return None, "marker without newline"
    return raw[: end - 1], ""


def reward_text(record: SteerLM2Record, answer: str) -> str:
    """The reward-model prompt of ``answer`` after the record's turns (annotation's builder and system)."""
    turns: list[tuple[str, str, str | None]] = [(role, value, None) for role, value in record.prompt_turns]
    conversation = make_conversation(turns + [(ASSISTANT_ROLE, answer, "")])
    return reward_prompts(conversation, labelled_only=False)[-1].text


def placeholder_record(row: Mapping[str, Any], values: Sequence[str]) -> SteerLM2Record:
    """The group with its answers but no log values yet (for rendering and tokenizing)."""
    turns = tuple((t["from"], t["value"]) for t in json.loads(str(row["turns"])))
    return SteerLM2Record(
        str(row["system"]),
        turns,
        str(row["label"]),
        tuple(SteerLM2Response(v, 0.0, 0.0, 0.0) for v in values),
    )


# --------------------------------------------------------------------------------------------------
# 2. Sampling and scoring (torch, inside the actor)
# --------------------------------------------------------------------------------------------------


def sample_raw(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
) -> list[tuple[str, int]]:
    """``(decoded continuation, generated tokens)`` per prompt, one batched ``generate``, stopping at the turn
    marker. Unlike the chat path nothing is cut or stripped: :func:`finished_answer` decides."""
    import torch

    tokenizer.padding_side = "left"
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            stop_strings=[TURN_START],
            tokenizer=tokenizer,
            **sampling,
        )
    width = batch["input_ids"].shape[1]
    results = []
    for row in range(len(prompts)):
        tokens = output[row, width:]
        if tokenizer.pad_token_id is not None:
            tokens = tokens[tokens != tokenizer.pad_token_id]
        results.append((tokenizer.decode(tokens, skip_special_tokens=True), int(len(tokens))))
    return results


def negative_nll(
    model: Any,
    tokenizer: Any,
    records: Sequence[SteerLM2Record],
    max_length: int,
    *,
    conditioned: bool,
    micro_batch: int,
) -> tuple[list[list[float]], list[bool]]:
    """``-response_nll`` per response of each group (the trainer's tokens and masks), and per group whether
    a response did not fit ``max_length`` (its value would cover tokens training cuts)."""
    groups = [tokenize_group(record, tokenizer, max_length, conditioned=conditioned) for record in records]
    flat = [example for group in groups for example in group]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll = (
        response_nll(
            model, [e.input_ids for e in flat], [e.labels for e in flat], pad, micro_batch=micro_batch
        ).tolist()
        if flat
        else []
    )
    out, start = [], 0
    for group in groups:
        out.append([-float(v) for v in nll[start : start + len(group)]])
        start += len(group)
    return out, [any(e.truncated for e in group) for group in groups]


def fit_sigmas(
    reward_model: str,
    texts: Sequence[str],
    labels: Sequence[Sequence[float]],
    *,
    max_length: int | None,
    batch_size: int,
    precision: str = "auto",
    threads: int | None = None,
) -> tuple[dict[str, float], dict[str, int], list[str]]:
    """Sigmas of the label likelihood from the reward model's residuals on labelled validation texts.

    ``labels`` are 9 floats in canonical order (prepare's regression rows, -100 = missing). Returns
    ``(sigmas, labelled cells per attribute, the model's attributes)``."""
    predictor = load_predictor(
        reward_model, max_length=max_length, batch_size=batch_size, precision=precision, threads=threads
    )
    preds, _ = predictor(list(texts))
    attributes = list(predictor.attributes)
    columns = np.asarray([[row[ATTRIBUTE_INDEX[a]] for a in attributes] for row in labels], dtype=np.float64)
    sigmas = fit_residual_sigma(preds, columns, attributes)
    cells = {a: int((columns[:, j] != IGNORE_VALUE).sum()) for j, a in enumerate(attributes)}
    return sigmas, cells, attributes


# --------------------------------------------------------------------------------------------------
# 3. The actor: one batch of groups in, one record (or a drop reason) per group out
# --------------------------------------------------------------------------------------------------


class SteerLM2Sampler:
    """Loads Q', the reference (Q' itself unless given) and the reward model once; per batch of group rows
    (``id, prompt_id, system, turns, label``) samples, retries unfinished samples and scores the groups.

    Output columns added: ``status`` (ok | dropped), ``reason``, ``record`` (the jsonl line), ``attempts``
    (samples drawn in all), ``redraws`` (JSON ``{why: count}``), ``predictions`` (JSON, per response).
    """

    def __init__(
        self,
        policy: str,
        reward_model: str,
        sigmas: Mapping[str, float],
        *,
        n: int,
        max_length: int,
        sampling: Mapping[str, Any],
        max_attempts: int,
        reference: str | None = None,
        reward_max_length: int | None = None,
        reward_batch_size: int = 16,
        score_batch_size: int = 8,
        threads: int | None = None,
    ) -> None:
        import torch

        device = pick_device()
        if device == "cpu":  # one actor per node on CPU: it uses the node's cores (Ray sets 1 thread)
            torch.set_num_threads(max(1, threads or os.cpu_count() or 1))
        self.sampling, self.n, self.max_length, self.max_attempts = (
            dict(sampling),
            n,
            max_length,
            max_attempts,
        )
        dtype = inference_dtype(self.sampling.get("precision", "auto"), device)
        self.tokenizer = load_tokenizer(policy)
        self.policy = load_causal_lm(policy, dtype=dtype).to(device).eval()
        if reference is None or reference == policy:
            self.reference, self.reference_tokenizer = self.policy, self.tokenizer
        else:
            self.reference_tokenizer = load_tokenizer(reference)
            self.reference = load_causal_lm(reference, dtype=dtype).to(device).eval()
        self.predictor = load_predictor(
            reward_model,
            max_length=reward_max_length,
            batch_size=reward_batch_size,
            precision=self.sampling.get("precision", "auto"),
        )
        self.sigmas, self.score_batch_size = dict(sigmas), score_batch_size

    def _draw(
        self, prompts: Sequence[str], slots: list[tuple[int, int]], ids: Sequence[int], attempt: int
    ) -> list[tuple[str | None, str, int]]:
        """One attempt at the given (group, sample) slots: ``(answer or None, why not, tokens)`` each."""
        s, out = self.sampling, []
        step = int(s["batch_size"])
        for start in range(0, len(slots), step):
            chunk = slots[start : start + step]
            g, k = chunk[0]
            # Reproducible: the seed follows the first slot's group id, sample index and the attempt.
            seed = int(s["seed"]) + 1_000_003 * attempt + int(ids[g]) * self.n + k
            raws = sample_raw(
                self.policy,
                self.tokenizer,
                [prompts[g] for g, _ in chunk],
                max_new_tokens=int(s["max_new_tokens"]),
                temperature=float(s["temperature"]),
                top_p=float(s["top_p"]),
                seed=seed,
            )
            out += [(*finished_answer(raw), tokens) for raw, tokens in raws]
        return out

    def sample_groups(
        self, prompts: Sequence[str], ids: Sequence[int], live: Sequence[bool]
    ) -> tuple[list[list[str | None]], list[int], list[Counter]]:
        """Answers per group (None where every attempt failed), samples drawn and redraw reasons per group."""
        answers: list[list[str | None]] = [[None] * self.n for _ in prompts]
        drawn = [0] * len(prompts)
        why: list[Counter] = [Counter() for _ in prompts]
        pending = [(g, k) for g in range(len(prompts)) if live[g] for k in range(self.n)]
        for attempt in range(self.max_attempts):
            if not pending:
                break
            for (g, k), (answer, reason, _) in zip(
                pending, self._draw(prompts, pending, ids, attempt), strict=True
            ):
                drawn[g] += 1
                if answer is None:
                    why[g][reason] += 1
                else:
                    answers[g][k] = answer
            pending = [(g, k) for g, k in pending if answers[g][k] is None]
        return answers, drawn, why

    def score(
        self, records: Sequence[SteerLM2Record]
    ) -> tuple[list[SteerLM2Record | None], list[list[list[float]]]]:
        """The three log values of every response; None for a group that does not fit ``max_length``."""
        log_q, long_q = negative_nll(
            self.policy,
            self.tokenizer,
            records,
            self.max_length,
            conditioned=True,
            micro_batch=self.score_batch_size,
        )
        log_py, _ = negative_nll(
            self.reference,
            self.reference_tokenizer,
            records,
            self.max_length,
            conditioned=False,
            micro_batch=self.score_batch_size,
        )
        texts = [reward_text(record, r.value) for record in records for r in record.responses]
        preds = self.predictor(texts)[0] if texts else np.zeros((0, len(self.predictor.attributes)))
        labels = [record.label for record in records for _ in record.responses]
        log_pa = label_log_likelihoods(preds, self.predictor.attributes, labels, self.sigmas).tolist()
        scored: list[SteerLM2Record | None] = []
        for g, record in enumerate(records):
            part = slice(g * self.n, (g + 1) * self.n)
            scored.append(
                None
                if long_q[g]
                else make_record(
                    record.system,
                    record.prompt_turns,
                    record.label,
                    [r.value for r in record.responses],
                    log_pa[part],
                    log_py[g],
                    log_q[g],
                )
            )
        return scored, [
            preds[part].tolist()
            for part in (slice(g * self.n, (g + 1) * self.n) for g in range(len(records)))
        ]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [{key: batch[key][i] for key in batch} for i in range(len(batch["id"]))]
        prompts = [
            steerlm2_prompt(str(r["system"]), json.loads(str(r["turns"])), str(r["label"])) for r in rows
        ]
        room = self.max_length - int(self.sampling["max_new_tokens"]) - 2
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        live = [n <= room for n in lengths]
        answers, drawn, why = self.sample_groups(prompts, [int(r["id"]) for r in rows], live)
        finished = [g for g in range(len(rows)) if live[g] and all(a is not None for a in answers[g])]
        records = [placeholder_record(rows[g], [a for a in answers[g] if a is not None]) for g in finished]
        scored, preds = self.score(records) if records else ([], [])
        status, reason, record, predictions = (
            [DROPPED] * len(rows),
            [""] * len(rows),
            [""] * len(rows),
            ["[]"] * len(rows),
        )
        for g in range(len(rows)):
            if not live[g]:
                reason[g] = (
                    f"prompt too long: {lengths[g]} tokens + max_new_tokens > max_length {self.max_length}"
                )
            elif g not in finished:
                reason[g] = (
                    f"unfinished: a sample did not end with \\n{TURN_START} in {self.max_attempts} attempts"
                )
        for g, result, pred in zip(finished, scored, preds, strict=True):
            if result is None:
                reason[g] = f"too long: a response renders to more than max_length {self.max_length} tokens"
                continue
            status[g], record[g], predictions[g] = OK, dumps_record(result), json.dumps(pred)
        out = dict(batch)
        out.update(
            status=np.array(status, dtype=object),
            reason=np.array(reason, dtype=object),
            record=np.array(record, dtype=object),
            predictions=np.array(predictions, dtype=object),
            attempts=np.array(drawn, dtype=np.int64),
            redraws=np.array([json.dumps(dict(c)) for c in why], dtype=object),
        )
        return out
