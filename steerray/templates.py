"""The SteerLM chat template, once: reward prompts, SFT rendering with trained spans, serving prompts.

Conversations use NeMo-Aligner's schema (spec section 2)::

    {"system": str, "mask": "User", "type": "VALUE_TO_TEXT",
     "conversations": [{"from": "User", "value": str, "label": None},
                       {"from": "Assistant", "value": str, "label": "helpfulness:4,..."}]}

Every renderer here works on character offsets of one rendered string, so later stages derive token
masks from a fast tokenizer's offset mapping instead of re-tokenizing pieces (which shifts merges).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from steerray.attributes import LabelError, check_range, parse_label
from steerray.errors import SteerrayError

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SYSTEM_START = "<extra_id_0>"
TURN_START = "<extra_id_1>"
LABEL_START = "<extra_id_2>"
USER_ROLE, ASSISTANT_ROLE = "User", "Assistant"
ROLES = (USER_ROLE, ASSISTANT_ROLE)
STOP_STRING = TURN_START  # the model ends its answer by starting the next turn
MARKERS = (SYSTEM_START, TURN_START, LABEL_START)

Conversation = Mapping[str, Any]


class ConversationError(SteerrayError, ValueError):
    """A conversation that does not follow the SteerLM schema; the message says what and where."""


def system_block(system: str) -> str:
    return f"{SYSTEM_START}System\n{system}\n"


def turn_header(role: str) -> str:
    return f"{TURN_START}{role}\n"


def label_line(label: str) -> str:
    return f"{LABEL_START}{label}\n"


def make_conversation(turns: Sequence[tuple[str, str, str | None]], system: str = SYSTEM_PROMPT) -> dict:
    """Build a conversation record from ``(role, text, label)`` triples."""
    return {
        "system": system,
        "mask": USER_ROLE,
        "type": "VALUE_TO_TEXT",
        "conversations": [{"from": role, "value": text, "label": label} for role, text, label in turns],
    }


def _turns(conversation: Conversation) -> list[Mapping[str, Any]]:
    turns = conversation.get("conversations") if isinstance(conversation, Mapping) else None
    if not isinstance(turns, (list, tuple)):
        raise ConversationError("record has no 'conversations' list")
    return list(turns)


def validate_conversation(conversation: Conversation, *, require_assistant: bool = True,
                          allow_preference: bool = False) -> None:
    """Check schema, roles, turn order, non-empty texts and label strings; raise naming the turn."""
    if not isinstance(conversation, Mapping):
        raise ConversationError(f"record must be a JSON object, got {type(conversation).__name__}")
    turns = _turns(conversation)
    if not turns:
        raise ConversationError("'conversations' is empty")
    system = conversation.get("system", SYSTEM_PROMPT)
    if not isinstance(system, str):
        raise ConversationError("'system' must be a string")
    mask = conversation.get("mask", USER_ROLE)
    if mask != USER_ROLE:
        raise ConversationError(f"'mask' must be {USER_ROLE!r}, got {mask!r}")
    if conversation.get("type", "VALUE_TO_TEXT") != "VALUE_TO_TEXT":
        raise ConversationError(f"'type' must be 'VALUE_TO_TEXT', got {conversation.get('type')!r}")
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise ConversationError(f"turn {i} is not an object")
        role, value = turn.get("from"), turn.get("value")
        if role not in ROLES:
            raise ConversationError(f"turn {i}: 'from' must be one of {ROLES}, got {role!r}")
        expected = ROLES[i % 2]
        if role != expected:
            raise ConversationError(f"turn {i}: expected a {expected} turn (turns alternate, User first), got {role}")
        if not isinstance(value, str) or not value.strip():
            raise ConversationError(f"turn {i} ({role}): empty or missing 'value'")
        label = turn.get("label")
        if label is not None:
            if role == USER_ROLE:
                raise ConversationError(f"turn {i}: User turns carry no label, got {label!r}")
            try:
                check_range(parse_label(label), allow_preference=allow_preference)
            except LabelError as err:
                raise ConversationError(f"turn {i}: bad label: {err}") from None
    if require_assistant and not any(t.get("from") == ASSISTANT_ROLE for t in turns):
        raise ConversationError("conversation has no Assistant turn")


# --------------------------------------------------------------------------------------------------
# Reward-model prompts (spec section 3 and 5.2)
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RewardPrompt:
    turn_index: int  # index of the scored assistant turn in the conversation
    text: str  # everything up to that turn, ending in LABEL_START: the read-out position
    label: str | None  # the turn's label string (may be "" or None)


def reward_prompts(conversation: Conversation, *, labelled_only: bool = True,
                   system: str = SYSTEM_PROMPT) -> list[RewardPrompt]:
    """One prompt per scored turn, byte-identical to NeMo-Aligner's regression converter.

    ``labelled_only=True`` keeps turns with a truthy label (the converter's rule for training data);
    ``False`` keeps every Assistant turn that has a ``label`` key that is not None, including ``""``
    (the annotator's rule). Like the reference, the constant system prompt is used by default.
    """
    text = system_block(system)
    prompts = []
    for i, turn in enumerate(_turns(conversation)):
        role = USER_ROLE if turn.get("from") == conversation.get("mask", USER_ROLE) else ASSISTANT_ROLE
        text += f"{turn_header(role)}{turn['value']}\n"
        label = turn.get("label")
        scored = bool(label) if labelled_only else (role == ASSISTANT_ROLE and "label" in turn and label is not None)
        if scored:
            prompts.append(RewardPrompt(i, text + LABEL_START, label))
    return prompts


# --------------------------------------------------------------------------------------------------
# SFT rendering with trained spans (spec section 6)
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TurnSpan:
    role: str
    start: int  # where the turn's header begins
    value_start: int  # where the turn's text begins (after header and label line)
    end: int  # one past the turn's trailing newline


@dataclass(frozen=True)
class RenderedConversation:
    text: str
    trained: list[tuple[int, int]]  # character [start, end) spans that carry loss
    turns: list[TurnSpan] = field(default_factory=list)


def render_sft(conversation: Conversation) -> RenderedConversation:
    """Render for attribute-conditioned SFT and mark what carries loss, per the reference's rules.

    Trained: each Assistant response with its newline; the leading ``<extra_id_1>`` of every User turn
    after index 1 (it ends the previous answer); the final ``<extra_id_1>`` appended after a last
    Assistant turn, so the model learns to stop. Masked: system block, User turns, headers, label lines.
    """
    mask_role = conversation.get("mask", USER_ROLE)
    text = system_block(conversation.get("system", SYSTEM_PROMPT))
    trained: list[tuple[int, int]] = []
    spans: list[TurnSpan] = []
    turns = _turns(conversation)
    for i, turn in enumerate(turns):
        is_user = turn.get("from") == mask_role
        start = len(text)
        text += turn_header(USER_ROLE if is_user else ASSISTANT_ROLE)
        label = turn.get("label")
        if not is_user and isinstance(label, str):
            text += label_line(label)
        value_start = len(text)
        text += f"{turn['value']}\n"
        spans.append(TurnSpan(turn["from"], start, value_start, len(text)))
        if is_user and i > 1:
            trained.append((start, start + len(TURN_START)))
        elif not is_user:
            trained.append((value_start, len(text)))
    if turns and turns[-1].get("from") != mask_role:
        trained.append((len(text), len(text) + len(TURN_START)))
        text += TURN_START
    return RenderedConversation(text, trained, spans)


# --------------------------------------------------------------------------------------------------
# Serving / sampling prompts (spec section 6.4)
# --------------------------------------------------------------------------------------------------

def generation_prompt(messages: Sequence[Mapping[str, str]], label: str, system: str = SYSTEM_PROMPT) -> str:
    """Prompt for the next assistant answer, conditioned on ``label``.

    ``messages`` are ``{"role": "user"|"assistant", "content": str}`` (OpenAI style) or SteerLM turns
    (``from``/``value``); they must alternate and end with a user message. Earlier assistant turns get
    the same label line, matching how they appear in training data.
    """
    if not messages:
        raise ConversationError("no messages")
    text = system_block(system)
    for i, message in enumerate(messages):
        role = _message_role(message, i)
        content = message.get("content", message.get("value"))
        if not isinstance(content, str) or not content.strip():
            raise ConversationError(f"message {i} has empty content")
        if role != ROLES[i % 2]:
            raise ConversationError(f"message {i}: expected a {ROLES[i % 2].lower()} message (user first, alternating)")
        text += turn_header(role) + (label_line(label) if role == ASSISTANT_ROLE else "") + content + "\n"
    if _message_role(messages[-1], len(messages) - 1) != USER_ROLE:
        raise ConversationError("the last message must come from the user")
    return text + turn_header(ASSISTANT_ROLE) + label_line(label)


def _message_role(message: Mapping[str, str], index: int) -> str:
    raw = message.get("role", message.get("from"))
    role = {"user": USER_ROLE, "assistant": ASSISTANT_ROLE, USER_ROLE: USER_ROLE,
            ASSISTANT_ROLE: ASSISTANT_ROLE}.get(raw)  # type: ignore[arg-type]
    if role is None:
        raise ConversationError(f"message {index}: role must be 'user' or 'assistant', got {raw!r}")
    return role


def strip_generation(text: str, stop_strings: Sequence[str] = (STOP_STRING,)) -> str:
    """Cut a generated answer at the first stop string and drop any stray template markers."""
    cut = len(text)
    for stop in list(stop_strings) + list(MARKERS):
        position = text.find(stop)
        if position != -1:
            cut = min(cut, position)
    return text[:cut].rstrip("\n")
