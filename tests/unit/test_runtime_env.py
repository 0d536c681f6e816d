"""The settings steerray gives Ray before it starts: which go to every Ray, which only to the embedded one,
and that a user's own value always wins (no Ray needed)."""

from __future__ import annotations

import os

import pytest

from steerray.ray_env import EMBEDDED_ENV, IMPORT_TIME_ENV, prepare_environment


@pytest.fixture
def bare_env(monkeypatch):
    for key in (*IMPORT_TIME_ENV, *EMBEDDED_ENV, "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_the_embedded_ray_gets_loopback_and_no_preemption_watcher(bare_env):
    prepare_environment()
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # every socket on 127.0.0.1
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"  # one local node is never drained
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"


def test_a_cluster_keeps_ray_defaults_beyond_the_import_time_settings(bare_env):
    bare_env.setenv("RAY_ADDRESS", "ray://head:10001")
    prepare_environment()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    for key in EMBEDDED_ENV:  # a cluster's nodes can be drained, and its driver must not bind to loopback
        assert key not in os.environ, key


def test_a_users_own_values_win(bare_env):
    bare_env.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    bare_env.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")
    prepare_environment()
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "2"
