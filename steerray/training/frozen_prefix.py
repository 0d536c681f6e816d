"""Compute the frozen lower layers once per row, not once per epoch.

With ``lora.last_layers=N`` (the demo reward model: the top 8 of 30 layers) the embeddings and the layers
below the trained ones never change, so a row's hidden states entering the first trained layer are the
same every time the row comes back. Each worker keeps them, keyed by row index, up to
``train.frozen_prefix_cache_mb``; a step then runs only the trained layers forward and backward for rows
seen before. On the demo's 2.6 epochs that is 16 layer passes a row-visit instead of 38 (30 forward, 8
backward) after the first.

The sliced forward is checked against the whole model's on the first micro-batch; where they disagree (a
backbone that transforms ``inputs_embeds``, say) the cache turns itself off and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from steerray.models.layer_slices import backbone_of, hidden_before_layer, layer_list_name
from steerray.models.reward import reward_forward
from steerray.training.strategy import decoder_layers

log = logging.getLogger("steerray")


def first_trained_layer(model: Any) -> int:
    """Index of the lowest decoder layer with a trainable weight; 0 where nothing below it is frozen (the
    embeddings train, or every layer does) or the layers cannot be found."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None or any(p.requires_grad for p in embeddings.parameters()):
        return 0
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            return index
    return 0


def keeps_frozen_prefixes(config: Any) -> bool:
    """Whether a run's workers may cache frozen prefixes (a sharded strategy still turns it off later)."""
    return config.train.frozen_prefix_cache_mb > 0 and bool(config.lora.enabled and config.lora.last_layers)


def _has_dropout(modules: Sequence[Any]) -> bool:
    """Active dropout below the trained layers would make their output differ every epoch."""
    import torch.nn as nn

    return any(isinstance(m, nn.Dropout) and m.p > 0 for layer in modules for m in layer.modules()) or any(
        float(getattr(getattr(layer, "self_attn", None), "attention_dropout", 0.0) or 0.0) > 0 for layer in modules)


class FrozenPrefixCache:
    """Per-worker store of each training row's hidden states below the first trained decoder layer."""

    def __init__(self, model: Any, budget_mb: float) -> None:
        self.backbone = backbone_of(model)
        self.layer = first_trained_layer(model)
        self.budget = int(budget_mb * 1024**2)
        self.rows: dict[int, Any] = {}
        self.bytes = self.hits = self.misses = 0
        self.checked = False
        self.enabled = self.budget > 0 and self.layer > 0 and layer_list_name(self.backbone) is not None and \
            not _has_dropout(decoder_layers(model)[: self.layer])

    @classmethod
    def for_training(cls, prepared: Any, budget_mb: float) -> FrozenPrefixCache:
        """FSDP2 and DeepSpeed get none: their hooks gather the sharded layers only through the root's forward."""
        return cls(prepared.model, budget_mb if prepared.strategy.kind in ("ddp", "single") else 0)

    def hidden(self, keys: Sequence[int], input_ids: Any, attention_mask: Any) -> Any:
        """Right-padded ``[B, T, H]`` hidden states entering the first trained layer, for rows ``keys``."""
        import torch

        missing = [i for i, key in enumerate(keys) if key not in self.rows]
        fresh = None
        if missing:
            with torch.no_grad():
                fresh = hidden_before_layer(self.backbone, self.layer, input_ids[missing], attention_mask[missing])
        lengths = attention_mask.sum(dim=1).tolist()
        out = None
        for i, key in enumerate(keys):
            if fresh is not None and i in missing:
                row = fresh[missing.index(i), : lengths[i]]
                self.misses += 1
                if self.bytes + row.numel() * row.element_size() <= self.budget:
                    # in host memory (a copy: the batch's tensor is not kept alive), never the GPU's
                    self.rows[key] = row.to("cpu", copy=True)
                    self.bytes += row.numel() * row.element_size()
            else:
                row = self.rows[key]
                self.hits += 1
            if out is None:
                out = torch.zeros((len(keys), input_ids.shape[1], row.shape[-1]), dtype=row.dtype,
                                  device=input_ids.device)
            out[i, : lengths[i]] = row.to(input_ids.device)
        return out

    def agrees(self, sliced: Any, whole: Any, precision: str) -> bool:
        """Checked once, on the first micro-batch: the sliced forward must give the whole model's outputs (to
        rounding: bf16 computes the two paths' matmuls in different groupings), else the cache turns off."""
        self.checked = True
        tolerance = 5e-2 if precision == "bf16" else 1e-3
        error = float((sliced.float() - whole.float()).abs().max()) / (float(whole.float().abs().max()) + 1e-6)
        if error > tolerance:
            log.warning("frozen-prefix cache off: the sliced forward differs from the whole model's by %.2e "
                        "(relative); every step runs all layers", error)
            self.enabled = False
            self.rows.clear()
            self.bytes = 0
        return self.enabled

    def stats(self) -> dict[str, Any]:
        return {"prefix_cache_rows": len(self.rows), "prefix_cache_mb": round(self.bytes / 1024**2, 1),
                "prefix_cache_hits": self.hits, "prefix_cache_misses": self.misses}


def reward_predictions(cache: FrozenPrefixCache, prepared: Any, batch: dict[str, Any]) -> Any:
    """A training micro-batch's reward predictions: the frozen layers' output of a row seen before comes from
    ``cache`` (``batch["keys"]`` name the rows), so only the trained layers run; the whole model where the
    cache is off or its one check fails."""
    import torch

    strategy = prepared.strategy
    ids, mask = batch["input_ids"].to(strategy.device), batch["attention_mask"].to(strategy.device)
    with strategy.autocast():
        if cache.enabled:
            hidden = cache.hidden(batch["keys"], ids, mask)
            if not cache.checked:
                with torch.no_grad():
                    sliced = reward_forward(prepared.model, ids, mask, hidden, cache.layer)
                    cache.agrees(sliced, reward_forward(prepared.model, ids, mask), strategy.precision)
            if cache.enabled:
                return prepared.module(ids, mask, hidden=hidden, from_layer=cache.layer)
        return prepared.module(ids, mask)
