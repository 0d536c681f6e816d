"""The attribute-prediction reward model: a causal-LM backbone with a linear head, one output per attribute.

Stored as a plain Hugging Face sequence-classification folder (``num_labels`` = number of attributes,
``problem_type="regression"``, attribute names in ``id2label``), tokenizer beside it, safetensors, so
``AutoModelForSequenceClassification.from_pretrained(folder)`` loads it anywhere without steerray.

The head reads the hidden state of the last real token. Inputs are tokenized without BOS/EOS (as
NeMo-Aligner does) and right-padded; over-long inputs lose tokens from the LEFT, so the read-out position
(the trailing ``<extra_id_2>``) survives; the reference cuts from the right and scores the wrong token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerray.attributes import ATTRIBUTES, check_attribute
from steerray.errors import SteerrayError
from steerray.models.layer_slices import backbone_of, forward_from_layer
from steerray.models.loading import expected_new_head, load_tokenizer, resolve_model, weights_format


class RewardModelError(SteerrayError, ValueError):
    """A folder that is not a steerray/HF regression reward model, or one that does not fit the data."""


@dataclass
class RewardBatch:
    input_ids: Any  # LongTensor [B, T], right-padded with pad_token_id
    attention_mask: Any  # LongTensor [B, T]
    truncated: list[bool]  # rows that lost tokens from the left
    num_tokens: int  # real (unpadded) tokens in the batch


def attribute_config(attributes: Sequence[str]) -> dict[str, Any]:
    for name in attributes:
        check_attribute(name)
    return {
        "num_labels": len(attributes),
        "id2label": dict(enumerate(attributes)),
        "label2id": {name: i for i, name in enumerate(attributes)},
        "problem_type": "regression",
    }


def build_reward_model(backbone: str, attributes: Sequence[str] = ATTRIBUTES, *, dtype: Any = None,
                       trust_remote_code: bool = False, init_from: str | None = None,
                       empty: bool = False) -> Any:
    """A reward model from a causal-LM backbone (fresh head), or from a reward folder (head included).

    ``empty=True`` builds the same architecture on the meta device without reading weights (sharded
    training's other ranks, which receive their shards from rank 0).
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    dtype = dtype or torch.float32
    if empty:
        return _empty_reward_model(backbone, attributes, dtype, trust_remote_code, init_from)
    if init_from is not None:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(init_from), dtype=dtype, trust_remote_code=trust_remote_code, **weights_format(trust_remote_code))
        found = reward_attributes(model.config)
        if found != list(attributes):
            raise RewardModelError(f"init_from {init_from} predicts {found}, but this run asks for {list(attributes)}")
        return model
    with expected_new_head():
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model(backbone), dtype=dtype, trust_remote_code=trust_remote_code, **attribute_config(attributes),
            **weights_format(trust_remote_code))
    if model.config.pad_token_id is None:
        tokenizer = load_tokenizer(backbone, trust_remote_code=trust_remote_code)
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _empty_reward_model(backbone: str, attributes: Sequence[str], dtype: Any, trust_remote_code: bool,
                        init_from: str | None) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if init_from is not None:
        config = AutoConfig.from_pretrained(str(init_from), trust_remote_code=trust_remote_code)
    else:
        config = AutoConfig.from_pretrained(resolve_model(backbone), trust_remote_code=trust_remote_code,
                                            **attribute_config(attributes))
        if config.pad_token_id is None:
            config.pad_token_id = load_tokenizer(backbone, trust_remote_code=trust_remote_code).pad_token_id
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config, dtype=dtype,
                                                              trust_remote_code=trust_remote_code)


def reward_attributes(config: Any) -> list[str]:
    """Attribute names of a reward model, in output order, from its config's id2label."""
    id2label = getattr(config, "id2label", None) or {}
    names = [id2label[i] for i in sorted(id2label, key=int)]
    if getattr(config, "problem_type", None) != "regression" or not names:
        raise RewardModelError("not a regression reward model (config.problem_type != 'regression')")
    for name in names:
        check_attribute(name)
    return names


def reward_model_attributes(folder: str | Path, trust_remote_code: bool = False) -> list[str]:
    """The outputs of the reward model in ``folder``, read from its config without loading the weights."""
    from transformers import AutoConfig

    if not (Path(folder) / "config.json").is_file():
        raise RewardModelError(f"reward model {folder} has no config.json; pass the `model` folder of train-reward")
    return reward_attributes(AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code))


def load_reward_model(folder: str | Path, *, dtype: Any = None, device: str | None = None,
                      trust_remote_code: bool = False) -> tuple[Any, Any, list[str]]:
    """Load ``(model, tokenizer, attributes)`` from an exported reward-model folder, in eval mode."""
    import torch
    from transformers import AutoModelForSequenceClassification

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise RewardModelError(f"{folder} is not a reward-model folder (no config.json); "
                               "pass the `model` folder that train-reward wrote")
    model = AutoModelForSequenceClassification.from_pretrained(
        str(folder), dtype=dtype or torch.float32, trust_remote_code=trust_remote_code,
        **weights_format(trust_remote_code))
    attributes = reward_attributes(model.config)
    tokenizer = load_tokenizer(str(folder), trust_remote_code=trust_remote_code)
    if device:
        model.to(device)
    model.eval()
    return model, tokenizer, attributes


def encode_reward_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> RewardBatch:
    """Tokenize without special tokens, keep the LAST ``max_length`` tokens, right-pad the batch."""
    import torch

    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    truncated = [len(ids) > max_length for ids in encoded]
    encoded = [ids[-max_length:] for ids in encoded]
    if any(len(ids) == 0 for ids in encoded):
        raise RewardModelError("cannot score an empty text")
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return RewardBatch(input_ids, attention_mask, truncated, int(attention_mask.sum()))


def reward_forward(model: Any, input_ids: Any, attention_mask: Any, hidden: Any = None, from_layer: int = 0) -> Any:
    """Attribute predictions ``[B, A]`` read at each row's last real token.

    Gathers by ``attention_mask`` rather than trusting the pad id (a text may contain the pad token).
    Works on a plain HF model and on a peft-wrapped one (LoRA layers and the trainable head copy are
    injected in place, so the base model's modules already carry them). ``hidden`` (the states entering
    decoder layer ``from_layer``, e.g. from training's frozen-prefix cache) skips the layers below it.
    """
    import torch

    backbone = backbone_of(model)
    if hidden is not None:
        hidden = forward_from_layer(backbone, from_layer, hidden, attention_mask)
    else:
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    last = attention_mask.sum(dim=1) - 1
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.score(pooled)


def reward_readout(model: Any) -> Any:
    """Wrap a reward model in a module whose forward is :func:`reward_forward` (training's FSDP2 root).

    Sharded training must call the root module (its hook gathers the embeddings, final norm and head);
    this wrapper makes the attention-mask read-out that root.
    """
    import torch.nn as nn

    class RewardReadout(nn.Module):
        def __init__(self, inner: Any):
            super().__init__()
            self.model = inner

        def forward(self, input_ids: Any, attention_mask: Any, hidden: Any = None, from_layer: int = 0) -> Any:
            return reward_forward(self.model, input_ids, attention_mask, hidden, from_layer)

    return RewardReadout(model)


def predict_texts(model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int = 4096,
                  batch_size: int = 16) -> tuple[Any, list[bool]]:
    """Score texts in batches: ``(predictions float32 numpy [N, A], truncated flags)``."""
    import numpy as np
    import torch

    device = next(model.parameters()).device
    outputs: list[tuple[list[int], Any]] = []
    truncated: list[tuple[int, bool]] = []
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad little
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            index = order[start: start + batch_size]
            batch = encode_reward_texts(tokenizer, [texts[i] for i in index], max_length)
            preds = reward_forward(model, batch.input_ids.to(device), batch.attention_mask.to(device))
            outputs.append((index, preds.float().cpu().numpy()))
            truncated.extend(zip(index, batch.truncated, strict=True))
    result = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    for index, preds in outputs:
        result[index] = preds
    flags = [False] * len(texts)
    for i, flag in truncated:
        flags[i] = flag
    return result, flags
