"""The SteerLM chat template, once: reward prompts, SFT rendering with trained spans, serving prompts.

Conversations use NeMo-Aligner's schema (spec section 2)::

    {"system": str, "mask": "User", "type": "VALUE_TO_TEXT",
     "conversations": [{"from": "User", "value": str, "label": None},
                       {"from": "Assistant", "value": str, "label": "helpfulness:4,..."}]}

Every renderer here works on character offsets of one rendered string, so later stages derive token
masks from a fast tokenizer's offset mapping instead of re-tokenizing pieces (which shifts merges).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from steerray.attributes import (
    ATTRIBUTES,
    DEFAULT_STEERING,
    MAX_VALUE,
    MIN_VALUE,
    LabelError,
    check_label_attributes,
    check_range,
    parse_label,
)
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
# How HelpSteer2 stores earlier turns inside one ``prompt`` (its dataset card): "\n<extra_id_1>Assistant\n".
_FLATTENED_TURN = re.compile(rf"\n{re.escape(TURN_START)}({USER_ROLE}|{ASSISTANT_ROLE})\n")
_TEMPLATE_TURN = re.compile(rf"(?:^|(?<=\n)){re.escape(TURN_START)}({USER_ROLE}|{ASSISTANT_ROLE})\n")


class ConversationError(SteerrayError, ValueError):
    """A conversation that does not follow the SteerLM schema; the message says what and where."""


# --------------------------------------------------------------------------------------------------
# Template markers inside texts: the one check every data path and both servers use
# --------------------------------------------------------------------------------------------------

def _stray_marker(text: str, allowed: Sequence[re.Match[str]] = ()) -> tuple[str, int] | None:
    """The first marker in ``text`` outside the ``allowed`` matches, with its position."""
    spans = [match.span() for match in allowed]
    for position in sorted(p for marker in MARKERS for p in _positions(text, marker)):
        if not any(start <= position < end for start, end in spans):
            return next(m for m in MARKERS if text.startswith(m, position)), position
    return None


def _positions(text: str, marker: str) -> list[int]:
    return [match.start() for match in re.finditer(re.escape(marker), text)]


def _marker_error(where: str, marker: str, position: int) -> ConversationError:
    return ConversationError(f"{where} contains the template marker {marker!r} at character {position}; "
                             "markers may only come from the template (they would add turns or a label line)")


def check_text_markers(text: str, where: str, *, allow_flattened_turns: bool = False) -> None:
    """Refuse SteerLM markers inside one turn's text (``where`` names it in the error).

    A marker in a message would let its author add a label line (overriding the steering) or fake turns.
    ``allow_flattened_turns``: a User text may hold earlier turns the way HelpSteer2 flattens them,
    ``\n<extra_id_1>Assistant\n`` / ``\n<extra_id_1>User\n`` alternating and ending with the user (after
    templating it reads like a real multi-turn conversation); no other marker, nowhere else.
    """
    if not any(marker in text for marker in MARKERS):
        return
    turns = list(_FLATTENED_TURN.finditer(text)) if allow_flattened_turns else []
    stray = _stray_marker(text, turns)
    if stray is not None:
        raise _marker_error(where, *stray)
    for i, match in enumerate(turns):
        if match.group(1) != ROLES[(i + 1) % 2]:
            raise ConversationError(f"{where}: its flattened turns must alternate Assistant, User, ...; the turn "
                                    f"marker at character {match.start() + 1} starts a {match.group(1)} turn")
    if turns[-1].group(1) != USER_ROLE:
        raise ConversationError(f"{where}: its flattened turns must end with a User turn")


def check_reward_text(text: str, where: str = "text") -> None:
    """A templated reward prompt: markers only where the template puts them, the read-out marker last.

    Optional system block first (``<extra_id_0>System\n``), turn headers at line starts alternating
    User/Assistant from User and ending with Assistant, exactly one ``<extra_id_2>``: the last characters.
    """
    if not text.endswith(LABEL_START):
        raise ConversationError(f"{where} does not end with {LABEL_START!r}")
    body = text[: -len(LABEL_START)]
    turns = list(_TEMPLATE_TURN.finditer(body))
    system = re.match(re.escape(f"{SYSTEM_START}System\n"), body)
    stray = _stray_marker(body, turns + ([system] if system else []))
    if stray is not None:
        raise _marker_error(where, *stray)
    roles = [match.group(1) for match in turns]
    for i, role in enumerate(roles):
        if role != ROLES[i % 2]:
            raise ConversationError(f"{where}: turn {i} is a {role} turn; turns alternate, User first")
    if roles and roles[-1] != ASSISTANT_ROLE:
        raise ConversationError(f"{where}: the scored (last) turn must be an Assistant turn")


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
    """Check schema, roles, turn order, non-empty texts, template markers and labels; raise naming the turn.

    Markers: none in ``system`` or Assistant texts; User texts only as HelpSteer2's flattened earlier
    turns (:func:`check_text_markers`).
    """
    if not isinstance(conversation, Mapping):
        raise ConversationError(f"record must be a JSON object, got {type(conversation).__name__}")
    turns = _turns(conversation)
    if not turns:
        raise ConversationError("'conversations' is empty")
    system = conversation.get("system", SYSTEM_PROMPT)
    if not isinstance(system, str):
        raise ConversationError("'system' must be a string")
    check_text_markers(system, "'system'")
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
        # HelpSteer2 prompts carry their earlier turns flattened into the User value (spec section 2).
        check_text_markers(value, f"turn {i} ({role})", allow_flattened_turns=role == USER_ROLE)
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

def generation_prompt(messages: Sequence[Mapping[str, str]], label: str, system: str = SYSTEM_PROMPT, *,
                      allow_flattened_turns: bool = True) -> str:
    """Prompt for the next assistant answer, conditioned on ``label``.

    ``messages`` are ``{"role": "user"|"assistant", "content": str}`` (OpenAI style) or SteerLM turns
    (``from``/``value``); they must alternate and end with a user message. Earlier assistant turns get
    the same label line, matching how they appear in training data. Template markers in the texts are
    refused (:func:`check_text_markers`); ``allow_flattened_turns=False`` (the servers) refuses even
    HelpSteer2-style flattened turns in user messages.
    """
    if not messages:
        raise ConversationError("no messages")
    check_text_markers(system, "the system prompt")
    text = system_block(system)
    for i, message in enumerate(messages):
        role = _message_role(message, i)
        content = message.get("content", message.get("value"))
        if not isinstance(content, str) or not content.strip():
            raise ConversationError(f"message {i} has empty content")
        if role != ROLES[i % 2]:
            raise ConversationError(f"message {i}: expected a {ROLES[i % 2].lower()} message (user first, alternating)")
        check_text_markers(content, f"message {i}", allow_flattened_turns=allow_flattened_turns and role == USER_ROLE)
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


# --------------------------------------------------------------------------------------------------
# The exported tokenizer's chat template (Jinja), equal to generation_prompt byte for byte
# --------------------------------------------------------------------------------------------------

# Jinja source with four literals filled in by steerlm_chat_template. Every tag trims whitespace on both
# sides, so the output does not depend on the trim_blocks/lstrip_blocks settings of the renderer
# (transformers and vLLM set them). Content given as a list of text parts is joined without a separator,
# as the server does; the `for part in message.content` loop also makes vLLM pass such lists through.
_CHAT_TEMPLATE = """\
{#- SteerLM chat template (steerray). Steer with chat_template_kwargs, e.g. {"steering": {"verbosity": 0}}; \
attributes left out take the defaults below. Stop generation at "<extra_id_1>". -#}
{%- macro content_text(content) -%}
  {%- if content is string -%}
    {{- content -}}
  {%- elif content is not none -%}
    {%- for part in content -%}
      {{- part.text -}}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- macro check_markers(text, index) -%}
  {#- A marker in a message could add a label line (overriding the steering) or fake turns. -#}
  {%- for marker in @MARKERS@ if marker in text -%}
    {{- raise_exception("messages." ~ index ~ " contains the template marker '" ~ marker
                        ~ "'; markers may only come from the template") -}}
  {%- endfor -%}
{%- endmacro -%}
{%- set attributes = @ATTRIBUTES@ -%}
{%- set trained = @TRAINED@ -%}
{%- set defaults = @DEFAULTS@ -%}
{%- set steer = steering if steering is defined and steering is not none else {} -%}
{%- if steer is not mapping -%}
  {{- raise_exception("steering must be an object of attribute: value, e.g. {\\"verbosity\\": 4}") -}}
{%- endif -%}
{%- for name in steer -%}
  {%- if name not in attributes -%}
    {{- raise_exception("unknown attribute '" ~ name ~ "'; known attributes: " ~ attributes | join(", ")) -}}
  {%- elif name not in trained -%}
    {{- raise_exception("cannot steer '" ~ name ~ "': this model was trained on labels of "
                        ~ trained | join(", ") ~ " only") -}}
  {%- endif -%}
{%- endfor -%}
{%- set label = namespace(parts=[]) -%}
{%- for name in trained -%}
  {%- set value = steer[name] if name in steer else defaults[name] -%}
  {%- if value is boolean or value is not number or value < @MIN@ or value > @MAX@ or value != value | int -%}
    {{- raise_exception("steering value for '" ~ name ~ "' must be an integer @MIN@-@MAX@, got "
                        ~ value | string) -}}
  {%- endif -%}
  {%- set label.parts = label.parts + [name ~ ":" ~ value | int] -%}
{%- endfor -%}
{%- set label = label.parts | join(",") -%}
{%- set state = namespace(system=@SYSTEM@, first=0) -%}
{%- if messages | length > 0 and messages[0].role in ["system", "developer"] -%}
  {%- set state.system = content_text(messages[0].content) -%}
  {%- set state.first = 1 -%}
  {{- check_markers(state.system, 0) -}}
{%- endif -%}
{%- set turns = messages[state.first:] -%}
{%- if turns | length == 0 -%}
  {{- raise_exception("no messages: send at least one user message") -}}
{%- endif -%}
{{- "@SYSTEM_START@System\\n" ~ state.system ~ "\\n" -}}
{%- for message in turns -%}
  {%- set text = content_text(message.content) -%}
  {%- set where = "messages." ~ (loop.index0 + state.first) -%}
  {%- set expected = "user" if loop.index0 % 2 == 0 else "assistant" -%}
  {%- if message.role in ["system", "developer"] -%}
    {{- raise_exception(where ~ ": a system message may only come first") -}}
  {%- elif message.role != expected -%}
    {{- raise_exception(where ~ ": expected a " ~ expected ~ " message (user first, alternating), got "
                        ~ message.role | string) -}}
  {%- elif text | trim == "" -%}
    {{- raise_exception(where ~ " has empty content") -}}
  {%- endif -%}
  {{- check_markers(text, loop.index0 + state.first) -}}
  {%- if message.role == "user" -%}
    {{- "@TURN_START@User\\n" ~ text ~ "\\n" -}}
  {%- else -%}
    {{- "@TURN_START@Assistant\\n@LABEL_START@" ~ label ~ "\\n" ~ text ~ "\\n" -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt is defined and add_generation_prompt -%}
  {%- if turns[-1].role != "user" -%}
    {{- raise_exception("the last message must come from the user") -}}
  {%- endif -%}
  {{- "@TURN_START@Assistant\\n@LABEL_START@" ~ label ~ "\\n" -}}
{%- elif turns[-1].role == "assistant" -%}
  {{- "@TURN_START@" -}}
{%- endif -%}
"""


def steerlm_chat_template(label_attributes: Sequence[str] | None = None) -> str:
    """The SteerLM chat template as Jinja source, for an exported tokenizer's ``chat_template``.

    ``tokenizer.apply_chat_template(messages, add_generation_prompt=True, steering={"verbosity": 0})``
    (vLLM: ``chat_template_kwargs={"steering": {...}}``) renders exactly what :func:`generation_prompt`
    renders with ``steering_label(steering, attributes=label_attributes)``: a leading system (or developer)
    message replaces the system prompt, every assistant turn carries the label line, and attributes left
    out take :data:`DEFAULT_STEERING`. ``label_attributes`` (a model trained on labels over a subset,
    ``steerlm_label_attributes`` in its config.json) is baked in: the label carries only those and
    steering any other attribute is an error. Without ``add_generation_prompt`` a conversation ending in
    an assistant turn gets the trailing ``<extra_id_1>`` that :func:`render_sft` trains the model to emit.
    Generation must stop at :data:`STOP_STRING`, which is several tokens, so no EOS id can do it.
    """
    trained = ATTRIBUTES if label_attributes is None else check_label_attributes(label_attributes)
    literals = {
        "@ATTRIBUTES@": json.dumps(list(ATTRIBUTES)), "@TRAINED@": json.dumps(list(trained)),
        "@DEFAULTS@": json.dumps({name: DEFAULT_STEERING[name] for name in trained}),
        "@SYSTEM@": json.dumps(SYSTEM_PROMPT), "@MIN@": str(MIN_VALUE), "@MAX@": str(MAX_VALUE),
        "@MARKERS@": json.dumps(list(MARKERS)),
        "@SYSTEM_START@": SYSTEM_START, "@TURN_START@": TURN_START, "@LABEL_START@": LABEL_START,
    }
    template = _CHAT_TEMPLATE
    for placeholder, literal in literals.items():
        template = template.replace(placeholder, literal)
    return template
