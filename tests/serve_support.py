"""Test support for the chat server: a tiny model with known answers, and a live local app.

``build_steerable_model`` writes a real 1-layer Llama (SmolLM2's tokenizer) whose weights are set by
hand, not trained, so that greedy decoding follows a fixed script: its next token depends on the current
and the previous token (an attention head that looks one position back, and a read-out that adds a
"current" and a "previous" vote). The prompt of a SteerLM request ends in ``verbosity:V\\n``, so the
previous token is the verbosity digit and the answer depends on the steering:

- verbosity 0: ``Paris.`` then ``\\n<extra_id_1>User\\n`` (the stop marker the server must cut);
- verbosity 4 (the default): ``The capital of France is Paris, a city of art.`` then the same marker.

That gives the serving tests exact expected answers in about a second, with no training. Built with
``end_with_eos``, each answer ends in the tokenizer's EOS token instead of the marker (how a chat model
usually ends), for what EOS decides (``min_tokens``).
"""

from __future__ import annotations

import math
import socket
from pathlib import Path

SHORT_ANSWER = "Paris."
LONG_ANSWER = "The capital of France is Paris, a city of art."
AFTER_ANSWER = "\n<extra_id_1>User\n"
QUESTION = "What is the capital of France?"
VOTE = 10.0  # logit each of the two votes adds; the wanted token gets both


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_steerable_model(out: Path, end_with_eos: bool = False) -> Path:
    """Write the scripted model (see the module docstring) to ``out`` with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from steerray.models.loading import TINY_ALIAS, load_tokenizer

    tokenizer = load_tokenizer(TINY_ALIAS)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    newline, digit0, digit4 = ids("\n")[0], ids("0")[0], ids("4")[0]
    after = [tokenizer.eos_token_id] if end_with_eos else ids(AFTER_ANSWER)
    scripts = [[digit0, newline, *ids(SHORT_ANSWER), *after], [digit4, newline, *ids(LONG_ANSWER), *after]]
    transitions = {(a, b): c for script in scripts for a, b, c in zip(script, script[1:], script[2:], strict=False)}
    vocab = sorted({t for script in scripts for t in script})
    slot = {token: i for i, token in enumerate(vocab)}
    k = len(vocab)
    hidden = 64
    assert 2 * k + 2 <= hidden, "too many scripted tokens for the hidden size"
    const = 2 * k  # a dimension every token has: it drives the position-only attention
    filler = 2 * k + 1  # unscripted tokens get this one, so every embedding has the same norm

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=hidden,
                         max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-6,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for norm in (model.model.norm, model.model.layers[0].input_layernorm,
                     model.model.layers[0].post_attention_layernorm):
            norm.weight.fill_(1.0)
        embed = model.model.embed_tokens.weight
        embed[:, const] = 1.0
        embed[:, filler] = 1.0
        for token, i in slot.items():
            embed[token, i], embed[token, filler] = 1.0, 0.0
        scale = math.sqrt(2 / hidden)  # RMS of a scripted token's embedding: undo the input norm
        attn = model.model.layers[0].self_attn
        # Previous-token head: q = (1, 0) and k = (cos t, sin t) in each of the 12 fastest RoPE planes,
        # so after rotation q_i . k_j = sum cos((j + 1 - i) t): largest at j = i - 1.
        theta = [config.rope_parameters["rope_theta"] ** (-2 * p / hidden) for p in range(hidden // 2)]
        sharpness = 40.0 * math.sqrt(hidden)  # undoes the 1/sqrt(head_dim) scaling; 40 x ~1.08 logit gap
        for p in range(12):
            attn.q_proj.weight[p, const] = math.sqrt(sharpness) * scale
            attn.k_proj.weight[p, const] = math.sqrt(sharpness) * scale * math.cos(theta[p])
            attn.k_proj.weight[p + hidden // 2, const] = math.sqrt(sharpness) * scale * math.sin(theta[p])
        for i in range(k):  # the value is the current-token one-hot; the output writes it to "previous"
            attn.v_proj.weight[i, i] = scale
            attn.o_proj.weight[k + i, i] = 1.0
        out_scale = math.sqrt(3 / hidden)  # RMS of current + previous + const after the final norm
        for (prev, cur), nxt in transitions.items():
            model.lm_head.weight[nxt, slot[cur]] = VOTE * out_scale
            model.lm_head.weight[nxt, k + slot[prev]] = VOTE * out_scale
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def steered_prompt(verbosity: int) -> str:
    from steerray.attributes import steering_label
    from steerray.templates import generation_prompt

    return generation_prompt([{"role": "user", "content": QUESTION}], steering_label({"verbosity": verbosity}))


def steerable_model_dir(end_with_eos: bool = False) -> str:
    """The scripted model, built once per machine under the steerray cache (like the tiny-llama alias)."""
    import functools

    from steerray.models.loading import _build_once, cache_dir

    name = "tests-steerable-llama-eos-v1" if end_with_eos else "tests-steerable-llama-v1"
    return str(_build_once(cache_dir() / name, functools.partial(build_steerable_model, end_with_eos=end_with_eos)))


def start_server(model: str, *, token: str | None = None, app_name: str = "test-chat", **fields) -> str:
    """Deploy the chat app on the session's Ray at a free loopback port; returns its URL."""
    from steerray.config import ServeConfig
    from steerray.serving.chat_app import start_chat_server

    # A generous batch window makes concurrent requests meet in one batch on a busy 2-core box.
    config = ServeConfig(model=model, port=free_port(), app_name=app_name, cpus_per_replica=0.5,
                         **{"batch_wait_ms": 50.0, **fields})
    return start_chat_server(config, token=token)
