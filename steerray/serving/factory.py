"""Building the serving engine a config asks for: the in-house transformers engine or vLLM."""

from __future__ import annotations

from steerray.serving.engines import Engine, TransformersEngine, choose_engine
from steerray.serving.vllm_engine import VLLMEngine


def make_engine(kind: str, model: str, *, max_batch_size: int = 16, batch_wait_ms: float = 10.0,
                max_model_len: int | None = None, precision: str = "auto", threads: int | None = None,
                gpu_memory_utilization: float = 0.85, trust_remote_code: bool = False) -> Engine:
    """Build the engine ``kind`` (auto, transformers, vllm) for ``model`` (folder, hub id or alias)."""
    chosen = choose_engine(kind)
    if chosen == "vllm":
        return VLLMEngine(model, max_model_len=max_model_len, precision=precision, max_batch_size=max_batch_size,
                          gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=trust_remote_code)
    return TransformersEngine(model, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                              max_model_len=max_model_len, precision=precision, threads=threads,
                              trust_remote_code=trust_remote_code)
