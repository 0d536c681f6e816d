"""vLLM's engine arguments as steerray sets them (no vLLM needed): the KV cache a CPU gets, loopback, eager."""

from __future__ import annotations

import os
from types import SimpleNamespace

from steerray.serving.vllm_engine import EAGER_ENV, engine_args, kv_cache_bytes

SMOLLM2 = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)


def test_a_cpu_gets_a_kv_cache_for_its_batch_of_full_contexts_and_loopback(monkeypatch):
    monkeypatch.setenv("VLLM_HOST_IP", "")  # recorded, so the value engine_args sets is undone after the test
    monkeypatch.delenv("VLLM_HOST_IP")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")  # the user's value wins
    monkeypatch.setenv(EAGER_ENV, "1")
    args = engine_args("/models/m", SMOLLM2, device="cpu", dtype="float32", max_model_len=1024, max_batch_size=4)
    # K and V, 30 layers, 3 KV heads of 64, 4 bytes: 46,080 bytes a token; 4 contexts of 1,024 plus 64 MiB.
    assert args["kv_cache_memory_bytes"] == 2 * 30 * 3 * 64 * 4 * 1024 * 4 + 64 * 1024**2
    assert args["kv_cache_memory_bytes"] == kv_cache_bytes(SMOLLM2, 1024, 4, "float32")
    assert "gpu_memory_utilization" not in args
    assert args["max_num_seqs"] == 4 and args["enforce_eager"] is True and args["trust_remote_code"] is False
    assert os.environ["VLLM_HOST_IP"] == "127.0.0.1" and os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"


def test_a_gpu_gets_a_memory_share_and_no_cpu_settings(monkeypatch):
    monkeypatch.delenv(EAGER_ENV, raising=False)
    monkeypatch.delenv("VLLM_HOST_IP", raising=False)
    args = engine_args("/models/m", SMOLLM2, device="cuda", dtype="bfloat16", max_model_len=2048, max_batch_size=16,
                       gpu_memory_utilization=0.6)
    assert args["gpu_memory_utilization"] == 0.6 and "kv_cache_memory_bytes" not in args
    assert args["dtype"] == "bfloat16" and args["enforce_eager"] is False
    assert "VLLM_HOST_IP" not in os.environ
