"""The fault-tolerance suite: kills of real processes (drivers, Ray Train workers, Serve replicas, nodes)."""

from __future__ import annotations


def pytest_configure(config) -> None:
    # Registered here so `--strict-markers` accepts it; pyproject.toml lists it too once the lead adds it.
    config.addinivalue_line("markers", "faults: kills real processes (CPU, each test bounded to ~90 s)")
