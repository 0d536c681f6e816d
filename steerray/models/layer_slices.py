"""Run a slice of a Hugging Face decoder: the layers below layer ``k``, or from layer ``k`` to the top.

Used where the lower layers are frozen (``lora.last_layers``): their output for a row is the same every
epoch, so it is computed once (``hidden_before_layer``) and the trained layers run on it
(``forward_from_layer``). Both swap the backbone's layer list for the slice for one call and pass the
hidden states in as ``inputs_embeds``, so the backbone's own code still builds the attention mask and the
position embeddings. A backbone that transforms ``inputs_embeds`` (Gemma scales them) breaks that:
callers check the sliced forward against the whole one before trusting it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def backbone_of(model: Any) -> Any:
    """The decoder stack under a causal-LM / sequence-classification head (peft unwrapped)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix)


def layer_list_name(backbone: Any) -> str | None:
    """The attribute of ``backbone`` holding its decoder layers (``layers``, ``h``, ...), if one is found."""
    import torch.nn as nn

    lists = [name for name, child in backbone.named_children() if isinstance(child, nn.ModuleList) and len(child)]
    return lists[0] if len(lists) == 1 else None


@contextlib.contextmanager
def only_layers(backbone: Any, start: int, stop: int | None = None) -> Iterator[None]:
    """Within the block, ``backbone`` runs only its decoder layers ``start:stop`` (same module objects)."""
    import torch.nn as nn

    name = layer_list_name(backbone)
    if name is None:
        raise ValueError(f"{type(backbone).__name__} has no single list of decoder layers to slice")
    whole = getattr(backbone, name)
    setattr(backbone, name, nn.ModuleList(list(whole)[start:stop]))
    try:
        yield
    finally:
        setattr(backbone, name, whole)


def hidden_before_layer(backbone: Any, layer: int, input_ids: Any, attention_mask: Any) -> Any:
    """The hidden states ``[B, T, H]`` that enter decoder layer ``layer`` (the output of layer ``layer - 1``)."""
    name = layer_list_name(backbone)
    if name is None:
        raise ValueError(f"{type(backbone).__name__} has no single list of decoder layers to slice")
    captured: list[Any] = []

    def keep(_module: Any, _args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = getattr(backbone, name)[layer - 1].register_forward_hook(keep)
    try:
        with only_layers(backbone, 0, layer):
            backbone(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        handle.remove()
    return captured[-1]


def forward_from_layer(backbone: Any, layer: int, hidden: Any, attention_mask: Any) -> Any:
    """The backbone's last hidden state when decoder layer ``layer`` receives ``hidden`` (final norm included)."""
    with only_layers(backbone, layer):
        return backbone(inputs_embeds=hidden, attention_mask=attention_mask).last_hidden_state
