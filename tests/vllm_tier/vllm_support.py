"""Shared bits of the vLLM tier: the skip mark and small real models vLLM's CPU kernels accept.

vLLM's CPU attention supports head sizes 32, 64, 80, 96, 112, 128... but not the 16 of the ``tiny-llama``
alias (its engine dies on the first request), so the tier builds its own models with 64-wide heads.
The folder is called ``vllm_tier``, not ``vllm``: pytest puts ``tests/`` on ``sys.path``, where a
``vllm`` folder would pass for the vllm package (a namespace package) wherever vllm is not installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from steerray.serving.engines import vllm_unavailable_reason

VLLM_MISSING = vllm_unavailable_reason()
VLLM_TIER = [pytest.mark.vllm,
             pytest.mark.skipif(VLLM_MISSING is not None,
                                reason=f"vLLM cannot run here: {VLLM_MISSING}; run it from .venv-vllm")]


def build_babbler(out: Path, seed: int = 7) -> Path:
    """A random 2-layer Llama (64-wide heads, SmolLM2's tokenizer) that talks until its token budget ends.

    Random weights almost never produce EOS or the stop marker, so a long answer stays in flight for
    seconds: what the engine-death test needs.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from steerray.models.loading import TINY_ALIAS, load_tokenizer

    tokenizer = load_tokenizer(TINY_ALIAS)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=64,
                         max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
